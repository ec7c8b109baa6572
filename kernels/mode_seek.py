"""mode_seek: the mode-seeking term of a paired batch, ``1 / (mean_i d_x(i) / max(d_z(i), 1e-12) + 1e-5)``
with rows ``i`` and ``i + h`` (``h = B // 2``) a pair, ``d_x(i)`` the mean absolute difference of the two
images and ``d_z(i)`` that of their latents; an unpaired last row of an odd batch is left out (declaration
and gradient: ``tldr_fast/ops/mode_seek.py``).

With the images viewed as x [B, P] and the latents as z [B, Q] (each row flattened), per pair i < h:
    sx_i = sum_p |x[i, p] - x[i + h, p]|,   sz_i = sum_q |z[i, q] - z[i + h, q]|         (fp32 sums)
    dz_i = max(sz_i / Q, 1e-12),   r_i = (sx_i / P) / dz_i,   S = mean_i r_i,   value = 1 / (S + 1e-5)
and, as d value / d r_i = -1 / (h (S + 1e-5)^2) and d r_i / d x[i, p] = sign(x[i, p] - x[i + h, p]) / (P dz_i),
    coef_i = -1 / (h P dz_i (S + 1e-5)^2),
    d/dx[i, p] = grad coef_i sign(x[i, p] - x[i + h, p]),   d/dx[i + h, p] = -d/dx[i, p]   (sign(0) = 0),
    d/dx[2h, p] = 0 for the unpaired last row of an odd batch.
fp32 sums are enough here: the value and gradient are within the tests' 2e-5 of the reference.

Tiles: [BR, BP] (BR pairs, BP contiguous positions of a row). Launches per call: forward 2
(``_pair_sums_kernel``: grid (pair blocks, splits), program (r, s) sums the column blocks s, s + splits, ...
of its pairs and writes one column of partial sums, a fixed order; the programs of split 0 also reduce the
latents; ``_finish_kernel``: one program sums the splits of each pair in a fixed order and writes value and
coef); backward 1 (``_backward_kernel``, one tile of pairs per program, writing both rows of each pair).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator, Tuple

import torch
import triton
import triton.language as tl

from tldr_fast.ops.mode_seek import SPEC

from ._utils import cdiv, compute_dtype, empty, launch, next_pow2, num_sms, triton_op

Tensor = torch.Tensor
_TILE = 2048  # elements per tile (BR * BP)
_BP_MAX = 1024  # positions per tile at most (a tail of P beyond a multiple of it is masked)
_PROGRAMS_PER_SM = 8
_FINISH_PAIRS = 128  # pairs per step of the finish
_FINISH_SPLITS = 16  # partial sums per pair per step of the finish


@triton.jit
def _pair_sums_kernel(
    x_ptr,  # images: [B, P] contiguous
    z_ptr,  # latents: [B, Q] contiguous
    part_ptr,  # out: [h, splits] fp32: sum |x_i - x_{i+h}| over the program's column blocks
    zs_ptr,  # out: [h] fp32: sum |z_i - z_{i+h}| (written by the programs of split 0)
    h, P, Q,
    BR: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr,
):
    # grid (cdiv(h, BR), splits): program (r, s) takes the column blocks s, s + splits, ... of pairs block r
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)  # pairs: [BR]
    rmask = rows < h
    row_a = rows.to(tl.int64) * P  # [BR]
    row_b = (rows + h).to(tl.int64) * P
    acc = tl.zeros([BR, BP], tl.float32)
    for c0 in range(split * BP, P, splits * BP):
        cols = c0 + tl.arange(0, BP)  # [BP]
        mask = rmask[:, None] & (cols < P)[None, :]
        a = tl.load(x_ptr + row_a[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(x_ptr + row_b[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.abs(a - b)  # [BR, BP]
    # -> part [h, splits]: column split, rows of this block
    tl.store(part_ptr + rows * splits + split, tl.sum(acc, axis=1), mask=rmask)
    if split == 0:
        zrow_a = rows.to(tl.int64) * Q
        zrow_b = (rows + h).to(tl.int64) * Q
        zacc = tl.zeros([BR, BQ], tl.float32)
        for c0 in range(0, Q, BQ):
            cols = c0 + tl.arange(0, BQ)  # [BQ]
            mask = rmask[:, None] & (cols < Q)[None, :]
            a = tl.load(z_ptr + zrow_a[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            b = tl.load(z_ptr + zrow_b[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            zacc += tl.abs(a - b)
        tl.store(zs_ptr + rows, tl.sum(zacc, axis=1), mask=rmask)  # -> zs [h]


@triton.jit
def _finish_kernel(
    part_ptr, n_splits,  # partial sums: [h, n_splits] fp32
    zs_ptr,  # latent sums: [h] fp32
    value_ptr, coef_ptr,  # out: [], [h] fp32
    h, P, Q,
    FH: tl.constexpr, FS: tl.constexpr,
):
    # grid (1,): pairs in blocks of FH, splits in blocks of FS (a fixed order)
    p32 = tl.cast(P, tl.float32)
    q32 = tl.cast(Q, tl.float32)
    h32 = tl.cast(h, tl.float32)
    r_acc = tl.zeros([FH], tl.float32)
    for r0 in range(0, h, FH):
        rows = r0 + tl.arange(0, FH)  # [FH]
        valid = rows < h
        acc = tl.zeros([FH, FS], tl.float32)
        for s0 in range(0, n_splits, FS):
            s = s0 + tl.arange(0, FS)  # [FS]
            mask = valid[:, None] & (s < n_splits)[None, :]
            acc += tl.load(part_ptr + rows[:, None] * n_splits + s[None, :], mask=mask, other=0.0)
        dx = tl.sum(acc, axis=1) / p32  # d_x(i): [FH]
        dz = tl.maximum(tl.load(zs_ptr + rows, mask=valid, other=1.0) / q32, 1e-12)  # dz_i: [FH]
        r_acc += tl.where(valid, dx / dz, 0.0)
        tl.store(coef_ptr + rows, dz, mask=valid)  # coef from it below, once S is known
    d = tl.sum(r_acc, axis=0) / h32 + 1e-5  # S + 1e-5
    tl.store(value_ptr, 1.0 / d)
    scale = -1.0 / (h32 * p32 * d * d)
    tl.debug_barrier()  # this program's stores of dz visible to all its threads
    for r0 in range(0, h, FH):
        rows = r0 + tl.arange(0, FH)
        valid = rows < h
        tl.store(coef_ptr + rows, scale / tl.load(coef_ptr + rows, mask=valid, other=1.0), mask=valid)


@triton.jit
def _backward_kernel(
    g_ptr,  # upstream gradient of value: []
    x_ptr,  # images: [B, P] contiguous
    coef_ptr,  # [h] fp32
    dx_ptr,  # out: d/dimages, [B, P] in the images' dtype
    h, n_rows, P,  # n_rows = B - h: the pairs, and the unpaired row 2h of an odd batch
    BR: tl.constexpr, BP: tl.constexpr,
):
    # grid (cdiv(n_rows, BR), cdiv(P, BP)): program (r, c) writes rows i and i + h of its [BR, BP] tile
    # (i < h: a pair; i = h, odd B only: row 2h, zeros)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)  # [BR]
    cols = tl.program_id(1) * BP + tl.arange(0, BP)  # [BP]
    paired = rows < h
    cmask = (cols < P)[None, :]
    pmask = paired[:, None] & cmask
    g = tl.load(g_ptr).to(tl.float32)
    c = g * tl.load(coef_ptr + rows, mask=paired, other=0.0)  # [BR]
    offs_a = rows.to(tl.int64)[:, None] * P + cols[None, :]
    offs_b = (rows + h).to(tl.int64)[:, None] * P + cols[None, :]
    a = tl.load(x_ptr + offs_a, mask=pmask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + offs_b, mask=pmask, other=0.0).to(tl.float32)
    diff = a - b
    sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    d = c[:, None] * sign  # [BR, BP]
    tl.store(dx_ptr + offs_a, d.to(dx_ptr.dtype.element_ty), mask=pmask)
    tl.store(dx_ptr + offs_b, (0.0 - d).to(dx_ptr.dtype.element_ty), mask=(rows < n_rows)[:, None] & cmask)


def _tiles(rows: int, p: int) -> Tuple[int, int]:
    """(BR, BP): a tile of about _TILE elements, positions first, then rows."""
    bp = min(next_pow2(p), _BP_MAX)
    br = min(max(1, _TILE // bp), next_pow2(rows))
    return br, bp


def _plan(h: int, p: int, device: torch.device) -> Tuple[int, int, int, int]:
    """(BR, BP, pair blocks, splits per pair block) of the forward."""
    br, bp = _tiles(h, p)
    row_blocks = cdiv(h, br)
    splits = max(1, min(cdiv(p, bp), _PROGRAMS_PER_SM * num_sms(device) // row_blocks))
    return br, bp, row_blocks, splits


def _rows(t: Tensor) -> Tensor:
    """[B, ...] -> [B, numel / B], contiguous."""
    t = t.contiguous()
    return t.view(t.shape[0], -1)


@triton_op(SPEC)
def _mode_seek_op(images: Tensor, latents: Tensor) -> Tuple[Tensor, Tensor]:
    """(value [], coef [h]), fp32."""
    x, z = _rows(images), _rows(latents)  # [B, P], [B, Q]
    device = x.device
    b, p = x.shape
    q = z.shape[1]
    h = b // 2
    br, bp, row_blocks, splits = _plan(h, p, device)
    part = empty((h, splits), device)
    zs = empty((h,), device)
    value, coef = empty((), device), empty((h,), device)
    bq = min(next_pow2(q), bp)
    launch(_pair_sums_kernel, (row_blocks, splits), x, z, part, zs, h, p, q, BR=br, BP=bp, BQ=bq, num_warps=4)
    launch(
        _finish_kernel, (1,), part, splits, zs, value, coef, h, p, q,
        FH=_FINISH_PAIRS, FS=_FINISH_SPLITS, num_warps=4,
    )
    return value, coef


@triton_op("mode_seek_backward")
def _mode_seek_backward_op(grad: Tensor, images: Tensor, coef: Tensor) -> Tensor:
    """d/dimages = grad coef_i sign(x_i - x_{i+h}) on row i, its negative on row i + h, 0 on an unpaired
    last row: the images' shape and dtype (contiguous)."""
    x = images.contiguous()
    b = x.shape[0]
    p = x.numel() // b
    h = b // 2
    dx = empty(x.shape, x.device, x.dtype)
    br, bp = _tiles(b - h, p)
    launch(
        _backward_kernel, (cdiv(b - h, br), cdiv(p, bp)), grad, x, coef.to(torch.float32).contiguous(), dx,
        h, b - h, p, BR=br, BP=bp, num_warps=4,
    )
    return dx


_setup_context, _backward = SPEC.value_autograd(_mode_seek_backward_op)  # d/dx: the helper backward op
_mode_seek_op.register_autograd(_backward, setup_context=_setup_context)


def mode_seek(images: Tensor, latents: Tensor) -> Tensor:
    """Fused ``tldr_fast.reference.mode_seek``: ``images`` [B, ...] and ``latents`` [B, ...] (B >= 2) on one
    device; returns the fp32 value [] (fp64 inputs are computed in fp32), differentiable w.r.t. the images
    (gradient in their dtype)."""
    SPEC.check(images, latents)
    return _mode_seek_op(compute_dtype(images), compute_dtype(latents))[0]


def compile_cases(dtype: torch.dtype) -> Iterator[Callable[[], object]]:
    """Representative calls of ``mode_seek`` on CPU tensors of ``dtype``, for ``kernels._aot``: together
    they launch every kernel variant (constexpr branch) that GPU shapes select, forward and backward."""
    def seek_backward(x: Tensor) -> None:
        mode_seek(x, torch.ones(x.shape[0], 100)).backward()

    # even and odd B; one pair per program (P >= 1024) and several split programs per pair
    # (few pairs, large images); several pairs per tile (small P)
    shapes = ((1024, 1, 28, 28), (4097, 3, 32, 32), (2, 3, 224, 224), (33, 50))
    for shape in shapes:
        yield partial(seek_backward, torch.zeros(shape, dtype=dtype, requires_grad=True))
