"""bn_stats: the BatchNorm-statistics prior of one layer, ``||mu - running_mean|| + ||var - running_var||``
with ``mu``, ``var`` the per-channel mean and population variance of ``x [N, C, ...]`` over every
dimension but the channels (declaration and gradient: ``tldr_fast/ops/bn_stats.py``).

With x viewed as [N, C, S] (S = the product of the trailing dims, 1 for [N, C]) and M = N S elements per
channel, the statistics of channel c come from two sums over its elements:
    s1_c = sum x                         (fp64: exact enough that mu_c is the correctly rounded mean)
    s2_c = sum (x - K_c)^2               (fp32, shifted by K_c = x[0, c, 0], a value of the channel)
    mu_c = fp32(s1_c / M),   var_c = fp32(max(s2_c / M - (s1_c / M - K_c)^2, 0))    (the latter in fp64)
The shift keeps E[(x-K)^2] - E[x-K]^2 from cancelling badly (and makes it exactly 0 on a flat channel).
The mean is summed in fp64 because the gradient of ||mu - rm|| at mu = rm is a direction: with a running
mean equal to the batch mean (as the fp32 reference sees it: torch's CPU var_mean accumulates in fp64)
an fp32 sum one ulp off would turn dm = 0 into a unit vector. Then, as the reference, in fp32:
    dm = mu - rm,  dv = var - rv,  value = ||dm|| + ||dv||,
    coef = (a, b),  a_c = dm_c / (M ||dm||),  b_c = 2 dv_c / (M ||dv||)   (a zero norm gives 0)
and the backward is one elementwise pass: d/dx[n, c, s] = grad (a_c + b_c (x[n, c, s] - mu_c)).

Tiles: both kernels read x in [BN, CB, BS] tiles (BN samples, CB channels, BS positions; the positions
contiguous, or with S = 1 the channels), so no element needs a division to find its channel.
Launches per call: forward 2 (``_stats_kernel``: grid (programs, channel blocks), each program takes
every programs-th tile of its channel block and writes one row of partial sums, a fixed order;
``_finish_kernel``: one program sums the rows in a fixed order, writes value, mean and coef);
backward 1 (``_backward_kernel``, one tile per program).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator, Tuple

import torch
import triton
import triton.language as tl

from tldr_fast.ops.bn_stats import SPEC

from ._utils import cdiv, compute_dtype, empty, launch, next_pow2, num_sms, triton_op

Tensor = torch.Tensor
_TILE = 2048  # elements per tile (BN * CB * BS)
_BS_MAX = 512  # positions per tile at most (a tail of S beyond a multiple of it is masked)
_CB_MAX = 64  # channels per tile at most (bounds the partial sums: programs * C <~ programs_total * 64)
_PROGRAMS_PER_SM = 8
_FINISH_ROWS = 32  # partial-sum rows per step of the finish
_FINISH_CHANNELS = 128  # channels per step of the finish


@triton.jit
def _stats_kernel(
    x_ptr,  # activations: [N, C, S] contiguous
    p1_ptr,  # out: [programs, C] fp64: sum x over the program's tiles
    p2_ptr,  # out: [programs, C] fp32: sum (x - K_c)^2 over them
    N, C, S, n_tiles,  # n_tiles: tiles of one channel block, cdiv(N, BN) * cdiv(S, BS)
    BN: tl.constexpr, CB: tl.constexpr, BS: tl.constexpr,
):
    # grid (programs, cdiv(C, CB)): program p takes the tiles p, p + programs, ... of channel block cb
    pid = tl.program_id(0)
    ch = tl.program_id(1) * CB + tl.arange(0, CB)  # [CB]
    cmask = ch < C
    shift = tl.load(x_ptr + ch * S, mask=cmask, other=0.0).to(tl.float32)  # K_c = x[0, c, 0]: [CB]
    s_blocks = tl.cdiv(S, BS)
    acc1 = tl.zeros([BN, CB, BS], tl.float64)
    acc2 = tl.zeros([BN, CB, BS], tl.float32)
    for t in range(pid, n_tiles, tl.num_programs(0)):
        nb = t // s_blocks
        n = nb * BN + tl.arange(0, BN)  # [BN]
        s = (t - nb * s_blocks) * BS + tl.arange(0, BS)  # [BS]
        mask = (n < N)[:, None, None] & cmask[None, :, None] & (s < S)[None, None, :]
        offs = n.to(tl.int64)[:, None, None] * C * S + (ch * S)[None, :, None] + s[None, None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BN, CB, BS]
        acc1 += x.to(tl.float64)
        d = tl.where(mask, x - shift[None, :, None], 0.0)
        acc2 += d * d
    # -> p1, p2 [programs, C]: row pid, columns of this channel block
    tl.store(p1_ptr + pid * C + ch, tl.sum(tl.sum(acc1, axis=2), axis=0), mask=cmask)
    tl.store(p2_ptr + pid * C + ch, tl.sum(tl.sum(acc2, axis=2), axis=0), mask=cmask)


@triton.jit
def _finish_kernel(
    p1_ptr, p2_ptr, n_rows,  # partial sums: [n_rows, C] fp64, fp32
    x_ptr,  # activations: [N, C, S] (the shifts K_c = x[0, c, 0])
    rm_ptr, rv_ptr,  # running mean, running var: [C] fp32
    value_ptr, mean_ptr, coef_ptr,  # out: [], [C], [2, C] fp32
    C, S, m,  # m: elements per channel, N S
    FR: tl.constexpr, FC: tl.constexpr,
):
    # grid (1,): channels in blocks of FC, partial rows in blocks of FR (a fixed order)
    m64 = tl.cast(m, tl.float64)
    ssq_m = tl.zeros([FC], tl.float32)
    ssq_v = tl.zeros([FC], tl.float32)
    for c0 in range(0, C, FC):
        cols = c0 + tl.arange(0, FC)  # [FC]
        valid = cols < C
        acc1 = tl.zeros([FR, FC], tl.float64)
        acc2 = tl.zeros([FR, FC], tl.float32)
        for r0 in range(0, n_rows, FR):
            rows = r0 + tl.arange(0, FR)
            mask = (rows < n_rows)[:, None] & valid[None, :]
            offs = rows[:, None] * C + cols[None, :]
            acc1 += tl.load(p1_ptr + offs, mask=mask, other=0.0)
            acc2 += tl.load(p2_ptr + offs, mask=mask, other=0.0)
        mean64 = tl.sum(acc1, axis=0) / m64  # E[x]: [FC] fp64
        shift = tl.load(x_ptr + cols * S, mask=valid, other=0.0).to(tl.float32).to(tl.float64)
        e1 = mean64 - shift  # E[x - K]
        var = tl.maximum(tl.sum(acc2, axis=0).to(tl.float64) / m64 - e1 * e1, 0.0).to(tl.float32)
        mean = mean64.to(tl.float32)
        dm = tl.where(valid, mean - tl.load(rm_ptr + cols, mask=valid, other=0.0), 0.0)
        dv = tl.where(valid, var - tl.load(rv_ptr + cols, mask=valid, other=0.0), 0.0)
        tl.store(mean_ptr + cols, mean, mask=valid)
        tl.store(coef_ptr + cols, dm, mask=valid)  # scaled below, once the norms are known
        tl.store(coef_ptr + C + cols, dv, mask=valid)
        ssq_m += dm * dm
        ssq_v += dv * dv
    norm_m = tl.sqrt(tl.sum(ssq_m, axis=0))
    norm_v = tl.sqrt(tl.sum(ssq_v, axis=0))
    tl.store(value_ptr, norm_m + norm_v)
    m32 = tl.cast(m, tl.float32)
    scale_a = tl.where(norm_m > 0, 1.0 / (m32 * tl.where(norm_m > 0, norm_m, 1.0)), 0.0)
    scale_b = tl.where(norm_v > 0, 2.0 / (m32 * tl.where(norm_v > 0, norm_v, 1.0)), 0.0)
    tl.debug_barrier()  # this program's stores of dm, dv visible to all its threads
    for c0 in range(0, C, FC):
        cols = c0 + tl.arange(0, FC)
        valid = cols < C
        tl.store(coef_ptr + cols, tl.load(coef_ptr + cols, mask=valid, other=0.0) * scale_a, mask=valid)
        tl.store(coef_ptr + C + cols, tl.load(coef_ptr + C + cols, mask=valid, other=0.0) * scale_b, mask=valid)


@triton.jit
def _backward_kernel(
    g_ptr,  # upstream gradient of value: []
    x_ptr,  # activations: [N, C, S] contiguous
    mean_ptr, coef_ptr,  # [C], [2, C] fp32 (a, b)
    dx_ptr,  # out: d/dactivations, [N, C, S] in the activations' dtype
    N, C, S,
    BN: tl.constexpr, CB: tl.constexpr, BS: tl.constexpr,
):
    # grid (cdiv(N, BN) * cdiv(S, BS), cdiv(C, CB)): one [BN, CB, BS] tile per program
    t = tl.program_id(0)
    ch = tl.program_id(1) * CB + tl.arange(0, CB)  # [CB]
    cmask = ch < C
    s_blocks = tl.cdiv(S, BS)
    nb = t // s_blocks
    n = nb * BN + tl.arange(0, BN)  # [BN]
    s = (t - nb * s_blocks) * BS + tl.arange(0, BS)  # [BS]
    g = tl.load(g_ptr).to(tl.float32)
    a = tl.load(coef_ptr + ch, mask=cmask, other=0.0)[None, :, None]
    b = tl.load(coef_ptr + C + ch, mask=cmask, other=0.0)[None, :, None]
    mu = tl.load(mean_ptr + ch, mask=cmask, other=0.0)[None, :, None]
    mask = (n < N)[:, None, None] & cmask[None, :, None] & (s < S)[None, None, :]
    offs = n.to(tl.int64)[:, None, None] * C * S + (ch * S)[None, :, None] + s[None, None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + offs, (g * (a + b * (x - mu))).to(dx_ptr.dtype.element_ty), mask=mask)


def _tiles(n: int, c: int, s: int) -> Tuple[int, int, int]:
    """(BN, CB, BS): a tile of about _TILE elements, positions first, then channels, then samples."""
    bs = min(next_pow2(s), _BS_MAX)
    cb = min(next_pow2(c), _CB_MAX, max(1, _TILE // bs))
    bn = min(max(1, _TILE // (bs * cb)), next_pow2(n))
    return bn, cb, bs


def _plan(n: int, c: int, s: int, device: torch.device) -> Tuple[int, int, int, int, int, int]:
    """(BN, CB, BS, channel blocks, tiles per channel block, programs per channel block) of the forward."""
    bn, cb, bs = _tiles(n, c, s)
    c_blocks = cdiv(c, cb)
    n_tiles = cdiv(n, bn) * cdiv(s, bs)
    programs = max(1, min(n_tiles, _PROGRAMS_PER_SM * num_sms(device) // c_blocks))
    return bn, cb, bs, c_blocks, n_tiles, programs


def _view(activations: Tensor) -> Tuple[Tensor, int, int, int]:
    x = activations.contiguous()
    n, c = x.shape[0], x.shape[1]
    return x, n, c, x.numel() // (n * c)


@triton_op(SPEC)
def _bn_stats_op(activations: Tensor, running_mean: Tensor, running_var: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(value [], mean [C], coef [2, C]), fp32."""
    x, n, c, s = _view(activations)  # x: [N, C, S]
    device = x.device
    rm = running_mean.to(torch.float32).contiguous()
    rv = running_var.to(torch.float32).contiguous()
    bn, cb, bs, c_blocks, n_tiles, programs = _plan(n, c, s, device)
    p1 = empty((programs, c), device, torch.float64)
    p2 = empty((programs, c), device)
    value, mean, coef = empty((), device), empty((c,), device), empty((2, c), device)
    launch(_stats_kernel, (programs, c_blocks), x, p1, p2, n, c, s, n_tiles, BN=bn, CB=cb, BS=bs, num_warps=8)
    launch(
        _finish_kernel, (1,), p1, p2, programs, x, rm, rv, value, mean, coef, c, s, n * s,
        FR=_FINISH_ROWS, FC=_FINISH_CHANNELS, num_warps=8,
    )
    return value, mean, coef


@triton_op("bn_stats_backward")
def _bn_stats_backward_op(grad: Tensor, activations: Tensor, mean: Tensor, coef: Tensor) -> Tensor:
    """d/dactivations = grad * (a_c + b_c (x - mean_c)): the activations' shape and dtype (contiguous)."""
    x, n, c, s = _view(activations)  # x: [N, C, S]
    dx = empty(x.shape, x.device, x.dtype)
    bn, cb, bs = _tiles(n, c, s)
    launch(
        _backward_kernel, (cdiv(n, bn) * cdiv(s, bs), cdiv(c, cb)), grad, x,
        mean.to(torch.float32).contiguous(), coef.to(torch.float32).contiguous(), dx, n, c, s,
        BN=bn, CB=cb, BS=bs, num_warps=4,
    )
    return dx


_setup_context, _backward = SPEC.value_autograd(_bn_stats_backward_op)  # d/dx: the helper backward op
_bn_stats_op.register_autograd(_backward, setup_context=_setup_context)


def bn_stats(activations: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """Fused ``tldr_fast.reference.bn_stats``: ``activations`` [N, C, ...], ``running_mean`` and
    ``running_var`` [C] on its device; returns the fp32 value [] (fp64 inputs are computed in fp32),
    differentiable w.r.t. the activations (gradient in their dtype)."""
    SPEC.check(activations, running_mean, running_var)
    return _bn_stats_op(compute_dtype(activations), running_mean, running_var)[0]


def compile_cases(dtype: torch.dtype) -> Iterator[Callable[[], object]]:
    """Representative calls of ``bn_stats`` on CPU tensors of ``dtype``, for ``kernels._aot``: together
    they launch every kernel variant (constexpr branch) that GPU shapes select, forward and backward."""
    def value_backward(x: Tensor) -> None:
        c = x.shape[1]
        bn_stats(x, torch.zeros(c), torch.ones(c)).backward()

    # [N, C] (channels contiguous, several samples per tile; one sample: M = 1), odd and large
    # spatial sizes, one channel
    shapes = ((1024, 256), (33, 20), (1, 5), (64, 512, 7, 7), (8, 64, 56, 56), (4, 12, 31), (2, 1, 28, 28))
    for shape in shapes:
        yield partial(value_backward, torch.zeros(shape, dtype=dtype, requires_grad=True))
