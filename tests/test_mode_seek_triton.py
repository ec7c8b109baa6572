"""mode_seek, Triton-specific: the partial sums over several programs per pair, a finish over several pair
and split steps, every output written (poisoned buffers), the backward op alone against its formula (odd
B included), bitwise determinism, dtypes, torch.library registration and compilation for Hopper.
Cross-backend checks live in test_mode_seek.py."""

import importlib

import pytest
import torch

from tests.helpers import DEVICE, assert_close, assert_compiled_matches_eager, rand
from tests.test_mode_seek import check_backend
from tldr_fast import reference as ref

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("triton_backend")  # skipped wherever the Triton backend cannot run

op_module = importlib.import_module("tldr_fast.kernels.mode_seek")


def expected_outputs(x, z):
    """(value, coef) of the fused op, computed in fp64 from the declaration's formulas."""
    h = x.shape[0] // 2
    xd, zd = x.double().flatten(1), z.double().flatten(1)
    p = xd.shape[1]
    dx = (xd[:h] - xd[h : 2 * h]).abs().mean(1)
    dz = (zd[:h] - zd[h : 2 * h]).abs().mean(1).clamp_min(1e-12)
    s = (dx / dz).mean()
    return 1.0 / (s + 1e-5), -1.0 / (h * p * dz * (s + 1e-5) ** 2)


def expected_grad(grad, x, coef):
    """d/dx from the declaration: coef_i sign(x_i - x_{i+h}) on row i, its negative on row i + h, 0 on an
    unpaired last row (fp64)."""
    h = x.shape[0] // 2
    xd = x.double()
    view = (-1,) + (1,) * (x.dim() - 1)
    d = grad * coef.double().view(view) * torch.sign(xd[:h] - xd[h : 2 * h])
    out = torch.zeros_like(xd)
    out[:h], out[h : 2 * h] = d, -d
    return out


def fused(x, z):
    return op_module._mode_seek_op(x, z)


@pytest.fixture
def small_steps(monkeypatch):
    """Small tiles, many programs, a finish of 2 pairs and 2 splits per step: every split path taken at
    test sizes."""
    monkeypatch.setattr(op_module, "_TILE", 16)  # one pair per tile
    monkeypatch.setattr(op_module, "_BP_MAX", 16)
    monkeypatch.setattr(op_module, "_PROGRAMS_PER_SM", 6)
    monkeypatch.setattr(op_module, "_FINISH_PAIRS", 2)
    monkeypatch.setattr(op_module, "_FINISH_SPLITS", 2)


@pytest.mark.parametrize(
    "shape", [(7, 3, 7, 9), (9, 70), (2, 1, 15, 17), (6, 2, 5, 40)], ids=lambda s: "x".join(map(str, s))
)
def test_partial_sums_over_many_programs_and_a_multi_step_finish(triton_backend, gen, small_steps, shape):
    b, p = shape[0], torch.Size(shape[1:]).numel()
    h = b // 2
    br, bp, row_blocks, splits = op_module._plan(h, p, torch.device(DEVICE))
    # several programs per pair block, each over several column blocks; more splits than one finish step
    assert splits > 1 and op_module.cdiv(p, bp) > splits
    assert splits > op_module._FINISH_SPLITS
    if h > 1:
        assert row_blocks > 1 and h > op_module._FINISH_PAIRS
    check_backend(triton_backend.mode_seek, rand(gen, *shape).tanh(), rand(gen, b, 37))


@pytest.mark.parametrize("with_small_steps", [False, True])
@pytest.mark.parametrize("b", [8, 7])
def test_every_output_is_written(gen, request, with_small_steps, b):
    """Outputs and scratch are NaN-poisoned (conftest): value and coef come back finite and right, the
    gradient everywhere (the unpaired row of an odd batch included), with P not a multiple of the tile."""
    if with_small_steps:
        request.getfixturevalue("small_steps")
    x = rand(gen, b, 3, 5, 7).tanh().requires_grad_(True)
    z = rand(gen, b, 10)
    value, coef = fused(x, z)
    assert value.shape == () and coef.shape == (b // 2,)
    assert value.dtype == torch.float32 and coef.dtype == torch.float32
    want_value, want_coef = expected_outputs(x.detach(), z)
    assert_close(value, want_value, what="value")
    assert_close(coef, want_coef, what="coef")
    (g,) = torch.autograd.grad(value * 0.7, x)
    assert_close(g, expected_grad(0.7, x.detach(), want_coef), rtol=2e-5, atol=1e-9, what="d/dx")
    if b % 2:
        assert torch.equal(g[-1], torch.zeros_like(g[-1]))


@pytest.mark.parametrize("b", [6, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backward_op_alone(gen, dtype, b):
    """d/dx from any coef, in the images' dtype; a non-contiguous input comes back as a contiguous
    gradient of its shape; an odd batch's last row 0; identical pairs (sign 0) give 0."""
    x = rand(gen, b, 4, 9, 5).to(dtype).permute(0, 1, 3, 2)  # [b, 4, 5, 9], not contiguous
    x[1] = x[1 + b // 2]  # an identical pair
    coef = rand(gen, b // 2, scale=0.1)
    grad = torch.tensor(0.7, device=DEVICE)
    dx = op_module._mode_seek_backward_op(grad, x, coef)
    assert dx.shape == x.shape and dx.dtype == dtype and dx.is_contiguous()
    want = expected_grad(0.7, x, coef)
    if dtype == torch.float32:
        assert_close(dx, want, what="d/dx")
    else:  # one rounding to the low-precision output
        assert_close(dx, want.to(dtype), rtol=1e-2, atol=1e-3, what="d/dx")
    assert torch.equal(dx[1], torch.zeros_like(dx[1])) and torch.equal(dx[1 + b // 2], torch.zeros_like(dx[1]))
    if b % 2:
        assert torch.equal(dx[-1], torch.zeros_like(dx[-1]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes(gen, dtype):
    """bf16/fp16 read as they are, fp64 computed in fp32: an fp32 value, the gradient in the input's dtype,
    against the reference on the same values in fp32."""
    x = rand(gen, 7, 3, 6, 5).tanh().to(dtype)
    z = rand(gen, 7, 12).to(dtype)
    xi = x.clone().requires_grad_(True)
    value = op_module.mode_seek(xi, z)
    value.backward()
    assert value.dtype == torch.float32 and xi.grad.dtype == dtype
    xr = x.float().requires_grad_(True)
    want = ref.mode_seek(xr, z.float())
    want.backward()
    assert_close(value, want, what="value")
    tol = dict(rtol=2e-5, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-2, atol=1e-5)
    assert_close(xi.grad, xr.grad.to(dtype), what="d/dx", **tol)


@pytest.mark.parametrize("with_small_steps", [False, True])
def test_bitwise_deterministic(gen, request, with_small_steps):
    if with_small_steps:
        request.getfixturevalue("small_steps")
    x = rand(gen, 9, 3, 11, 13).tanh()
    z = rand(gen, 9, 20)
    runs = []
    for _ in range(2):
        xi = x.clone().requires_grad_(True)
        value, coef = fused(xi, z)
        value.backward()
        runs.append((value, coef, xi.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_opcheck_of_the_backward_op(gen):
    x = rand(gen, 5, 2, 3, 4)
    torch.library.opcheck(op_module._mode_seek_backward_op, (torch.tensor(1.3), x, rand(gen, 2)))


def test_gradient_only_through_the_value(gen):
    """coef is an output without a gradient; a loss that does not use the value gets None."""
    x = rand(gen, 4, 3, 5).requires_grad_(True)
    value, coef = op_module._mode_seek_op(x, rand(gen, 4, 6))
    assert value.requires_grad and not coef.requires_grad
    (g,) = torch.autograd.grad(value * 0.0 + x.sum(), x)
    assert torch.equal(g, torch.ones_like(x))


def test_torch_compile_fullgraph(triton_backend, gen):
    x = rand(gen, 6, 3, 6, 6)
    z = rand(gen, 6, 8)

    def f(t):
        return triton_backend.mode_seek(torch.tanh(t) * 1.2, z) * 2.0

    assert_compiled_matches_eager(f, x, backend="aot_eager")
