"""mode_seek: the reference against its definition and the declared gradient, and every fast backend
against the reference (value and gradient w.r.t. the images), at odd shapes and the edge cases the step meets."""

import pytest
import torch

from tests.helpers import assert_close, assert_low_precision_close, rand
from tldr_fast import reference as ref
from tldr_fast.ops.mode_seek import SPEC


def naive_mode_seek(x, z):
    """The definition pair by pair, in fp64 (the unpaired last row of an odd batch left out)."""
    h = x.shape[0] // 2
    ratios = []
    for i in range(h):
        dx = (x[i] - x[i + h]).abs().mean()
        dz = (z[i] - z[i + h]).abs().mean()
        ratios.append(dx / max(dz, 1e-12))
    return 1.0 / (sum(ratios) / h + 1e-5)


@pytest.mark.parametrize("b", [6, 7])
def test_reference_matches_the_definition_and_the_declared_gradient(gen, b):
    x = rand(gen, b, 2, 4, 3, dtype=torch.float64, device="cpu").requires_grad_(True)
    z = rand(gen, b, 8, dtype=torch.float64, device="cpu")
    value = ref.mode_seek(x, z)
    torch.testing.assert_close(value, naive_mode_seek(x.detach(), z))
    (g,) = torch.autograd.grad(value, x)
    h, p = b // 2, x[0].numel()
    v = x.detach()
    dz = (z[:h] - z[h : 2 * h]).abs().flatten(1).mean(1)
    s = ((v[:h] - v[h : 2 * h]).abs().flatten(1).mean(1) / dz).mean()
    coef = -1.0 / (h * p * dz * (s + 1e-5) ** 2)  # tldr_fast/ops/mode_seek.py
    d = coef.view(-1, 1, 1, 1) * torch.sign(v[:h] - v[h : 2 * h])
    expected = torch.zeros_like(v)
    expected[:h], expected[h : 2 * h] = d, -d
    torch.testing.assert_close(g, expected)
    assert torch.autograd.gradcheck(lambda t: ref.mode_seek(t, z), (x,))


def fast_op(fast):
    op = getattr(fast, "mode_seek", None)
    if op is None:
        pytest.skip(f"backend {fast.name!r} has no mode_seek kernel")
    return op


def check_backend(op, x, z, **tol):
    upstream = 0.7
    out = []
    for impl in (ref.mode_seek, op):
        xi = x.detach().clone().requires_grad_(True)
        value = impl(xi, z)
        (value * upstream).backward()
        out.append((value, xi.grad))
    (v0, g0), (v1, g1) = out
    assert v1.shape == () and v1.dtype == v0.dtype
    assert_close(v1, v0, what="value", **tol)
    assert_close(g1, g0, what="d/dimages", rtol=2e-5, atol=1e-9)


# [B, ...]: the generator's images (even and odd B), flat rows, one pair
SHAPES = [(128, 1, 28, 28), (9, 3, 13, 17), (2, 1, 28, 28), (33, 50), (64, 3, 32, 32)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fast_matches_reference(fast, gen, shape):
    op = fast_op(fast)
    check_backend(op, rand(gen, *shape).tanh(), rand(gen, shape[0], 100))


def test_fast_with_identical_pairs_and_a_slice(fast, gen):
    """Some pairs with identical images (a zero difference: sign 0, no gradient there) and rows that are a
    slice of a larger non-contiguous batch."""
    op = fast_op(fast)
    x = rand(gen, 12, 3, 7, 9).to(memory_format=torch.channels_last)
    x[1] = x[1 + 5]
    check_backend(op, x[:10], rand(gen, 10, 16))


def test_fast_gradient_reaches_only_the_images(fast, gen):
    op = fast_op(fast)
    x, z = rand(gen, 8, 1, 5, 5), rand(gen, 8, 4)
    with torch.no_grad():
        assert_close(op(x, z), ref.mode_seek(x, z), what="value under no_grad")
    zi = z.clone().requires_grad_(True)
    xi = x.clone().requires_grad_(True)
    value = op(xi, zi)
    (gx,) = torch.autograd.grad(value, xi)
    assert torch.isfinite(gx).all()


def test_fast_fp64_gradcheck(fast, gen):
    op = fast_op(fast)
    if fast.name == "triton":
        pytest.skip("the Triton kernels compute fp64 inputs in fp32 (DESIGN.md §3.1)")
    x = rand(gen, 5, 2, 3, 3, dtype=torch.float64).requires_grad_(True)
    z = rand(gen, 5, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: op(t, z), (x,))


def test_fused_op_schema_and_fake_rule(fast, gen):
    fast_op(fast)
    ns = {"triton": "tldr_triton", "extension": "tldr_fast"}[fast.name]
    op = getattr(getattr(torch.ops, ns), SPEC.name).default
    torch.library.opcheck(op, (rand(gen, 7, 1, 4, 6), rand(gen, 7, 10)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1024, 1, 28, 28), (4096, 3, 32, 32)])
def test_fast_low_precision(fast, gen, dtype, shape):
    op = fast_op(fast)
    x = rand(gen, *shape).tanh().to(dtype)
    z = rand(gen, shape[0], 100)
    res = {}
    for name, impl, xi in (("hp", ref.mode_seek, x.double()), ("ref_lp", ref.mode_seek, x), ("ours", op, x)):
        xi = xi.detach().clone().requires_grad_(True)
        value = impl(xi, z.double() if name == "hp" else z)
        value.backward()
        res[name] = (value, xi.grad)
    for i, what in enumerate(("value", "d/dimages")):
        assert_low_precision_close(res["ours"][i], res["ref_lp"][i], res["hp"][i], slack=2.0, atol=1e-5, what=what)
