"""``bn_stats``: the BatchNorm-statistics prior of one layer (DeepInversion; DESIGN.md §2.4):
``||mu - running_mean||_2 + ||var - running_var||_2`` with ``mu``, ``var`` the per-channel mean and
population variance of the layer's input over every dimension but the channels.

The fused form returns ``(value [], mean [C], coef [2, C])`` and its backward is one elementwise pass:
with ``M`` the elements per channel, ``dm = mu - running_mean``, ``dv = var - running_var``,

    d value / d x[n, c, ...] = a_c + b_c (x[n, c, ...] - mu_c),
    a_c = dm_c / (M ||dm||),   b_c = 2 dv_c / (M ||dv||)

(``d mu_c / d x = 1 / M``, ``d var_c / d x = 2 (x - mu_c) / M``; a norm that is 0 contributes 0, as
autograd's norm does), so ``coef = (a, b)`` and the gradient is ``grad * (a_c + b_c (x - mu_c))``.
"""

from __future__ import annotations

import torch

from . import _spec
from ._spec import OpSpec

Tensor = torch.Tensor

NAME = "bn_stats"


def check(activations: Tensor, running_mean: Tensor, running_var: Tensor) -> None:
    """``activations`` a non-empty floating ``[N, C, ...]`` (N >= 1, at least 2 dimensions), ``running_mean``
    and ``running_var`` floating ``[C]``; one device."""
    _spec.floating(NAME, "activations", activations)
    if activations.dim() < 2 or activations.numel() == 0:
        _spec.fail(NAME, f"activations must be a non-empty [N, C, ...], got {list(activations.shape)}")
    c = activations.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        _spec.floating(NAME, name, t)
        if t.shape != (c,):
            _spec.fail(NAME, f"{name} must be [C] with C = {c}, got {list(t.shape)}")
    _spec.same_device(NAME, "activations", activations=activations, running_mean=running_mean, running_var=running_var)


def fake(activations, running_mean, running_var):
    """``(value [], mean [C], coef [2, C])`` in the accumulation dtype."""
    acc = _spec.acc_dtype(activations.dtype)
    c = activations.shape[1]
    return (
        activations.new_empty((), dtype=acc),
        activations.new_empty((c,), dtype=acc),
        activations.new_empty((2, c), dtype=acc),
    )


def fake_backward(grad, activations, mean, coef):
    """The gradient w.r.t. ``activations``: its shape and dtype."""
    return activations.new_empty(activations.shape)


SPEC = OpSpec(
    name=NAME,
    position=4,
    schema="(Tensor activations, Tensor running_mean, Tensor running_var) -> (Tensor value, Tensor mean, Tensor coef)",
    check=check,
    fake=fake,
    auto={"cuda": ("extension", "triton", "torch"), "cpu": ("extension", "torch")},
    files=(
        "tldr_fast/reference.py",
        "kernels/bn_stats.py",
        "csrc/cpu/bn_stats.cpp",
        "csrc/cuda/bn_stats.cu",
        "tests/test_bn_stats.py",
        "tests/test_bn_stats_triton.py",
        "benchmarks/benchmark_bn_stats.py",
    ),
    helpers=(
        ("bn_stats_backward", "(Tensor grad, Tensor activations, Tensor mean, Tensor coef) -> Tensor", fake_backward),
    ),
)
