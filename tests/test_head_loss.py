"""head_loss: the reference against naive formulas, and every fast backend against the reference."""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import DEVICE, assert_close, assert_low_precision_close, backend_or_skip, rand, rand_weights
from tldr_fast import reference as ref


def make_inputs(gen, b, k, d, pert=True, soft=False, dtype=torch.float32, device=DEVICE):
    logits = rand(gen, (2 if pert else 1) * b, k, scale=3.0, dtype=dtype, device=device)
    labels = torch.randint(0, k, (b,), generator=gen).to(device)
    if soft:
        target = F.softmax(rand(gen, b, k, dtype=torch.float64, device="cpu"), 1).to(device=device, dtype=dtype)
        labels = target.argmax(1)
    else:
        target = F.one_hot(labels, k).to(dtype)
    feats = rand(gen, b, d, dtype=dtype, device=device) if d else None
    weights = rand_weights(gen, 5, device)
    return logits, target, labels, feats, weights


def naive_head_terms(logits, target, labels, feats, head_bias):
    """Term by term with Python loops over the batch."""
    b, k = target.shape
    terms = []
    for rows in (range(b), range(b, 2 * b)):
        if rows.stop > logits.shape[0]:
            terms += [logits.new_zeros(()), logits.new_zeros(())]
            continue
        ce = kl = 0.0
        for n, i in enumerate(rows):
            logp = logits[i] - torch.logsumexp(logits[i], 0)
            ce = ce - logp[labels[n]]
            for j in range(k):
                c = target[n, j]
                if c > 0:
                    kl = kl + c * (torch.log(c) - logp[j])
        terms += [ce / b, kl / b]
    if feats is None:
        terms.append(logits.new_zeros(()))
    else:
        e = torch.softmax(logits[:b], 1) - target
        gw = sum(torch.outer(e[i], feats[i]) for i in range(b)) / b  # dH/dW, [K, D]
        sq = gw.square().sum()
        if head_bias:
            sq = sq + (e.sum(0) / b).square().sum()
        terms.append(sq.sqrt())
    return torch.stack(terms)


# --- the reference -------------------------------------------------------------------------------


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("head_bias", [False, True])
def test_reference_matches_naive_formulas(gen, soft, head_bias):
    logits, target, labels, feats, w = make_inputs(gen, 7, 5, 4, soft=soft, dtype=torch.float64, device="cpu")
    logits.requires_grad_(True)
    feats.requires_grad_(True)
    loss, terms = ref.head_loss(logits, target, labels, feats, w, head_bias)
    naive = naive_head_terms(logits, target, labels, feats, head_bias)
    torch.testing.assert_close(terms, naive.detach(), rtol=1e-10, atol=1e-12)
    g_ref = torch.autograd.grad(loss, (logits, feats))
    g_naive = torch.autograd.grad((w.double() * naive).sum(), (logits, feats))
    for a, e in zip(g_ref, g_naive):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_kl_equals_ce_for_hot_conditioning(gen):
    logits, target, labels, _, w = make_inputs(gen, 33, 10, 0)
    _, terms = ref.head_loss(logits, target, labels, None, w)
    assert_close(terms[1], terms[0], what="KL vs CE (clean)")
    assert_close(terms[3], terms[2], what="KL vs CE (perturbed)")


def test_kl_is_true_kl_for_soft_targets(gen):
    logits, target, labels, _, w = make_inputs(gen, 9, 6, 0, pert=False, soft=True, dtype=torch.float64, device="cpu")
    _, terms = ref.head_loss(logits, target, labels, None, w)
    expected = F.kl_div(F.log_softmax(logits, 1), target, reduction="batchmean")
    torch.testing.assert_close(terms[1], expected)


@pytest.mark.parametrize("head_bias", [False, True])
def test_head_grad_norm_equals_autograd_of_a_real_linear_head(gen, head_bias):
    b, k, d = 19, 7, 11
    head = torch.nn.Linear(d, k, bias=head_bias).double()
    phi = rand(gen, b, d, dtype=torch.float64, device="cpu")
    labels = torch.randint(0, k, (b,), generator=gen)
    target = F.one_hot(labels, k).double()
    logits = head(phi)
    ce = F.cross_entropy(logits, labels)
    grads = torch.autograd.grad(ce, list(head.parameters()))
    expected = torch.sqrt(sum(g.square().sum() for g in grads))
    _, terms = ref.head_loss(logits.detach(), target, labels, phi, torch.zeros(5, dtype=torch.float64), head_bias)
    torch.testing.assert_close(terms[4], expected, rtol=1e-12, atol=1e-14)
    # and the full double-backward definition agrees on this one-layer model
    full = ref.grad_norm_full(head(phi), target, list(head.parameters()))
    torch.testing.assert_close(full.detach(), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("head_bias", [False, True])
def test_head_grad_norm_gradcheck(gen, head_bias):
    logits, target, labels, feats, _ = make_inputs(
        gen, 5, 4, 3, pert=False, soft=True, dtype=torch.float64, device="cpu"
    )
    w = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    logits.requires_grad_(True)
    feats.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z, f: ref.head_loss(z, target, labels, f, w, head_bias)[0], (logits, feats))


# --- fast backends against the reference ---------------------------------------------------------

SHAPES = [  # (B, K, D): B not a power of two, K in {2, 10, 1000}, D in {3, 64, 300}
    (37, 2, 3),
    (5, 10, 64),
    (37, 10, 300),
    (13, 1000, 64),
    (1, 1000, 3),
]


def check_backend(fast, logits, target, labels, feats, w, head_bias, **tol):
    """Forward values and gradients (under a random upstream gradient) of ``fast`` vs the reference."""
    upstream = torch.rand((), generator=torch.Generator().manual_seed(0)).item() + 0.5
    results = []
    for impl in (ref.head_loss, fast.head_loss):
        z = logits.detach().clone().requires_grad_(True)
        f = None if feats is None else feats.detach().clone().requires_grad_(True)
        loss, terms = impl(z, target, labels, f, w, head_bias)
        (loss * upstream).backward()
        results.append((loss, terms, z.grad, None if f is None else f.grad))
    (l0, t0, gz0, gf0), (l1, t1, gz1, gf1) = results
    assert l1.dtype == torch.float32 and t1.shape == (5,)
    assert_close(t1, t0, what="terms", **tol)
    assert_close(l1, l0, what="loss", **tol)
    assert_close(gz1, gz0, what="d/dlogits", **tol)
    if feats is not None:
        assert_close(gf1, gf0, what="d/dfeatures", **tol)


@pytest.mark.parametrize("b,k,d", SHAPES)
@pytest.mark.parametrize("pert", [True, False])
@pytest.mark.parametrize("soft", [False, True])
def test_fast_matches_reference(fast, gen, b, k, d, pert, soft):
    logits, target, labels, feats, w = make_inputs(gen, b, k, d, pert=pert, soft=soft)
    check_backend(fast, logits, target, labels, feats, w, head_bias=True)


@pytest.mark.parametrize("b,k,d", [(301, 7, 37), (517, 10, 256)])
@pytest.mark.parametrize("head_bias", [False, True])
def test_extension_grad_norm_blocks(gen, b, k, d, head_bias):
    """The extension's CPU grad-norm loops at the sizes of their blocking: several 128-row partials of G,
    a remainder of rows past the 4-row blocks, a tail of columns past the 16-wide vectors, K padded to a
    multiple of 5 (on a GPU: the CUDA kernels at the same sizes)."""
    logits, target, labels, feats, w = make_inputs(gen, b, k, d, soft=True)
    check_backend(backend_or_skip("extension"), logits, target, labels, feats, w, head_bias=head_bias)


@pytest.mark.parametrize("term", range(5))
@pytest.mark.parametrize("head_bias", [False, True])
def test_fast_each_term_gradient(fast, gen, term, head_bias):
    logits, target, labels, feats, _ = make_inputs(gen, 21, 10, 17, soft=True)
    w = torch.zeros(5, device=DEVICE)
    w[term] = 1.0
    check_backend(fast, logits, target, labels, feats, w, head_bias)


def test_fast_without_features_skips_grad_norm(fast, gen):
    logits, target, labels, _, w = make_inputs(gen, 11, 10, 0)
    _, terms = fast.head_loss(logits, target, labels, None, w, True)
    assert terms[4].item() == 0.0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,k,d", [(1024, 10, 256), (4099, 1000, 512), (65536, 10, 256)])
def test_fast_low_precision(fast, gen, dtype, b, k, d):
    logits, target, labels, feats, w = make_inputs(gen, b, k, d, soft=True)
    lp = [t.to(dtype) for t in (logits, target, feats)]
    results = {}
    for name, impl, args in (
        ("hp", ref.head_loss, [t.double() for t in lp]),
        ("ref_lp", ref.head_loss, lp),
        ("ours", fast.head_loss, lp),
    ):
        z = args[0].detach().clone().requires_grad_(True)
        f = args[2].detach().clone().requires_grad_(True)
        loss, terms = impl(z, args[1], labels, f, w.to(torch.float64 if name == "hp" else torch.float32), True)
        loss.backward()
        results[name] = (terms, z.grad, f.grad)
    for i, what in enumerate(("terms", "d/dlogits", "d/dfeatures")):
        ours, lp_ref, hp = results["ours"][i], results["ref_lp"][i], results["hp"][i]
        assert ours.dtype == lp_ref.dtype, what
        # the reference computes in fp32 from low-precision inputs too: at worst a rounding apart
        assert_low_precision_close(ours, lp_ref, hp, slack=2.0, atol=1e-5, what=what)


@pytest.mark.gpu
def test_fast_under_torch_compile_fullgraph(fast, gen):
    logits, target, labels, feats, w = make_inputs(gen, 257, 10, 64, soft=True)

    def block(z, f):
        loss, terms = fast.head_loss(z, target, labels, f, w, True)
        return loss * 2.0, terms

    compiled = torch.compile(block, fullgraph=True)
    z = logits.clone().requires_grad_(True)
    f = feats.clone().requires_grad_(True)
    loss, terms = compiled(z, f)
    loss.backward()
    z2 = logits.clone().requires_grad_(True)
    f2 = feats.clone().requires_grad_(True)
    loss2, terms2 = block(z2, f2)
    loss2.backward()
    assert_close(terms, terms2, what="terms")
    assert_close(z.grad, z2.grad, what="d/dlogits")
    assert_close(f.grad, f2.grad, what="d/dfeatures")
