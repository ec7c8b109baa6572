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
products need fp32 accuracy, not more: ``precision="tf32x3"`` (default; three TF32 products, ~fp32
accurate) or ``"ieee"`` (fp32 FMAs, no tensor cores). ``"bf16x3"`` (GPU only: three bf16 products,
~1e-5 relative per product) is opt-in; its tests hold it to 1e-4 of scikit-image.

Layout: images pixel-major (``[C*H*W, N]``) and statistics position-major (``[P, N]``), so each
load of a window pixel or statistic for a tile of images is contiguous.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tldr_fast.reference import SSIM_K1, SSIM_K2, SSIM_WIN

from ._utils import INTERPRET, empty

Tensor = torch.Tensor
WIN = SSIM_WIN  # the kernel is written for 7x7 windows (49 pixels, padded to 64)
PRECISIONS = ("tf32x3", "ieee", "bf16x3")


@triton.jit
def _pairwise_ssim_kernel(
    a_ptr,  # images a: [C*H*W, N] fp32, pixel-major
    b_ptr,  # images b: [C*H*W, M] fp32, pixel-major
    mua_ptr, vara_ptr,  # window mean and sample variance of a: [P, N] fp32
    mub_ptr, varb_ptr,  # of b: [P, M] fp32
    out_ptr,  # SSIM: [N, M] fp32
    N, M, H, W, HO, WO, P,  # P = C * HO * WO window positions
    c1, c2,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
):
    # Program (pid_n, pid_m): a tile of BLOCK_N images of a against BLOCK_M images of b. pid_n varies
    # fastest, so the programs running together share their tile of b (one DRAM read of b).
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_n = tl.program_id(0) % tiles_n
    pid_m = tl.program_id(0) // tiles_n
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = rn < N
    m_ok = rm < M
    q = tl.arange(0, 64)  # window pixel: row q // 7, column q % 7; q >= 49 is padding
    q_ok = q < 49
    q_off = ((q // 7) * W + q % 7).to(tl.int64)  # offset from the window's top-left pixel
    a_win = a_ptr + q_off[:, None] * N + rn[None, :]  # [64, BN]: the window at pixel 0
    b_win = b_ptr + q_off[:, None] * M + rm[None, :]  # [64, BM]
    a_mask = q_ok[:, None] & n_ok[None, :]
    b_mask = q_ok[:, None] & m_ok[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for p in range(0, P):
        c = p // (HO * WO)
        yx = p % (HO * WO)
        corner = (c * H * W + (yx // WO) * W + yx % WO).to(tl.int64)  # the window's top-left pixel
        p64 = tl.cast(p, tl.int64)
        mua = tl.load(mua_ptr + p64 * N + rn, mask=n_ok, other=0.0)  # [BN]
        vara = tl.load(vara_ptr + p64 * N + rn, mask=n_ok, other=0.0)
        mub = tl.load(mub_ptr + p64 * M + rm, mask=m_ok, other=0.0)  # [BM]
        varb = tl.load(varb_ptr + p64 * M + rm, mask=m_ok, other=0.0)
        wa = tl.load(a_win + corner * N, mask=a_mask, other=0.0)  # [64, BN]
        wb = tl.load(b_win + corner * M, mask=b_mask, other=0.0)  # [64, BM]
        wa = tl.where(a_mask, wa - mua[None, :], 0.0)  # centred windows, zero padding
        wb = tl.where(b_mask, wb - mub[None, :], 0.0)
        cov48 = tl.dot(tl.trans(wa), wb, input_precision=PRECISION)  # [BN, BM]: 48 cov
        num = (2.0 * mua[:, None] * mub[None, :] + c1) * (cov48 * (2.0 / 48.0) + c2)
        den = ((mua * mua + c1)[:, None] + (mub * mub)[None, :]) * ((vara + c2)[:, None] + varb[None, :])
        acc += tl.fdiv(num, den)
    out = out_ptr + rn.to(tl.int64)[:, None] * M + rm[None, :]
    tl.store(out, acc / P, mask=n_ok[:, None] & m_ok[None, :])


# Tile shapes tried on the GPU (autotuned once per image size and precision), all within sm_90's
# shared memory (at most 193 KB: 128x128 with 3 stages would need 258 KB); one small tile under the
# interpreter, where tests use small N and M.
_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_M": bm}, num_warps=w, num_stages=s)
    for bn, bm, w, s in ((64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 2), (128, 64, 4, 2), (64, 128, 8, 2), (128, 128, 8, 2))
]
_kernel = _pairwise_ssim_kernel if INTERPRET else triton.autotune(_CONFIGS, key=["P", "PRECISION"])(_pairwise_ssim_kernel)
_INTERPRET_BLOCK = 16


def _prepare(x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Images -> (pixel-major fp32 [C*H*W, n], window mean [P, n], window sample variance [P, n]).

    The statistics use fp64 window sums (``box(x^2) - mu^2`` cancels in fp32), stored as fp32."""
    if x.dim() != 4 or x.shape[-1] < WIN or x.shape[-2] < WIN:
        raise ValueError(f"images must be [N, C, H, W] with H, W >= 7, got {tuple(x.shape)}")
    x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
    xd = x.double()
    mu = F.avg_pool2d(xd, WIN, stride=1)
    var = (F.avg_pool2d(xd * xd, WIN, stride=1) - mu * mu) * (WIN * WIN / (WIN * WIN - 1))
    n = x.shape[0]
    return (x.reshape(n, -1).t().contiguous(), mu.reshape(n, -1).t().float().contiguous(),
            var.reshape(n, -1).t().float().contiguous())


def pairwise_ssim(a: Tensor, b: Tensor, data_range: float = 1.0, precision: str = "tf32x3") -> Tensor:
    """SSIM of every image of ``a`` against every image of ``b``, as scikit-image defines it.

    Args:
        a: ``[N, C, H, W]``, b: ``[M, C, H, W]`` on one device (CUDA, or CPU under the interpreter);
            fp32, fp16, bf16 or fp64 in ``[0, data_range]``, or uint8 (divided by 255).
        data_range: the range of the pixel values (c1 = (0.01 R)^2, c2 = (0.03 R)^2).
        precision: of the window products: "tf32x3" (default), "ieee" (fp32 FMAs, no tensor cores)
            or "bf16x3" (GPU only, opt-in; see the module docstring).

    Returns:
        ``[N, M]`` fp32.
    """
    if a.shape[1:] != b.shape[1:] or a.device != b.device:
        raise ValueError(f"a and b must share [C, H, W] and device, got {tuple(a.shape)} and {tuple(b.shape)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    n, m = a.shape[0], b.shape[0]
    _, c, h, w = a.shape
    out = empty((n, m), a.device)
    if n == 0 or m == 0:
        return out
    at, mua, vara = _prepare(a)
    bt, mub, varb = _prepare(b)
    ho, wo = h - WIN + 1, w - WIN + 1
    args = (at, bt, mua, vara, mub, varb, out, n, m, h, w, ho, wo, c * ho * wo,
            (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2)
    if INTERPRET:
        grid = (triton.cdiv(n, _INTERPRET_BLOCK) * triton.cdiv(m, _INTERPRET_BLOCK),)
        _kernel[grid](*args, BLOCK_N=_INTERPRET_BLOCK, BLOCK_M=_INTERPRET_BLOCK, PRECISION=precision)
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
        with torch.cuda.device(a.device):
            _kernel[grid](*args, PRECISION=precision)
    return out
