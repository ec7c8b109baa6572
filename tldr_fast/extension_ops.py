"""The ops of backend ``"extension"`` (the C++/CUDA extension, ``csrc/``), with the reference's signatures.

Each checks its arguments against the op's declaration (``tldr_fast/ops/<op>.py``), as every backend
does, and calls ``torch.ops.tldr_fast.<op>``, whose loss ops return ``(loss, terms, grad_<input>...)``
(their gradients come out of the forward; ``csrc/autograd.cpp`` scales them in the backward). The
library is loaded by ``tldr_fast.extension`` on first use.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import extension
from .errors import BackendUnavailable
from .ops import bn_stats as _bn_stats
from .ops import feature_loss as _feature_loss
from .ops import head_loss as _head_loss
from .ops import image_prior as _image_prior
from .ops import mode_seek as _mode_seek
from .ops import pairwise_ssim as _pairwise_ssim

Tensor = torch.Tensor


def _ops():
    """``torch.ops.tldr_fast``, the library loaded (on first use), or BackendUnavailable with the reason."""
    if extension.load().module is None:
        raise BackendUnavailable(extension.unavailable("cpu"))
    return torch.ops.tldr_fast


def head_loss(
    logits: Tensor,
    condition: Tensor,
    labels: Tensor,
    features: Optional[Tensor],
    weights: Tensor,
    head_bias: bool = True,
) -> Tuple[Tensor, Tensor]:
    """``tldr_fast.reference.head_loss`` in one fused kernel: ``(loss [], terms [5])``."""
    _head_loss.check(logits, condition, labels, features, weights, head_bias)
    loss, terms, _, _ = _ops().head_loss(logits, condition, labels, features, weights, bool(head_bias))
    return loss, terms


def feature_loss(
    features: Tensor, weights: Tensor, labels: Optional[Tensor] = None, num_classes: int = 0
) -> Tuple[Tensor, Tensor]:
    """``tldr_fast.reference.feature_loss`` by the closed forms: ``(loss [], terms [2])``; with ``labels``
    over same-label pairs."""
    _feature_loss.check(features, weights, labels, num_classes)
    loss, terms, _ = _ops().feature_loss(features, weights, labels, int(num_classes))
    return loss, terms


def image_prior(
    images: Tensor, weights: Tensor, lo: float = -1.0, hi: float = 1.0, moments: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """``tldr_fast.reference.image_prior`` in one pass (two with ``moments``): ``(loss [], terms [3])``."""
    _image_prior.check(images, weights, lo, hi, moments)
    loss, terms, _ = _ops().image_prior(images, weights, float(lo), float(hi), moments)
    return loss, terms


def bn_stats(activations: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """``tldr_fast.reference.bn_stats`` in one pass over the activations (its backward one more): the value
    ``[]``, differentiable w.r.t. ``activations``."""
    _bn_stats.check(activations, running_mean, running_var)
    value, _, _ = _ops().bn_stats(activations, running_mean, running_var)
    return value


def mode_seek(images: Tensor, latents: Tensor) -> Tensor:
    """``tldr_fast.reference.mode_seek`` in one pass over the image pairs (its backward one more): the value
    ``[]``, differentiable w.r.t. ``images`` only."""
    _mode_seek.check(images, latents)
    value, _ = _ops().mode_seek(images, latents)
    return value


def pairwise_ssim(a: Tensor, b: Tensor, data_range: float = 1.0) -> Tensor:
    """``tldr_fast.reference.pairwise_ssim``: the ``[N, M]`` SSIM matrix."""
    _pairwise_ssim.check(a, b, data_range)
    return _ops().pairwise_ssim(a, b, float(data_range))
