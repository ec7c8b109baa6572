"""``perturb``: ``clip(x + eps * s, lo, hi)`` with seeded noise ``s`` of a given kind (DESIGN.md §2.3).

reference   tldr_fast/reference.py            perturb
Triton      kernels/perturb.py                tldr_triton::perturb (its own Philox noise)
extension   none (the Triton kernel, or the reference on a CPU)
tests       tests/test_perturb.py, tests/test_perturb_triton.py
benchmark   benchmarks/benchmark_perturb.py
"""

from __future__ import annotations

import math
import numbers

import torch

from . import _spec
from ._spec import OpSpec

Tensor = torch.Tensor

NAME = "perturb"
PERTURBATIONS = ("rademacher", "uniform", "gaussian")


def check(images: Tensor, eps: float, lo: float, hi: float, kind: str, seed: int) -> None:
    """``images`` a floating tensor, finite ``eps >= 0`` and ``lo <= hi``, ``kind`` one of
    ``PERTURBATIONS``, an int ``seed``."""
    _spec.floating(NAME, "images", images)
    if not (math.isfinite(eps) and eps >= 0):
        _spec.fail(NAME, f"eps must be finite and >= 0, got {eps!r}")
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        _spec.fail(NAME, f"needs finite lo <= hi, got lo={lo!r}, hi={hi!r}")
    if kind not in PERTURBATIONS:
        _spec.fail(NAME, f"unknown perturbation {kind!r}; expected one of {PERTURBATIONS}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        _spec.fail(NAME, f"seed must be an int, got {seed!r}")


def kind_index(kind: str) -> int:
    """The ``kind`` argument of the op: the index of the perturbation in ``PERTURBATIONS``."""
    if kind not in PERTURBATIONS:
        _spec.fail(NAME, f"unknown perturbation {kind!r}; expected one of {PERTURBATIONS}")
    return PERTURBATIONS.index(kind)


def fake(images, eps, lo, hi, kind, seed):
    """The perturbed images: the shape and dtype of ``images``."""
    return images.new_empty(images.shape)


SPEC = OpSpec(
    name=NAME,
    schema="(Tensor images, float eps, float lo, float hi, int kind, int seed) -> Tensor",
    check=check,
    fake=fake,
    auto={"cuda": ("triton", "torch"), "cpu": ("torch",)},
    files=(
        "tldr_fast/reference.py",
        "kernels/perturb.py",
        "tests/test_perturb.py",
        "tests/test_perturb_triton.py",
        "benchmarks/benchmark_perturb.py",
    ),
    extension=False,
)
