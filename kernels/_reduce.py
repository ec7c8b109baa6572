"""Deterministic cross-program reductions shared by the loss ops.

Every loss op reduces its terms in two stages, with no atomics (so results are bitwise reproducible):
each program of a kernel writes one row of a partial-sums buffer ``part [rows, T]`` (all T columns,
zeros where it has nothing), already scaled so that the term is the plain column sum; then
``_finish`` (program 0 of an op's last kernel, or ``_finish_kernel``) sums the rows, takes the square
root of one column if asked (the grad-norm term) and writes ``terms [T]`` and ``loss = sum(w * terms)``
reading the weights from device memory.
"""

import triton
import triton.language as tl


@triton.jit
def _store_partial_row(part_ptr, row, T, col_a, val_a, col_b, val_b, TP: tl.constexpr):
    """part[row, :] = val_a at col_a, + val_b at col_b, 0 elsewhere (col_a == col_b adds both)."""
    cols = tl.arange(0, TP)
    vals = tl.where(cols == col_a, val_a, 0.0) + tl.where(cols == col_b, val_b, 0.0)
    tl.store(part_ptr + row * T + cols, vals, mask=cols < T)


@triton.jit
def _sum_partials(part_ptr, n_rows, T, TP: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """Column sums of part [n_rows, T] -> [TP] (padding columns 0)."""
    cols = tl.arange(0, TP)
    acc = tl.zeros([BLOCK_ROWS, TP], tl.float32)
    for r0 in range(0, n_rows, BLOCK_ROWS):
        rows = r0 + tl.arange(0, BLOCK_ROWS)
        mask = (rows < n_rows)[:, None] & (cols < T)[None, :]
        acc += tl.load(part_ptr + rows[:, None] * T + cols[None, :], mask=mask, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _write_terms(terms, T, w_ptr, terms_ptr, loss_ptr, TP: tl.constexpr):
    """terms [TP] -> terms_ptr[:T]; loss = sum(w * terms) over the first T."""
    cols = tl.arange(0, TP)
    w = tl.load(w_ptr + cols, mask=cols < T, other=0.0)
    tl.store(terms_ptr + cols, terms, mask=cols < T)
    tl.store(loss_ptr, tl.sum(tl.where(cols < T, w * terms, 0.0), axis=0))


@triton.jit
def _finish(part_ptr, n_rows, T, w_ptr, terms_ptr, loss_ptr,
            SQRT_COL: tl.constexpr, TP: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """terms = column sums of part (sqrt at SQRT_COL, -1 for none); loss = sum(w * terms)."""
    cols = tl.arange(0, TP)
    terms = _sum_partials(part_ptr, n_rows, T, TP, BLOCK_ROWS)
    if SQRT_COL >= 0:
        terms = tl.where(cols == SQRT_COL, tl.sqrt(tl.maximum(terms, 0.0)), terms)
    _write_terms(terms, T, w_ptr, terms_ptr, loss_ptr, TP)


@triton.jit
def _finish_kernel(part_ptr, n_rows, T, w_ptr, terms_ptr, loss_ptr,
                   SQRT_COL: tl.constexpr, TP: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    # part: [n_rows, T] -> terms: [T], loss: []; grid (1,)
    _finish(part_ptr, n_rows, T, w_ptr, terms_ptr, loss_ptr, SQRT_COL, TP, BLOCK_ROWS)


@triton.jit
def _sum_splits_kernel(ws_ptr, out_ptr, S, W, ldc, N,
                       part_ptr, part_row0, T, col_lo, scale_lo, col_hi, scale_hi,
                       BLOCK: tl.constexpr, TP: tl.constexpr):
    """out = sum_s ws[s] for a matrix of row stride ``ldc`` stored flat, plus this block's partial row:
    sum of squares of the columns < N (scaled into col_lo) and of the columns >= N (into col_hi).

    ws: [S, W] fp32 -> out: [W]; grid (cdiv(W, BLOCK),)
    """
    scale_lo = tl.cast(scale_lo, tl.float32)  # float arguments in fp32 (see _utils)
    scale_hi = tl.cast(scale_hi, tl.float32)
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < W
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(0, S):
        acc += tl.load(ws_ptr + s * W + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc, mask=mask)
    sq = acc * acc  # 0 outside the mask
    lo = tl.sum(tl.where(offs % ldc < N, sq, 0.0), axis=0)
    hi = tl.sum(tl.where(offs % ldc >= N, sq, 0.0), axis=0)
    _store_partial_row(part_ptr, part_row0 + pid, T, col_lo, lo * scale_lo, col_hi, hi * scale_hi, TP)
