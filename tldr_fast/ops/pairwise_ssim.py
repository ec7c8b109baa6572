"""``pairwise_ssim``: SSIM of every image of ``a`` against every image of ``b``, as scikit-image defines it
(DESIGN.md §6). Evaluation only: no gradient. ``tldr_fast.ssim`` drives it over blocks of any size.
"""

from __future__ import annotations

import math

import torch

from . import _spec
from ._spec import OpSpec

Tensor = torch.Tensor

NAME = "pairwise_ssim"
# scikit-image's defaults: a uniform 7x7 window, K1, K2, sample covariance.
SSIM_WIN = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def check(a: Tensor, b: Tensor, data_range: float = 1.0) -> None:
    """``a`` [N, C, H, W] and ``b`` [M, C, H, W] with the same C, H, W >= 7, floating or uint8, on one
    device; a finite ``data_range > 0``."""
    for name, x in (("a", a), ("b", b)):
        _spec.tensor(NAME, name, x)
        if x.dim() != 4:
            _spec.fail(NAME, f"a and b must be [N, C, H, W] and [M, C, H, W], got {list(a.shape)} and {list(b.shape)}")
        if not (x.dtype.is_floating_point or x.dtype == torch.uint8):
            _spec.fail(NAME, f"images must be uint8 or floating point, got {x.dtype}")
    if a.shape[1:] != b.shape[1:]:
        _spec.fail(NAME, f"a and b must have the same [C, H, W], got {list(a.shape)} and {list(b.shape)}")
    if a.shape[2] < SSIM_WIN or a.shape[3] < SSIM_WIN:
        _spec.fail(NAME, f"SSIM uses a 7x7 window, images must be at least 7x7, got {list(a.shape)}")
    _spec.same_device(NAME, "a", a=a, b=b)
    if not (math.isfinite(data_range) and data_range > 0):
        _spec.fail(NAME, f"data_range must be finite and > 0, got {data_range!r}")


def fake(a, b, data_range):
    """The ``[N, M]`` SSIM matrix, fp32 (fp64 when an input is fp64)."""
    return a.new_empty((a.shape[0], b.shape[0]), dtype=_spec.acc_dtype(a.dtype, b.dtype))


SPEC = OpSpec(
    name=NAME,
    position=6,
    schema="(Tensor a, Tensor b, float data_range) -> Tensor",
    check=check,
    fake=fake,
    # on a GPU the Triton kernel first: 56 ms for 1,000 x 60,000 on an H200 against 197 ms for the
    # extension's CUDA kernel (BENCHMARKS.md)
    auto={"cuda": ("triton", "extension", "torch"), "cpu": ("extension", "torch")},
    files=(
        "tldr_fast/reference.py",
        "tldr_fast/torch_ops.py",
        "kernels/pairwise_ssim.py",
        "csrc/cpu/pairwise_ssim.cpp",
        "csrc/cuda/pairwise_ssim.cu",
        "tests/test_pairwise_ssim.py",
        "benchmarks/benchmark_pairwise_ssim.py",
    ),
)
