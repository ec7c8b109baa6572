"""``head_loss``: CE and KL(c || p) on the clean and perturbed logits, and the closed-form grad-norm of
the classifier's linear head (DESIGN.md §2.4, §2.6).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _spec
from ._spec import OpSpec

Tensor = torch.Tensor

NAME = "head_loss"
TERMS = ("ce", "kl", "ce_pert", "kl_pert", "grad_norm")


def check(
    logits: Tensor,
    condition: Tensor,
    labels: Tensor,
    features: Optional[Tensor],
    weights: Tensor,
    head_bias: bool = True,
) -> None:
    """``logits`` [N, K] with N = B or 2B, ``condition`` [B, K], ``labels`` [B] integers in [0, K) (values
    checked on CPU tensors), ``features`` None or [B, D], ``weights`` [5]; floating tensors, one device."""
    _spec.floating(NAME, "logits", logits)
    _spec.floating(NAME, "condition", condition)
    if logits.dim() != 2:
        _spec.fail(NAME, f"logits must be [N, K], got {list(logits.shape)}")
    if condition.dim() != 2:
        _spec.fail(NAME, f"condition must be [B, K], got {list(condition.shape)}")
    n, k = logits.shape
    b = condition.shape[0]
    if b == 0 or k == 0:
        _spec.fail(NAME, f"needs B > 0 and K > 0, got condition {list(condition.shape)}")
    if condition.shape[1] != k:
        _spec.fail(NAME, f"condition must be [B, K] with K = {k}, got {list(condition.shape)}")
    if n not in (b, 2 * b):
        _spec.fail(NAME, f"logits must have B or 2B rows (B = {b}), got {n}")
    _spec.integer(NAME, "labels", labels)
    if _spec.shape(labels) != (b,):
        _spec.fail(NAME, f"labels must be [B] with B = {b}, got {list(labels.shape)}")
    if features is not None:
        _spec.floating(NAME, "features", features)
        if features.dim() != 2 or features.shape[0] != b or features.shape[1] == 0:
            _spec.fail(NAME, f"features must be [B, D] with B = {b} and D > 0, got {list(features.shape)}")
    _spec.weights(NAME, weights, len(TERMS))
    _spec.same_device(
        NAME, "logits", logits=logits, condition=condition, labels=labels, features=features, weights=weights
    )
    _spec.labels_in_range(NAME, labels, k)


def fake(logits, condition, labels, features, weights, head_bias):
    """``(loss [], terms [5], grad_logits [N, K], grad_features [B, D] or [0])``."""
    acc = _spec.acc_dtype(logits.dtype, *(() if features is None else (features.dtype,)))
    grad_features = logits.new_empty((0,)) if features is None else features.new_empty(features.shape)
    return (
        logits.new_empty((), dtype=acc),
        logits.new_empty((len(TERMS),), dtype=acc),
        logits.new_empty(logits.shape),
        grad_features,
    )


SPEC = OpSpec(
    name=NAME,
    position=0,
    schema="(Tensor logits, Tensor condition, Tensor labels, Tensor? features, Tensor weights, bool head_bias)"
    " -> (Tensor loss, Tensor terms, Tensor grad_logits, Tensor grad_features)",
    check=check,
    fake=fake,
    auto={"cuda": ("extension", "triton", "torch"), "cpu": ("extension", "torch")},
    files=(
        "tldr_fast/reference.py",
        "kernels/head_loss.py",
        "csrc/cpu/head_loss.cpp",
        "csrc/cuda/head_loss.cu",
        "tests/test_head_loss.py",
        "tests/test_head_loss_triton.py",
        "benchmarks/benchmark_head_loss.py",
    ),
    terms=TERMS,
    grad_inputs=(0, 3),
    weights_arg=4,
)
