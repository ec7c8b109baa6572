"""The reference implementation of every op, in plain PyTorch.

This module is the oracle of the test suite: each fused kernel (``kernels/``, Triton) and each op of
the C++/CUDA extension (``csrc/``) computes exactly these functions, with the same names, arguments
and return values. Formulas are those of ``DESIGN.md`` section 2; autograd provides the gradients.
Each op is declared in ``tldr_fast/ops/<op>.py`` (schema, term names, argument check); the functions
here check their arguments with it, as every backend does.

Every loss op follows one contract so that all backends are interchangeable::

    loss, terms = op(inputs..., weights)

``terms`` is a detached fp32 vector of the unweighted loss terms (for logging), ``loss`` the fp32
scalar ``sum(weights * terms)`` through which gradients flow. ``weights`` is an fp32 tensor on the
inputs' device, so schedules change it without a recompile or a host sync.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .ops import bn_stats as _bn_stats
from .ops import colour_line as _colour_line
from .ops import feature_loss as _feature_loss
from .ops import head_loss as _head_loss
from .ops import image_prior as _image_prior
from .ops import mode_seek as _mode_seek
from .ops import pairwise_ssim as _pairwise_ssim
from .ops import perturb as _perturb
from .ops.feature_loss import NORM_EPS
from .ops.image_prior import MOMENT_VAR_EPS
from .ops.pairwise_ssim import SSIM_K1, SSIM_K2, SSIM_WIN
from .ops.perturb import PERTURBATIONS

Tensor = torch.Tensor


def _acc(t: Tensor) -> Tensor:
    """The accumulation dtype: fp64 stays fp64 (for gradcheck), everything else computes in fp32."""
    return t if t.dtype == torch.float64 else t.float()


def head_loss(
    logits: Tensor,
    condition: Tensor,
    labels: Tensor,
    features: Optional[Tensor],
    weights: Tensor,
    head_bias: bool = True,
) -> Tuple[Tensor, Tensor]:
    """CE, KL(c||p) on clean and perturbed logits, and the closed-form head grad-norm.

    Args:
        logits: ``[N, K]`` with N = B (clean only) or 2B (clean rows first, then perturbed).
        condition: ``[B, K]`` conditioning distribution ``c`` (one-hot for hot conditioning).
        labels: ``[B]`` int64 class of each sample (``argmax c``).
        features: ``[B, D]`` penultimate features of the clean images (input of the linear head),
            or None to skip the grad-norm term.
        weights: ``[5]`` fp32 weights of the terms (``tldr_fast.ops.head_loss.TERMS``).
        head_bias: whether the linear head has a bias (adds ``||d CE/db||^2``).

    Returns:
        ``(loss [], terms [5])``: ce, kl, ce_pert, kl_pert, grad_norm (0 where not computed).

    The grad-norm is ``||grad_theta H(c, p)||_2`` over the head's weight W and bias b, where
    ``H(c, p) = -(1/B) sum_i sum_k c_ik log p_ik`` (the CE for hot c). With ``E = P - C``:
    ``grad_W = E^T Phi / B``, ``grad_b = sum_i e_i / B``.
    """
    _head_loss.check(logits, condition, labels, features, weights, head_bias)
    n, k = logits.shape
    b = condition.shape[0]
    logp = F.log_softmax(_acc(logits), dim=1)  # [N, K]
    c = condition.to(logp.dtype)
    zero = logp.new_zeros(())

    def ce_kl(lp: Tensor) -> Tuple[Tensor, Tensor]:
        ce = -lp.gather(1, labels[:, None]).mean()
        # 0 * log 0 = 0: xlogy gives exactly that.
        kl = (torch.xlogy(c, c) - c * lp).sum(1).mean()
        return ce, kl

    ce, kl = ce_kl(logp[:b])
    ce_p, kl_p = ce_kl(logp[b:]) if n == 2 * b else (zero, zero)
    gn = zero
    if features is not None:
        e = logp[:b].exp() - c  # [B, K]
        g = e.t() @ features.to(logp.dtype)  # [K, D]
        s = g.square().sum()
        if head_bias:
            s = s + e.sum(0).square().sum()
        gn = s.sqrt() / b
    terms = torch.stack([ce, kl, ce_p, kl_p, gn])
    return (weights.to(terms.dtype) * terms).sum(), terms.detach()


def feature_loss(
    features: Tensor, weights: Tensor, labels: Optional[Tensor] = None, num_classes: int = 0
) -> Tuple[Tensor, Tensor]:
    """Diversity: mean pairwise cosine similarity and orthogonality of penultimate features, over all
    pairs of the batch or, with ``labels``, over the pairs of the same label only; and the activation
    loss of DAFL (Chen et al. 2019) over every row.

    Args:
        features: ``[B, D]`` with B >= 2.
        weights: ``[3]`` fp32 weights of the terms (``tldr_fast.ops.feature_loss.TERMS``).
        labels: None (all pairs), or ``[B]`` int64 in ``[0, num_classes)``: only pairs with equal labels.
        num_classes: K, with ``labels`` (the per-class sums are ``[K, D]``; no host sync on the labels).

    Returns:
        ``(loss [], terms [3])``. All pairs: ``Cos = (||sum_i u_i||^2 - B) / (B(B-1))`` with
        ``u_i = phi_i / ||phi_i||``; ``Ortho = ||Phi^T Phi||_F^2 - 2||Phi||_F^2 + B`` over ``B^2``
        (equal to ``||Phi Phi^T - I||_F^2 / B^2``), with the smaller Gram matrix.
        Same-label pairs, with ``n_k`` samples of class k and ``S_k = sum_{i: y_i = k} u_i``:
        ``Cos = (sum_k ||S_k||^2 - B) / P`` with ``P = sum_k n_k (n_k - 1)`` the number of ordered
        same-label pairs (0 when P = 0); ``Ortho = ||(Phi Phi^T) o M - I||_F^2 / sum_k n_k^2`` with
        ``M_ij = [y_i = y_j]``, i.e. ``(sum_{i,j: y_i = y_j} (phi_i . phi_j)^2 - 2||Phi||_F^2 + B) / sum_k n_k^2``.
        Every sample of a class is one term of its class; the all-pairs form is the one-class case.
        ``Act = -(1 / (B D)) sum_{i,d} |phi_id|`` over every row, labels or not (large activations, as
        real images excite the classifier's features; d/dphi = -sign(phi) / (B D), sign(0) = 0).
    """
    _feature_loss.check(features, weights, labels, num_classes)
    phi = _acc(features)
    b, d = phi.shape
    u = phi / phi.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    if labels is None:
        cos = (u.sum(0).square().sum() - b) / (b * (b - 1))
        gram = phi.t() @ phi if d <= b else phi @ phi.t()  # [D, D] or [B, B]: same Frobenius norm
        ortho = (gram.square().sum() - 2 * phi.square().sum() + b) / (b * b)
    else:
        s = phi.new_zeros(num_classes, d).index_add_(0, labels, u)  # [K, D]: S_k
        n = phi.new_zeros(num_classes).index_add_(0, labels, phi.new_ones(b))  # [K]: n_k
        cos = (s.square().sum() - b) / (n * (n - 1)).sum().clamp_min(1)
        same = labels[:, None] == labels[None, :]  # [B, B]: M
        ortho = ((phi @ phi.t()).square()[same].sum() - 2 * phi.square().sum() + b) / n.square().sum()
    act = -phi.abs().mean()
    terms = torch.stack([cos, ortho, act])
    return (weights.to(terms.dtype) * terms).sum(), terms.detach()


def image_prior(
    images: Tensor, weights: Tensor, lo: float = -1.0, hi: float = 1.0, moments: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Total variation, pixel-range penalty and pixel moments of a batch of images.

    Args:
        images: ``[B, C, H, W]``.
        weights: ``[3]`` fp32 weights of the terms (``tldr_fast.ops.image_prior.TERMS``).
        lo, hi: the valid pixel range.
        moments: None, or ``[2, C]``: the per-channel mean and std (of images mapped to [0, 1]) of the
            data the classifier was trained on - the normalisation it ships with.

    Returns:
        ``(loss [], terms [3])``: ``TV = (1/B) sum dh^2 + dw^2`` (squared differences of vertical
        and horizontal neighbours), ``Pix = sum relu(x - hi) + relu(lo - x)`` (a sum, as DESIGN.md
        writes it, not a mean), and ``Moments = (1/C) sum_c ((m_c - mu_c)^2 + (s_c - sigma_c)^2) / sigma_c^2``
        where ``m_c`` and ``s_c = sqrt(max(var_c, MOMENT_VAR_EPS))`` are the mean and (population) std of channel c of ``(x - lo) / (hi - lo)``
        over the batch and the pixels: the classifier's normalised input should have zero mean and unit
        variance per channel, as its training data had (0 without ``moments``).
    """
    _image_prior.check(images, weights, lo, hi, moments)
    x = _acc(images)
    b = x.shape[0]
    tv = ((x[:, :, 1:, :] - x[:, :, :-1, :]).square().sum() + (x[:, :, :, 1:] - x[:, :, :, :-1]).square().sum()) / b
    pix = F.relu(x - hi).sum() + F.relu(lo - x).sum()
    mom = x.new_zeros(())
    if moments is not None:
        x01 = (x - lo) / (hi - lo)
        var, mean = torch.var_mean(x01, dim=(0, 2, 3), unbiased=False)  # [C]
        mu, sigma = moments.to(x.dtype)
        std = var.clamp_min(MOMENT_VAR_EPS).sqrt()
        mom = (((mean - mu).square() + (std - sigma).square()) / sigma.square()).mean()
    terms = torch.stack([tv, pix, mom])
    return (weights.to(terms.dtype) * terms).sum(), terms.detach()


def colour_line(images: Tensor) -> Tensor:
    """The mean over images of the variance of each image's pixel colours off their principal line,
    ``(1/B) sum_i (tr S_i - lambda_1(S_i))`` with ``S_i`` the [3, 3] colour covariance of image i's pixels
    (``tldr_fast/ops/colour_line.py``): 0 for an image in one ink on one background. ``images``:
    ``[B, 3, H, W]``; returns ``[]``.

    >>> ink, back = torch.tensor([0.9, 0.1, 0.3]), torch.tensor([-0.5, 0.4, -0.8])
    >>> g = torch.rand(2, 1, 5, 5)  # two grey images drawn in one ink on one background
    >>> abs(float(colour_line(back[:, None, None] + (ink - back)[:, None, None] * g))) < 1e-6
    True
    """
    _colour_line.check(images)
    x = _acc(images).flatten(2)  # [B, 3, N]
    x = x - x.mean(2, keepdim=True)
    cov = x @ x.transpose(1, 2) / x.shape[2]  # [B, 3, 3]
    return torch.linalg.eigvalsh(cov)[:, :-1].sum(1).mean()


def perturb_noise(shape: torch.Size, kind: str, generator: torch.Generator, device, dtype=torch.float32) -> Tensor:
    """Noise ``s`` of a perturbation: Rademacher (+-1), uniform in [-1, 1] or standard Gaussian."""
    if kind == "rademacher":
        return torch.randint(0, 2, shape, generator=generator, device=device).to(dtype) * 2 - 1
    if kind == "uniform":
        return torch.rand(shape, generator=generator, device=device, dtype=dtype) * 2 - 1
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    raise ValueError(f"unknown perturbation {kind!r}; expected one of {PERTURBATIONS}")


def perturb(
    images: Tensor,
    eps: float,
    lo: float,
    hi: float,
    kind: str,
    seed: int,
    theta: Optional[Tensor] = None,
    mode: str = "bilinear",
) -> Tensor:
    """``clip(x + eps * s, lo, hi)`` with noise ``s`` of the given kind drawn from ``seed``; with ``theta``,
    then moved by ``warp(., theta, fill=lo, mode)``.

    Args:
        images: ``[B, C, H, W]`` (any shape works without ``theta``).
        eps: absolute perturbation size, in the images' units.
        lo, hi: clipping range.
        kind: one of ``PERTURBATIONS``.
        seed: the noise is a deterministic function of (seed, shape, device).
        theta: ``[B, 2, 3]`` affine transforms (``warp_theta``), or None (no transform).
        mode: the resampling of the transform, "bilinear" or "nearest" (``warp``).

    The gradient w.r.t. ``images`` is 1 where the clip is inactive and 0 where it clips (then through
    the warp). Backends draw their noise from their own generators: the same seed gives the same images
    within one backend, not across backends.
    """
    _perturb.check(images, eps, lo, hi, kind, seed, theta, mode)
    gen = torch.Generator(device=images.device).manual_seed(int(seed))
    x = _acc(images)
    s = perturb_noise(images.shape, kind, gen, images.device, x.dtype)
    y = (x + eps * s).clamp(lo, hi).to(images.dtype)
    return y if theta is None else warp(y, theta, lo, mode)


def grad_norm_full(logits: Tensor, condition: Tensor, params) -> Tensor:
    """``||grad_theta H(c, p)||_2`` over all classifier parameters, by double backward.

    Args:
        logits: ``[B, K]`` clean logits, part of a graph that reaches ``params``.
        condition: ``[B, K]`` conditioning distribution.
        params: the classifier's parameters (with ``requires_grad``).

    Returns a differentiable scalar (``create_graph=True``).
    """
    logp = F.log_softmax(_acc(logits), dim=1)
    h = -(condition.to(logp.dtype) * logp).sum(1).mean()
    grads = torch.autograd.grad(h, params, create_graph=True, allow_unused=True)
    return torch.sqrt(sum(_acc(g).square().sum() for g in grads if g is not None))


def kkt(logits: Tensor, labels: Tensor, params) -> Tensor:
    """The KKT-direction term: ``1 - cos(theta, g)`` with ``theta`` all classifier parameters (one
    vector) and ``g = -grad_theta sum_i CE(z_i, y_i)`` the descent direction of the batch's
    cross-entropy w.r.t. the parameters, by double backward.

    A network trained long on CE approaches a KKT point of margin maximisation, where
    ``theta = sum_i lambda_i grad_theta m_i(x_i)`` over its training samples with ``lambda_i >= 0``
    and ``m_i`` the multiclass margin (Haim et al. 2022; Buzaglo et al. 2023), and along the way
    ``-grad_theta CE`` over the training set aligns with ``theta`` (its per-sample weights
    ``1 - p_{y_i}`` play the ``lambda_i``). Their reconstruction fits ``x_i`` and ``lambda_i`` of that
    sum; a generator draws a new batch every step, so this form asks its batch's CE descent direction
    to point along ``theta``: scale-free, no ``lambda`` to learn. On the benchmark's MNIST targets
    real training images score a higher cosine than held-out ones (BENCHMARKS.md, leakage).

    Args:
        logits: ``[B, K]`` clean logits, part of a graph that reaches ``params``.
        labels: ``[B]`` int64 classes.
        params: the classifier's parameters (with ``requires_grad``).

    Returns a differentiable fp32 scalar in [0, 2] (``create_graph=True``).
    """
    ce = F.cross_entropy(_acc(logits), labels, reduction="sum")
    grads = torch.autograd.grad(-ce, params, create_graph=True, allow_unused=True)
    pairs = [(_acc(p.detach()).view(-1), _acc(g).view(-1)) for p, g in zip(params, grads) if g is not None]
    dot = sum((p * g).sum() for p, g in pairs)
    g_norm = torch.sqrt(sum(g.square().sum() for _, g in pairs))
    theta_norm = torch.sqrt(sum(p.square().sum() for p, _ in pairs))
    return 1.0 - dot / (theta_norm * g_norm).clamp_min(NORM_EPS)


def bn_stats(activations: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """The BatchNorm-statistics prior of one layer (DeepInversion, Yin et al. 2020):
    ``||mu - running_mean||_2 + ||var - running_var||_2`` with ``mu``, ``var`` the per-channel mean and
    (population) variance of ``activations`` ``[N, C, ...]`` over every dimension but the channels,
    as BatchNorm computes them in training. fp32 scalar (fp64 for fp64 input), differentiable."""
    _bn_stats.check(activations, running_mean, running_var)
    x = _acc(activations)
    dims = [0] + list(range(2, x.dim()))
    var, mu = torch.var_mean(x, dim=dims, unbiased=False)  # [C]
    return (mu - running_mean.to(x.dtype)).norm() + (var - running_var.to(x.dtype)).norm()


def warp_theta(
    n: int,
    size: Tuple[int, int],
    shift: int,
    rotate: float,
    scale: float,
    generator: torch.Generator,
    device,
    dtype=torch.float32,
) -> Tensor:
    """``[n, 2, 3]`` affine matrices (``F.affine_grid``'s convention) of random transforms: a whole-pixel
    shift in ``[-shift, shift]`` on each axis of an image of ``size = (H, W)``, a rotation by an angle in
    ``[-rotate, rotate]`` degrees and a scaling by a factor in ``[1 - scale, 1 + scale]`` about the centre."""
    h, w = size

    def uniform(span: float) -> Tensor:  # [n] in [-span, span]
        return (torch.rand(n, generator=generator, device=device, dtype=dtype) * 2 - 1) * span

    tx = torch.randint(-shift, shift + 1, (n,), generator=generator, device=device).to(dtype) * (2.0 / w)
    ty = torch.randint(-shift, shift + 1, (n,), generator=generator, device=device).to(dtype) * (2.0 / h)
    angle = uniform(rotate * math.pi / 180)
    s = 1 + uniform(scale)
    cos, sin = s * torch.cos(angle), s * torch.sin(angle)
    return torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)


def warp(images: Tensor, theta: Tensor, fill: float, mode: str = "bilinear") -> Tensor:
    """Each image moved by its affine transform ``theta`` ``[B, 2, 3]`` (from ``warp_theta``); pixels
    from outside the image read ``fill``.

    Args:
        images: ``[B, C, H, W]``.
        mode: "bilinear" resampling, or "nearest", which moves pixels exactly when every transform is a
            whole-pixel shift (``warp_theta`` with ``rotate = scale = 0``).

    Differentiable w.r.t. ``images`` (``F.grid_sample``).
    """
    x = _acc(images)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x - fill, grid, mode=mode, padding_mode="zeros", align_corners=False) + fill
    return out.to(images.dtype)


def zoom_size(zoom: int, step: int, steps: int, size: Tuple[int, int]) -> Optional[Tuple[int, int]]:
    """The resolution the classifier sees at ``step`` under Zoom (Plug-In Inversion, Ghiasi et al. 2022)
    with ``zoom`` stages over ``steps``: stage ``s = floor(step * zoom / steps)`` (the last one from
    there on) shows ``ceil(size * (s + 1) / zoom)``; None at full resolution (and for ``zoom`` <= 1).

    >>> [zoom_size(4, s, 100, (28, 28)) for s in (0, 25, 50, 99)]
    [(7, 7), (14, 14), (21, 21), None]
    """
    if zoom <= 1:
        return None
    stage = min(step * zoom // steps, zoom - 1)
    out = tuple(math.ceil(n * (stage + 1) / zoom) for n in size)
    return None if out == tuple(size) else out


def zoom(images: Tensor, size: Tuple[int, int]) -> Tensor:
    """``images`` ``[B, C, H, W]`` as seen at resolution ``size``: area-averaged down to ``size``
    (``adaptive_avg_pool2d``), then bilinearly back up to ``[H, W]`` (``align_corners=False``). Linear,
    so its gradient is the transpose: spread back by the bilinear weights, then over each averaged area."""
    x = _acc(images)
    low = F.adaptive_avg_pool2d(x, size)  # [B, C, h, w]
    return F.interpolate(low, size=images.shape[-2:], mode="bilinear", align_corners=False).to(images.dtype)


def colour_draws(
    n: int, channels: int, contrast: float, offset: float, generator: torch.Generator, device, dtype=torch.float32
) -> Tensor:
    """``[n, 2, channels]`` random ColorShifts (Plug-In Inversion, Ghiasi et al. 2022): per image and
    channel a log-contrast ``c ~ U(-contrast, contrast)`` (row 0) and an offset ``o ~ U(-offset, offset)``
    (row 1), drawn from ``generator`` in that order."""

    def uniform(span: float) -> Tensor:  # [n, channels] in [-span, span]
        return (torch.rand(n, channels, generator=generator, device=device, dtype=dtype) * 2 - 1) * span

    log_contrast = uniform(contrast)
    return torch.stack([log_contrast, uniform(offset)], 1)


def colour_shift(images: Tensor, shifts: Tensor) -> Tensor:
    """``images`` ``[B, C, H, W]`` with each image's channels shifted by ``shifts`` ``[B, 2, C]`` (from
    ``colour_draws``): ``exp(c) * x + o``, not clipped. Affine in ``images``, so its gradient is ``exp(c)``."""
    log_contrast, offset = (t[:, :, None, None].to(images.dtype) for t in shifts.unbind(1))  # [B, C, 1, 1]
    return torch.exp(log_contrast) * images + offset


def disagreement(teacher: Tensor, student: Tensor) -> Tensor:
    """DFAD's disagreement (Fang et al. 2019) between two classifiers' logits ``[B, K]``: their mean
    absolute difference ``(1/(B K)) sum_{i,k} |t_ik - s_ik|``. The adversarial student minimises it on
    the generated images; the ``adversarial`` term is its negative, so the generator maximises it.
    Gradient ``sign(t - s) / (B K)`` w.r.t. ``t`` and its negative w.r.t. ``s`` (``sign(0) = 0``, as
    autograd's ``abs``). fp32 (fp64 for fp64 inputs)."""
    return (_acc(teacher) - _acc(student)).abs().mean()


class SurrogateReLU(torch.autograd.Function):
    """``relu(x)`` whose backward is ``grad * sigmoid(alpha x)`` instead of ``grad * 1[x > 0]``; with
    ``inplace``, ``x`` itself is overwritten (as ``torch.relu_``) and returned."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: float, inplace: bool) -> Tensor:
        ctx.save_for_backward(torch.sigmoid(alpha * x))  # the surrogate derivative, before x is overwritten
        if inplace:
            ctx.mark_dirty(x)
            return torch.relu_(x)
        return torch.relu(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (slope,) = ctx.saved_tensors
        return grad * slope, None, None


class _SurrogateReLUs(TorchFunctionMode):
    """Every ReLU called while active (``torch.relu``, ``torch.relu_``, ``F.relu`` with or without
    ``inplace``, hence ``nn.ReLU``, and the tensor methods ``relu``, ``relu_``) runs as ``SurrogateReLU``."""

    INPLACE = {torch.relu: False, torch.Tensor.relu: False, torch.relu_: True, torch.Tensor.relu_: True}

    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = alpha

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.relu:
            inplace = kwargs.get("inplace", args[1] if len(args) > 1 else False)
            return SurrogateReLU.apply(args[0], self.alpha, bool(inplace))
        if func in self.INPLACE:
            return SurrogateReLU.apply(args[0], self.alpha, self.INPLACE[func])
        return func(*args, **kwargs)


def surrogate_relu(alpha: float) -> TorchFunctionMode:
    """A context in which every ReLU's backward uses the derivative ``sigmoid(alpha x)`` in place of
    ``1[x > 0]`` (Haim et al. 2022, Buzaglo et al. 2023); forwards are unchanged. The graph built inside
    keeps the substitution; nothing outside it is affected, also when the block raises.

    >>> x = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
    >>> with surrogate_relu(1.0):
    ...     y = torch.nn.ReLU()(x)
    >>> y.sum().backward(); x.grad
    tensor([0.2689, 0.5000, 0.8808])
    """
    return _SurrogateReLUs(float(alpha))


def mode_seek(images: Tensor, latents: Tensor) -> Tensor:
    """The mode-seeking term (MSGAN, Mao et al. 2019) of a paired batch: rows ``i`` and ``i + B/2``
    share a label and differ in their latents; ``1 / (mean_i d_x(i) / d_z(i) + 1e-5)`` with
    ``d_x`` the mean absolute difference of the two images and ``d_z`` that of their latents
    (an unpaired last row of an odd batch is left out). Minimising it pushes the generator to let
    different latents give different images. fp32 scalar, differentiable w.r.t. ``images``."""
    _mode_seek.check(images, latents)
    return 1.0 / (mode_seek_ratios(images, latents).mean() + 1e-5)


def mode_seek_ratios(images: Tensor, latents: Tensor) -> Tensor:
    """``d_x(i) / d_z(i)`` of each pair ``(i, i + B/2)`` of ``mode_seek``: ``[B // 2]``, fp32 (fp64 for fp64)."""
    h = images.shape[0] // 2
    x, z = _acc(images), _acc(latents)
    dx = (x[:h] - x[h : 2 * h]).abs().flatten(1).mean(1)  # [h]
    dz = (z[:h] - z[h : 2 * h]).abs().flatten(1).mean(1)  # [h]
    return dx / dz.clamp_min(1e-12)


def pairwise_ssim(a: Tensor, b: Tensor, data_range: float = 1.0) -> Tensor:
    """SSIM of every image of ``a`` against every image of ``b``, as scikit-image defines it.

    Args:
        a: ``[N, C, H, W]``, b: ``[M, C, H, W]`` with H, W >= 7; floats in ``[0, data_range]``, or uint8
            (divided by 255).

    Returns:
        ``[N, M]`` fp32 (fp64 for fp64 inputs): ``structural_similarity(a_i, b_j, data_range=...,
        channel_axis=0)`` - mean over the valid 7x7 windows and over channels.

    This is the batched-torch oracle: it materialises ``[N, M, C, H, W]`` products, so callers chunk
    (``tldr_fast.ssim.pairwise_ssim`` does). It computes in fp64, as scikit-image does: in fp32,
    ``box(a b) - mu_a mu_b`` cancels on flat bright images.
    """
    _pairwise_ssim.check(a, b, data_range)
    out_dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    a, b = (x.double() / 255 if x.dtype == torch.uint8 else x.double() for x in (a, b))
    c, h, w = a.shape[1:]
    np_ = SSIM_WIN * SSIM_WIN
    cov_norm = np_ / (np_ - 1)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2

    def box(t: Tensor) -> Tensor:  # [..., H, W] -> [..., H-6, W-6]: mean over each valid window
        lead = t.shape[:-2]
        return F.avg_pool2d(t.reshape(-1, 1, h, w), SSIM_WIN, stride=1).reshape(
            *lead, h - SSIM_WIN + 1, w - SSIM_WIN + 1
        )

    mu_a, mu_b = box(a), box(b)  # [N, C, h', w'], [M, C, h', w']
    var_a = cov_norm * (box(a * a) - mu_a * mu_a)
    var_b = cov_norm * (box(b * b) - mu_b * mu_b)
    mu_a, var_a = mu_a[:, None], var_a[:, None]  # [N, 1, C, h', w']
    mu_b, var_b = mu_b[None], var_b[None]  # [1, M, C, h', w']
    cov = cov_norm * (box(a[:, None] * b[None]) - mu_a * mu_b)  # [N, M, C, h', w']
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2))
    return s.mean(dim=(2, 3, 4)).to(out_dtype)
