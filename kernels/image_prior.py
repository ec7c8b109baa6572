"""image_prior: total variation and pixel-range penalty in one read of the images, gradient written in
the same pass.

With x [B, C, H, W]:
    TV  = (1/B) sum dh^2 + dw^2,  dh = x[h+1, w] - x[h, w],  dw = x[h, w+1] - x[h, w]
    Pix = sum relu(x - hi) + relu(lo - x)
    dTV/dx[h, w] = (2/B) ((x[h,w] - x[h-1,w]) - (x[h+1,w] - x[h,w]) + (x[h,w] - x[h,w-1]) - (x[h,w+1] - x[h,w])),
        each difference present only inside the image (free boundaries);
    dPix/dx = [x > hi] - [x < lo]   (relu'(0) = 0, as torch).

``_image_prior_kernel``: the images as one flat array; a program takes blocks of BLOCK consecutive
pixels, grid-stride (aligned, so its own loads and the gradient's stores are 16-byte vectors), loads
their four neighbours (offsets +-1 and +-W: cache hits, so one DRAM read of the images), writes the
gradient and, at its end, one row of partial sums; ``_finish_kernel`` sums the rows (2 launches in
all). H and W are compile-time constants, so the pixel's row and column come from multiplications, not
divisions.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ._reduce import _finish_kernel, _store_partial_row
from ..fused_autograd import fused_autograd
from ._utils import BLOCK_ROWS, TERMS_PAD, cdiv, compute_dtype, empty, launch, num_sms, triton_op, weights_fp32

Tensor = torch.Tensor
_BLOCK = 2048  # pixels per block (a program takes several, grid-stride)
_CHUNK = 2**30  # pixels per launch at most (int32 offsets); launches cover whole images
_PROGRAMS_PER_SM = 8


@triton.jit
def _image_prior_kernel(
    x_ptr,  # images: [n] flat (contiguous [B, C, H, W], or a run of whole images of it)
    dx_ptr,  # d loss / d images: same shape and dtype
    w_ptr,  # weights: [2] fp32
    part_ptr,  # partial sums: [programs, 2], this launch's rows
    n, inv_b, lo, hi,
    H: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr, TP: tl.constexpr,
):
    # Program p takes blocks p, p + programs, ... (grid-stride), so its sums are reduced once.
    pid = tl.program_id(0)
    inv_b = tl.cast(inv_b, tl.float32)  # float arguments in fp32 (see _utils)
    lo = tl.cast(lo, tl.float32)
    hi = tl.cast(hi, tl.float32)
    w_tv = tl.load(w_ptr + 0)
    w_pix = tl.load(w_ptr + 1)
    tv = tl.zeros([BLOCK], tl.float32)
    pix = tl.zeros([BLOCK], tl.float32)
    for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)  # [BLOCK]
        mask = offs < n
        col = offs % W
        row = (offs // W) % H
        right = mask & (col + 1 < W)
        left = mask & (col >= 1)
        down = mask & (row + 1 < H)
        up = mask & (row >= 1)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d_dn = tl.where(down, tl.load(x_ptr + offs + W, mask=down, other=0.0).to(tl.float32) - x, 0.0)
        d_up = tl.where(up, x - tl.load(x_ptr + offs - W, mask=up, other=0.0).to(tl.float32), 0.0)
        d_rt = tl.where(right, tl.load(x_ptr + offs + 1, mask=right, other=0.0).to(tl.float32) - x, 0.0)
        d_lt = tl.where(left, x - tl.load(x_ptr + offs - 1, mask=left, other=0.0).to(tl.float32), 0.0)
        g_tv = 2.0 * inv_b * (d_up - d_dn + d_lt - d_rt)
        g_pix = tl.where(x > hi, 1.0, 0.0) - tl.where(x < lo, 1.0, 0.0)
        tl.store(dx_ptr + offs, (w_tv * g_tv + w_pix * g_pix).to(dx_ptr.dtype.element_ty), mask=mask)
        tv += d_dn * d_dn + d_rt * d_rt
        pix += tl.where(mask, tl.maximum(x - hi, 0.0) + tl.maximum(lo - x, 0.0), 0.0)
    _store_partial_row(part_ptr, pid, 2, 0, tl.sum(tv, axis=0) * inv_b, 1, tl.sum(pix, axis=0), TP)


@triton_op("tldr_triton::image_prior")
def _image_prior_op(images: Tensor, weights: Tensor, lo: float, hi: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss [], terms [2], d loss/d images)."""
    x = images.contiguous()
    b, c, h, w = x.shape
    device = x.device
    per_image = c * h * w
    step = max(1, _CHUNK // max(per_image, 1))  # images per launch
    chunks = [(i, min(b, i + step)) for i in range(0, b, step)]
    progs = [min(cdiv((j - i) * per_image, _BLOCK), _PROGRAMS_PER_SM * num_sms(device)) for i, j in chunks]
    part = empty((max(sum(progs), 1), 2), device)
    if sum(progs) == 0:  # no pixels: both terms are 0
        part.zero_()
    dx = empty(x.shape, device, x.dtype)
    loss, terms = empty((), device), empty((2,), device)
    row = 0
    for (i, j), n_prog in zip(chunks, progs):
        if n_prog:
            launch(
                _image_prior_kernel, (n_prog,), x[i:j], dx[i:j], weights, part[row:row + n_prog],
                (j - i) * per_image, 1.0 / b, lo, hi, H=h, W=w, BLOCK=_BLOCK, TP=TERMS_PAD, num_warps=8,
            )
        row += n_prog
    launch(_finish_kernel, (1,), part, part.shape[0], 2, weights, terms, loss, SQRT_COL=-1, TP=TERMS_PAD, BLOCK_ROWS=BLOCK_ROWS)
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
