"""head_loss: CE and KL(c||p) on clean and perturbed logits, and the closed-form head grad-norm, with
the gradient computed in the forward (Liger-Kernel's fused cross-entropy style).

Notation (DESIGN.md section 2): logits z [N, K] (N = B clean rows, or 2B: clean then perturbed),
conditioning c [B, K], labels y [B], features Phi [B, D], p = softmax(z), E = P - C on clean rows.

Forward terms, per row with lse = logsumexp(z):
    CE_i = lse - z_{y_i}
    KL_i = sum_k xlogy(c_k, c_k) - sum_k c_k z_k + lse * sum_k c_k            (0 log 0 = 0)
Their gradients (the 1/B of the batch mean included):
    dCE/dz_i = (p_i - onehot(y_i)) / B,    dKL/dz_i = (p_i * sum_k c_ik - c_i) / B
Grad-norm (head with weight W and, if ``head_bias``, bias b), with G = E^T Phi [K, D], h = E^T 1 [K]:
    s = ||G||^2 + ||h||^2,   GN = sqrt(s) / B
    dGN/de_i = (G phi_i + h) / (B sqrt s),   dGN/dphi_i = G^T e_i / (B sqrt s)
and through the softmax (e_i = p_i - c_i, c constant): dz_i = p_i * (g_i - <p_i, g_i>) for g_i = dGN/de_i.
With the augmented G_aug = [G | h] [K, D+1] and phi_aug_i = [phi_i, 1] this is
    g_i = G_aug phi_aug_i / (B sqrt s),   <p_i, g_i> = ((E + C)_i G_aug) . phi_aug_i / (B sqrt s).

Kernels (launches): without features, ``_head_rows_kernel`` (softmax, CE, KL, gradient of every row)
then ``_finish_kernel`` (terms, loss): 2. With features: ``_head_rows_kernel`` (also writes E of the
clean rows), the Gram kernel (G_aug and the ||.||^2 pieces of s; plus a split-sum kernel at large B),
and ``_head_grad_kernel`` (clean-row logit gradients with the grad-norm part, d/dPhi, and the terms in
its program 0): 3, or 4 at large B.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator, Optional, Tuple

import torch
import triton
import triton.language as tl

from tldr_fast.ops.head_loss import SPEC, TERMS

from ._gram import EXTRA_NONE, EXTRA_ONES, gram, plan_gram
from ._reduce import _finish, _finish_kernel, _sum_partials
from ._utils import BLOCK_ROWS, FP32_DOT, TERMS_PAD, block, cdiv, compute_dtype, empty, launch, triton_op, weights_fp32

Tensor = torch.Tensor
# The kernels below address the declared terms (ce, kl, ce_pert, kl_pert, grad_norm) as the columns
# 0..4 of terms and of the partial sums; the grad-norm column is the one finished with a square root.
_T = len(TERMS)
_GN_COL = TERMS.index("grad_norm")
assert TERMS[:4] == ("ce", "kl", "ce_pert", "kl_pert") and (_T, _GN_COL) == (5, 4), "kernels written for this layout"


@triton.jit
def _xlogx(c):
    return tl.where(c > 0, c * tl.log(tl.where(c > 0, c, 1.0)), 0.0)


@triton.jit
def _ce_kl_grad(p, c, is_label, sum_c, w_ce, w_kl, inv_b):
    """w_ce dCE/dz + w_kl dKL/dz for a [rows, cols] block (see the module doc)."""
    return (w_ce * (p - tl.where(is_label, 1.0, 0.0)) + w_kl * (p * sum_c[:, None] - c)) * inv_b


@triton.jit
def _lse_update(m, s, z):
    """Online logsumexp: running max m and sum s of exp(z - m) over one more [rows, BK] block."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
    return m_new, s


@triton.jit
def _head_rows_kernel(
    z_ptr,  # logits: [N, K]
    c_ptr,  # condition: [B, K]
    y_ptr,  # labels: [B]
    w_ptr,  # weights: [5] fp32
    dz_ptr,  # d loss / d logits: [N, K] (clean rows only when not GN)
    e_ptr,  # GN: E = P - C of the clean rows, [B, K] fp32
    part_ptr,  # partial sums: [rows, 5], this kernel's rows 0 .. grid-1
    B, K, inv_b,
    PERT: tl.constexpr, GN: tl.constexpr, BB: tl.constexpr, BK: tl.constexpr, TP: tl.constexpr,
):
    inv_b = tl.cast(inv_b, tl.float32)  # float arguments in fp32 (see _utils)
    pid = tl.program_id(0)
    rows = pid * BB + tl.arange(0, BB)
    mask_r = rows < B
    labels = tl.load(y_ptr + rows, mask=mask_r, other=0)

    # pass 1: online logsumexp of the clean and perturbed rows, and the condition's sums
    m_c = tl.full([BB], float("-inf"), tl.float32)
    l_c = tl.zeros([BB], tl.float32)
    m_p = tl.full([BB], float("-inf"), tl.float32)
    l_p = tl.zeros([BB], tl.float32)
    sum_c = tl.zeros([BB], tl.float32)
    sum_clogc = tl.zeros([BB], tl.float32)
    sum_cz_c = tl.zeros([BB], tl.float32)
    sum_cz_p = tl.zeros([BB], tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        mask_k = cols < K
        mask = mask_r[:, None] & mask_k[None, :]
        offs = rows[:, None] * K + cols[None, :]
        c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sum_c += tl.sum(c, axis=1)
        sum_clogc += tl.sum(_xlogx(c), axis=1)
        # padding rows read 0 (finite); padding columns are -inf for the max and exp
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sum_cz_c += tl.sum(c * z, axis=1)
        m_c, l_c = _lse_update(m_c, l_c, tl.where(mask_k[None, :], z, float("-inf")))
        if PERT:
            zp = tl.load(z_ptr + B * K + offs, mask=mask, other=0.0).to(tl.float32)
            sum_cz_p += tl.sum(c * zp, axis=1)
            m_p, l_p = _lse_update(m_p, l_p, tl.where(mask_k[None, :], zp, float("-inf")))
    # lse = m + log(l); log p = (z - m) - log(l) keeps full precision for large logits (z - m is exact)
    log_l_c = tl.log(l_c)
    z_y = tl.load(z_ptr + rows * K + labels, mask=mask_r, other=0.0).to(tl.float32)
    ce = tl.sum(tl.where(mask_r, (m_c - z_y) + log_l_c, 0.0), axis=0)
    kl = tl.sum(tl.where(mask_r, sum_clogc - sum_cz_c + (m_c + log_l_c) * sum_c, 0.0), axis=0)
    ce_p = 0.0
    kl_p = 0.0
    if PERT:
        log_l_p = tl.log(l_p)
        zp_y = tl.load(z_ptr + (B + rows) * K + labels, mask=mask_r, other=0.0).to(tl.float32)
        ce_p = tl.sum(tl.where(mask_r, (m_p - zp_y) + log_l_p, 0.0), axis=0)
        kl_p = tl.sum(tl.where(mask_r, sum_clogc - sum_cz_p + (m_p + log_l_p) * sum_c, 0.0), axis=0)

    # pass 2: probabilities and gradients
    w_ce = tl.load(w_ptr + 0)
    w_kl = tl.load(w_ptr + 1)
    w_cep = tl.load(w_ptr + 2)
    w_klp = tl.load(w_ptr + 3)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        mask = mask_r[:, None] & (cols < K)[None, :]
        offs = rows[:, None] * K + cols[None, :]
        is_label = cols[None, :] == labels[:, None]
        c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp((tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32) - m_c[:, None]) - log_l_c[:, None])
        if GN:
            tl.store(e_ptr + offs, p - c, mask=mask)
        else:
            dz = _ce_kl_grad(p, c, is_label, sum_c, w_ce, w_kl, inv_b)
            tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        if PERT:
            zp = tl.load(z_ptr + B * K + offs, mask=mask, other=0.0).to(tl.float32)
            pp = tl.exp((zp - m_p[:, None]) - log_l_p[:, None])
            dzp = _ce_kl_grad(pp, c, is_label, sum_c, w_cep, w_klp, inv_b)
            tl.store(dz_ptr + B * K + offs, dzp.to(dz_ptr.dtype.element_ty), mask=mask)

    t = tl.arange(0, TP)
    vals = tl.where(t == 0, ce, 0.0) + tl.where(t == 1, kl, 0.0) + tl.where(t == 2, ce_p, 0.0) + tl.where(t == 3, kl_p, 0.0)
    tl.store(part_ptr + pid * 5 + t, vals * inv_b, mask=t < 5)


@triton.jit
def _head_grad_kernel(
    e_ptr,  # E = P - C of the clean rows: [B, K] fp32
    c_ptr,  # condition: [B, K]
    y_ptr,  # labels: [B]
    phi_ptr,  # features: [B, D]
    g_ptr,  # G_aug = [G | h]: [K, DA] fp32, DA = D + HAS_BIAS
    w_ptr,  # weights: [5] fp32
    part_ptr, n_part, gram_row0,  # partial sums: [n_part, 5], complete; the grad-norm column's rows start at gram_row0
    dz_ptr,  # d loss / d logits: [N, K], clean rows written here
    dphi_ptr,  # d loss / d features: [B, D]
    terms_ptr, loss_ptr,  # [5], []: written by program 0
    B, K, D, inv_b,
    HAS_BIAS: tl.constexpr, BB: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
    TP: tl.constexpr, BLOCK_ROWS: tl.constexpr,
):
    inv_b = tl.cast(inv_b, tl.float32)  # float arguments in fp32 (see _utils)
    pid = tl.program_id(0)
    DA = D + HAS_BIAS
    rows = pid * BB + tl.arange(0, BB)
    mask_r = rows < B
    labels = tl.load(y_ptr + rows, mask=mask_r, other=0)
    t = tl.arange(0, TP)
    # s / B^2 = sum of the grad-norm column (only the Gram's rows hold it); GN = sqrt(s) / B;
    # coef = w_gn / (B sqrt(s)) (0 if s = 0)
    gram_part = _sum_partials(part_ptr + gram_row0 * 5, n_part - gram_row0, 5, TP, BLOCK_ROWS)
    q = tl.sum(tl.where(t == 4, gram_part, 0.0), axis=0)  # column _GN_COL
    gn = tl.sqrt(q)
    coef = tl.load(w_ptr + 4) * tl.where(q > 0, inv_b * inv_b / tl.where(q > 0, gn, 1.0), 0.0)

    sum_c = tl.zeros([BB], tl.float32)
    for k0 in range(0, K, BK):
        kcols = k0 + tl.arange(0, BK)
        mask = mask_r[:, None] & (kcols < K)[None, :]
        sum_c += tl.sum(tl.load(c_ptr + rows[:, None] * K + kcols[None, :], mask=mask, other=0.0).to(tl.float32), axis=1)

    # pass A, over the columns of G_aug: d/dphi = coef E G, and rowdot_i = (P G_aug)_i . phi_aug_i
    rowdot = tl.zeros([BB], tl.float32)
    for d0 in range(0, DA, BD):
        dcols = d0 + tl.arange(0, BD)
        eg = tl.zeros([BB, BD], tl.float32)
        cg = tl.zeros([BB, BD], tl.float32)
        for k0 in range(0, K, BK):
            kcols = k0 + tl.arange(0, BK)
            mask_k = kcols < K
            mask = mask_r[:, None] & mask_k[None, :]
            e = tl.load(e_ptr + rows[:, None] * K + kcols[None, :], mask=mask, other=0.0)
            c = tl.load(c_ptr + rows[:, None] * K + kcols[None, :], mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + kcols[:, None] * DA + dcols[None, :],
                        mask=mask_k[:, None] & (dcols < DA)[None, :], other=0.0)  # [BK, BD]
            eg = tl.dot(e, g, eg, input_precision=PREC)
            cg = tl.dot(c, g, cg, input_precision=PREC)
        mask_d = mask_r[:, None] & (dcols < D)[None, :]
        phi = tl.load(phi_ptr + rows[:, None] * D + dcols[None, :], mask=mask_d, other=0.0).to(tl.float32)
        if HAS_BIAS:
            phi = tl.where(dcols[None, :] == D, 1.0, phi)
        rowdot += tl.sum((eg + cg) * phi, axis=1)
        tl.store(dphi_ptr + rows[:, None] * D + dcols[None, :], (coef * eg).to(dphi_ptr.dtype.element_ty), mask=mask_d)

    # pass B, over the classes: g_i = coef G_aug phi_aug_i; dz = CE/KL part + p (g - coef rowdot)
    w_ce = tl.load(w_ptr + 0)
    w_kl = tl.load(w_ptr + 1)
    for k0 in range(0, K, BK):
        kcols = k0 + tl.arange(0, BK)
        mask_k = kcols < K
        gphi = tl.zeros([BB, BK], tl.float32)
        for d0 in range(0, DA, BD):
            dcols = d0 + tl.arange(0, BD)
            phi = tl.load(phi_ptr + rows[:, None] * D + dcols[None, :],
                          mask=mask_r[:, None] & (dcols < D)[None, :], other=0.0).to(tl.float32)
            if HAS_BIAS:
                phi = tl.where(dcols[None, :] == D, 1.0, phi)
            g = tl.load(g_ptr + kcols[:, None] * DA + dcols[None, :],
                        mask=mask_k[:, None] & (dcols < DA)[None, :], other=0.0)  # [BK, BD]
            gphi = tl.dot(phi, tl.trans(g), gphi, input_precision=PREC)
        mask = mask_r[:, None] & mask_k[None, :]
        offs = rows[:, None] * K + kcols[None, :]
        c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(e_ptr + offs, mask=mask, other=0.0) + c
        dz = _ce_kl_grad(p, c, kcols[None, :] == labels[:, None], sum_c, w_ce, w_kl, inv_b)
        dz += coef * p * (gphi - rowdot[:, None])
        tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)

    if pid == 0:
        _finish(part_ptr, n_part, 5, w_ptr, terms_ptr, loss_ptr, 4, TP, BLOCK_ROWS)


@triton_op(SPEC)
def _head_loss_op(
    logits: Tensor, condition: Tensor, labels: Tensor, features: Optional[Tensor], weights: Tensor, head_bias: bool
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss [], terms [5], d loss/d logits [N, K], d loss/d features [B, D] or [0])."""
    n, k = logits.shape
    b = condition.shape[0]
    device = logits.device
    z, c, y = logits.contiguous(), condition.contiguous(), labels.contiguous()
    gn = features is not None
    bk = block(k, hi=64)
    bb = max(16, min(128, 1024 // bk))
    p1 = cdiv(b, bb)
    if gn:
        phi = features.contiguous()
        d = phi.shape[1]
        plan = plan_gram(b, k, d, EXTRA_ONES if head_bias else EXTRA_NONE, device)
        n_part = p1 + plan.partial_rows
    else:
        n_part = p1
    part = empty((n_part, _T), device)
    dz = empty((n, k), device, logits.dtype)
    e = empty((b, k), device) if gn else part
    loss, terms = empty((), device), empty((_T,), device)
    launch(
        _head_rows_kernel, (p1,), z, c, y, weights, dz, e, part, b, k, 1.0 / b,
        PERT=n == 2 * b, GN=gn, BB=bb, BK=bk, TP=TERMS_PAD, num_warps=4, num_stages=1,
    )
    if not gn:
        launch(_finish_kernel, (1,), part, n_part, _T, weights, terms, loss,
               SQRT_COL=_GN_COL, TP=TERMS_PAD, BLOCK_ROWS=BLOCK_ROWS)
        return loss, terms, dz, torch.empty(0, device=device, dtype=logits.dtype)
    # G_aug = E^T [Phi | 1]; its squares are s = ||G||^2 (+ ||h||^2), scaled by 1/B^2 into column 4
    g = gram(plan, e, (k, 1), phi, (d, 1), part, p1, (_GN_COL, _GN_COL), (1.0 / b**2, 1.0 / b**2))
    dphi = empty((b, d), device, features.dtype)
    bb2 = 32
    launch(
        _head_grad_kernel, (cdiv(b, bb2),),
        e, c, y, phi, g, weights, part, n_part, p1, dz, dphi, terms, loss, b, k, d, 1.0 / b,
        HAS_BIAS=head_bias, BB=bb2, BK=block(k, hi=32), BD=block(d + int(head_bias), hi=64), PREC=FP32_DOT,
        TP=TERMS_PAD, BLOCK_ROWS=BLOCK_ROWS, num_warps=8,
    )
    return loss, terms, dz, dphi


_setup_context, _backward = SPEC.autograd()  # d loss/d x: the gradient the forward wrote
_head_loss_op.register_autograd(_backward, setup_context=_setup_context)


def head_loss(
    logits: Tensor,
    condition: Tensor,
    labels: Tensor,
    features: Optional[Tensor],
    weights: Tensor,
    head_bias: bool = True,
) -> Tuple[Tensor, Tensor]:
    """Fused ``tldr_fast.reference.head_loss``: same arguments, returns ``(loss [], terms [5])``.

    ``logits`` [N, K] (N = B or 2B, clean rows first), ``condition`` [B, K], ``labels`` [B] int,
    ``features`` [B, D] or None (no grad-norm), ``weights`` [5] fp32 on the device. Gradients flow to
    logits, features and weights (not to condition); they come back in the inputs' dtypes.
    """
    SPEC.check(logits, condition, labels, features, weights, head_bias)
    if features is not None:
        features = compute_dtype(features)
    loss, terms, _, _ = _head_loss_op(
        compute_dtype(logits), compute_dtype(condition), labels, features, weights_fp32(weights), bool(head_bias)
    )
    return loss, terms


def compile_cases(dtype: torch.dtype) -> Iterator[Callable[[], object]]:
    """Representative calls of ``head_loss`` on CPU tensors of ``dtype``, for ``kernels._aot``: together
    they launch every kernel variant (constexpr branch) that GPU shapes select."""
    w = torch.ones(5)
    for b, k, d, variants in ((1024, 10, 256, "full"), (4099, 1000, 512, "gn"), (65536, 10, 256, "gn")):
        labels = torch.zeros(b, dtype=torch.int64)
        condition = torch.nn.functional.one_hot(labels, k).to(dtype)
        feats = torch.zeros(b, d, dtype=dtype)
        z2 = torch.zeros(2 * b, k, dtype=dtype)
        yield partial(head_loss, z2, condition, labels, feats, w, True)
        if variants == "full":
            yield partial(head_loss, z2[:b], condition, labels, feats, w, False)
            yield partial(head_loss, z2, condition, labels, None, w, True)
