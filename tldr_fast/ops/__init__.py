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

import importlib
import pkgutil
from typing import Dict, Tuple

from ._spec import OpSpec


def _declared() -> Dict[str, OpSpec]:
    """The ``SPEC`` of every module of this package, in the order of their ``position``s (distinct)."""
    specs = sorted(
        (
            importlib.import_module(f"{__name__}.{m.name}").SPEC
            for m in pkgutil.iter_modules(__path__)
            if m.name[0] != "_"
        ),
        key=lambda spec: spec.position,
    )
    positions = [spec.position for spec in specs]
    if positions != list(range(len(specs))):
        raise RuntimeError(f"the ops' positions must be 0..{len(specs) - 1}, each once; got {positions}")
    return {spec.name: spec for spec in specs}


# The order of OPS, and of LOSS_OPS' terms in the per-step term vector (the weights rows, the history and the
# checkpoints follow it): each op's declared position; a new op takes the next one.
SPECS: Dict[str, OpSpec] = _declared()
OPS: Tuple[str, ...] = tuple(SPECS)
LOSS_OPS: Tuple[str, ...] = tuple(name for name, spec in SPECS.items() if spec.terms)

__all__ = ["LOSS_OPS", "OPS", "SPECS", "OpSpec"]
