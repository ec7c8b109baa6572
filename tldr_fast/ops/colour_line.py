"""``colour_line``: how far each image's pixel colours lie off one line in colour space (DESIGN.md §2.4):

    value = (1/B) sum_i (tr S_i - lambda_1(S_i)),   S_i = (1/N) sum_p (x_p - m_i)(x_p - m_i)^T   [3, 3]

over the ``N = H W`` pixels ``x_p`` (an RGB 3-vector each) of image i, ``m_i`` their mean colour and
``lambda_1`` the largest eigenvalue: the variance of the colours off their principal line. It is 0 exactly
for an image drawn in one ink on one background (its colours are the two and their blends), whatever the
two colours are; a per-image prior, where the BatchNorm statistics constrain colours only over the batch.

Gradient (the derivative of an eigenvalue of a symmetric matrix is ``v v^T``, ``v`` its unit eigenvector;
the mean's own derivative cancels since ``sum_p (x_p - m_i) = 0``):

    d value / d x_p = (2 / (B N)) (I - v_i v_i^T)(x_p - m_i),

the part of the pixel's deviation off the principal direction ``v_i``. The fused form returns
``(value [], coef [B, 2, 3])`` with ``coef[i] = (m_i, v_i)``, and its backward is one elementwise pass
(``colour_line_backward``). ``v_i`` is defined up to sign (the gradient does not depend on it) and is
arbitrary where ``lambda_1`` is not simple (an isotropic or a flat image; there the reference's ``eigh``
picks one too).
"""

from __future__ import annotations

import torch

from . import _spec
from ._spec import OpSpec

Tensor = torch.Tensor

NAME = "colour_line"
CHANNELS = 3  # RGB: the kernels solve the 3 x 3 eigenproblem in closed form


def check(images: Tensor) -> None:
    """``images`` a floating ``[B, 3, H, W]``, B, H, W >= 1."""
    _spec.floating(NAME, "images", images)
    if images.dim() != 4 or images.shape[1] != CHANNELS or images.numel() == 0:
        _spec.fail(NAME, f"images must be a non-empty [B, 3, H, W] (RGB), got {list(images.shape)}")


def fake(images):
    """``(value [], coef [B, 2, 3])`` in the accumulation dtype."""
    acc = _spec.acc_dtype(images.dtype)
    return images.new_empty((), dtype=acc), images.new_empty((images.shape[0], 2, CHANNELS), dtype=acc)


def fake_backward(grad, images, coef):
    """The gradient w.r.t. ``images``: its shape and dtype."""
    return images.new_empty(images.shape)


SPEC = OpSpec(
    name=NAME,
    position=7,
    schema="(Tensor images) -> (Tensor value, Tensor coef)",
    check=check,
    fake=fake,
    auto={"cuda": ("extension", "triton", "torch"), "cpu": ("extension", "torch")},
    files=(
        "tldr_fast/reference.py",
        "kernels/colour_line.py",
        "csrc/cpu/colour_line.cpp",
        "csrc/cuda/colour_line.cu",
        "tests/test_colour_line.py",
        "tests/test_colour_line_triton.py",
        "benchmarks/benchmark_colour_line.py",
    ),
    helpers=(("colour_line_backward", "(Tensor grad, Tensor images, Tensor coef) -> Tensor", fake_backward),),
)
