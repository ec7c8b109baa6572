"""Backend ``"torch"``: every op in plain PyTorch, in its fastest form.

For most ops that form is the reference's own code (``tldr_fast.reference``: autograd through plain
tensor ops): every declared op not defined here is taken from it. ``pairwise_ssim`` is organised as
batched matrix products over the window positions, which needs a fraction of the reference's memory and
time (the reference materialises ``[n, m, C, H, W]`` in fp64). Each op checks its arguments against its declaration (``tldr_fast/ops/``).

Cost of SSIM: the window means and variances belong to one image and are computed once per image; only
the cross term ``sum_q a_q b_q`` over each window is per pair. Seen per window position ``p``, it is a
matrix product ``[n, 49] x [49, m]`` of the images' windows; with each window's mean subtracted first
(``cov = sum_q (a_q - mu_a)(b_q - mu_b) / 48``) there is no cancellation and fp32 is accurate.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Tuple

import torch
import torch.nn.functional as F

from . import reference
from .ops import OPS
from .ops import pairwise_ssim as _pairwise_ssim
from .ops.pairwise_ssim import SSIM_K1, SSIM_K2
from .ops.pairwise_ssim import SSIM_WIN as WIN

Tensor = torch.Tensor

__all__ = list(OPS)

NPIX = WIN * WIN  # pixels per window
# Elements of each [positions, n, m] temporary of pairwise_ssim: large enough that the per-op overhead
# (and, on the CPU, the threads' synchronisation) is small, small enough to stay in memory.
TORCH_CHUNK = {"cpu": 1 << 20, "cuda": 1 << 24}


def _unit(x: Tensor) -> Tensor:
    """Images as fp32 in [0, 1]: uint8 is divided by 255."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def _centered_windows(x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Every 7x7 window of every image, minus its mean, and the windows' statistics.

    x: ``[n, C, H, W]`` fp32 -> ``(windows [P, n, 49], mu [P, n], var [P, n])`` over the ``P = C (H-6)(W-6)``
    positions: ``windows[p, i, q] = x_i[q] - mu[p, i]`` (pixel q of window p), ``var`` the sample variance.
    """
    n, c, h, w = x.shape
    win = F.unfold(x.reshape(n * c, 1, h, w), WIN)  # [n C, 49, (H-6)(W-6)]
    mu = win.mean(1, keepdim=True)
    win = win.sub_(mu)
    var = win.square().sum(1).div_(NPIX - 1)  # [n C, (H-6)(W-6)]
    pos = c * win.shape[-1]
    windows = win.view(n, c, NPIX, win.shape[-1]).permute(1, 3, 0, 2).reshape(pos, n, NPIX)
    return windows, mu.view(n, pos).t(), var.view(n, pos).t()


@contextlib.contextmanager
def _exact_fp32_matmul(device: torch.device) -> Iterator[None]:
    """fp32 matrix products in full precision (no TF32) while inside, whatever the global setting."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = saved


def pairwise_ssim(a: Tensor, b: Tensor, data_range: float = 1.0) -> Tensor:
    """``reference.pairwise_ssim`` in plain PyTorch, organised as batched matrix products.

    a: ``[N, C, H, W]``, b: ``[M, C, H, W]`` floats (uint8: divided by 255) -> ``[N, M]`` fp32.

    Per window position p (a batch of the products): ``2 cov + c2 = (2/48) W_a,p W_b,p^T + c2`` with
    the centred windows ``W`` (``[n, 49]``), and ``2 mu_a mu_b + c1`` likewise as a rank-1 product;
    positions are taken in chunks so that the ``[chunk, n, m]`` temporaries stay small.
    """
    _pairwise_ssim.check(a, b, data_range)
    device = a.device
    a, b = _unit(a), _unit(b)
    wa, mua, va = _centered_windows(a)  # [P, N, 49], [P, N], [P, N]
    wb, mub, vb = _centered_windows(b)  # [P, M, 49], [P, M], [P, M]
    pos, n, m = wa.shape[0], a.shape[0], b.shape[0]
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    lum_a, lum_b = (mua.square() + c1)[:, :, None], mub.square()[:, None, :]  # mu_a^2 + c1, mu_b^2
    con_a, con_b = (va + c2)[:, :, None], vb[:, None, :]  # var_a + c2, var_b
    c1_t, c2_t = a.new_full((1, 1, 1), c1), a.new_full((1, 1, 1), c2)
    out = a.new_zeros(n, m)
    step = max(1, TORCH_CHUNK.get(device.type, TORCH_CHUNK["cuda"]) // max(1, n * m))
    with _exact_fp32_matmul(device):
        for s in range(0, pos, step):
            p = slice(s, s + step)
            num = torch.baddbmm(c2_t, wa[p], wb[p].transpose(1, 2), alpha=2 / (NPIX - 1))  # 2 cov + c2
            num.mul_(torch.baddbmm(c1_t, mua[p, :, None], mub[p, None, :], alpha=2))  # (2 mu_a mu_b + c1)
            den = torch.add(lum_a[p], lum_b[p]).mul_(con_a[p] + con_b[p])
            out += num.div_(den).sum(0)
    return out.div_(pos)


# Every op this module does not define is the reference's own code.
globals().update({op: getattr(reference, op) for op in OPS if op not in globals()})
