"""Every op of tldr_fast, declared once (one file per op: ``tldr_fast/ops/<op>.py``).

A declaration (``OpSpec``) holds the op's schema, term names, input check, fake (meta) rule, the
autograd rule of its fused form, the order in which ``backend="auto"`` tries its implementations, and
``files``: its implementations, tests and benchmark (the one file map per op; CONTRIBUTING.md, "Adding
an op"). The implementations register against it: ``tldr_fast.reference`` (the oracle),
``tldr_fast.torch_ops``, ``kernels/`` (Triton) and the C++/CUDA extension (``csrc/``, loaded by
``tldr_fast.extension``); the lists of ops in those modules and in the tests are derived from ``SPECS``.
This package imports nothing from tldr_fast; the kernels import nothing from tldr_fast but this package.

``LOSS_OPS`` are the ops with terms; ``TERMS`` their term names, in the order of the per-step term
vector (the step adds its own terms after these: ``tldr_fast.config.TERMS``).
"""

from __future__ import annotations

from typing import Dict, Tuple

from . import bn_stats, feature_loss, head_loss, image_prior, mode_seek, pairwise_ssim, perturb
from ._spec import OpSpec

# The order of OPS, and of LOSS_OPS' terms in the per-step term vector (the weights rows, the history and the
# checkpoints follow it): a new op is appended.
SPECS: Dict[str, OpSpec] = {
    m.SPEC.name: m.SPEC for m in (head_loss, feature_loss, image_prior, perturb, bn_stats, mode_seek, pairwise_ssim)
}
OPS: Tuple[str, ...] = tuple(SPECS)
LOSS_OPS: Tuple[str, ...] = tuple(name for name, spec in SPECS.items() if spec.terms)

__all__ = ["LOSS_OPS", "OPS", "SPECS", "OpSpec"]
