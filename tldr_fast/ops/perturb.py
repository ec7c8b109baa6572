"""``perturb``: ``clip(x + eps * s, lo, hi)`` with seeded noise ``s`` of a given kind, optionally moved by a
per-image affine transform in the same op (DESIGN.md §2.3).

With ``theta`` (``[B, 2, 3]``, ``F.affine_grid``'s convention, ``align_corners=False``) the op is
``warp(clip(x + eps * s, lo, hi), theta, fill=lo, mode)`` (``tldr_fast.reference.warp``): each output pixel
samples the perturbed, clipped images ("bilinear" or "nearest"); pixels from outside read ``lo``. The
noise is that of the op without ``theta`` (same seed, same element); ``theta`` gets no gradient from the
fused kernel.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from . import _spec
from ._spec import OpSpec

Tensor = torch.Tensor

NAME = "perturb"
PERTURBATIONS = ("rademacher", "uniform", "gaussian")
WARP_MODES = ("bilinear", "nearest")  # F.grid_sample's modes


def check(
    images: Tensor,
    eps: float,
    lo: float,
    hi: float,
    kind: str,
    seed: int,
    theta: Optional[Tensor] = None,
    mode: str = "bilinear",
) -> None:
    """``images`` a floating tensor, finite ``eps >= 0`` and ``lo <= hi``, ``kind`` one of
    ``PERTURBATIONS``, an int ``seed``, ``mode`` one of ``WARP_MODES``; ``theta`` None, or with ``images``
    ``[B, C, H, W]`` a floating ``[B, 2, 3]`` tensor on their device with finite values (checked on CPU
    tensors only: ``_spec.values_readable``)."""
    _spec.floating(NAME, "images", images)
    if not (math.isfinite(eps) and eps >= 0):
        _spec.fail(NAME, f"eps must be finite and >= 0, got {eps!r}")
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        _spec.fail(NAME, f"needs finite lo <= hi, got lo={lo!r}, hi={hi!r}")
    kind_index(kind)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        _spec.fail(NAME, f"seed must be an int, got {seed!r}")
    mode_index(mode)
    if theta is None:
        return
    _spec.floating(NAME, "theta", theta)
    if images.dim() != 4:
        _spec.fail(NAME, f"images must be [B, C, H, W] with theta, got shape {list(images.shape)}")
    if _spec.shape(theta) != (images.shape[0], 2, 3):
        _spec.fail(NAME, f"theta must be [B, 2, 3] with B = {images.shape[0]}, got {list(theta.shape)}")
    _spec.same_device(NAME, "images", images=images, theta=theta)
    _spec.finite(NAME, "theta", theta)


def kind_index(kind: str) -> int:
    """The ``kind`` argument of the op: the index of the perturbation in ``PERTURBATIONS``."""
    if kind not in PERTURBATIONS:
        _spec.fail(NAME, f"unknown perturbation {kind!r}; expected one of {PERTURBATIONS}")
    return PERTURBATIONS.index(kind)


def mode_index(mode: str) -> int:
    """The ``mode`` argument of the op: the index of the resampling in ``WARP_MODES``."""
    if mode not in WARP_MODES:
        _spec.fail(NAME, f"unknown warp mode {mode!r}; expected one of {WARP_MODES}")
    return WARP_MODES.index(mode)


def fake(images, eps, lo, hi, kind, seed, theta=None, mode=0):
    """The perturbed images: the shape and dtype of ``images``."""
    return images.new_empty(images.shape)


SPEC = OpSpec(
    name=NAME,
    position=3,
    schema="(Tensor images, float eps, float lo, float hi, int kind, int seed, Tensor? theta=None, int mode=0) -> Tensor",
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
