"""feature_loss: mean pairwise cosine similarity and orthogonality of the penultimate features, by their
closed forms, over all pairs of the batch or over the pairs of the same label, and the activation loss
(DAFL, Chen et al. 2019), with the gradient computed in the forward.

Notation: Phi [B, D], r_i = max(||phi_i||, eps) (eps = reference.NORM_EPS), u_i = phi_i / r_i,
S = sum_i u_i [D], and the smaller Gram matrix: G = Phi^T Phi [D, D] when D <= B, else Phi Phi^T [B, B]
(no B x B matrix unless D > B).

    Cos   = (||S||^2 - B) / (B (B-1))
    Ortho = (||G||_F^2 - 2 ||Phi||_F^2 + B) / B^2
    Act   = -(1 / (B D)) sum_{i,d} |phi_id|        (every row, with labels too)

Gradients (autograd of the reference, derived):
    dCos/du_i = 2 S / (B (B-1)); through u_i = phi_i / r_i:
        d/dphi_i = (dCos/du_i - u_i (u_i . dCos/du_i)) / r_i   when ||phi_i|| >= eps,
        d/dphi_i = dCos/du_i / eps                             when the norm is clamped (no projection);
    so d/dphi_i = 2 (S - [||phi_i|| >= eps] u_i t_i) / (B (B-1) r_i) with t_i = u_i . S.
    dOrtho/dPhi = 4 (Phi (Phi^T Phi) - Phi) / B^2 = 4 ((Phi Phi^T) Phi - Phi) / B^2.
    dAct/dphi_id = -sign(phi_id) / (B D)   (sign(0) = 0: torch.abs's subgradient, as the reference's autograd).
t_i comes with the matrix product: phi_i . S is (Phi G_aug)_{i, D} for G_aug = [Phi^T Phi | S], or
(G w)_i with w = 1/r for the B x B Gram (then S = Phi^T w is accumulated in the same loop).

Same-label pairs (``labels`` y [B]): with M_ij = [y_i = y_j], n_k rows of label k, S_k = sum_{y_i = k} u_i,
P = sum_k n_k (n_k - 1) and N2 = sum_k n_k^2 = sum_ij M_ij, by the masked B x B Gram Gm = (Phi Phi^T) o M:

    Cos   = (sum_k ||S_k||^2 - B) / max(P, 1),   sum_k ||S_k||^2 = w^T Gm w
    Ortho = (||Gm||_F^2 - 2 ||Phi||_F^2 + B) / N2

and the gradient is the all-pairs one with S -> S_{y_i}, B (B-1) -> max(P, 1), B^2 -> N2 and the Gram masked
(the all-pairs form is the one-label case): d/dphi_i = 2 (S_{y_i} - [||phi_i|| >= eps] u_i t_i) / (max(P, 1) r_i)
+ 4 ((Gm Phi)_i - phi_i) / N2, t_i = u_i . S_{y_i} = (Gm w)_i / r_i, S_{y_i} = (M diag(w) Phi)_i. P and N2
depend on the labels, which stay on the device (compared, never read by the host nor used as indices): the
partial sums carry N2, and the gradient kernel's programs each sum them before scaling. O(B^2 D) work and a
[B, B] buffer: meant for training batches.

Partial sums: one column per term (Cos, Ortho, Act: ``TERMS``' order), and with labels N2 in a fourth.
Kernels (launches): ``_feature_norms_kernel`` (row norms, ||Phi||_F^2 and sum |phi| pieces; with labels
the N2 pieces, counting each row's label in the batch), the Gram kernel
(G, plus S as an extra column of Phi^T [Phi | 1/r] in the D x D case; ||G||^2 pieces and ||S||^2
pieces, from that column or from w^T G w for the B x B Gram, masked with labels; a split-sum kernel at
large B), ``_feature_grad_kernel`` (d/dPhi, and the terms in its program 0): 3, or 4 at large B.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator, Optional, Tuple

import torch
import triton
import triton.language as tl

from tldr_fast.ops.feature_loss import NORM_EPS, SPEC, TERMS

from ._gram import EXTRA_INV, EXTRA_NONE, gram, plan_gram
from ._reduce import _finish, _sum_partials, _write_terms
from ._utils import BLOCK_ROWS, FP32_DOT, TERMS_PAD, block, cdiv, compute_dtype, empty, launch, triton_op, weights_fp32

Tensor = torch.Tensor
_COS, _ORTHO, _ACT = TERMS.index("cos"), TERMS.index("ortho"), TERMS.index("activation")  # columns of terms
assert (_COS, _ORTHO, _ACT) == (0, 1, 2) == tuple(range(len(TERMS))), "the kernels below are written for this layout"
_N2 = len(TERMS)  # with labels, the partial sums' column of N2 (after the terms')
_NORM_ROWS = 16  # feature rows per program of the norms kernel


@triton.jit
def _feature_norms_kernel(
    phi_ptr,  # features: [B, D]
    norm_ptr,  # ||phi_i||: [B] fp32
    part_ptr,  # partial sums: [rows, T]; this kernel's rows 0 .. grid-1
    y_ptr,  # LABELS: labels [B]
    B, D, T, inv_b2, inv_bd, cos_const, ortho_const,
    LABELS: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr, BY: tl.constexpr, TP: tl.constexpr,
):
    inv_b2 = tl.cast(inv_b2, tl.float32)  # float arguments in fp32 (see _utils)
    inv_bd = tl.cast(inv_bd, tl.float32)
    cos_const = tl.cast(cos_const, tl.float32)
    ortho_const = tl.cast(ortho_const, tl.float32)
    pid = tl.program_id(0)
    rows = pid * BB + tl.arange(0, BB)
    mask_r = rows < B
    sq = tl.zeros([BB], tl.float32)  # ||phi_i||^2
    ab = tl.zeros([BB], tl.float32)  # sum_d |phi_id|
    for d0 in range(0, D, BD):
        cols = d0 + tl.arange(0, BD)
        x = tl.load(phi_ptr + rows[:, None] * D + cols[None, :],
                    mask=mask_r[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)
        sq += tl.sum(x * x, axis=1)
        ab += tl.sum(tl.abs(x), axis=1)
    tl.store(norm_ptr + rows, tl.sqrt(sq), mask=mask_r)
    # Ortho gets -2 ||Phi||^2 / B^2 and Act -sum |phi| / (B D); program 0 adds the constants of Cos and Ortho
    first = pid == 0
    cos = tl.where(first, cos_const, 0.0)
    ortho = -2.0 * inv_b2 * tl.sum(sq, axis=0) + tl.where(first, ortho_const, 0.0)
    act = -inv_bd * tl.sum(ab, axis=0)
    if LABELS:  # column _N2 = 3: this program's rows' part of N2 = sum_i n_{y_i}
        y_r = tl.load(y_ptr + rows, mask=mask_r, other=0)
        n = tl.zeros([BB], tl.float32)
        for j0 in range(0, B, BY):
            js = j0 + tl.arange(0, BY)
            y_j = tl.load(y_ptr + js, mask=js < B, other=0)
            n += tl.sum(tl.where((y_r[:, None] == y_j[None, :]) & (js < B)[None, :], 1.0, 0.0), axis=1)
        n2 = tl.sum(tl.where(mask_r, n, 0.0), axis=0)
    else:
        n2 = 0.0
    cols_t = tl.arange(0, TP)
    vals = (tl.where(cols_t == 0, cos, 0.0) + tl.where(cols_t == 1, ortho, 0.0) + tl.where(cols_t == 2, act, 0.0)
            + tl.where(cols_t == 3, n2, 0.0))
    tl.store(part_ptr + pid * T + cols_t, vals, mask=cols_t < T)  # part[pid, :T]


@triton.jit
def _feature_grad_kernel(
    phi_ptr,  # features: [B, D]
    norm_ptr,  # ||phi_i||: [B] fp32
    g_ptr,  # D x D: G_aug = [Phi^T Phi | S] [D, D+1]; B x B: Phi Phi^T [B, B] (masked with labels); fp32
    y_ptr,  # LABELS: labels [B]
    w_ptr,  # weights: [3] fp32
    part_ptr, n_part, T,  # partial sums: [n_part, T], complete
    dphi_ptr,  # d loss / d features: [B, D]
    terms_ptr, loss_ptr,  # [3], []: written by program (0, 0)
    B, D, eps, cos_scale, ortho_scale, act_scale,
    GRAM_BB: tl.constexpr, LABELS: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
    PREC: tl.constexpr, TP: tl.constexpr, BLOCK_ROWS: tl.constexpr,
):
    eps = tl.cast(eps, tl.float32)  # float arguments in fp32 (see _utils)
    cos_scale = tl.cast(cos_scale, tl.float32)
    ortho_scale = tl.cast(ortho_scale, tl.float32)
    act_scale = tl.cast(act_scale, tl.float32)
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_b * BB + tl.arange(0, BB)
    cols = pid_d * BD + tl.arange(0, BD)
    mask_r = rows < B
    mask_d = cols < D
    ortho = tl.zeros([BB, BD], tl.float32)  # (Phi G)[rows, cols] or (G Phi)[rows, cols]
    phi_s = tl.zeros([BB], tl.float32)  # phi_i . S (phi_i . S_{y_i} with labels)
    if GRAM_BB:
        if LABELS:
            y_r = tl.load(y_ptr + rows, mask=mask_r, other=0)
            s = tl.zeros([BB, BD], tl.float32)  # S_{y_i}[cols] = (M diag(w) Phi)[rows, cols]
        else:
            s = tl.zeros([BD], tl.float32)  # S[cols] = sum_k w_k phi_k[cols]
        for k0 in range(0, B, BK):
            ks = k0 + tl.arange(0, BK)
            mask_k = ks < B
            g = tl.load(g_ptr + rows[:, None] * B + ks[None, :], mask=mask_r[:, None] & mask_k[None, :], other=0.0)
            phi_k = tl.load(phi_ptr + ks[:, None] * D + cols[None, :],
                            mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            w_k = tl.where(mask_k, 1.0 / tl.maximum(tl.load(norm_ptr + ks, mask=mask_k, other=1.0), eps), 0.0)
            phi_s += tl.sum(g * w_k[None, :], axis=1)
            if LABELS:
                y_k = tl.load(y_ptr + ks, mask=mask_k, other=0)
                s = tl.dot(tl.where(y_r[:, None] == y_k[None, :], w_k[None, :], 0.0), phi_k, s, input_precision=PREC)
            else:
                s += tl.sum(w_k[:, None] * phi_k, axis=0)
            ortho = tl.dot(g, phi_k, ortho, input_precision=PREC)
    else:
        ldg = D + 1
        s = tl.load(g_ptr + cols * ldg + D, mask=mask_d, other=0.0)
        for k0 in range(0, D, BK):
            ks = k0 + tl.arange(0, BK)
            mask_k = ks < D
            phi_k = tl.load(phi_ptr + rows[:, None] * D + ks[None, :],
                            mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            g = tl.load(g_ptr + ks[:, None] * ldg + cols[None, :], mask=mask_k[:, None] & mask_d[None, :], other=0.0)
            phi_s += tl.sum(phi_k * tl.load(g_ptr + ks * ldg + D, mask=mask_k, other=0.0)[None, :], axis=1)
            ortho = tl.dot(phi_k, g, ortho, input_precision=PREC)
    if LABELS:  # the scales from P and N2: the partial sums' columns (Cos, Ortho without the constants, Act, N2)
        cols_t = tl.arange(0, TP)
        totals = _sum_partials(part_ptr, n_part, T, TP, BLOCK_ROWS)
        n2 = tl.sum(tl.where(cols_t == 3, totals, 0.0), axis=0)
        pairs = tl.maximum(n2 - B, 1.0)
        cos_scale = 2.0 / pairs
        ortho_scale = 4.0 / n2
    else:
        s = s[None, :]

    mask = mask_r[:, None] & mask_d[None, :]
    phi = tl.load(phi_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    norm = tl.load(norm_ptr + rows, mask=mask_r, other=1.0)
    r = tl.maximum(norm, eps)
    t = phi_s / r  # u_i . S
    u = phi / r[:, None]
    d_cos = (s - tl.where((norm >= eps)[:, None], u * t[:, None], 0.0)) / r[:, None]
    sign = tl.where(phi > 0, 1.0, 0.0) - tl.where(phi < 0, 1.0, 0.0)  # sign(0) = 0
    grad = (tl.load(w_ptr + 0) * cos_scale * d_cos + tl.load(w_ptr + 1) * ortho_scale * (ortho - phi)
            - tl.load(w_ptr + 2) * act_scale * sign)
    tl.store(dphi_ptr + rows[:, None] * D + cols[None, :], grad.to(dphi_ptr.dtype.element_ty), mask=mask)

    if (pid_b == 0) & (pid_d == 0):
        if LABELS:
            terms = tl.where(cols_t == 0, (totals - B) / pairs,
                             tl.where(cols_t == 1, (totals + B) / n2, tl.where(cols_t == 2, totals, 0.0)))
            _write_terms(terms, 3, w_ptr, terms_ptr, loss_ptr, TP)
        else:
            _finish(part_ptr, n_part, T, w_ptr, terms_ptr, loss_ptr, -1, TP, BLOCK_ROWS)


@triton_op(SPEC)
def _feature_loss_op(
    features: Tensor, weights: Tensor, labels: Optional[Tensor], num_classes: int
) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss [], terms [3], d loss/d features [B, D]); the kernels compare labels, so ``num_classes`` is unused."""
    phi = features.contiguous()
    b, d = phi.shape
    device = phi.device
    y = labels.contiguous() if labels is not None else None
    gram_bb = y is not None or d > b
    p1 = cdiv(b, _NORM_ROWS)
    if gram_bb:  # X = Phi^T [D, B] (a strided view), G = Phi Phi^T; reduction over D <= a few thousand
        plan = plan_gram(d, b, b, EXTRA_NONE, device, splittable=False)
        view = (1, d)
    else:  # X = Phi [B, D], C = Phi^T [Phi | 1/r] = [G | S]
        plan = plan_gram(b, d, d, EXTRA_INV, device)
        view = (d, 1)
    n_part = p1 + plan.partial_rows
    if y is None:  # partial sums already scaled: terms = column sums
        cols, cos_scale, ortho_scale = len(TERMS), 1.0 / (b * (b - 1)), 1.0 / b**2
    else:  # columns (Cos, Ortho) without their constants and divisors, Act, and N2 (see the module doc)
        cols, cos_scale, ortho_scale = _N2 + 1, 1.0, 1.0
    act_scale = 1.0 / (b * d)  # Act's divisor, labels or not
    consts = (-b * cos_scale, b * ortho_scale) if y is None else (0.0, 0.0)  # program 0 adds them
    part = empty((n_part, cols), device)
    norms = empty((b,), device)
    launch(
        _feature_norms_kernel, (p1,), phi, norms, part, y if y is not None else phi, b, d, cols, ortho_scale, act_scale,
        *consts,
        LABELS=y is not None, BB=_NORM_ROWS, BD=block(d, hi=128), BY=block(b, hi=128), TP=TERMS_PAD, num_warps=4,
    )
    # ||G||^2 into Ortho; ||S||^2 (extra column, or w^T G w for the B x B Gram) into Cos
    g = gram(plan, phi, view, phi, view, part, p1, (_ORTHO, _COS), (ortho_scale, cos_scale),
             v=norms, eps=NORM_EPS, quad=gram_bb, labels=y)
    dphi = empty((b, d), device, features.dtype)
    loss, terms = empty((), device), empty((len(TERMS),), device)
    bb, bd = 32, block(d, hi=64)
    launch(
        _feature_grad_kernel, (cdiv(b, bb), cdiv(d, bd)),
        phi, norms, g, y if y is not None else phi, weights, part, n_part, cols, dphi, terms, loss,
        b, d, NORM_EPS, 2.0 * cos_scale, 4.0 * ortho_scale, act_scale,
        GRAM_BB=gram_bb, LABELS=y is not None, BB=bb, BD=bd, BK=32, PREC=FP32_DOT, TP=TERMS_PAD,
        BLOCK_ROWS=BLOCK_ROWS, num_warps=8,
    )
    return loss, terms, dphi


_setup_context, _backward = SPEC.autograd()  # d loss/d x: the gradient the forward wrote
_feature_loss_op.register_autograd(_backward, setup_context=_setup_context)


def feature_loss(
    features: Tensor, weights: Tensor, labels: Optional[Tensor] = None, num_classes: int = 0
) -> Tuple[Tensor, Tensor]:
    """Fused ``tldr_fast.reference.feature_loss``: ``features`` [B, D] with B >= 2, ``weights`` [3] fp32
    on the device, ``labels`` None (all pairs) or [B] integers in ``[0, num_classes)`` on the device
    (same-label pairs); returns ``(loss [], terms [3])`` = (Cos, Ortho, Act). Gradients flow to features (in
    their dtype) and weights."""
    SPEC.check(features, weights, labels, num_classes)
    loss, terms, _ = _feature_loss_op(compute_dtype(features), weights_fp32(weights), labels, int(num_classes))
    return loss, terms


def compile_cases(dtype: torch.dtype) -> Iterator[Callable[[], object]]:
    """Representative calls of ``feature_loss`` on CPU tensors of ``dtype``, for ``kernels._aot``: together
    they launch every kernel variant (constexpr branch) that GPU shapes select."""
    for b, d in ((1024, 256), (65536, 256), (300, 4096)):
        yield partial(feature_loss, torch.ones(b, d, dtype=dtype), torch.ones(3))
    labels = torch.zeros(1024, dtype=torch.int64)
    yield partial(feature_loss, torch.ones(1024, 256, dtype=dtype), torch.ones(3), labels, 10)
