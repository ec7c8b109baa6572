"""image_prior: TV and Pix against loops, and fast backends against the reference."""

import pytest
import torch

from tldr_fast import reference as ref
from tests.helpers import DEVICE, assert_close, assert_low_precision_close, rand, rand_weights


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
    _, terms = ref.image_prior(x, torch.ones(2, dtype=torch.float64), -1.0, 1.0)
    torch.testing.assert_close(terms, naive_prior_terms(x, -1.0, 1.0).to(terms.dtype))


def test_reference_gradient_is_the_stencil(gen):
    """dTV/dx = (2/B) (4-neighbour Laplacian with free boundaries), dPix/dx = [x > hi] - [x < lo]."""
    x = rand(gen, 3, 2, 6, 7, dtype=torch.float64, device="cpu", scale=1.5).requires_grad_(True)
    g = torch.autograd.grad(ref.image_prior(x, torch.tensor([1.0, 1.0], dtype=torch.float64), -1.0, 1.0)[0], x)[0]
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


SHAPES = [(3, 1, 8, 8), (5, 3, 13, 17), (2, 1, 28, 28), (2, 3, 32, 32), (1, 3, 64, 64), (7, 2, 9, 33)]


def check_backend(fast, x, w, lo, hi, **tol):
    upstream = 0.7
    out = []
    for impl in (ref.image_prior, fast.image_prior):
        xi = x.detach().clone().requires_grad_(True)
        loss, terms = impl(xi, w, lo, hi)
        (loss * upstream).backward()
        out.append((loss, terms, xi.grad))
    (l0, t0, g0), (l1, t1, g1) = out
    assert l1.dtype == torch.float32 and t1.shape == (2,)
    assert_close(t1, t0, what="terms", **tol)
    assert_close(l1, l0, what="loss", **tol)
    assert_close(g1, g0, what="d/dimages", **tol)


@pytest.mark.parametrize("shape", SHAPES)
def test_fast_matches_reference(fast, gen, shape):
    x = rand(gen, *shape, scale=1.3)  # partly outside [-1, 1]: Pix is active
    w = rand_weights(gen)
    check_backend(fast, x, w, -1.0, 1.0)


@pytest.mark.parametrize("term", range(2))
def test_fast_each_term_gradient(fast, gen, term):
    x = rand(gen, 3, 3, 11, 10, scale=1.3)
    w = torch.zeros(2, device=DEVICE)
    w[term] = 1.0
    check_backend(fast, x, w, 0.0, 0.5)  # another range


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1024, 1, 28, 28), (4097, 3, 32, 32), (64, 3, 224, 224)])
def test_fast_low_precision(fast, gen, dtype, shape):
    x = rand(gen, *shape, scale=1.3).to(dtype)
    w = torch.tensor([1e-3, 1.0], device=DEVICE)
    res = {}
    for name, impl, xi in (("hp", ref.image_prior, x.double()), ("ref_lp", ref.image_prior, x), ("ours", fast.image_prior, x)):
        xi = xi.detach().clone().requires_grad_(True)
        loss, terms = impl(xi, w.to(xi.dtype) if name == "hp" else w, -1.0, 1.0)
        loss.backward()
        res[name] = (terms, xi.grad)
    for i, what in enumerate(("terms", "d/dimages")):
        assert_low_precision_close(res["ours"][i], res["ref_lp"][i], res["hp"][i], slack=2.0, atol=1e-5, what=what)


@pytest.mark.gpu
def test_fast_under_torch_compile_fullgraph(fast, gen):
    x = rand(gen, 33, 3, 32, 32)
    w = torch.tensor([1e-3, 1.0], device=DEVICE)

    def block(xi):
        return fast.image_prior(torch.tanh(xi), w, -1.0, 1.0)

    x1 = x.clone().requires_grad_(True)
    loss, terms = torch.compile(block, fullgraph=True)(x1)
    loss.backward()
    x2 = x.clone().requires_grad_(True)
    loss2, terms2 = block(x2)
    loss2.backward()
    assert_close(terms, terms2, what="terms")
    assert_close(x1.grad, x2.grad, what="d/dimages")
