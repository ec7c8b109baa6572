"""bn_stats, Triton-specific: the partial sums over several programs per channel and several channel
blocks, a finish over several row and channel steps, every output written (poisoned buffers), the
backward op alone against its formula, the exact zero of a matching statistic, bitwise determinism,
dtypes, torch.library registration and compilation for Hopper. Cross-backend checks live in
test_bn_stats.py."""

import importlib

import pytest
import torch

from tests.helpers import DEVICE, assert_close, assert_compiled_matches_eager, rand
from tests.test_bn_stats import check_backend, running_stats
from tldr_fast import reference as ref

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("triton_backend")  # skipped wherever the Triton backend cannot run

op_module = importlib.import_module("tldr_fast.kernels.bn_stats")


def expected_outputs(x, rm, rv):
    """(value, mean, coef) of the fused op, computed in fp64 from the declaration's formulas."""
    xd = x.double()
    dims = [0] + list(range(2, x.dim()))
    var, mu = torch.var_mean(xd, dim=dims, unbiased=False)
    m = x.numel() // x.shape[1]
    dm, dv = mu - rm.double(), var - rv.double()
    coef = torch.stack([dm / (m * dm.norm()), 2 * dv / (m * dv.norm())])
    return dm.norm() + dv.norm(), mu, coef


def fused(x, rm, rv):
    return op_module._bn_stats_op(x, rm.float().contiguous(), rv.float().contiguous())


@pytest.fixture
def small_steps(monkeypatch):
    """Small tiles, many programs, a finish of 2 rows and 4 channels per step: every split path taken at
    test sizes."""
    monkeypatch.setattr(op_module, "_TILE", 64)
    monkeypatch.setattr(op_module, "_BS_MAX", 16)
    monkeypatch.setattr(op_module, "_CB_MAX", 4)
    monkeypatch.setattr(op_module, "_PROGRAMS_PER_SM", 12)
    monkeypatch.setattr(op_module, "_FINISH_ROWS", 2)
    monkeypatch.setattr(op_module, "_FINISH_CHANNELS", 4)


@pytest.mark.parametrize(
    "shape", [(5, 11, 9, 13), (150, 10), (7, 6, 50), (1, 5, 7, 40)], ids=lambda s: "x".join(map(str, s))
)
def test_partial_sums_over_many_programs_and_a_multi_step_finish(triton_backend, gen, small_steps, shape):
    n, c = shape[:2]
    s = torch.Size(shape[2:]).numel()
    _, _, _, c_blocks, n_tiles, programs = op_module._plan(n, c, s, torch.device(DEVICE))
    # several programs per channel block, each over several tiles; more rows and channels than one finish step
    assert c_blocks > 1 and programs > 1 and n_tiles > programs
    assert programs > op_module._FINISH_ROWS and c > op_module._FINISH_CHANNELS
    rm, rv = running_stats(gen, c)
    check_backend(triton_backend.bn_stats, rand(gen, *shape, scale=1.5) + 0.3, rm, rv)


@pytest.mark.parametrize("with_small_steps", [False, True])
def test_every_output_is_written(gen, request, with_small_steps):
    """Outputs and scratch are NaN-poisoned (conftest): value, mean and coef come back finite and right,
    with C not a multiple of the channel block."""
    if with_small_steps:
        request.getfixturevalue("small_steps")
    x = rand(gen, 4, 7, 5, 3, scale=1.5) + 0.3
    rm, rv = running_stats(gen, 7)
    value, mean, coef = fused(x, rm, rv)
    assert value.shape == () and mean.shape == (7,) and coef.shape == (2, 7)
    assert all(t.dtype == torch.float32 for t in (value, mean, coef))
    want = expected_outputs(x, rm, rv)
    for got, exp, what in zip((value, mean, coef), want, ("value", "mean", "coef")):
        assert_close(got, exp, what=what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backward_op_alone(gen, dtype):
    """d/dx = grad (a_c + b_c (x - mean_c)), in the activations' dtype, from any mean and coef; a
    non-contiguous input comes back as a contiguous gradient of its shape."""
    x = (rand(gen, 5, 6, 4, 9) * 1.5).to(dtype).permute(0, 1, 3, 2)  # [5, 6, 9, 4], not contiguous
    mean = rand(gen, 6)
    coef = rand(gen, 2, 6, scale=0.1)
    grad = torch.tensor(0.7, device=DEVICE)
    dx = op_module._bn_stats_backward_op(grad, x, mean, coef)
    assert dx.shape == x.shape and dx.dtype == dtype
    view = (1, -1, 1, 1)
    want = 0.7 * (coef[0].double().view(view) + coef[1].double().view(view) * (x.double() - mean.double().view(view)))
    if dtype == torch.float32:
        assert_close(dx, want, what="d/dx")
    else:  # one rounding to the low-precision output
        assert_close(dx, want.to(dtype), rtol=1e-2, atol=1e-3, what="d/dx")


def test_a_matching_running_mean_and_a_flat_channel_give_exact_zeros(gen):
    """The fp32 mean is the correctly rounded one (fp64 sums), so a running mean equal to it gives dm = 0
    exactly and a = 0; a flat channel has variance exactly 0 (the shift is one of its values), so a zero
    running variance gives b_c = 0 there; a flat channel alone gives value 0 and a zero gradient."""
    x = rand(gen, 9, 3, 6, 7, scale=1.5) + 0.3
    x[:, 1] = 0.37  # flat channel
    var, mu = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    rm = mu.float()
    rv = var.float() + 0.5
    rv[1] = 0.0
    value, mean, coef = fused(x, rm, rv)
    assert torch.equal(mean, rm)
    assert torch.equal(coef[0], torch.zeros_like(coef[0]))
    assert coef[1, 1] == 0 and (coef[1, [0, 2]] != 0).all()
    assert_close(value, (var - rv.double()).norm(), what="value")

    flat = x[:, 1:2].clone().requires_grad_(True)
    zero = torch.zeros(1, device=DEVICE)
    ours = op_module.bn_stats(flat, rm[1:2], zero)
    ours.backward()
    assert ours.item() == 0.0 == ref.bn_stats(flat.detach(), rm[1:2], zero).item()
    assert torch.equal(flat.grad, torch.zeros_like(flat))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes(gen, dtype):
    """bf16/fp16 read as they are, fp64 computed in fp32: an fp32 value, the gradient in the input's dtype,
    against the reference on the same values in fp32."""
    x = (rand(gen, 6, 5, 7, 3, scale=1.5) + 0.3).to(dtype)
    rm, rv = running_stats(gen, 5)
    xi = x.clone().requires_grad_(True)
    value = op_module.bn_stats(xi, rm, rv)
    value.backward()
    assert value.dtype == torch.float32 and xi.grad.dtype == dtype
    xr = x.float().requires_grad_(True)
    want = ref.bn_stats(xr, rm, rv)
    want.backward()
    assert_close(value, want, what="value")
    tol = {} if dtype == torch.float64 else dict(rtol=1e-2, atol=1e-5)
    assert_close(xi.grad, xr.grad.to(dtype), what="d/dx", **tol)


@pytest.mark.parametrize("with_small_steps", [False, True])
def test_bitwise_deterministic(gen, request, with_small_steps):
    if with_small_steps:
        request.getfixturevalue("small_steps")
    x = rand(gen, 6, 9, 11, 13, scale=1.5) + 0.3
    rm, rv = running_stats(gen, 9)
    runs = []
    for _ in range(2):
        xi = x.clone().requires_grad_(True)
        value, mean, coef = fused(xi, rm, rv)
        value.backward()
        runs.append((value, mean, coef, xi.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_opcheck_of_the_backward_op(gen):
    x = rand(gen, 3, 4, 5, 2)
    torch.library.opcheck(op_module._bn_stats_backward_op, (torch.tensor(1.3), x, rand(gen, 4), rand(gen, 2, 4)))


def test_gradient_only_through_the_value(gen):
    """mean and coef are outputs without a gradient; a loss that does not use the value gets None."""
    x = rand(gen, 3, 4, 5).requires_grad_(True)
    rm, rv = running_stats(gen, 4)
    value, mean, coef = op_module._bn_stats_op(x, rm, rv)
    assert value.requires_grad and not mean.requires_grad and not coef.requires_grad
    (g,) = torch.autograd.grad(value * 0.0 + x.sum(), x)
    assert torch.equal(g, torch.ones_like(x))


def test_torch_compile_fullgraph(triton_backend, gen):
    x = rand(gen, 4, 3, 6, 6)
    rm, rv = running_stats(gen, 3)

    def f(t):
        return triton_backend.bn_stats(torch.tanh(t) * 1.2, rm, rv) * 2.0

    assert_compiled_matches_eager(f, x, backend="aot_eager")
