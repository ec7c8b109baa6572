"""image_prior: total variation and pixel-range penalty in one read of the images, gradient written in
the same pass; with ``moments``, the Moments term, whose gradient needs the batch's statistics first.

With x [B, C, H, W]:
    TV  = (1/B) sum dh^2 + dw^2,  dh = x[h+1, w] - x[h, w],  dw = x[h, w+1] - x[h, w]
    Pix = sum relu(x - hi) + relu(lo - x)
    dTV/dx[h, w] = (2/B) ((x[h,w] - x[h-1,w]) - (x[h+1,w] - x[h,w]) + (x[h,w] - x[h,w-1]) - (x[h,w+1] - x[h,w])),
        each difference present only inside the image (free boundaries);
    dPix/dx = [x > hi] - [x < lo]   (relu'(0) = 0, as torch).
Moments, with R = hi - lo, x01 = (x - lo) / R, per channel c over its N = B H W pixels the mean m_c and the
population variance var_c of x01, s_c = sqrt(max(var_c, eps)) (eps = reference.MOMENT_VAR_EPS) and
(mu, sigma) = moments:
    Moments = (1/C) sum_c ((m_c - mu_c)^2 + (s_c - sigma_c)^2) / sigma_c^2
    dMoments/dx = [2 (m_c - mu_c) / N + [var_c >= eps] 2 (s_c - sigma_c) (x01 - m_c) / (N s_c)] / (C sigma_c^2 R)
                = alpha_c + beta_c (x - M_c)   (M_c = lo + R m_c, the channel's mean in pixel units)
    (dm/dx01 = 1/N, dvar/dx01 = 2 (x01 - m) / N, ds/dvar = [var >= eps] / (2 s), as clamp_min's gradient).
The variance comes from shifted sums, sum (x - K_c) and sum (x - K_c)^2 with K_c = x[0, c, 0, 0] (a value of
the channel: E[(x-K)^2] - E[x-K]^2 does not cancel badly, and is exactly 0 on a flat channel).

``_image_prior_kernel``, in one of three passes (PASS):
    0 (no moments): the images as one flat array; a program takes blocks of BLOCK consecutive pixels,
      grid-stride (aligned, so its own loads and the gradient's stores are 16-byte vectors), loads their
      four neighbours (offsets +-1 and +-W: cache hits, so one DRAM read of the images), writes the
      gradient and, at its end, one row of partial sums; ``_finish_kernel`` sums the rows (2 launches).
    1 (moments, statistics): grid (programs, C), program (p, c) walks the pixels of channel c; one row of
      partial sums (TV, Pix) and one row of the channel's shifted sums; no gradient.
      ``_moment_coef_kernel`` (one program) then finishes the channels' statistics: the Moments term,
      alpha, beta and M per channel, the terms and the loss.
    2 (moments, gradient): the same walk, writing the whole gradient (one rounding); no sums (3 launches).
Without moments the op costs what it cost before the Moments term. H and W are compile-time constants, so
the pixel's row and column come from multiplications, not divisions.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator, Optional, Tuple

import torch
import triton
import triton.language as tl

from tldr_fast.ops.image_prior import MOMENT_VAR_EPS, SPEC, TERMS

from ._reduce import _finish_kernel, _store_partial_row, _sum_partials, _write_terms
from ._utils import (
    BLOCK_ROWS,
    TERMS_PAD,
    cdiv,
    compute_dtype,
    empty,
    launch,
    next_pow2,
    num_sms,
    triton_op,
    weights_fp32,
)

Tensor = torch.Tensor
# The kernels below address the declared terms (tv, pix, moments) as the columns 0..2 of terms and of
# the partial sums.
_T = len(TERMS)
assert TERMS == ("tv", "pix", "moments"), "the kernels are written for this layout"
_BLOCK = 2048  # pixels per block (a program takes several, grid-stride)
_CHUNK = 2**30  # pixels per launch at most (int32 offsets); launches cover whole images
_PROGRAMS_PER_SM = 8


@triton.jit
def _image_prior_kernel(
    x_ptr,  # images: [n] flat (contiguous [B, C, H, W], or a run of whole images of it)
    dx_ptr,  # d loss / d images: same shape and dtype
    w_ptr,  # weights: [3] fp32
    part_ptr,  # PASS 0, 1: partial sums [programs * grid(1), 3], this launch's rows
    shift_ptr,  # PASS 1: the whole batch's images (the shifts K_c = x[0, c, 0, 0])
    mstats_ptr,  # PASS 1: [programs * C, 2, CP] fp32, this launch's rows: sum (x-K_c), sum (x-K_c)^2 at column c
    coef_ptr,  # PASS 2: [3, CP] fp32: alpha, beta, M per channel
    n, C, inv_b, lo, hi,  # n: pixels of the launch (PASS 0) or of one channel in the launch (PASS 1, 2)
    PASS: tl.constexpr, CP: tl.constexpr, H: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr,
    TP: tl.constexpr,
):
    # Program p takes blocks p, p + programs, ... (grid-stride), so its sums are reduced once.
    pid = tl.program_id(0)
    ch = tl.program_id(1)  # PASS 1, 2: the channel of this program's pixels
    inv_b = tl.cast(inv_b, tl.float32)  # float arguments in fp32 (see _utils)
    lo = tl.cast(lo, tl.float32)
    hi = tl.cast(hi, tl.float32)
    w_tv = tl.load(w_ptr + 0)
    w_pix = tl.load(w_ptr + 1)
    if PASS == 1:
        shift = tl.load(shift_ptr + ch * (H * W)).to(tl.float32)
    if PASS == 2:
        alpha = tl.load(coef_ptr + ch)
        beta = tl.load(coef_ptr + CP + ch)
        center = tl.load(coef_ptr + 2 * CP + ch)
    tv = tl.zeros([BLOCK], tl.float32)
    pix = tl.zeros([BLOCK], tl.float32)
    s1 = tl.zeros([BLOCK], tl.float32)
    s2 = tl.zeros([BLOCK], tl.float32)
    for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
        k = start + tl.arange(0, BLOCK)  # [BLOCK]
        mask = k < n
        if PASS == 0:
            offs = k
        else:  # pixel k of channel ch: image k // (H W)
            offs = (k // (H * W) * C + ch) * (H * W) + k % (H * W)
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
        if PASS == 1:
            dev = tl.where(mask, x - shift, 0.0)
            s1 += dev
            s2 += dev * dev
        else:
            g = 2.0 * inv_b * (d_up - d_dn + d_lt - d_rt) * w_tv
            g += (tl.where(x > hi, 1.0, 0.0) - tl.where(x < lo, 1.0, 0.0)) * w_pix
            if PASS == 2:
                g += alpha + beta * (x - center)
            tl.store(dx_ptr + offs, g.to(dx_ptr.dtype.element_ty), mask=mask)
        if PASS != 2:
            tv += d_dn * d_dn + d_rt * d_rt
            pix += tl.where(mask, tl.maximum(x - hi, 0.0) + tl.maximum(lo - x, 0.0), 0.0)
    if PASS != 2:
        r = ch * tl.num_programs(0) + pid
        _store_partial_row(part_ptr, r, 3, 0, tl.sum(tv, axis=0) * inv_b, 1, tl.sum(pix, axis=0), TP)
    if PASS == 1:
        cols = tl.arange(0, CP)
        tl.store(mstats_ptr + r * 2 * CP + cols, tl.where(cols == ch, tl.sum(s1, axis=0), 0.0))
        tl.store(mstats_ptr + r * 2 * CP + CP + cols, tl.where(cols == ch, tl.sum(s2, axis=0), 0.0))


@triton.jit
def _moment_coef_kernel(
    part_ptr, n_rows,  # partial sums of TV and Pix: [n_rows, 3] (column 2, Moments, is 0)
    mstats_ptr,  # shifted sums: [n_rows, 2, CP]
    x_ptr,  # images: the shifts K_c = x[0, c, 0, 0]
    mom_ptr,  # moments: [2, C] fp32 (mu, sigma)
    w_ptr,  # weights: [3] fp32
    coef_ptr,  # out: [3, CP] fp32: alpha, beta, M per channel
    terms_ptr, loss_ptr,  # out: [3], []
    C, n_c, lo, hi, var_eps,  # n_c: pixels per channel, B H W
    HW: tl.constexpr, CP: tl.constexpr, TP: tl.constexpr, BLOCK_ROWS: tl.constexpr,
):
    # grid (1,)
    n_c = tl.cast(n_c, tl.float32)  # float arguments in fp32 (see _utils)
    lo = tl.cast(lo, tl.float32)
    hi = tl.cast(hi, tl.float32)
    var_eps = tl.cast(var_eps, tl.float32)
    cols = tl.arange(0, CP)
    valid = cols < C
    acc1 = tl.zeros([BLOCK_ROWS, CP], tl.float32)
    acc2 = tl.zeros([BLOCK_ROWS, CP], tl.float32)
    for r0 in range(0, n_rows, BLOCK_ROWS):
        rows = r0 + tl.arange(0, BLOCK_ROWS)
        ptrs = mstats_ptr + rows[:, None] * (2 * CP) + cols[None, :]
        mask = (rows < n_rows)[:, None] & valid[None, :]
        acc1 += tl.load(ptrs, mask=mask, other=0.0)
        acc2 += tl.load(ptrs + CP, mask=mask, other=0.0)
    e1 = tl.sum(acc1, axis=0) / n_c  # E[x - K]
    e2 = tl.sum(acc2, axis=0) / n_c  # E[(x - K)^2]
    rng = hi - lo
    center = tl.load(x_ptr + cols * HW, mask=valid, other=0.0).to(tl.float32) + e1
    var = tl.maximum(e2 - e1 * e1, 0.0) / (rng * rng)
    m = (center - lo) / rng
    sd = tl.sqrt(tl.maximum(var, var_eps))
    mu = tl.load(mom_ptr + cols, mask=valid, other=0.0)
    sigma = tl.load(mom_ptr + C + cols, mask=valid, other=1.0)
    scale = tl.load(w_ptr + 2) / (C * sigma * sigma * rng * n_c)
    tl.store(coef_ptr + cols, 2.0 * (m - mu) * scale)
    tl.store(coef_ptr + CP + cols, tl.where(var >= var_eps, 2.0 * (sd - sigma) / (sd * rng) * scale, 0.0))
    tl.store(coef_ptr + 2 * CP + cols, center)
    dev = ((m - mu) * (m - mu) + (sd - sigma) * (sd - sigma)) / (sigma * sigma)
    mom = tl.sum(tl.where(valid, dev, 0.0), axis=0) / C
    terms = _sum_partials(part_ptr, n_rows, 3, TP, BLOCK_ROWS)
    _write_terms(tl.where(tl.arange(0, TP) == 2, mom, terms), 3, w_ptr, terms_ptr, loss_ptr, TP)


def _programs(pixels: int, device: torch.device, ways: int = 1) -> int:
    """Programs of one grid column over ``pixels``, for ``ways`` columns (channels) side by side."""
    return min(cdiv(pixels, _BLOCK), max(1, _PROGRAMS_PER_SM * num_sms(device) // ways))


@triton_op(SPEC)
def _image_prior_op(
    images: Tensor, weights: Tensor, lo: float, hi: float, moments: Optional[Tensor]
) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss [], terms [3], d loss/d images)."""
    x = images.contiguous()
    b, c, h, w = x.shape
    device = x.device
    per_image = c * h * w
    step = max(1, _CHUNK // max(per_image, 1))  # images per launch
    chunks = [(i, min(b, i + step)) for i in range(0, b, step)]
    ways = 1 if moments is None else c  # grid columns: the channels with moments
    progs = [_programs((j - i) * per_image // ways, device, ways) * ways for i, j in chunks]
    part = empty((max(sum(progs), 1), _T), device)
    if sum(progs) == 0:  # no pixels: every term is 0
        part.zero_()
    dx = empty(x.shape, device, x.dtype)
    loss, terms = empty((), device), empty((_T,), device)
    common = dict(H=h, W=w, BLOCK=_BLOCK, TP=TERMS_PAD, num_warps=8)

    def walk(pass_, mstats=None, coef=None):
        row = 0
        for (i, j), n_prog in zip(chunks, progs):
            if n_prog:
                launch(
                    _image_prior_kernel, (n_prog // ways, ways), x[i:j], dx[i:j], weights, part[row:row + n_prog],
                    x, mstats[row:row + n_prog] if mstats is not None else part, coef if coef is not None else part,
                    (j - i) * per_image // ways, c, 1.0 / b, lo, hi, PASS=pass_, CP=cp, **common,
                )
            row += n_prog

    if moments is None:
        cp = 1
        walk(0)
        launch(_finish_kernel, (1,), part, part.shape[0], _T, weights, terms, loss, SQRT_COL=-1, TP=TERMS_PAD, BLOCK_ROWS=BLOCK_ROWS)
    else:
        cp = next_pow2(c)
        mstats = empty((part.shape[0], 2, cp), device)
        if sum(progs) == 0:
            mstats.zero_()
        coef = empty((3, cp), device)
        walk(1, mstats=mstats)
        launch(
            _moment_coef_kernel, (1,), part, part.shape[0], mstats, x, moments.to(torch.float32).contiguous(), weights,
            coef, terms, loss, c, b * h * w, lo, hi, MOMENT_VAR_EPS, HW=h * w, CP=cp, TP=TERMS_PAD, BLOCK_ROWS=BLOCK_ROWS,
        )
        walk(2, coef=coef)
    return loss, terms, dx


_setup_context, _backward = SPEC.autograd()  # d loss/d x: the gradient the forward wrote
_image_prior_op.register_autograd(_backward, setup_context=_setup_context)


def image_prior(
    images: Tensor, weights: Tensor, lo: float = -1.0, hi: float = 1.0, moments: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Fused ``tldr_fast.reference.image_prior``: ``images`` [B, C, H, W], ``weights`` [3] fp32 on the
    device, valid range [lo, hi], ``moments`` None or [2, C] on the device (mean and std per channel of
    [0, 1] images); returns ``(loss [], terms [3])`` = (TV, Pix, Moments). Gradients flow to the images
    (in their dtype) and the weights."""
    SPEC.check(images, weights, lo, hi, moments)
    return _image_prior_op(compute_dtype(images), weights_fp32(weights), float(lo), float(hi), moments)[:2]


def compile_cases(dtype: torch.dtype) -> Iterator[Callable[[], object]]:
    """Representative calls of ``image_prior`` on CPU tensors of ``dtype``, for ``kernels._aot``: together
    they launch every kernel variant (constexpr branch) that GPU shapes select."""
    for shape in ((1024, 1, 28, 28), (4, 3, 224, 300)):
        yield partial(image_prior, torch.zeros(shape, dtype=dtype), torch.ones(3), -1.0, 1.0)
        moments = torch.ones(2, shape[1])
        yield partial(image_prior, torch.zeros(shape, dtype=dtype), torch.ones(3), -1.0, 1.0, moments)
