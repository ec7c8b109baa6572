"""pairwise_ssim: the [N, M] SSIM matrix of two image sets as tiled tensor-core matrix products.

SSIM (scikit-image's defaults; ``tldr_fast.reference.pairwise_ssim``) of images x, y is the mean over
the 7x7 window positions p (and channels) of
    ssim_p = (2 mu_x mu_y + c1)(2 cov_p + c2) / ((mu_x^2 + mu_y^2 + c1)(var_x + var_y + c2)),
with window means mu, sample variances var and covariance
    cov_p = (1/48) sum_q (x_q - mu_x,p)(y_q - mu_y,p)     (q over the window's 49 pixels).
mu and var belong to one image: computed once per image, before the kernel (fp64 window sums, fp32
results). Only cov is per pair; for a tile of BN images of a and BM images of b at position p it is
one matrix product of their centred windows, ``[BN, 49] x [49, BM]`` (K padded to 64), which
``_pairwise_ssim_kernel`` runs on tensor cores and follows with the SSIM formula on the [BN, BM]
tile, summing over p in registers: a program writes its [BN, BM] block of the output once.

Centring before the product (rather than ``sum x y - 49 mu_x mu_y``) leaves no cancellation, so the
products need fp32 accuracy, not more: ``precision="fp16x3"`` (default: each operand split into fp16
hi + lo halves, three fp16 tensor-core products; fp16 has TF32's significand, so this is as accurate as
``"tf32x3"`` at twice the tensor-core rate), ``"tf32x3"`` (Triton's three TF32 products) or ``"ieee"``
(fp32 FMAs, no tensor cores). ``"bf16x3"`` (GPU only: three bf16 products, ~1e-5 relative per product)
is opt-in; its tests hold it to 1e-4 of scikit-image.

Layout: images pixel-major (``[C*H*W, N]``) and statistics position-major (``[P, N]``), so each
load of a window pixel or statistic for a tile of images is contiguous; image counts padded with
zero images to a multiple of every tile side, so that no load is masked.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra import libdevice

from tldr_fast.ops.pairwise_ssim import SPEC, SSIM_K1, SSIM_K2, SSIM_WIN

from ._utils import INTERPRET, empty

Tensor = torch.Tensor
WIN = SSIM_WIN  # the kernel is written for 7x7 windows (49 pixels, padded to 64)
PRECISIONS = ("fp16x3", "tf32x3", "ieee", "bf16x3")


@triton.jit
def _split(x, DT: tl.constexpr):
    """fp32 x -> (hi, lo) in DT with hi + lo = x to ~2x DT's precision."""
    hi = x.to(DT)
    return hi, (x - hi.to(tl.float32)).to(DT)


@triton.jit
def _window_products(wa, wb, PRECISION: tl.constexpr):
    """wa: [64, BN], wb: [64, BM] fp32 -> wa^T wb: [BN, BM] fp32.

    "fp16x3": hi/lo fp16 halves of each operand, hi_a lo_b + lo_a hi_b + hi_a hi_b (small terms first)
    on fp16 tensor cores, fp32 accumulation. fp16 has TF32's 11-bit significand, so this is "tf32x3"'s
    accuracy (~2^-22 relative per product; the centred values are <= 1 in magnitude, so fp16's range is
    no limit) at twice its tensor-core rate. Other values go to tl.dot's input_precision."""
    if PRECISION == "fp16x3":
        ah, al = _split(tl.trans(wa), tl.float16)
        bh, bl = _split(wb, tl.float16)
        acc = tl.dot(ah, bl)
        acc = tl.dot(al, bh, acc)
        return tl.dot(ah, bh, acc)
    else:
        return tl.dot(tl.trans(wa), wb, input_precision=PRECISION)


@triton.jit
def _pairwise_ssim_kernel(
    a_ptr,  # images a: [C*H*W, NP] fp32, pixel-major, NP = N padded to a multiple of PAD with zeros
    b_ptr,  # images b: [C*H*W, MP] fp32
    mua_ptr, vara_ptr,  # window mean and sample variance (+ c2) of a: [P, NP] fp32
    mub_ptr, varb_ptr,  # of b: [P, MP] fp32
    out_ptr,  # SSIM: [N, M] fp32
    N, M, NP, MP, H, W, HO, WO, P,  # P = C * HO * WO window positions
    c1, c2,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, FAST_DIV: tl.constexpr,
):
    # Program (pid_n, pid_m): a tile of BLOCK_N images of a against BLOCK_M images of b. pid_n varies
    # fastest, so the programs running together share their tile of b (one DRAM read of b). The inputs
    # are padded, so no load is masked; int32 offsets (the host keeps C*H*W*max(NP, MP) < 2^31).
    tiles_n = NP // BLOCK_N
    pid_n = tl.program_id(0) % tiles_n
    pid_m = tl.program_id(0) // tiles_n
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = tl.arange(0, 64)  # window pixel: row q // 7, column q % 7; q >= 49 is padding
    q_ok = q < 49
    q_off = tl.where(q_ok, (q // 7) * W + q % 7, 0)  # offset from the window's top-left pixel
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for p in range(0, P):
        c = p // (HO * WO)
        yx = p - c * (HO * WO)
        pix = c * H * W + (yx // WO) * W + yx % WO + q_off  # [64]: the window's pixels
        mua = tl.load(mua_ptr + p * NP + rn)  # [BN]
        vara = tl.load(vara_ptr + p * NP + rn)
        mub = tl.load(mub_ptr + p * MP + rm)  # [BM]
        varb = tl.load(varb_ptr + p * MP + rm)
        wa = tl.load(a_ptr + pix[:, None] * NP + rn[None, :])  # [64, BN]
        wb = tl.load(b_ptr + pix[:, None] * MP + rm[None, :])  # [64, BM]
        wa = tl.where(q_ok[:, None], wa - mua[None, :], 0.0)  # centred; padding rows 0 on one side
        wb = wb - mub[None, :]
        cov48 = _window_products(wa, wb, PRECISION)  # [BN, BM]: 48 cov
        # ssim_p = (2 mu_a mu_b + c1)(2 cov + c2) / ((mu_a^2 + c1 + mu_b^2)(var_a + c2 + var_b)):
        # 2 FMA, 2 adds, 2 products and one division per pair; everything else is per image
        num = tl.fma((2.0 * mua)[:, None], mub[None, :], c1) * tl.fma(cov48, 2.0 / 48.0, c2)
        den = ((mua * mua + c1)[:, None] + (mub * mub)[None, :]) * (vara[:, None] + varb[None, :])
        if FAST_DIV:  # div.approx (2 ulp; den >= c1 c2 is far from its range limits)
            acc += libdevice.fast_dividef(num, den)
        else:  # the interpreter has no fast_dividef
            acc += num / den
    out = out_ptr + rn.to(tl.int64)[:, None] * M + rm[None, :]
    tl.store(out, acc / P, mask=(rn < N)[:, None] & (rm < M)[None, :])


# Tile shapes tried on the GPU (autotuned once per image size and precision): those whose fp16x3
# build for sm_90 has no register spills (checked with cuobjdump, tests/test_pairwise_ssim.py) under the
# installed Triton: 128x128 spills 40 bytes under Triton 3.9's compiler (255 registers), not under 3.6.
# One small tile under the interpreter, where tests use small N and M.
_TRITON = tuple(int(v) for v in triton.__version__.split(".")[:2])
_TILES = ((64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 8, 2), (64, 128, 8, 3), (128, 64, 8, 2))
_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_M": bm}, num_warps=w, num_stages=s)
    for bn, bm, w, s in _TILES + (((128, 128, 8, 2),) if _TRITON < (3, 9) else ())
]
_kernel = _pairwise_ssim_kernel if INTERPRET else triton.autotune(_CONFIGS, key=["P", "PRECISION"])(_pairwise_ssim_kernel)
_INTERPRET_BLOCK = 16


PAD = _INTERPRET_BLOCK if INTERPRET else 128  # image counts padded to a multiple of every tile side
_MAX_OFFSET = 2**31  # the kernel's int32 offsets: C*H*W * padded image count must stay below
_FP16_SAFE = 2.0**14  # fp16x3 splits centred pixels (|x - mu| <= 2 max|x|) into fp16 (max 65504)


def _prepare(x: Tensor, data_range: float, add: float = 0.0) -> Tuple[Tensor, Tensor, Tensor]:
    """Images -> (pixel-major fp32 [C*H*W, n_pad], window mean [P, n_pad], window sample variance + add
    [P, n_pad]), scaled to data range 1 (SSIM with c1, c2 scaled alike is unchanged) and zero-padded
    to a multiple of ``PAD`` images.

    The statistics use fp64 window sums (``box(x^2) - mu^2`` cancels in fp32), stored as fp32."""
    if x.dim() != 4 or x.shape[-1] < WIN or x.shape[-2] < WIN:
        raise ValueError(f"images must be [N, C, H, W] with H, W >= 7, got {tuple(x.shape)}")
    xd = x.double().div_(255.0 * data_range if x.dtype == torch.uint8 else data_range)
    n = x.shape[0]
    pad = -n % PAD
    xd = F.pad(xd, (0, 0, 0, 0, 0, 0, 0, pad))
    mu = F.avg_pool2d(xd, WIN, stride=1)
    var = (F.avg_pool2d(xd * xd, WIN, stride=1) - mu * mu) * (WIN * WIN / (WIN * WIN - 1)) + add
    m = n + pad
    return (xd.float().reshape(m, -1).t().contiguous(), mu.reshape(m, -1).t().float().contiguous(),
            var.reshape(m, -1).t().float().contiguous())


def pairwise_ssim(a: Tensor, b: Tensor, data_range: float = 1.0, precision: str = "fp16x3") -> Tensor:
    """SSIM of every image of ``a`` against every image of ``b``, as scikit-image defines it.

    Args:
        a: ``[N, C, H, W]``, b: ``[M, C, H, W]`` on one device (CUDA, or CPU under the interpreter);
            fp32, fp16, bf16 or fp64 in ``[0, data_range]``, or uint8 (divided by 255).
        data_range: the range of the pixel values (c1 = (0.01 R)^2, c2 = (0.03 R)^2).
        precision: of the window products: "fp16x3" (default), "tf32x3" (Triton's three TF32
            products; same accuracy, half the tensor-core rate), "ieee" (fp32 FMAs, no tensor cores)
            or "bf16x3" (GPU only, ~1e-5 relative per product; its tests hold it to 1e-4).

    Returns:
        ``[N, M]`` fp32.
    """
    SPEC.check(a, b, data_range)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    n, m = a.shape[0], b.shape[0]
    _, c, h, w = a.shape
    if c * h * w * PAD >= _MAX_OFFSET:
        raise ValueError(f"images of {c}x{h}x{w} pixels exceed the Triton SSIM kernel's int32 offsets; "
                         "use backend='torch'")
    chunk = max(PAD, (_MAX_OFFSET // (c * h * w)) // PAD * PAD - PAD)  # images per launch (int32 offsets)
    if n > chunk:
        return torch.cat([pairwise_ssim(a[i:i + chunk], b, data_range, precision) for i in range(0, n, chunk)])
    if m > chunk:
        return torch.cat([pairwise_ssim(a, b[j:j + chunk], data_range, precision) for j in range(0, m, chunk)], dim=1)
    out = empty((n, m), a.device)
    if n == 0 or m == 0:
        return out
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # data range 1 after _prepare
    at, mua, vara = _prepare(a, data_range, add=c2)  # den = (mu_a^2 + mu_b^2 + c1)(var_a + c2 + var_b)
    bt, mub, varb = _prepare(b, data_range)
    if precision == "fp16x3" and torch.maximum(at.abs().amax(), bt.abs().amax()).item() > _FP16_SAFE:
        precision = "tf32x3"  # pixels far outside data_range would overflow fp16; tf32x3 is as accurate
    np_, mp = at.shape[1], bt.shape[1]
    ho, wo = h - WIN + 1, w - WIN + 1
    args = (at, bt, mua, vara, mub, varb, out, n, m, np_, mp, h, w, ho, wo, c * ho * wo, c1, c2)
    if INTERPRET:
        grid = ((np_ // _INTERPRET_BLOCK) * (mp // _INTERPRET_BLOCK),)
        _kernel[grid](*args, BLOCK_N=_INTERPRET_BLOCK, BLOCK_M=_INTERPRET_BLOCK, PRECISION=precision, FAST_DIV=False)
    else:
        grid = lambda meta: ((np_ // meta["BLOCK_N"]) * (mp // meta["BLOCK_M"]),)  # noqa: E731
        with torch.cuda.device(a.device):
            _kernel[grid](*args, PRECISION=precision, FAST_DIV=True)
    return out
