"""image_prior: TV, Pix and Moments against loops, and fast backends against the reference."""

import pytest
import torch

from tests.helpers import DEVICE, assert_close, assert_low_precision_close, rand, rand_weights
from tldr_fast import reference as ref


def naive_prior_terms(x, lo, hi):
    b, c, h, w = x.shape
    tv = pix = 0.0
    for n in range(b):
        for ch in range(c):
            for i in range(h):
                for j in range(w):
                    v = x[n, ch, i, j]
                    if i + 1 < h:
                        tv = tv + (x[n, ch, i + 1, j] - v) ** 2
                    if j + 1 < w:
                        tv = tv + (x[n, ch, i, j + 1] - v) ** 2
                    pix = pix + max(v - hi, 0) + max(lo - v, 0)
    return torch.stack([torch.as_tensor(tv) / b, torch.as_tensor(pix)])


def test_reference_matches_loops(gen):
    x = rand(gen, 2, 3, 5, 4, dtype=torch.float64, device="cpu", scale=1.5)
    _, terms = ref.image_prior(x, torch.ones(3, dtype=torch.float64), -1.0, 1.0)
    torch.testing.assert_close(terms[:2], naive_prior_terms(x, -1.0, 1.0).to(terms.dtype))
    assert terms[2] == 0  # no moments given


def naive_moments(x, lo, hi, moments):
    """(1/C) sum_c ((m_c - mu_c)^2 + (s_c - sigma_c)^2) / sigma_c^2 over the pixels of x01, one channel at a time."""
    b, c, h, w = x.shape
    total = 0.0
    for ch in range(c):
        values = [(x[n, ch, i, j] - lo) / (hi - lo) for n in range(b) for i in range(h) for j in range(w)]
        m = sum(values) / len(values)
        s = (sum((v - m) ** 2 for v in values) / len(values)) ** 0.5
        mu, sigma = moments[0, ch], moments[1, ch]
        total = total + ((m - mu) ** 2 + (s - sigma) ** 2) / sigma**2
    return total / c


MOMENTS = torch.tensor([[0.13, 0.4, 0.6], [0.31, 0.2, 0.25]], dtype=torch.float64)  # [2, C]: mu, sigma


@pytest.mark.parametrize("lo,hi", [(-1.0, 1.0), (0.0, 2.0)])
def test_reference_moments_match_loops(gen, lo, hi):
    """Value and gradient of Moments against the definition evaluated pixel by pixel (fp64), and gradcheck."""
    x = rand(gen, 3, 3, 4, 5, dtype=torch.float64, device="cpu", scale=1.5).requires_grad_(True)
    w = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    loss, terms = ref.image_prior(x, w, lo, hi, MOMENTS)
    naive = naive_moments(x, lo, hi, MOMENTS)
    torch.testing.assert_close(terms[2], naive.detach(), rtol=1e-12, atol=0)
    g, g_naive = (torch.autograd.grad(t, x)[0] for t in (loss, naive))
    torch.testing.assert_close(g, g_naive, rtol=1e-10, atol=1e-14)
    assert torch.autograd.gradcheck(lambda t: ref.image_prior(t, w, lo, hi, MOMENTS)[0], (x,))


def test_reference_moments_gradient_matches_the_derivation(gen):
    """dMoments/dx = [2 (m - mu) / N + [var >= eps] 2 (s - sigma) (x01 - m) / (N s)] / (C sigma^2 (hi - lo)),
    the kernels' formula; on a flat channel (var clamped) only the mean's part remains."""
    lo, hi = -1.0, 1.0
    x = rand(gen, 3, 3, 5, 4, dtype=torch.float64, device="cpu", scale=0.6)
    x[:, 2] = 0.25  # flat
    x.requires_grad_(True)
    g = torch.autograd.grad(
        ref.image_prior(x, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), lo, hi, MOMENTS)[0], x
    )[0]
    x01 = (x.detach() - lo) / (hi - lo)
    c, n = x.shape[1], x.numel() // x.shape[1]
    var, m = (t.view(1, c, 1, 1) for t in torch.var_mean(x01, dim=(0, 2, 3), unbiased=False))
    mu, sigma = (t.view(1, c, 1, 1) for t in MOMENTS)
    s = var.clamp_min(ref.MOMENT_VAR_EPS).sqrt()
    std_part = torch.where(var >= ref.MOMENT_VAR_EPS, 2 * (s - sigma) * (x01 - m) / (n * s), 0.0)
    torch.testing.assert_close(g, (2 * (m - mu) / n + std_part) / (c * sigma**2 * (hi - lo)))


def test_reference_gradient_is_the_stencil(gen):
    """dTV/dx = (2/B) (4-neighbour Laplacian with free boundaries), dPix/dx = [x > hi] - [x < lo]."""
    x = rand(gen, 3, 2, 6, 7, dtype=torch.float64, device="cpu", scale=1.5).requires_grad_(True)
    g = torch.autograd.grad(ref.image_prior(x, torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64), -1.0, 1.0)[0], x)[0]
    v = x.detach()
    lap = torch.zeros_like(v)
    dh = v[:, :, 1:] - v[:, :, :-1]
    dw = v[:, :, :, 1:] - v[:, :, :, :-1]
    lap[:, :, 1:] += dh
    lap[:, :, :-1] -= dh
    lap[:, :, :, 1:] += dw
    lap[:, :, :, :-1] -= dw
    expected = 2 * lap / v.shape[0] + (v > 1).double() - (v < -1).double()
    torch.testing.assert_close(g, expected)


SHAPES = [(3, 1, 8, 8), (5, 3, 13, 17), (4, 3, 13, 11), (2, 1, 28, 28), (2, 3, 32, 32), (1, 3, 64, 64), (7, 2, 9, 33)]


def check_backend(fast, x, w, lo, hi, moments=None, **tol):
    upstream = 0.7
    out = []
    for impl in (ref.image_prior, fast.image_prior):
        xi = x.detach().clone().requires_grad_(True)
        loss, terms = impl(xi, w, lo, hi, moments)
        (loss * upstream).backward()
        out.append((loss, terms, xi.grad))
    (l0, t0, g0), (l1, t1, g1) = out
    assert l1.dtype == torch.float32 and t1.shape == (3,)
    assert_close(t1, t0, what="terms", **tol)
    assert_close(l1, l0, what="loss", **tol)
    assert_close(g1, g0, what="d/dimages", **tol)


def rand_moments(gen, c):
    """A plausible (mean, std) per channel of [0, 1] images: [2, C] fp32 on the test device."""
    return torch.stack([torch.rand(c, generator=gen) * 0.6 + 0.1, torch.rand(c, generator=gen) * 0.3 + 0.1]).to(DEVICE)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_moments", [False, True])
def test_fast_matches_reference(fast, gen, shape, with_moments):
    x = rand(gen, *shape, scale=1.3)  # partly outside [-1, 1]: Pix is active
    w = rand_weights(gen, 3)
    check_backend(fast, x, w, -1.0, 1.0, rand_moments(gen, shape[1]) if with_moments else None)


@pytest.mark.parametrize("term", range(3))
def test_fast_each_term_gradient(fast, gen, term):
    x = rand(gen, 3, 3, 11, 10, scale=1.3)
    w = torch.zeros(3, device=DEVICE)
    w[term] = 1.0
    check_backend(fast, x, w, 0.0, 0.5, rand_moments(gen, 3))  # another range


def test_fast_moments_of_a_flat_channel(fast, gen):
    """A constant channel has zero variance: the std is clamped and its gradient part vanishes (no NaN)."""
    x = rand(gen, 4, 2, 6, 5, scale=0.5)
    x[:, 1] = 0.25
    check_backend(fast, x, rand_weights(gen, 3), -1.0, 1.0, rand_moments(gen, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1024, 1, 28, 28), (4097, 3, 32, 32), (64, 3, 224, 224)])
@pytest.mark.parametrize("with_moments", [False, True])
def test_fast_low_precision(fast, gen, dtype, shape, with_moments):
    x = rand(gen, *shape, scale=1.3).to(dtype)
    w = torch.tensor([1e-3, 1.0, 1.0], device=DEVICE)
    moments = rand_moments(gen, shape[1]) if with_moments else None
    res = {}
    for name, impl, xi in (
        ("hp", ref.image_prior, x.double()),
        ("ref_lp", ref.image_prior, x),
        ("ours", fast.image_prior, x),
    ):
        xi = xi.detach().clone().requires_grad_(True)
        loss, terms = impl(xi, w.to(xi.dtype) if name == "hp" else w, -1.0, 1.0, moments)
        loss.backward()
        res[name] = (terms, xi.grad)
    for i, what in enumerate(("terms", "d/dimages")):
        assert_low_precision_close(res["ours"][i], res["ref_lp"][i], res["hp"][i], slack=2.0, atol=1e-5, what=what)


@pytest.mark.gpu
@pytest.mark.parametrize("with_moments", [False, True])
def test_fast_under_torch_compile_fullgraph(fast, gen, with_moments):
    x = rand(gen, 33, 3, 32, 32)
    w = torch.tensor([1e-3, 1.0, 1.0], device=DEVICE)
    moments = rand_moments(gen, 3) if with_moments else None

    def block(xi):
        return fast.image_prior(torch.tanh(xi), w, -1.0, 1.0, moments)

    x1 = x.clone().requires_grad_(True)
    loss, terms = torch.compile(block, fullgraph=True)(x1)
    loss.backward()
    x2 = x.clone().requires_grad_(True)
    loss2, terms2 = block(x2)
    loss2.backward()
    assert_close(terms, terms2, what="terms")
    assert_close(x1.grad, x2.grad, what="d/dimages")
