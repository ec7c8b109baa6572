"""image_prior: total variation and pixel-range penalty in one read of the images, gradient written in
the same pass.

With x [B, C, H, W] seen as a matrix of B*C*H rows (row = one image line) and W columns:
    TV  = (1/B) sum dh^2 + dw^2,  dh = x[h+1, w] - x[h, w],  dw = x[h, w+1] - x[h, w]
    Pix = sum relu(x - hi) + relu(lo - x)
    dTV/dx[h, w] = (2/B) ((x[h,w] - x[h-1,w]) - (x[h+1,w] - x[h,w]) + (x[h,w] - x[h,w-1]) - (x[h,w+1] - x[h,w])),
        each difference present only inside the image (free boundaries);
    dPix/dx = [x > hi] - [x < lo]   (relu'(0) = 0, as torch).

``_image_prior_kernel``: persistent programs over [BR, BW] tiles; each loads its tile and the four
neighbouring tiles shifted by one line / one column (cache hits: one DRAM read of the images),
accumulates its TV and Pix sums in registers and writes one partial row; ``_finish_kernel`` sums the
rows (2 launches in all).
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ._reduce import _finish_kernel
from ..fused_autograd import fused_autograd
from ._utils import TERMS_PAD, cdiv, compute_dtype, empty, launch, next_pow2, num_sms, triton_op, weights_fp32

Tensor = torch.Tensor
_TILE = 2048  # elements per tile
_PROGRAMS_PER_SM = 8


@triton.jit
def _image_prior_kernel(
    x_ptr,  # images: [B*C*H, W] (contiguous [B, C, H, W])
    dx_ptr,  # d loss / d images: same shape and dtype
    w_ptr,  # weights: [2] fp32
    part_ptr,  # partial sums: [grid, 2]
    n_rows, H, W, n_tiles, tiles_w, tiles_per_program, inv_b, lo, hi,
    BR: tl.constexpr, BW: tl.constexpr, TP: tl.constexpr,
):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    w_tv = tl.load(w_ptr + 0)
    w_pix = tl.load(w_ptr + 1)
    tv = tl.zeros([BR, BW], tl.float32)
    pix = tl.zeros([BR, BW], tl.float32)
    for i in range(0, tiles_per_program):
        tile = pid + i * n_prog
        rows = (tile // tiles_w) * BR + tl.arange(0, BR)
        cols = (tile % tiles_w) * BW + tl.arange(0, BW)
        h = rows % H
        mask = ((rows < n_rows) & (tile < n_tiles))[:, None] & (cols < W)[None, :]
        down = mask & (h + 1 < H)[:, None]
        up = mask & (h >= 1)[:, None]
        right = mask & (cols + 1 < W)[None, :]
        left = mask & (cols >= 1)[None, :]
        offs = rows.to(tl.int64)[:, None] * W + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d_dn = tl.where(down, tl.load(x_ptr + offs + W, mask=down, other=0.0).to(tl.float32) - x, 0.0)
        d_up = tl.where(up, x - tl.load(x_ptr + offs - W, mask=up, other=0.0).to(tl.float32), 0.0)
        d_rt = tl.where(right, tl.load(x_ptr + offs + 1, mask=right, other=0.0).to(tl.float32) - x, 0.0)
        d_lt = tl.where(left, x - tl.load(x_ptr + offs - 1, mask=left, other=0.0).to(tl.float32), 0.0)
        tv += d_dn * d_dn + d_rt * d_rt
        pix += tl.where(mask, tl.maximum(x - hi, 0.0) + tl.maximum(lo - x, 0.0), 0.0)
        g_tv = 2.0 * inv_b * (d_up - d_dn + d_lt - d_rt)
        g_pix = tl.where(x > hi, 1.0, 0.0) - tl.where(x < lo, 1.0, 0.0)
        tl.store(dx_ptr + offs, (w_tv * g_tv + w_pix * g_pix).to(dx_ptr.dtype.element_ty), mask=mask)
    t = tl.arange(0, TP)
    tv_sum = tl.sum(tl.sum(tv, axis=1), axis=0) * inv_b
    pix_sum = tl.sum(tl.sum(pix, axis=1), axis=0)
    tl.store(part_ptr + pid * 2 + t, tl.where(t == 0, tv_sum, pix_sum), mask=t < 2)


@triton_op("tldr_triton::image_prior")
def _image_prior_op(images: Tensor, weights: Tensor, lo: float, hi: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss [], terms [2], d loss/d images)."""
    x = images.contiguous()
    b, c, h, w = x.shape
    device = x.device
    n_rows = b * c * h
    bw = min(next_pow2(w), 256)
    br = max(1, min(_TILE // bw, next_pow2(n_rows)))
    tiles_w = cdiv(w, bw)
    n_tiles = cdiv(n_rows, br) * tiles_w
    grid = min(n_tiles, _PROGRAMS_PER_SM * num_sms(device))
    part = empty((grid, 2), device)
    dx = empty(x.shape, device, x.dtype)
    loss, terms = empty((), device), empty((2,), device)
    launch(
        _image_prior_kernel, (grid,), x, dx, weights, part,
        n_rows, h, w, n_tiles, tiles_w, cdiv(n_tiles, grid), 1.0 / b, lo, hi,
        BR=br, BW=bw, TP=TERMS_PAD, num_warps=8, num_stages=1,
    )
    launch(_finish_kernel, (1,), part, grid, 2, weights, terms, loss, SQRT_COL=-1, TP=TERMS_PAD, BLOCK_ROWS=256)
    return loss, terms, dx


_setup_context, _backward = fused_autograd((0,), 1)  # d loss/d x: the gradient the forward wrote
_image_prior_op.register_autograd(_backward, setup_context=_setup_context)


def image_prior(images: Tensor, weights: Tensor, lo: float = -1.0, hi: float = 1.0) -> Tuple[Tensor, Tensor]:
    """Fused ``tldr_fast.reference.image_prior``: ``images`` [B, C, H, W], ``weights`` [2] fp32 on the
    device, valid range [lo, hi]; returns ``(loss [], terms [2])`` = (TV, Pix). Gradients flow to the
    images (in their dtype) and the weights."""
    if images.dim() != 4:
        raise ValueError(f"image_prior needs images [B, C, H, W], got {tuple(images.shape)}")
    return _image_prior_op(compute_dtype(images), weights_fp32(weights, 2, images.device), float(lo), float(hi))[:2]
