"""``mode_seek``: the mode-seeking term (MSGAN, Mao et al. 2019; DESIGN.md §2.4) of a paired batch: rows
``i`` and ``i + h`` (``h = B // 2``) share a label and differ in their latents;

    value = 1 / (mean_i r_i + 1e-5),   r_i = d_x(i) / max(d_z(i), 1e-12)

with ``d_x(i)`` the mean absolute difference of the two images (``P`` elements each) and ``d_z(i)`` that
of their latents; an unpaired last row of an odd batch is left out. Differentiable w.r.t. the images
only (the latents are sampled noise).

The fused form returns ``(value [], coef [h])`` and its backward is one elementwise pass: with
``S = mean_i r_i``, ``d value / d r_i = -1 / (h (S + 1e-5)^2)`` and ``d r_i / d x_i = sign(x_i - x_{i+h}) / (P dz_i)``
(``dz_i = max(d_z(i), 1e-12)``; the sign of 0 is 0, as autograd's ``abs``), so

    coef_i = -1 / (h P dz_i (S + 1e-5)^2),
    d value / d x_i = coef_i sign(x_i - x_{i+h}),   d value / d x_{i+h} = -coef_i sign(x_i - x_{i+h}),

and 0 for the unpaired last row.
"""

from __future__ import annotations

import torch

from . import _spec
from ._spec import OpSpec

Tensor = torch.Tensor

NAME = "mode_seek"


def check(images: Tensor, latents: Tensor) -> None:
    """``images`` a floating ``[B, ...]`` and ``latents`` a floating ``[B, ...]`` with the same B >= 2, each
    row non-empty; one device."""
    _spec.floating(NAME, "images", images)
    _spec.floating(NAME, "latents", latents)
    if images.dim() < 2 or images.shape[0] < 2 or images[0].numel() == 0:
        _spec.fail(NAME, f"images must be [B, ...] with B >= 2 (pairs of rows i, i + B/2), got {list(images.shape)}")
    if latents.dim() < 2 or latents.shape[0] != images.shape[0] or latents[0].numel() == 0:
        _spec.fail(NAME, f"latents must be [B, ...] with B = {images.shape[0]}, got {list(latents.shape)}")
    _spec.same_device(NAME, "images", images=images, latents=latents)


def fake(images, latents):
    """``(value [], coef [h])`` in the accumulation dtype."""
    acc = _spec.acc_dtype(images.dtype)
    return images.new_empty((), dtype=acc), images.new_empty((images.shape[0] // 2,), dtype=acc)


def fake_backward(grad, images, coef):
    """The gradient w.r.t. ``images``: its shape and dtype."""
    return images.new_empty(images.shape)


SPEC = OpSpec(
    name=NAME,
    position=5,
    schema="(Tensor images, Tensor latents) -> (Tensor value, Tensor coef)",
    check=check,
    fake=fake,
    auto={"cuda": ("extension", "triton", "torch"), "cpu": ("extension", "torch")},
    files=(
        "tldr_fast/reference.py",
        "kernels/mode_seek.py",
        "csrc/cpu/mode_seek.cpp",
        "csrc/cuda/mode_seek.cu",
        "tests/test_mode_seek.py",
        "tests/test_mode_seek_triton.py",
        "benchmarks/benchmark_mode_seek.py",
    ),
    helpers=(("mode_seek_backward", "(Tensor grad, Tensor images, Tensor coef) -> Tensor", fake_backward),),
)
