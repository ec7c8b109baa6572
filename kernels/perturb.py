"""perturb: ``clip(x + eps * s, lo, hi)`` with Rademacher / uniform / Gaussian noise ``s`` from Triton's
Philox generator, in one pass; reproducible from ``seed``. With ``theta`` the same pass also moves each
image by its affine transform (``reference.warp``: the warp fused).

Element e of the flattened images takes its noise from Philox counter ``e // LANES``: a Rademacher
sign is bit ``e % 32`` of one 32-bit draw (one Philox evaluation per 32 elements); uniform and Gaussian
values are lane ``e % 4`` of ``rand4x`` / ``randn4x`` (one evaluation per 4 elements). The noise is a
function of (seed, element index) only, so the backward regenerates it instead of saving a mask:

    d clip(x + eps s, lo, hi) / dx = 1 where lo <= x + eps s <= hi, else 0   (torch.clamp's convention)

The warp (``theta`` ``[B, 2, 3]``; constexpr WARP: 1 bilinear, 2 nearest). Each OUTPUT pixel (b, c, i, j)
of the ``[B, C, H, W]`` images samples ``p = clip(x + eps s, lo, hi)`` at the source point of
``F.affine_grid`` + ``F.grid_sample`` with ``align_corners=False``:

    x_n = (2j + 1)/W - 1,   y_n = (2i + 1)/H - 1                   (the pixel's centre in [-1, 1])
    u = (theta[b, 0] . [x_n, y_n, 1] + 1) W/2 - 0.5,   v = (theta[b, 1] . [x_n, y_n, 1] + 1) H/2 - 0.5
    out[b, c, i, j] = lo + sum_k w_k [k inside the image] (p[b, c, v_k, u_k] - lo)

bilinear: the 4 neighbours (u_k, v_k) = (u0 + dx, v0 + dy), dx, dy in {0, 1}, u0 = floor(u), v0 = floor(v),
with ``w_k = (dx ? u - u0 : 1 - (u - u0)) (dy ? v - v0 : 1 - (v - v0))``; nearest: the one pixel
(rint(u), rint(v)), halves rounded to even (grid_sample's nearbyint), ``w = 1``. That is grid_sample of
``p - lo`` with zeros padding, plus ``lo``: pixels from outside read ``lo``. Each source pixel's noise is
regenerated from its own element index, so it is exactly the noise of the op without ``theta``. The
source points are F.affine_grid's up to fp32 rounding (about an ulp of the pixel coordinate: PyTorch
rounds its linspace, batched matrix product and FMAs differently on the CPU and the GPU), so a bilinear
output agrees with the reference to that times a neighbour difference, and "nearest" may pick the other
pixel for a source point within that of a tie.

The backward with the warp: out is linear in p with weights w_k, and dp/dx is the clip mask, so

    d/dx[b, c, y, x] = [lo <= x + eps s <= hi] * sum of w_k g[b, c, i, j] over the (i, j, k) with (u_k, v_k) = (x, y)

for the upstream gradient g: each output pixel scatters ``w_k g`` to its neighbours (``tl.atomic_add`` into
a zeroed fp32 buffer, converted to the images' dtype after). The order of those additions varies from run
to run on a GPU, so this gradient is reproducible only up to the last bits. theta gets no gradient.

One kernel, ``_perturb_kernel``, serves the forward, the backward and ``perturb_noise`` (the noise alone,
for tests), selected by a constexpr MODE, with or without the warp (constexpr WARP): one launch each. It
computes in fp32 whatever the images' dtype.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator, Optional

import torch
import triton
import triton.language as tl

from tldr_fast.ops.perturb import PERTURBATIONS, SPEC, kind_index, mode_index

from ._utils import cdiv, compute_dtype, empty, launch, triton_op

Tensor = torch.Tensor
FORWARD, BACKWARD, NOISE = 0, 1, 2
_BLOCK = 1024  # elements per program
# with the warp: a Philox evaluation per neighbour of each output pixel; at 1024 the bilinear Gaussian
# variant spills registers on sm_90 (255 registers and a 700-byte stack, `python -m tldr_fast.kernels._aot
# perturb`), at 256 it takes 122 and none
_WARP_BLOCK = 256
_SEED_MASK = (1 << 63) - 1


@triton.jit
def _noise(seed, words, lane, LANES: tl.constexpr, KIND: tl.constexpr):
    """Noise (fp32) of the elements ``words * LANES + lane`` (int32 tensors that broadcast together): one
    Philox evaluation per entry of ``words``."""
    if KIND == 0:  # Rademacher: one bit per element
        bits = tl.randint(seed, words)
        s = tl.where(((bits >> lane.to(tl.uint32)) & 1) == 1, 1.0, -1.0)
    else:
        if KIND == 1:
            r0, r1, r2, r3 = tl.rand4x(seed, words)
        else:
            r0, r1, r2, r3 = tl.randn4x(seed, words)
        s = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
        if KIND == 1:
            s = 2.0 * s - 1.0  # uniform in [-1, 1)
    return s


@triton.jit
def _rint(u):
    """``u`` rounded to the nearest integer, halves to even (``nearbyint``), as an fp32 value; |u| < 2**23."""
    f = tl.floor(u)
    d = u - f  # exact
    return tl.where((d > 0.5) | ((d == 0.5) & ((f.to(tl.int32) & 1) == 1)), f + 1.0, f)


@triton.jit
def _tap(
    acc, x_ptr, out_ptr, g, plane, xs, ys, w, mask, eps, lo, hi, seed, H, W,
    KIND: tl.constexpr, MODE: tl.constexpr, LANES: tl.constexpr,
):
    """The source pixel (xs, ys) of each output pixel of a block, with weight w: forward, acc + w (p - lo)
    where it lies inside the image; backward, w g added to its gradient where it lies inside and the clip is
    inactive. ``plane``: the element index of the image's (b, c, 0, 0); p and the mask from the source's own
    element index and noise."""
    inside = mask & (xs >= 0) & (xs < W) & (ys >= 0) & (ys < H)
    e = plane + ys * W + xs  # the source's element index
    s = _noise(seed, (e // LANES).to(tl.int32), (e % LANES).to(tl.int32), LANES, KIND)
    v = tl.load(x_ptr + e, mask=inside, other=0.0).to(tl.float32) + eps * s
    if MODE == 0:
        acc += tl.where(inside, w * (tl.minimum(tl.maximum(v, lo), hi) - lo), 0.0)
    else:
        tl.atomic_add(out_ptr + e, w * g, mask=inside & (v >= lo) & (v <= hi))
    return acc


@triton.jit(do_not_specialize=["seed"])
def _perturb_kernel(
    x_ptr,  # images: [n] (flattened); with WARP: [B, C, H, W]
    g_ptr,  # BACKWARD: upstream gradient, [n]
    theta_ptr,  # WARP: theta: [B, 2, 3] fp32
    out_ptr,  # FORWARD: perturbed images; BACKWARD: d/dimages (with WARP: fp32, zeroed); NOISE: s (fp32); [n]
    n, eps, lo, hi, seed, C, H, W,
    KIND: tl.constexpr, MODE: tl.constexpr, WARP: tl.constexpr, WORDS: tl.constexpr, LANES: tl.constexpr,
):
    eps = tl.cast(eps, tl.float32)  # float arguments in fp32 (see _utils)
    lo = tl.cast(lo, tl.float32)
    hi = tl.cast(hi, tl.float32)
    pid = tl.program_id(0)
    words = pid * WORDS + tl.arange(0, WORDS)  # Philox counters
    lane = tl.arange(0, LANES)
    offs = words.to(tl.int64)[:, None] * LANES + lane[None, :]  # [WORDS, LANES]
    mask = offs < n
    if WARP == 0:
        s = _noise(seed, words[:, None], lane[None, :], LANES, KIND)
        if MODE == 2:
            tl.store(out_ptr + offs, s, mask=mask)
        else:
            v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + eps * s
            if MODE == 0:
                y = tl.minimum(tl.maximum(v, lo), hi)
            else:
                y = tl.where((v >= lo) & (v <= hi), tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32), 0.0)
            tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:  # offs are output pixels (b, c, i, j): their source points (module doc)
        j = offs % W
        i = (offs // W) % H
        plane = offs - i * W - j  # element (b, c, 0, 0)
        t = theta_ptr + (offs // (C * H * W)) * 6  # theta[b]: [2, 3]
        xn = (2 * j + 1 - W) / W  # x_n in fp32, rounded once
        yn = (2 * i + 1 - H) / H
        gx = tl.load(t, mask=mask, other=0.0) * xn + tl.load(t + 1, mask=mask, other=0.0) * yn
        gy = tl.load(t + 3, mask=mask, other=0.0) * xn + tl.load(t + 4, mask=mask, other=0.0) * yn
        u = (gx + tl.load(t + 2, mask=mask, other=0.0) + 1.0) * (W * 0.5) - 0.5
        v = (gy + tl.load(t + 5, mask=mask, other=0.0) + 1.0) * (H * 0.5) - 0.5
        # a pixel or more outside the image every neighbour is outside: clamped there, any theta gives valid indices
        u = tl.minimum(tl.maximum(u, -2.0), W + 1.0)
        v = tl.minimum(tl.maximum(v, -2.0), H + 1.0)
        g = 0.0
        if MODE == 1:
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc = tl.zeros([WORDS, LANES], tl.float32)
        if WARP == 1:  # bilinear: the 4 neighbours
            u0 = tl.floor(u)
            v0 = tl.floor(v)
            fu = u - u0
            fv = v - v0
            x0 = u0.to(tl.int64)
            y0 = v0.to(tl.int64)
            for k in tl.static_range(4):  # the neighbour (x0 + k % 2, y0 + k // 2): grid_sample's nw, ne, sw, se
                w = (fu if k % 2 == 1 else 1.0 - fu) * (fv if k // 2 == 1 else 1.0 - fv)
                acc = _tap(acc, x_ptr, out_ptr, g, plane, x0 + k % 2, y0 + k // 2, w, mask, eps, lo, hi, seed, H, W,
                           KIND, MODE, LANES)
        else:  # nearest
            xs = _rint(u).to(tl.int64)
            ys = _rint(v).to(tl.int64)
            acc = _tap(acc, x_ptr, out_ptr, g, plane, xs, ys, 1.0, mask, eps, lo, hi, seed, H, W, KIND, MODE, LANES)
        if MODE == 0:
            tl.store(out_ptr + offs, (acc + lo).to(out_ptr.dtype.element_ty), mask=mask)


def _run(
    mode: int, x: Tensor, g: Tensor, theta: Optional[Tensor], out: Tensor,
    eps: float, lo: float, hi: float, kind: int, seed: int, warp_mode: int,
) -> Tensor:
    """One launch of MODE ``mode``; ``theta`` ``[B, 2, 3]`` (with ``warp_mode``, the index in ``WARP_MODES``)
    or None: no warp."""
    lanes = 32 if kind == 0 else 4
    n = out.numel()
    block = _BLOCK if theta is None else _WARP_BLOCK
    if theta is None:
        warp, theta, (c, h, w) = 0, x, (1, 1, 1)  # theta_ptr unread
    else:
        warp, theta, (c, h, w) = 1 + warp_mode, theta.to(torch.float32).contiguous(), x.shape[1:]
    launch(
        _perturb_kernel, (cdiv(n, block),), x, g, theta, out, n, eps, lo, hi, seed & _SEED_MASK, c, h, w,
        KIND=kind, MODE=mode, WARP=warp, WORDS=block // lanes, LANES=lanes, num_warps=4,
    )
    return out


@triton_op(SPEC)
def _perturb_op(
    images: Tensor, eps: float, lo: float, hi: float, kind: int, seed: int,
    theta: Optional[Tensor] = None, mode: int = 0,
) -> Tensor:
    x = images.contiguous()
    return _run(FORWARD, x, x, theta, empty(x.shape, x.device, x.dtype), eps, lo, hi, kind, seed, mode)


@triton_op("perturb_backward")
def _perturb_backward_op(
    grad: Tensor, images: Tensor, eps: float, lo: float, hi: float, kind: int, seed: int,
    theta: Optional[Tensor], mode: int,
) -> Tensor:
    x = images.contiguous()
    if theta is None:
        out = empty(x.shape, x.device, x.dtype)
    else:  # the kernel adds into it (fp32 atomics)
        out = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
    return _run(BACKWARD, x, grad.contiguous(), theta, out, eps, lo, hi, kind, seed, mode).to(x.dtype)


def _setup_context(ctx, inputs, output) -> None:
    images, ctx.eps, ctx.lo, ctx.hi, ctx.kind, ctx.seed, theta, ctx.mode = inputs
    ctx.save_for_backward(images, theta)


def _backward(ctx, grad):
    images, theta = ctx.saved_tensors
    d_images = _perturb_backward_op(grad, images, ctx.eps, ctx.lo, ctx.hi, ctx.kind, ctx.seed, theta, ctx.mode)
    return d_images, None, None, None, None, None, None, None


_perturb_op.register_autograd(_backward, setup_context=_setup_context)


def perturb(
    images: Tensor,
    eps: float,
    lo: float,
    hi: float,
    kind: str,
    seed: int,
    theta: Optional[Tensor] = None,
    mode: str = "bilinear",
) -> Tensor:
    """Fused ``tldr_fast.reference.perturb``: ``clip(images + eps * s, lo, hi)`` with noise ``kind`` in
    ``tldr_fast.ops.perturb.PERTURBATIONS`` drawn from ``seed`` (bits above 63 ignored); same shape and dtype
    as ``images``; the gradient is the clip mask. The same seed gives the same noise on every call. With
    ``theta`` ``[B, 2, 3]``, moved in the same pass by ``reference.warp(., theta, fill=lo, mode)`` (mode
    "bilinear" or "nearest"; no gradient for theta)."""
    SPEC.check(images, eps, lo, hi, kind, seed, theta, mode)
    y = _perturb_op(
        compute_dtype(images), float(eps), float(lo), float(hi), kind_index(kind), int(seed), theta, mode_index(mode)
    )
    return y.to(images.dtype)


def perturb_noise(shape: torch.Size, kind: str, seed: int, device: torch.device) -> Tensor:
    """The fp32 noise ``s`` that ``perturb`` with this ``kind`` and ``seed`` adds (times eps) to images
    of ``shape``: the same Philox stream, written out (for tests and inspection)."""
    out = torch.empty(tuple(shape), device=device, dtype=torch.float32)
    return _run(NOISE, out, out, None, out, 0.0, 0.0, 0.0, kind_index(kind), int(seed), 0)


def compile_cases(dtype: torch.dtype) -> Iterator[Callable[[], object]]:
    """Representative calls of ``perturb`` on CPU tensors of ``dtype``, for ``kernels._aot``: together
    they launch every kernel variant (constexpr branch) that GPU shapes select, forward and backward."""
    x = torch.zeros(64, 3, 32, 32, dtype=dtype, requires_grad=True)
    theta = torch.eye(2, 3).repeat(64, 1, 1)  # [B, 2, 3]

    def forward_backward(kind: str, *warp) -> None:
        perturb(x, 0.1, -1.0, 1.0, kind, 1, *warp).sum().backward()

    for kind in PERTURBATIONS:
        for warp in ((), (theta, "bilinear"), (theta, "nearest")):
            yield partial(forward_backward, kind, *warp)
