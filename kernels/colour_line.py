"""colour_line: the variance of each image's pixel colours off their principal line, averaged over the batch
(declaration, definition and gradient: ``tldr_fast/ops/colour_line.py``).

With x [B, 3, N] (N = H W pixels per channel), per image i:
    K = x[i, :, 0] (a colour of the image: shifted sums do not cancel badly),  d_p = x_p - K,
    m = K + (1/N) sum_p d_p,   S = (1/N) sum_p d_p d_p^T - (mean d)(mean d)^T        (fp32 sums)
    v = the principal direction of S: S^(2^k) by ``_SQUARINGS`` squarings of S / tr S, each renormalised by
        its trace, tends to v v^T (the other eigenvalues' share falls as (lambda_2 / lambda_1)^(2^k)); v is
        its column of largest diagonal entry, normalised (v_j^2 is the largest of the v_j^2: no cancellation);
    value_i = tr S - v^T S v.
The Rayleigh quotient's error is (lambda_1 - lambda_2) sin^2(theta) for an angle theta off v_1, at most
about lambda_1 / (e 2^(k+1)) over every eigenvalue ratio: 1e-7 of lambda_1 for k = 22. A flat image
(tr S = 0) has value 0 and v = (1, 0, 0), any direction being right.
    value = (1/B) sum_i value_i,   coef[i] = (m, v),
    colour_line_backward: d/dx_p = grad (2 / (B N)) ((x_p - m) - v (v . (x_p - m))).

Launches per call: forward 2 (``_colour_line_kernel``: one program per image, over its pixels in blocks
of BLOCK; the batch mean of the per-image values as a torch sum, a fixed order); backward 1
(``_backward_kernel``: grid (images, pixel blocks), elementwise).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator, Tuple

import torch
import triton
import triton.language as tl

from tldr_fast.ops.colour_line import SPEC

from ._utils import cdiv, compute_dtype, empty, launch, next_pow2, triton_op

Tensor = torch.Tensor
_BLOCK = 1024  # pixels per block at most
_SQUARINGS = 22  # S^(2^22): see the module doc


@triton.jit
def _colour_line_kernel(
    x_ptr,  # images: [B, 3, N] contiguous
    value_ptr,  # out: [B] fp32, value_i
    coef_ptr,  # out: [B, 2, 3] fp32, (m, v) per image
    N,
    BLOCK: tl.constexpr, SQUARINGS: tl.constexpr,
):
    # grid (B,): program i reads image i whole
    i = tl.program_id(0).to(tl.int64)
    base = x_ptr + i * 3 * N
    k0 = tl.load(base).to(tl.float32)  # the shift K
    k1 = tl.load(base + N).to(tl.float32)
    k2 = tl.load(base + 2 * N).to(tl.float32)
    s0 = tl.zeros([BLOCK], tl.float32)
    s1 = tl.zeros([BLOCK], tl.float32)
    s2 = tl.zeros([BLOCK], tl.float32)
    s00 = tl.zeros([BLOCK], tl.float32)
    s01 = tl.zeros([BLOCK], tl.float32)
    s02 = tl.zeros([BLOCK], tl.float32)
    s11 = tl.zeros([BLOCK], tl.float32)
    s12 = tl.zeros([BLOCK], tl.float32)
    s22 = tl.zeros([BLOCK], tl.float32)
    for start in range(0, N, BLOCK):
        p = start + tl.arange(0, BLOCK)  # [BLOCK]
        mask = p < N
        d0 = tl.where(mask, tl.load(base + p, mask=mask, other=0.0).to(tl.float32) - k0, 0.0)
        d1 = tl.where(mask, tl.load(base + N + p, mask=mask, other=0.0).to(tl.float32) - k1, 0.0)
        d2 = tl.where(mask, tl.load(base + 2 * N + p, mask=mask, other=0.0).to(tl.float32) - k2, 0.0)
        s0 += d0
        s1 += d1
        s2 += d2
        s00 += d0 * d0
        s01 += d0 * d1
        s02 += d0 * d2
        s11 += d1 * d1
        s12 += d1 * d2
        s22 += d2 * d2
    n = tl.cast(N, tl.float32)
    e0 = tl.sum(s0, axis=0) / n
    e1 = tl.sum(s1, axis=0) / n
    e2 = tl.sum(s2, axis=0) / n
    # S: [3, 3] symmetric, as six scalars
    a00 = tl.maximum(tl.sum(s00, axis=0) / n - e0 * e0, 0.0)
    a11 = tl.maximum(tl.sum(s11, axis=0) / n - e1 * e1, 0.0)
    a22 = tl.maximum(tl.sum(s22, axis=0) / n - e2 * e2, 0.0)
    a01 = tl.sum(s01, axis=0) / n - e0 * e1
    a02 = tl.sum(s02, axis=0) / n - e0 * e2
    a12 = tl.sum(s12, axis=0) / n - e1 * e2
    tr = a00 + a11 + a22
    inv = tl.where(tr > 0.0, 1.0 / tl.where(tr > 0.0, tr, 1.0), 0.0)
    m00 = a00 * inv
    m11 = a11 * inv
    m22 = a22 * inv
    m01 = a01 * inv
    m02 = a02 * inv
    m12 = a12 * inv
    for _ in tl.static_range(SQUARINGS):  # M <- M^2 / tr(M^2)
        q00 = m00 * m00 + m01 * m01 + m02 * m02
        q11 = m01 * m01 + m11 * m11 + m12 * m12
        q22 = m02 * m02 + m12 * m12 + m22 * m22
        q01 = m00 * m01 + m01 * m11 + m02 * m12
        q02 = m00 * m02 + m01 * m12 + m02 * m22
        q12 = m01 * m02 + m11 * m12 + m12 * m22
        t = q00 + q11 + q22
        r = tl.where(t > 0.0, 1.0 / tl.where(t > 0.0, t, 1.0), 0.0)
        m00 = q00 * r
        m11 = q11 * r
        m22 = q22 * r
        m01 = q01 * r
        m02 = q02 * r
        m12 = q12 * r
    # v: the column j of M with the largest M_jj, normalised; (1, 0, 0) for a flat image
    use1 = (m11 > m00) & (m11 >= m22)
    use2 = (m22 > m00) & (m22 > m11)
    c0 = tl.where(use2, m02, tl.where(use1, m01, m00))
    c1 = tl.where(use2, m12, tl.where(use1, m11, m01))
    c2 = tl.where(use2, m22, tl.where(use1, m12, m02))
    norm = tl.sqrt(c0 * c0 + c1 * c1 + c2 * c2)
    flat = norm <= 0.0
    rn = 1.0 / tl.where(flat, 1.0, norm)
    v0 = tl.where(flat, 1.0, c0 * rn)
    v1 = tl.where(flat, 0.0, c1 * rn)
    v2 = tl.where(flat, 0.0, c2 * rn)
    sv0 = a00 * v0 + a01 * v1 + a02 * v2
    sv1 = a01 * v0 + a11 * v1 + a12 * v2
    sv2 = a02 * v0 + a12 * v1 + a22 * v2
    value = tl.maximum(tr - (v0 * sv0 + v1 * sv1 + v2 * sv2), 0.0)
    tl.store(value_ptr + i, value)
    out = coef_ptr + i * 6  # -> coef[i] = (m, v)
    tl.store(out + 0, k0 + e0)
    tl.store(out + 1, k1 + e1)
    tl.store(out + 2, k2 + e2)
    tl.store(out + 3, v0)
    tl.store(out + 4, v1)
    tl.store(out + 5, v2)


@triton.jit
def _backward_kernel(
    g_ptr,  # upstream gradient of value: []
    x_ptr,  # images: [B, 3, N] contiguous
    coef_ptr,  # [B, 2, 3] fp32: (m, v) per image
    dx_ptr,  # out: d/dimages, [B, 3, N] in the images' dtype
    N, scale,  # scale = 2 / (B N)
    BLOCK: tl.constexpr,
):
    # grid (B, cdiv(N, BLOCK)): program (i, j) writes pixels j BLOCK ... of image i, all three channels
    i = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = p < N
    g = tl.load(g_ptr).to(tl.float32) * tl.cast(scale, tl.float32)
    cf = coef_ptr + i * 6
    m0 = tl.load(cf + 0)
    m1 = tl.load(cf + 1)
    m2 = tl.load(cf + 2)
    v0 = tl.load(cf + 3)
    v1 = tl.load(cf + 4)
    v2 = tl.load(cf + 5)
    base = i * 3 * N
    d0 = tl.load(x_ptr + base + p, mask=mask, other=0.0).to(tl.float32) - m0
    d1 = tl.load(x_ptr + base + N + p, mask=mask, other=0.0).to(tl.float32) - m1
    d2 = tl.load(x_ptr + base + 2 * N + p, mask=mask, other=0.0).to(tl.float32) - m2
    t = v0 * d0 + v1 * d1 + v2 * d2
    ty = dx_ptr.dtype.element_ty
    tl.store(dx_ptr + base + p, (g * (d0 - v0 * t)).to(ty), mask=mask)
    tl.store(dx_ptr + base + N + p, (g * (d1 - v1 * t)).to(ty), mask=mask)
    tl.store(dx_ptr + base + 2 * N + p, (g * (d2 - v2 * t)).to(ty), mask=mask)


def _block(n: int) -> int:
    return min(next_pow2(n), _BLOCK)


@triton_op(SPEC)
def _colour_line_op(images: Tensor) -> Tuple[Tensor, Tensor]:
    """(value [], coef [B, 2, 3]), fp32."""
    x = images.contiguous()
    b, _, h, w = x.shape
    n = h * w
    per_image = empty((b,), x.device)
    coef = empty((b, 2, 3), x.device)
    launch(_colour_line_kernel, (b,), x, per_image, coef, n, BLOCK=_block(n), SQUARINGS=_SQUARINGS, num_warps=4)
    return per_image.sum() / b, coef


@triton_op("colour_line_backward")
def _colour_line_backward_op(grad: Tensor, images: Tensor, coef: Tensor) -> Tensor:
    """d/dimages = grad (2 / (B N)) ((x_p - m_i) - v_i (v_i . (x_p - m_i))): the images' shape and dtype
    (contiguous)."""
    x = images.contiguous()
    b, _, h, w = x.shape
    n = h * w
    dx = empty(x.shape, x.device, x.dtype)
    bl = _block(n)
    launch(
        _backward_kernel, (b, cdiv(n, bl)), grad, x, coef.to(torch.float32).contiguous(), dx, n, 2.0 / (b * n),
        BLOCK=bl, num_warps=4,
    )
    return dx


_setup_context, _backward = SPEC.value_autograd(_colour_line_backward_op)  # d/dx: the helper backward op
_colour_line_op.register_autograd(_backward, setup_context=_setup_context)


def colour_line(images: Tensor) -> Tensor:
    """Fused ``tldr_fast.reference.colour_line``: ``images`` [B, 3, H, W]; returns the fp32 value [] (fp64
    inputs are computed in fp32), differentiable w.r.t. the images (gradient in their dtype)."""
    SPEC.check(images)
    return _colour_line_op(compute_dtype(images))[0]


def compile_cases(dtype: torch.dtype) -> Iterator[Callable[[], object]]:
    """Representative calls of ``colour_line`` on CPU tensors of ``dtype``, for ``kernels._aot``: together
    they launch every kernel variant that GPU shapes select, forward and backward."""
    def line_backward(x: Tensor) -> None:
        colour_line(x).backward()

    for shape in ((1024, 3, 28, 28), (7, 3, 224, 224), (5, 3, 3, 5)):
        yield partial(line_backward, torch.zeros(shape, dtype=dtype, requires_grad=True))
