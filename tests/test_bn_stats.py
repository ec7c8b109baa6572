"""bn_stats: the reference against its definition, and every fast backend against the reference (value
and gradient), at odd shapes, with the layouts and edge cases the step meets."""

import pytest
import torch

from tests.helpers import assert_close, assert_compiled_matches_eager, assert_low_precision_close, rand
from tldr_fast import reference as ref
from tldr_fast.ops.bn_stats import SPEC


def naive_bn_stats(x, rm, rv):
    """||mu - rm|| + ||var - rv|| with the statistics of each channel computed element by element (fp64)."""
    c = x.shape[1]
    xs = x.transpose(0, 1).reshape(c, -1)
    mu = torch.stack([sum(xs[ch]) / xs.shape[1] for ch in range(c)])
    var = torch.stack([sum((xs[ch] - mu[ch]) ** 2) / xs.shape[1] for ch in range(c)])
    return (mu - rm).norm() + (var - rv).norm()


def test_reference_matches_the_definition_and_the_declared_gradient(gen):
    x = rand(gen, 3, 4, 5, 2, dtype=torch.float64, device="cpu").requires_grad_(True)
    rm = rand(gen, 4, dtype=torch.float64, device="cpu")
    rv = rand(gen, 4, dtype=torch.float64, device="cpu").abs() + 0.5
    value = ref.bn_stats(x, rm, rv)
    torch.testing.assert_close(value, naive_bn_stats(x.detach(), rm, rv))
    (g,) = torch.autograd.grad(value, x)
    # the fused form's gradient (tldr_fast/ops/bn_stats.py): a_c + b_c (x - mu_c)
    v = x.detach()
    var, mu = torch.var_mean(v, dim=(0, 2, 3), unbiased=False)
    m = v.numel() // v.shape[1]
    a = (mu - rm) / (m * (mu - rm).norm())
    b = 2 * (var - rv) / (m * (var - rv).norm())
    torch.testing.assert_close(g, a.view(1, -1, 1, 1) + b.view(1, -1, 1, 1) * (v - mu.view(1, -1, 1, 1)))
    assert torch.autograd.gradcheck(lambda t: ref.bn_stats(t, rm, rv), (x,))


def fast_op(fast):
    op = getattr(fast, "bn_stats", None)
    if op is None:
        pytest.skip(f"backend {fast.name!r} has no bn_stats kernel")
    return op


def check_backend(op, x, rm, rv, **tol):
    upstream = 0.7
    out = []
    for impl in (ref.bn_stats, op):
        xi = x.detach().clone().requires_grad_(True)
        value = impl(xi, rm, rv)
        (value * upstream).backward()
        out.append((value, xi.grad))
    (v0, g0), (v1, g1) = out
    assert v1.shape == () and v1.dtype == v0.dtype
    assert_close(v1, v0, what="value", **tol)
    assert_close(g1, g0, what="d/dactivations", **tol)


def running_stats(gen, c):
    """Plausible running statistics [C]: mean around 0, variance around 1."""
    return rand(gen, c, scale=0.3), rand(gen, c, scale=0.3).abs() + 0.7


# [N, C, ...]: conv activations of odd sizes, the BatchNorm1d shapes [N, C] and [N, C, L], one sample
SHAPES = [(8, 16, 14, 14), (5, 3, 13, 17), (7, 32, 7, 7), (1, 6, 9, 5), (33, 20), (4, 12, 31), (2, 1, 28, 28)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fast_matches_reference(fast, gen, shape):
    op = fast_op(fast)
    rm, rv = running_stats(gen, shape[1])
    check_backend(op, rand(gen, *shape, scale=1.5) + 0.3, rm, rv)


def test_fast_channels_last_and_a_slice_of_rows(fast, gen):
    """The step matches the clean rows only: a slice of the batch; classifiers may run channels_last."""
    op = fast_op(fast)
    rm, rv = running_stats(gen, 6)
    x = rand(gen, 10, 6, 9, 11).to(memory_format=torch.channels_last)
    check_backend(op, x[:7], rm, rv)


def test_fast_when_a_statistic_matches_exactly(fast, gen):
    """||mu - running_mean|| = 0 (a running mean equal to the batch mean): that norm contributes no
    gradient, as autograd's norm gives, and nothing is NaN."""
    op = fast_op(fast)
    x = rand(gen, 6, 4, 5, 5)
    var, mu = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    check_backend(op, x, mu.float(), var.float() + 0.5)


def test_fast_gradient_reaches_only_what_needs_it(fast, gen):
    op = fast_op(fast)
    rm, rv = running_stats(gen, 3)
    x = rand(gen, 4, 3, 6, 6)
    with torch.no_grad():
        assert_close(op(x, rm, rv), ref.bn_stats(x, rm, rv), what="value under no_grad")
    xi = x.clone().requires_grad_(True)
    assert op(xi, rm, rv).requires_grad and not rm.requires_grad


def test_fast_fp64_gradcheck(fast, gen):
    """fp64 computes in fp64 where the backend keeps it (the extension); Triton computes it in fp32."""
    op = fast_op(fast)
    if fast.name == "triton":
        pytest.skip("the Triton kernels compute fp64 inputs in fp32 (DESIGN.md §3.1)")
    x = rand(gen, 3, 2, 4, 3, dtype=torch.float64).requires_grad_(True)
    rm = rand(gen, 2, dtype=torch.float64)
    rv = rand(gen, 2, dtype=torch.float64).abs() + 0.5
    assert torch.autograd.gradcheck(lambda t: op(t, rm, rv), (x,))


def test_fused_op_schema_and_fake_rule(fast, gen):
    """opcheck of the backend's registered op (schema, fake rule, autograd registration)."""
    fast_op(fast)
    ns = {"triton": "tldr_triton", "extension": "tldr_fast"}[fast.name]
    op = getattr(getattr(torch.ops, ns), SPEC.name).default
    rm, rv = running_stats(gen, 5)
    torch.library.opcheck(op, (rand(gen, 3, 5, 4, 6), rm, rv))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1024, 32, 14, 14), (4096, 64, 7, 7), (256, 128)])
def test_fast_low_precision(fast, gen, dtype, shape):
    op = fast_op(fast)
    rm, rv = running_stats(gen, shape[1])
    x = rand(gen, *shape).to(dtype)
    res = {}
    for name, impl, xi in (("hp", ref.bn_stats, x.double()), ("ref_lp", ref.bn_stats, x), ("ours", op, x)):
        xi = xi.detach().clone().requires_grad_(True)
        value = impl(xi, rm, rv)
        value.backward()
        res[name] = (value, xi.grad)
    for i, what in enumerate(("value", "d/dactivations")):
        assert_low_precision_close(res["ours"][i], res["ref_lp"][i], res["hp"][i], slack=2.0, atol=1e-5, what=what)


@pytest.mark.gpu
def test_fast_under_torch_compile_fullgraph(fast, gen):
    op = fast_op(fast)
    rm, rv = running_stats(gen, 16)
    x = rand(gen, 64, 16, 14, 14)

    def f(t):
        return op(torch.relu(t), rm, rv) * 2.0

    assert_compiled_matches_eager(f, x)
