"""colour_line, Triton-specific: the per-image sums over several pixel blocks, every output written (poisoned
buffers), the backward op alone against its formula, bitwise determinism, dtypes, torch.library registration
and compilation. Cross-backend checks live in test_colour_line.py."""

import importlib

import pytest
import torch

from tests.helpers import DEVICE, assert_close, assert_compiled_matches_eager, rand
from tests.test_colour_line import check_backend, lined
from tldr_fast import reference as ref

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("triton_backend")  # skipped wherever the Triton backend cannot run

op_module = importlib.import_module("tldr_fast.kernels.colour_line")


def expected_outputs(x):
    """(value, coef) of the fused op from the declaration, in fp64: the mean colour and the unit principal
    direction (sign chosen like ``got``'s) per image."""
    xd = x.double().flatten(2)  # [B, 3, N]
    m = xd.mean(2)
    d = xd - m[:, :, None]
    cov = d @ d.transpose(1, 2) / xd.shape[2]
    ev, vec = torch.linalg.eigh(cov)
    return ev[:, :2].sum(1).mean(), m, vec[:, :, 2]


def expected_grad(grad, x, coef):
    """d/dx = grad (2 / (B N)) ((x_p - m) - v (v . (x_p - m))) from any coef (fp64)."""
    b, n = x.shape[0], x.shape[2] * x.shape[3]
    xd = x.double().flatten(2)
    m, v = coef.double()[:, 0, :, None], coef.double()[:, 1, :, None]  # [B, 3, 1]
    d = xd - m
    t = (v * d).sum(1, keepdim=True)
    return (grad * 2 / (b * n) * (d - v * t)).view(x.shape)


@pytest.fixture
def small_blocks(monkeypatch):
    """16 pixels per block: several blocks per image at test sizes (the forward's loop, the backward's grid)."""
    monkeypatch.setattr(op_module, "_BLOCK", 16)


@pytest.mark.parametrize("shape", [(7, 3, 7, 9), (2, 3, 15, 17), (5, 3, 1, 33)], ids=lambda s: "x".join(map(str, s)))
def test_sums_over_many_pixel_blocks(triton_backend, gen, small_blocks, shape):
    b, _, h, w = shape
    assert op_module._block(h * w) == 16 < h * w
    check_backend(triton_backend.colour_line, lined(gen, b, h, w))


@pytest.mark.parametrize("with_small_blocks", [False, True])
def test_every_output_is_written(gen, request, with_small_blocks):
    """Outputs and scratch are NaN-poisoned (conftest): value and coef come back finite and right (v up to
    its sign), the gradient everywhere, with N not a multiple of the block."""
    if with_small_blocks:
        request.getfixturevalue("small_blocks")
    x = lined(gen, 6, 5, 7).requires_grad_(True)
    value, coef = op_module._colour_line_op(x)
    assert value.shape == () and coef.shape == (6, 2, 3)
    assert value.dtype == torch.float32 and coef.dtype == torch.float32
    want_value, want_m, want_v = expected_outputs(x.detach())
    assert_close(value, want_value, what="value")
    assert_close(coef[:, 0], want_m, what="mean colour")
    sign = torch.sign((coef[:, 1].double().cpu() * want_v.cpu()).sum(1, keepdim=True))
    assert_close(coef[:, 1].cpu() * sign, want_v.cpu(), rtol=1e-4, atol=1e-5, what="principal direction")
    (g,) = torch.autograd.grad(value * 0.7, x)
    assert_close(g, expected_grad(0.7, x.detach(), coef), rtol=2e-5, atol=1e-9, what="d/dx")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backward_op_alone(gen, dtype):
    """d/dx from any coef, in the images' dtype; a non-contiguous input comes back as a contiguous gradient of
    its shape."""
    x = rand(gen, 5, 3, 9, 6).to(dtype).permute(0, 1, 3, 2)  # [5, 3, 6, 9], not contiguous
    coef = rand(gen, 5, 2, 3)
    grad = torch.tensor(0.7, device=DEVICE)
    dx = op_module._colour_line_backward_op(grad, x, coef)
    assert dx.shape == x.shape and dx.dtype == dtype and dx.is_contiguous()
    want = expected_grad(0.7, x, coef)
    if dtype == torch.float32:
        assert_close(dx, want, rtol=2e-5, atol=1e-9, what="d/dx")
    else:  # one rounding to the low-precision output
        assert_close(dx, want.to(dtype), rtol=1e-2, atol=1e-4, what="d/dx")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes(gen, dtype):
    """bf16/fp16 read as they are, fp64 computed in fp32: an fp32 value, the gradient in the input's dtype,
    against the reference on the same values in fp32."""
    x = lined(gen, 7, 6, 5).to(dtype)
    xi = x.clone().requires_grad_(True)
    value = op_module.colour_line(xi)
    value.backward()
    assert value.dtype == torch.float32 and xi.grad.dtype == dtype
    xr = x.float().requires_grad_(True)
    want = ref.colour_line(xr)
    want.backward()
    assert_close(value, want, what="value")
    scale = float(xr.grad.abs().max())
    tol = dict(rtol=2e-5, atol=1e-5 * scale) if dtype == torch.float64 else dict(rtol=1e-2, atol=1e-2 * scale)
    assert_close(xi.grad, xr.grad.to(dtype), what="d/dx", **tol)


@pytest.mark.parametrize("with_small_blocks", [False, True])
def test_bitwise_deterministic(gen, request, with_small_blocks):
    if with_small_blocks:
        request.getfixturevalue("small_blocks")
    x = lined(gen, 9, 11, 13)
    runs = []
    for _ in range(2):
        xi = x.clone().requires_grad_(True)
        value, coef = op_module._colour_line_op(xi)
        value.backward()
        runs.append((value, coef, xi.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_opcheck_of_the_backward_op(gen):
    torch.library.opcheck(
        op_module._colour_line_backward_op, (torch.tensor(1.3), rand(gen, 4, 3, 3, 5), rand(gen, 4, 2, 3))
    )


def test_gradient_only_through_the_value(gen):
    """coef is an output without a gradient."""
    x = lined(gen, 4, 3, 5).requires_grad_(True)
    value, coef = op_module._colour_line_op(x)
    assert value.requires_grad and not coef.requires_grad


def test_torch_compile_fullgraph(triton_backend, gen):
    x = lined(gen, 6, 6, 6)

    def f(t):
        return triton_backend.colour_line(torch.tanh(t) * 1.2) * 2.0

    assert_compiled_matches_eager(f, x, backend="aot_eager")
