"""The batch reduction ``C = X^T [Y | v]`` shared by head_loss (G = E^T Phi and the bias column
h = E^T 1) and feature_loss (Phi^T Phi and S = Phi^T (1/||phi||), or Phi Phi^T when D > B, masked to the
pairs of equal labels in the same-label form).

X [R, M] and Y [R, N] are strided views (so Phi^T needs no copy); the reduction runs over the R rows.
The output is fp32 ``C [M, ldc]`` with ``ldc = N + 1`` when there is an extra column
``C[:, N] = X^T v`` (v: ones, or ``1/max(v_r, eps)`` from a vector), else ``ldc = N``.

The kernel tiles C into [BM, BN] blocks and, when there are few tiles for many rows (large batch,
small K or D), splits the rows over S programs per tile; the split partials are then summed by
``_sum_splits_kernel`` (deterministic, no atomics). Whichever kernel produces the final C also writes
one row per program into the op's partial-sums buffer: the sum of squares of its dot-product block
(``||G||^2`` pieces) and of its extra column or, for the B x B Gram, the quadratic form
``w^T C w`` (``||S||^2`` pieces), each scaled into the term column it belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._reduce import _store_partial_row, _sum_splits_kernel
from ._utils import FP32_DOT, INTERPRET, TERMS_PAD, block, cdiv, empty, launch, num_sms

EXTRA_NONE, EXTRA_ONES, EXTRA_INV = 0, 1, 2
_SPLIT_BLOCK = 1024
# A split handles at least this many rows: fewer launches at moderate batch sizes on the GPU; small
# under the interpreter so that the tests exercise the split path.
_MIN_SPLIT_ROWS = 64 if INTERPRET else 1024


@triton.jit
def _gram_kernel(
    x_ptr, sx_r, sx_m,  # X: [R, M]
    y_ptr, sy_r, sy_n,  # Y: [R, N]
    v_ptr, eps,  # v: [R] (EXTRA_INV) or [M] = [N] (QUAD): weights 1/max(v, eps)
    lab_ptr,  # LABELS: labels [M] = [N]; C is masked to the pairs of equal labels
    out_ptr, ldc,  # C: [M, ldc] fp32 (FINAL) or split partials [S, M, ldc]
    part_ptr, part_row0, T, col_lo, scale_lo, col_hi, scale_hi,
    R, M, N, rows_per_split,
    EXTRA: tl.constexpr, QUAD: tl.constexpr, LABELS: tl.constexpr, FINAL: tl.constexpr, PREC: tl.constexpr,
    BR: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, TP: tl.constexpr,
):
    eps = tl.cast(eps, tl.float32)  # float arguments in fp32 (see _utils)
    scale_lo = tl.cast(scale_lo, tl.float32)
    scale_hi = tl.cast(scale_hi, tl.float32)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_m = offs_m < M
    mask_n = offs_n < N
    r_begin = split * rows_per_split
    r_end = tl.minimum(r_begin + rows_per_split, R)

    acc = tl.zeros([BM, BN], tl.float32)
    ext = tl.zeros([BM], tl.float32)
    for r0 in range(0, rows_per_split, BR):
        rows = r_begin + r0 + tl.arange(0, BR)
        mask_r = rows < r_end
        x = tl.load(x_ptr + rows[:, None] * sx_r + offs_m[None, :] * sx_m,
                    mask=mask_r[:, None] & mask_m[None, :], other=0.0)  # [BR, BM]
        y = tl.load(y_ptr + rows[:, None] * sy_r + offs_n[None, :] * sy_n,
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0)  # [BR, BN]
        # fp32 products with fp32 FMAs (PREC "ieee"), bf16/fp16 operands included: on tensor cores the
        # fp32 accumulator is truncated at every 16-row step, a bias that reached 1.4e-5 relative error
        # in ||Phi^T Phi||^2 after 4096 rows (H200, 2026-11-26), 14x the bf16 reference's own error
        x = x.to(tl.float32)
        y = y.to(tl.float32)
        acc = tl.dot(tl.trans(x), y, acc, input_precision=PREC)
        if EXTRA == 1:
            ext += tl.sum(x, axis=0)  # masked rows are 0
        elif EXTRA == 2:
            v = 1.0 / tl.maximum(tl.load(v_ptr + rows, mask=mask_r, other=1.0), eps)
            ext += tl.sum(x * tl.where(mask_r, v, 0.0)[:, None], axis=0)

    if LABELS:  # C o M, M_mn = [y_m = y_n] (linear: split partials are masked alike)
        y_m = tl.load(lab_ptr + offs_m, mask=mask_m, other=0)
        y_n = tl.load(lab_ptr + offs_n, mask=mask_n, other=0)
        acc = tl.where(y_m[:, None] == y_n[None, :], acc, 0.0)
    base = out_ptr + split * M * ldc
    tl.store(base + offs_m[:, None] * ldc + offs_n[None, :], acc, mask=mask_m[:, None] & mask_n[None, :])
    if EXTRA != 0:
        # every column block computed the extra column; the first one stores it (a runtime branch, not
        # mask_m & (pid_n == 0): the interpreter gives a scalar i1 splat int32 data, a mask Triton 3.9 rejects)
        if pid_n == 0:
            tl.store(base + offs_m * ldc + N, ext, mask=mask_m)
    if FINAL:
        lo = tl.sum(tl.sum(acc * acc, axis=1), axis=0)
        hi = 0.0
        if QUAD:
            w_m = tl.where(mask_m, 1.0 / tl.maximum(tl.load(v_ptr + offs_m, mask=mask_m, other=1.0), eps), 0.0)
            w_n = tl.where(mask_n, 1.0 / tl.maximum(tl.load(v_ptr + offs_n, mask=mask_n, other=1.0), eps), 0.0)
            hi = tl.sum(tl.sum(acc * w_m[:, None] * w_n[None, :], axis=1), axis=0)
        elif EXTRA != 0:
            hi = tl.where(pid_n == 0, tl.sum(ext * ext, axis=0), 0.0)
        row = part_row0 + pid_m * tl.num_programs(1) + pid_n
        _store_partial_row(part_ptr, row, T, col_lo, lo * scale_lo, col_hi, hi * scale_hi, TP)


@dataclass(frozen=True)
class GramPlan:
    """Tiling of ``C = X^T [Y | v]``: ``partial_rows`` rows of the op's partial buffer are written."""

    R: int
    M: int
    N: int
    extra: int
    bm: int
    bn: int
    br: int
    splits: int
    rows_per_split: int

    @property
    def ldc(self) -> int:
        return self.N + int(self.extra != EXTRA_NONE)  # int: N may be a SymInt (torch.compile, dynamic)

    @property
    def tiles(self) -> Tuple[int, int]:
        return cdiv(self.M, self.bm), cdiv(self.N, self.bn)

    @property
    def partial_rows(self) -> int:
        if self.splits == 1:
            return self.tiles[0] * self.tiles[1]
        return cdiv(self.M * self.ldc, _SPLIT_BLOCK)


def plan_gram(R: int, M: int, N: int, extra: int, device: torch.device, splittable: bool = True) -> GramPlan:
    """Tile sizes and the number of row splits: about two programs per SM when rows are plentiful."""
    bm, bn, br = block(M), block(N), 32
    tiles = cdiv(M, bm) * cdiv(N, bn)
    splits = max(1, min((2 * num_sms(device)) // tiles, cdiv(R, _MIN_SPLIT_ROWS))) if splittable else 1
    rows_per_split = cdiv(cdiv(max(R, 1), splits), br) * br
    return GramPlan(R, M, N, extra, bm, bn, br, cdiv(max(R, 1), rows_per_split), rows_per_split)


def gram(
    plan: GramPlan,
    x: torch.Tensor, x_strides: Tuple[int, int],
    y: torch.Tensor, y_strides: Tuple[int, int],
    part: torch.Tensor, part_row0: int,
    cols: Tuple[int, int], scales: Tuple[float, float],
    v: Optional[torch.Tensor] = None, eps: float = 0.0, quad: bool = False, labels: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``C = X^T [Y | v]`` as fp32 ``[M, plan.ldc]``; writes ``plan.partial_rows`` rows of ``part``
    from ``part_row0``: squares of the dot block into ``cols[0]`` (times ``scales[0]``) and of the extra
    column, or ``w^T C w`` when ``quad``, into ``cols[1]`` (times ``scales[1]``). With ``labels`` ([M] = [N],
    contiguous), the dot block is masked to the entries (m, n) of equal labels (C o M, sums included)."""
    assert not (quad and plan.splits > 1), "the quadratic form is computed on unsplit tiles"
    device = x.device
    final = plan.splits == 1
    c = empty((plan.M, plan.ldc), device)
    out = c if final else empty((plan.splits, plan.M, plan.ldc), device)
    tm, tn = plan.tiles
    launch(
        _gram_kernel, (tm, tn, plan.splits),
        x, x_strides[0], x_strides[1], y, y_strides[0], y_strides[1],
        v if v is not None else x, eps, labels if labels is not None else x, out, plan.ldc,
        part, part_row0, part.shape[1], cols[0], scales[0], cols[1], scales[1],
        plan.R, plan.M, plan.N, plan.rows_per_split,
        EXTRA=plan.extra, QUAD=quad, LABELS=labels is not None, FINAL=final, PREC=FP32_DOT,
        BR=plan.br, BM=plan.bm, BN=plan.bn, TP=TERMS_PAD, num_warps=8,
    )
    if not final:
        w = plan.M * plan.ldc
        launch(
            _sum_splits_kernel, (cdiv(w, _SPLIT_BLOCK),),
            out, c, plan.splits, w, plan.ldc, plan.N,
            part, part_row0, part.shape[1], cols[0], scales[0], cols[1], scales[1],
            BLOCK=_SPLIT_BLOCK, TP=TERMS_PAD,
        )
    return c
