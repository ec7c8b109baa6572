"""feature_loss: the closed forms against the B x B definitions, and fast backends against them."""

import pytest
import torch

from tests.helpers import DEVICE, assert_close, assert_low_precision_close, rand, rand_weights
from tldr_fast import reference as ref
from tldr_fast.ops.feature_loss import TERMS

T = len(TERMS)  # (cos, ortho, activation): the weights' and terms' length


def unit_weights(term, dtype=torch.float32, device=DEVICE):
    """Weight 1 on ``term``, 0 on the others."""
    w = torch.zeros(T, dtype=dtype, device=device)
    w[TERMS.index(term)] = 1.0
    return w


def naive_activation(phi):
    """DAFL's activation loss: -mean |phi| over every element, whatever the labels."""
    return -phi.abs().mean()


def naive_feature_terms(phi):
    """The definitions of DESIGN.md §2, with the B x B matrices the closed forms avoid."""
    b = phi.shape[0]
    u = phi / phi.norm(dim=1, keepdim=True)
    sim = u @ u.t()
    cos = sum(sim[i, j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
    ortho = (phi @ phi.t() - torch.eye(b, dtype=phi.dtype)).square().sum() / b**2
    return torch.stack([cos, ortho, naive_activation(phi)])


@pytest.mark.parametrize("b,d", [(6, 3), (4, 9), (2, 2)])  # both Gram branches (D < B, D > B)
def test_reference_matches_definitions(gen, b, d):
    phi = rand(gen, b, d, dtype=torch.float64, device="cpu").requires_grad_(True)
    w = torch.rand(T, generator=gen, dtype=torch.float64) + 0.5
    loss, terms = ref.feature_loss(phi, w)
    naive = naive_feature_terms(phi)
    torch.testing.assert_close(terms, naive.detach(), rtol=1e-10, atol=1e-12)
    g = torch.autograd.grad(loss, phi)[0]
    g_naive = torch.autograd.grad((w * naive).sum(), phi)[0]
    torch.testing.assert_close(g, g_naive, rtol=1e-10, atol=1e-12)


def test_reference_gradients_match_the_derivations(gen):
    """dOrtho/dPhi = 4 (Phi Phi^T Phi - Phi) / B^2, dCos/du_i = 2 (S - u_i) / (B (B-1)) and
    dAct/dPhi = -sign(Phi) / (B D) (0 at 0)."""
    b, d = 8, 5
    phi = rand(gen, b, d, dtype=torch.float64, device="cpu")
    phi[2, 1:4] = 0
    phi.requires_grad_(True)
    p = phi.detach()
    f64 = dict(dtype=torch.float64, device="cpu")
    g_act = torch.autograd.grad(ref.feature_loss(phi, unit_weights("activation", **f64))[0], phi)[0]
    torch.testing.assert_close(g_act, -p.sign() / (b * d), rtol=0, atol=0)
    assert (g_act[2, 1:4] == 0).all()
    g_ortho = torch.autograd.grad(ref.feature_loss(phi, unit_weights("ortho", **f64))[0], phi)[0]
    torch.testing.assert_close(g_ortho, 4 * (p @ (p.t() @ p) - p) / b**2)
    g_cos = torch.autograd.grad(ref.feature_loss(phi, unit_weights("cos", **f64))[0], phi)[0]
    norm = p.norm(dim=1, keepdim=True)
    u = p / norm
    du = 2 * (u.sum(0, keepdim=True) - u) / (b * (b - 1))
    torch.testing.assert_close(g_cos, (du - u * (u * du).sum(1, keepdim=True)) / norm)


def naive_class_terms(phi, labels):
    """The same-label definitions, pair by pair: Cos over the ordered pairs i != j of one label (0 when
    there is none), Ortho over every pair (i, j) of one label, i = j included (Phi Phi^T - I restricted to
    the same-label pairs)."""
    b = phi.shape[0]
    u = phi / phi.norm(dim=1, keepdim=True)
    same = [(i, j) for i in range(b) for j in range(b) if labels[i] == labels[j]]
    off = [(i, j) for i, j in same if i != j]
    cos = sum(u[i] @ u[j] for i, j in off) / len(off) if off else phi.new_zeros(())
    ortho = sum((phi[i] @ phi[j] - (1.0 if i == j else 0.0)) ** 2 for i, j in same) / len(same)
    return torch.stack([cos, ortho, naive_activation(phi)])


# (labels, K): several samples per label, one sample, labels absent from the batch (K larger than the labels
# seen), every label distinct (no same-label pair: P = 0, Cos is 0), a single label (the all-pairs form)
LABEL_CASES = [([0, 0, 1, 1, 1, 2], 3), ([3, 1, 3, 3, 0, 1], 6), ([0, 1, 2, 3, 4, 5], 6), ([2, 2, 2, 2, 2, 2], 4)]


@pytest.mark.parametrize("labels,k", LABEL_CASES)
def test_reference_by_class_matches_definitions(gen, labels, k):
    y = torch.tensor(labels)
    phi = rand(gen, len(labels), 4, dtype=torch.float64, device="cpu").requires_grad_(True)
    w = torch.rand(T, generator=gen, dtype=torch.float64) + 0.5
    loss, terms = ref.feature_loss(phi, w, y, k)
    naive = naive_class_terms(phi, y)
    torch.testing.assert_close(terms, naive.detach(), rtol=1e-10, atol=1e-12)
    g = torch.autograd.grad(loss, phi)[0]
    g_naive = torch.autograd.grad((w * naive).sum(), phi)[0]
    torch.testing.assert_close(g, g_naive, rtol=1e-10, atol=1e-12)
    if len(set(labels)) == 1:
        torch.testing.assert_close(terms, ref.feature_loss(phi, w)[1])


@pytest.mark.parametrize("labels,k", LABEL_CASES)
def test_reference_by_class_gradients_match_the_derivations(gen, labels, k):
    """dOrtho/dPhi = 4 (((Phi Phi^T) o M) Phi - Phi) / N2 and dCos/du_i = 2 S_{y_i} / max(P, 1), then
    through the normalisation (the kernels' formulas)."""
    y = torch.tensor(labels)
    b = len(labels)
    phi = rand(gen, b, 5, dtype=torch.float64, device="cpu").requires_grad_(True)
    p = phi.detach()
    m = (y[:, None] == y[None, :]).double()
    n = torch.bincount(y, minlength=k).double()
    pairs, n2 = max(float((n * (n - 1)).sum()), 1.0), float(n.square().sum())
    f64 = dict(dtype=torch.float64, device="cpu")
    g_ortho = torch.autograd.grad(ref.feature_loss(phi, unit_weights("ortho", **f64), y, k)[0], phi)[0]
    torch.testing.assert_close(g_ortho, 4 * ((p @ p.t() * m) @ p - p) / n2)
    g_act = torch.autograd.grad(ref.feature_loss(phi, unit_weights("activation", **f64), y, k)[0], phi)[0]
    torch.testing.assert_close(g_act, -p.sign() / p.numel(), rtol=0, atol=0)  # labels play no part
    g_cos = torch.autograd.grad(ref.feature_loss(phi, unit_weights("cos", **f64), y, k)[0], phi)[0]
    norm = p.norm(dim=1, keepdim=True)
    u = p / norm
    du = 2 * (m @ u) / pairs  # 2 S_{y_i} / max(P, 1)
    torch.testing.assert_close(g_cos, (du - u * (u * du).sum(1, keepdim=True)) / norm)


def test_reference_by_class_gradcheck(gen):
    phi = rand(gen, 7, 5, dtype=torch.float64, device="cpu").requires_grad_(True)
    y = torch.tensor([0, 1, 0, 2, 1, 1, 0])
    w = torch.tensor([1.0, 0.5, 0.7], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: ref.feature_loss(f, w, y, 4)[0], (phi,))


@pytest.mark.parametrize("b,d", [(5, 3), (3, 7)])
def test_reference_gradcheck(gen, b, d):
    phi = rand(gen, b, d, dtype=torch.float64, device="cpu").requires_grad_(True)
    w = torch.tensor([1.0, 0.5, 0.7], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: ref.feature_loss(f, w)[0], (phi,))


SHAPES = [(37, 3), (5, 64), (37, 300), (2, 64), (300, 64), (129, 17), (5, 7), (33, 130)]  # (B, D): D < B and D > B


def check_backend(fast, phi, w, labels=None, num_classes=0, **tol):
    upstream = 1.7
    out = []
    for impl in (ref.feature_loss, fast.feature_loss):
        f = phi.detach().clone().requires_grad_(True)
        loss, terms = impl(f, w, labels, num_classes)
        (loss * upstream).backward()
        out.append((loss, terms, f.grad))
    (l0, t0, g0), (l1, t1, g1) = out
    assert l1.dtype == torch.float32 and t1.shape == (T,)
    # Cos is a difference of O(B^2) sums: judge it against the size of those sums
    assert_close(t1, t0, what="terms", **tol)
    assert_close(l1, l0, what="loss", **tol)
    # each gradient element is a difference of terms as large as the largest element (Cos and Ortho
    # parts cancel): its fp32 rounding scales with that, not with the element (an H200 run of
    # (37, 300) differed by 3.2e-6 in one element of size 0.04, where the largest is ~5)
    scale = max(1.0, g0.abs().max().item())
    assert_close(g1, g0, what="d/dfeatures", rtol=tol["rtol"], atol=tol["atol"] * scale)


@pytest.mark.parametrize("b,d", SHAPES)
def test_fast_matches_reference(fast, gen, b, d):
    phi = rand(gen, b, d) + 0.3  # a common direction, as real features have: Cos well away from 0
    w = rand_weights(gen, T)
    check_backend(fast, phi, w, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("k", [1, 3, 10])  # one label (the all-pairs form), a few, many (some absent or single)
def test_fast_by_class_matches_reference(fast, gen, b, d, k):
    phi = rand(gen, b, d) + 0.3
    labels = torch.randint(0, k, (b,), generator=gen).to(DEVICE)
    check_backend(fast, phi, rand_weights(gen, T), labels, k, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("labels,k", LABEL_CASES)
def test_fast_by_class_special_batches(fast, gen, labels, k):
    """Absent and single labels, every label distinct (P = 0), one label; and a dead (zero) row."""
    phi = rand(gen, len(labels), 9) + 0.3
    y = torch.tensor(labels, device=DEVICE)
    check_backend(fast, phi, rand_weights(gen, T), y, k, rtol=2e-5, atol=2e-6)
    phi[2] = 0
    check_backend(fast, phi, rand_weights(gen, T), y, k, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("term", TERMS)
def test_fast_each_term_gradient(fast, gen, term):
    check_backend(fast, rand(gen, 23, 19), unit_weights(term), rtol=2e-5, atol=2e-6)


def test_fast_zero_row_is_finite(fast, gen):
    """A dead feature row (all zeros, as after a ReLU) must not produce NaN: the norm is clamped."""
    phi = rand(gen, 9, 16)
    phi[3] = 0
    w = torch.ones(T, device=DEVICE)
    check_backend(fast, phi, w, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("b,d", [(5, 7), (33, 130)])
@pytest.mark.parametrize("k", [0, 3])  # without labels, and by class: Act is over every row either way
def test_fast_activation(fast, gen, b, d, k):
    """Act alone: -mean |phi| and -sign(phi) / (B D), 0 where phi is 0 (a ReLU's zeros, a dead row)."""
    phi = (rand(gen, b, d) + 0.3).relu()  # many exact zeros
    phi[1] = 0
    labels = torch.randint(0, k, (b,), generator=gen).to(DEVICE) if k else None
    w = unit_weights("activation")
    check_backend(fast, phi, w, labels, k, rtol=2e-5, atol=2e-6)
    f = phi.clone().requires_grad_(True)
    loss, terms = fast.feature_loss(f, w, labels, k)
    loss.backward()
    assert_close(terms[TERMS.index("activation")], naive_activation(phi), what="Act")
    assert_close(f.grad, -phi.sign() / (b * d), what="dAct/dfeatures")
    assert (f.grad[phi == 0] == 0).all()


def check_low_precision(fast, phi, *label_args):
    """terms and d/dfeatures of ``fast`` against the reference in the same dtype, both measured from fp64."""
    w = torch.tensor([1.0, 0.01, 0.5], device=DEVICE)
    res = {}
    for name, impl, x in (
        ("hp", ref.feature_loss, phi.double()),
        ("ref_lp", ref.feature_loss, phi),
        ("ours", fast.feature_loss, phi),
    ):
        f = x.detach().clone().requires_grad_(True)
        loss, terms = impl(f, w.to(x.dtype) if name == "hp" else w, *label_args)
        loss.backward()
        res[name] = (terms, f.grad)
    for i, what in enumerate(("terms", "d/dfeatures")):
        ours, lp_ref, hp = res["ours"][i], res["ref_lp"][i], res["hp"][i]
        assert_low_precision_close(ours, lp_ref, hp, slack=2.0, atol=1e-5, what=what)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,d", [(1024, 256), (8191, 300), (65536, 256), (300, 4096)])
def test_fast_low_precision(fast, gen, dtype, b, d):
    check_low_precision(fast, (rand(gen, b, d) + 0.3).to(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,d", [(1024, 256), (300, 4096)])
def test_fast_by_class_low_precision(fast, gen, dtype, b, d):
    phi = (rand(gen, b, d) + 0.3).to(dtype)
    check_low_precision(fast, phi, torch.randint(0, 10, (b,), generator=gen).to(DEVICE), 10)


@pytest.mark.gpu
@pytest.mark.parametrize("by_class", [False, True])
def test_fast_under_torch_compile_fullgraph(fast, gen, by_class):
    phi = rand(gen, 513, 64)
    w = torch.tensor([1.0, 0.1, 0.5], device=DEVICE)
    labels = torch.randint(0, 10, (513,), generator=gen).to(DEVICE) if by_class else None

    def block(f):
        loss, terms = fast.feature_loss(f.relu(), w, labels, 10)
        return loss, terms

    f1 = phi.clone().requires_grad_(True)
    loss, terms = torch.compile(block, fullgraph=True)(f1)
    loss.backward()
    f2 = phi.clone().requires_grad_(True)
    loss2, terms2 = block(f2)
    loss2.backward()
    assert_close(terms, terms2, what="terms")
    assert_close(f1.grad, f2.grad, what="d/dfeatures")
