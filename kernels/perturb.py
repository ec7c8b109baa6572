"""perturb: ``clip(x + eps * s, lo, hi)`` with Rademacher / uniform / Gaussian noise ``s`` from Triton's
Philox generator, in one pass; reproducible from ``seed``.

Element e of the flattened images takes its noise from Philox counter ``e // LANES``: a Rademacher
sign is bit ``e % 32`` of one 32-bit draw (one Philox evaluation per 32 elements); uniform and Gaussian
values are lane ``e % 4`` of ``rand4x`` / ``randn4x`` (one evaluation per 4 elements). The noise is a
function of (seed, element index) only, so the backward regenerates it instead of saving a mask:

    d clip(x + eps s, lo, hi) / dx = 1 where lo <= x + eps s <= hi, else 0   (torch.clamp's convention)

One kernel, ``_perturb_kernel``, serves the forward, the backward and ``perturb_noise`` (the noise
alone, for tests), selected by a constexpr MODE: one launch each.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tldr_fast.ops.perturb import SPEC, kind_index

from ._utils import cdiv, compute_dtype, empty, launch, triton_op

Tensor = torch.Tensor
FORWARD, BACKWARD, NOISE = 0, 1, 2
_BLOCK = 1024  # elements per program
_SEED_MASK = (1 << 63) - 1


@triton.jit
def _noise(seed, words, LANES: tl.constexpr, KIND: tl.constexpr):
    """Noise of the [WORDS, LANES] block whose element (i, j) is words[i] * LANES + j (fp32)."""
    lane = tl.arange(0, LANES)
    if KIND == 0:  # Rademacher: one bit per element
        bits = tl.randint(seed, words)
        s = tl.where(((bits[:, None] >> lane.to(tl.uint32)[None, :]) & 1) == 1, 1.0, -1.0)
    else:
        if KIND == 1:
            r0, r1, r2, r3 = tl.rand4x(seed, words)
        else:
            r0, r1, r2, r3 = tl.randn4x(seed, words)
        s = tl.where(lane[None, :] == 0, r0[:, None],
                     tl.where(lane[None, :] == 1, r1[:, None], tl.where(lane[None, :] == 2, r2[:, None], r3[:, None])))
        if KIND == 1:
            s = 2.0 * s - 1.0  # uniform in [-1, 1)
    return s


@triton.jit(do_not_specialize=["seed"])
def _perturb_kernel(
    x_ptr,  # images: [n] (flattened)
    g_ptr,  # BACKWARD: upstream gradient, [n]
    out_ptr,  # FORWARD: perturbed images; BACKWARD: d/dimages; NOISE: s (fp32); [n]
    n, eps, lo, hi, seed,
    KIND: tl.constexpr, MODE: tl.constexpr, WORDS: tl.constexpr, LANES: tl.constexpr,
):
    eps = tl.cast(eps, tl.float32)  # float arguments in fp32 (see _utils)
    lo = tl.cast(lo, tl.float32)
    hi = tl.cast(hi, tl.float32)
    pid = tl.program_id(0)
    words = pid * WORDS + tl.arange(0, WORDS)  # Philox counters
    offs = words.to(tl.int64)[:, None] * LANES + tl.arange(0, LANES)[None, :]
    mask = offs < n
    s = _noise(seed, words, LANES, KIND)
    if MODE == 2:
        tl.store(out_ptr + offs, s, mask=mask)
    else:
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + eps * s
        if MODE == 0:
            y = tl.minimum(tl.maximum(v, lo), hi)
        else:
            y = tl.where((v >= lo) & (v <= hi), tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32), 0.0)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _run(mode: int, x: Tensor, g: Tensor, out: Tensor, eps: float, lo: float, hi: float, kind: int, seed: int) -> Tensor:
    lanes = 32 if kind == 0 else 4
    n = out.numel()
    launch(
        _perturb_kernel, (cdiv(n, _BLOCK),), x, g, out, n, eps, lo, hi, seed & _SEED_MASK,
        KIND=kind, MODE=mode, WORDS=_BLOCK // lanes, LANES=lanes, num_warps=4,
    )
    return out


@triton_op(SPEC)
def _perturb_op(images: Tensor, eps: float, lo: float, hi: float, kind: int, seed: int) -> Tensor:
    x = images.contiguous()
    return _run(FORWARD, x, x, empty(x.shape, x.device, x.dtype), eps, lo, hi, kind, seed)


@triton_op("perturb_backward")
def _perturb_backward_op(grad: Tensor, images: Tensor, eps: float, lo: float, hi: float, kind: int, seed: int) -> Tensor:
    x = images.contiguous()
    return _run(BACKWARD, x, grad.contiguous(), empty(x.shape, x.device, x.dtype), eps, lo, hi, kind, seed)


def _setup_context(ctx, inputs, output) -> None:
    images, ctx.eps, ctx.lo, ctx.hi, ctx.kind, ctx.seed = inputs
    ctx.save_for_backward(images)


def _backward(ctx, grad):
    (images,) = ctx.saved_tensors
    d_images = _perturb_backward_op(grad, images, ctx.eps, ctx.lo, ctx.hi, ctx.kind, ctx.seed)
    return d_images, None, None, None, None, None


_perturb_op.register_autograd(_backward, setup_context=_setup_context)


def perturb(images: Tensor, eps: float, lo: float, hi: float, kind: str, seed: int) -> Tensor:
    """Fused ``tldr_fast.reference.perturb``: ``clip(images + eps * s, lo, hi)`` with noise ``kind`` in
    ``tldr_fast.ops.perturb.PERTURBATIONS`` drawn from ``seed`` (bits above 63 ignored); same shape and dtype
    as ``images``; the gradient is the clip mask. The same seed gives the same noise on every call."""
    SPEC.check(images, eps, lo, hi, kind, seed)
    y = _perturb_op(compute_dtype(images), float(eps), float(lo), float(hi), kind_index(kind), int(seed))
    return y.to(images.dtype)


def perturb_noise(shape: torch.Size, kind: str, seed: int, device: torch.device) -> Tensor:
    """The fp32 noise ``s`` that ``perturb`` with this ``kind`` and ``seed`` adds (times eps) to images
    of ``shape``: the same Philox stream, written out (for tests and inspection)."""
    out = torch.empty(tuple(shape), device=device, dtype=torch.float32)
    return _run(NOISE, out, out, out, 0.0, 0.0, 0.0, kind_index(kind), int(seed))
