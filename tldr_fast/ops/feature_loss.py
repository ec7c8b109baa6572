"""``feature_loss``: mean pairwise cosine similarity (Cos) and orthogonality (Ortho) of the penultimate
features, over all pairs of the batch or over the pairs of the same label, by closed forms, and DAFL's
activation loss (Act = -mean |phi|, over every row whatever the pairs) (DESIGN.md §2.4, §2.6).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _spec
from ._spec import OpSpec

Tensor = torch.Tensor

NAME = "feature_loss"
TERMS = ("cos", "ortho", "activation")
# Features are divided by max(||phi||, NORM_EPS), as F.normalize does.
NORM_EPS = 1e-12


def check(features: Tensor, weights: Tensor, labels: Optional[Tensor] = None, num_classes: int = 0) -> None:
    """``features`` [B >= 2, D > 0] floating, ``weights`` [3] (``TERMS``); ``labels`` None or [B] integers in
    ``[0, num_classes)`` with ``num_classes >= 1`` (values checked on CPU tensors); one device."""
    _spec.floating(NAME, "features", features)
    if features.dim() != 2 or features.shape[0] < 2 or features.shape[1] == 0:
        _spec.fail(NAME, f"features must be [B, D] with B >= 2 and D > 0, got {list(features.shape)}")
    _spec.weights(NAME, weights, len(TERMS))
    if labels is not None:
        _spec.integer(NAME, "labels", labels)
        if _spec.shape(labels) != features.shape[:1]:
            _spec.fail(NAME, f"labels must be [B] with B = {features.shape[0]}, got {list(labels.shape)}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            _spec.fail(NAME, f"num_classes must be an int >= 1 with labels, got {num_classes!r}")
    _spec.same_device(NAME, "features", features=features, weights=weights, labels=labels)
    if labels is not None:
        _spec.labels_in_range(NAME, labels, num_classes)


def fake(features, weights, labels, num_classes):
    """``(loss [], terms [3], grad_features [B, D])``."""
    acc = _spec.acc_dtype(features.dtype)
    return (
        features.new_empty((), dtype=acc),
        features.new_empty((len(TERMS),), dtype=acc),
        features.new_empty(features.shape),
    )


SPEC = OpSpec(
    name=NAME,
    position=1,
    schema="(Tensor features, Tensor weights, Tensor? labels, int num_classes)"
    " -> (Tensor loss, Tensor terms, Tensor grad_features)",
    check=check,
    fake=fake,
    auto={"cuda": ("extension", "triton", "torch"), "cpu": ("extension", "torch")},
    files=(
        "tldr_fast/reference.py",
        "kernels/feature_loss.py",
        "csrc/cpu/feature_loss.cpp",
        "csrc/cuda/feature_loss.cu",
        "tests/test_feature_loss.py",
        "tests/test_feature_loss_triton.py",
        "benchmarks/benchmark_feature_loss.py",
    ),
    terms=TERMS,
    grad_inputs=(0,),
    weights_arg=1,
)
