"""colour_line: the reference against its definition and the declared gradient, and every fast backend against
the reference (value and gradient w.r.t. the images), at odd shapes and the edge cases the step meets (images in
one ink on one background, flat images, one pixel)."""

import pytest
import torch

from tests.helpers import DEVICE, assert_close, assert_low_precision_close
from tldr_fast import reference as ref
from tldr_fast.ops.colour_line import SPEC


def lined(gen, b, h, w, off=0.3, noise=0.05, dtype=torch.float32, device=DEVICE):
    """[b, 3, h, w] images near one colour line each: a random ink-background line, a weaker second
    direction (``off``) and pixel noise, so that every image's colour covariance has well-separated
    eigenvalues (the principal direction, and with it the gradient, is then well-conditioned)."""
    base = torch.rand(b, 3, 1, 1, generator=gen, dtype=torch.float64) * 2 - 1
    ink = torch.randn(b, 3, 1, 1, generator=gen, dtype=torch.float64)
    ink = ink / ink.norm(dim=1, keepdim=True) * 1.5
    other = torch.randn(b, 3, 1, 1, generator=gen, dtype=torch.float64) * off
    g = torch.rand(b, 1, h, w, generator=gen, dtype=torch.float64)
    s = torch.rand(b, 1, h, w, generator=gen, dtype=torch.float64)
    x = base + ink * g + other * s + noise * torch.randn(b, 3, h, w, generator=gen, dtype=torch.float64)
    return x.to(device=device, dtype=dtype)


def naive_colour_line(x):
    """The definition image by image, in fp64: the pixels' colour covariance and the sum of its eigenvalues
    other than the largest (numpy-free: torch.linalg on each [3, 3] matrix)."""
    values = []
    for img in x.double():
        p = img.reshape(3, -1).T  # [N, 3]
        d = p - p.mean(0)
        cov = d.T @ d / p.shape[0]
        ev = torch.linalg.eigvalsh(cov)
        values.append(ev.sum() - ev.max())
    return torch.stack(values).mean()


def test_reference_matches_the_definition_and_the_declared_gradient(gen):
    x = lined(gen, 5, 4, 7, dtype=torch.float64, device="cpu").requires_grad_(True)
    value = ref.colour_line(x)
    torch.testing.assert_close(value, naive_colour_line(x.detach()))
    (g,) = torch.autograd.grad(value, x)
    b, n = x.shape[0], 4 * 7
    expected = torch.empty_like(g)
    for i, img in enumerate(x.detach()):  # (2 / (B N)) (I - v v^T)(x_p - m): tldr_fast/ops/colour_line.py
        d = img.reshape(3, -1) - img.reshape(3, -1).mean(1, keepdim=True)
        v = torch.linalg.eigh(d @ d.T / n).eigenvectors[:, -1:]  # [3, 1]
        expected[i] = ((2 / (b * n)) * (d - v @ (v.T @ d))).reshape(3, 4, 7)
    torch.testing.assert_close(g, expected)
    assert torch.autograd.gradcheck(ref.colour_line, (x,))


def test_reference_is_zero_on_one_ink_one_background_and_grows_off_the_line(gen):
    """An image drawn in one ink on one background (the colour data sets' construction) scores 0 whatever its
    colours; colours that leave the line score more the farther they leave it; grey images score 0."""
    g = torch.rand(6, 1, 9, 8, generator=gen, dtype=torch.float64)
    ink, back = (
        torch.rand(6, 3, 1, 1, generator=gen, dtype=torch.float64),
        torch.rand(6, 3, 1, 1, generator=gen, dtype=torch.float64),
    )
    drawn = back + (ink - back) * g
    assert abs(float(ref.colour_line(drawn))) < 1e-12
    assert abs(float(ref.colour_line(g.expand(6, 3, 9, 8)))) < 1e-12
    off = torch.randn(6, 3, 9, 8, generator=gen, dtype=torch.float64)
    values = [float(ref.colour_line(drawn + s * off)) for s in (0.01, 0.1, 0.5)]
    assert 0 < values[0] < values[1] < values[2]


def test_check_refuses_what_is_not_rgb():
    for bad in (torch.zeros(2, 1, 4, 4), torch.zeros(2, 3, 4), torch.zeros(0, 3, 4, 4)):
        with pytest.raises(ValueError, match=r"colour_line: images must be a non-empty \[B, 3, H, W\]"):
            ref.colour_line(bad)
    with pytest.raises(ValueError, match="floating-point"):
        ref.colour_line(torch.zeros(2, 3, 4, 4, dtype=torch.int64))


def fast_op(fast):
    op = getattr(fast, "colour_line", None)
    if op is None:
        pytest.skip(f"backend {fast.name!r} has no colour_line kernel")
    return op


def check_backend(op, x, rtol=2e-5, atol=1e-6):
    """Value and gradient (upstream 0.7) of ``op`` against the reference on the same fp32 inputs; the
    gradient's absolute tolerance is relative to its largest element (its scale is 2 / (B N))."""
    out = []
    for impl in (ref.colour_line, op):
        xi = x.detach().clone().requires_grad_(True)
        value = impl(xi)
        (value * 0.7).backward()
        out.append((value, xi.grad))
    (v0, g0), (v1, g1) = out
    assert v1.shape == () and v1.dtype == v0.dtype
    assert_close(v1, v0, rtol=rtol, atol=atol, what="value")
    assert_close(g1, g0, rtol=rtol, atol=1e-5 * float(g0.abs().max()) + 1e-30, what="d/dimages")


# [B, 3, H, W]: the generator's colour images, odd sizes, one row of pixels, more pixels than a block
SHAPES = [(64, 3, 28, 28), (9, 3, 13, 17), (1, 3, 32, 32), (5, 3, 1, 7), (3, 3, 45, 40)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fast_matches_reference(fast, gen, shape):
    op = fast_op(fast)
    b, _, h, w = shape
    check_backend(op, lined(gen, b, h, w))


def test_fast_on_lines_flat_images_one_pixel_and_a_slice(fast, gen):
    """Images exactly on a line (value 0, gradient 0 up to rounding), flat images and one-pixel images
    (no covariance: 0 and 0), in one batch that is a non-contiguous slice of a larger one."""
    op = fast_op(fast)
    x = lined(gen, 8, 6, 5).to(memory_format=torch.channels_last)
    g = torch.rand(6, 5, generator=gen).to(x.device)
    x[1] = torch.tensor([0.2, -0.4, 0.9], device=x.device)[:, None, None] * g + 0.1
    x[2] = 0.3
    xs = x[:7]
    check_backend(op, xs)
    value = op(xs[1:3].contiguous())
    assert abs(float(value)) < 1e-6
    one = lined(gen, 4, 1, 1)
    xi = one.clone().requires_grad_(True)
    v = op(xi)
    v.backward()
    assert float(v) == 0.0 and torch.equal(xi.grad, torch.zeros_like(xi))


def test_fast_gradient_under_no_grad_and_only_through_the_value(fast, gen):
    op = fast_op(fast)
    x = lined(gen, 4, 5, 5)
    with torch.no_grad():
        assert_close(op(x), ref.colour_line(x), what="value under no_grad")
    xi = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(op(xi) * 0.0 + xi.sum(), xi)
    assert torch.equal(g, torch.ones_like(x))


def test_fast_fp64_gradcheck(fast, gen):
    op = fast_op(fast)
    if fast.name == "triton":
        pytest.skip("the Triton kernels compute fp64 inputs in fp32 (DESIGN.md §3.1)")
    x = lined(gen, 3, 3, 4, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(op, (x,))


def test_fused_op_schema_and_fake_rule(fast, gen):
    fast_op(fast)
    ns = {"triton": "tldr_triton", "extension": "tldr_fast"}[fast.name]
    op = getattr(getattr(torch.ops, ns), SPEC.name).default
    torch.library.opcheck(op, (lined(gen, 7, 4, 6),))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1024, 3, 28, 28), (64, 3, 224, 224)])
def test_fast_low_precision(fast, gen, dtype, shape):
    op = fast_op(fast)
    x = lined(gen, shape[0], shape[2], shape[3]).to(dtype)
    res = {}
    for name, impl, xi in (("hp", ref.colour_line, x.double()), ("ref_lp", ref.colour_line, x), ("ours", op, x)):
        xi = xi.detach().clone().requires_grad_(True)
        value = impl(xi)
        value.backward()
        res[name] = (value, xi.grad)
    for i, what in enumerate(("value", "d/dimages")):
        assert_low_precision_close(res["ours"][i], res["ref_lp"][i], res["hp"][i], slack=2.0, atol=1e-5, what=what)
