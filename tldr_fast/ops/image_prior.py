"""``image_prior``: total variation (TV), the pixel-range penalty (Pix) and the pixel moments (Moments)
of a batch of images (DESIGN.md §2.4, §2.6).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import _spec
from ._spec import OpSpec

Tensor = torch.Tensor

NAME = "image_prior"
TERMS = ("tv", "pix", "moments")
# The pixel std of the Moments term is sqrt(max(var, MOMENT_VAR_EPS)) (finite gradient on flat images).
MOMENT_VAR_EPS = 1e-12


def check(images: Tensor, weights: Tensor, lo: float = -1.0, hi: float = 1.0, moments: Optional[Tensor] = None) -> None:
    """``images`` a non-empty floating [B, C, H, W], ``weights`` [3], finite ``lo < hi``, ``moments`` None
    or a floating [2, C]; one device."""
    _spec.floating(NAME, "images", images)
    if images.dim() != 4 or images.numel() == 0:
        _spec.fail(NAME, f"images must be a non-empty [B, C, H, W], got {list(images.shape)}")
    _spec.weights(NAME, weights, len(TERMS))
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        _spec.fail(NAME, f"needs finite lo < hi, got lo={lo!r}, hi={hi!r}")
    if moments is not None:
        _spec.floating(NAME, "moments", moments)
        if _spec.shape(moments) != (2, images.shape[1]):
            _spec.fail(NAME, f"moments must be [2, C] with C = {images.shape[1]}, got {list(moments.shape)}")
    _spec.same_device(NAME, "images", images=images, weights=weights, moments=moments)


def fake(images, weights, lo, hi, moments):
    """``(loss [], terms [3], grad_images [B, C, H, W])``."""
    acc = _spec.acc_dtype(images.dtype)
    return (images.new_empty((), dtype=acc), images.new_empty((len(TERMS),), dtype=acc), images.new_empty(images.shape))


SPEC = OpSpec(
    name=NAME,
    position=2,
    schema="(Tensor images, Tensor weights, float lo, float hi, Tensor? moments)"
    " -> (Tensor loss, Tensor terms, Tensor grad_images)",
    check=check,
    fake=fake,
    auto={"cuda": ("extension", "triton", "torch"), "cpu": ("extension", "torch")},
    files=(
        "tldr_fast/reference.py",
        "kernels/image_prior.py",
        "csrc/cpu/image_prior.cpp",
        "csrc/cuda/image_prior.cu",
        "tests/test_image_prior.py",
        "tests/test_image_prior_triton.py",
        "benchmarks/benchmark_image_prior.py",
    ),
    terms=TERMS,
    grad_inputs=(0,),
    weights_arg=1,
)
