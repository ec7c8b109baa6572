"""perturb, Triton-specific: the fused output is exactly clip(x + eps * s) for the noise s of the same
Philox stream (``perturb_noise``), the noise law, per-element reproducibility, the backward's recomputed
mask on the clip bounds, dtypes and torch.library registration (compilation for Hopper:
test_kernels_aot.py). Properties every backend shares live in test_perturb.py."""

import importlib
import math

import pytest
import torch

from tests.helpers import DEVICE, assert_close, rand
from tldr_fast.reference import PERTURBATIONS

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("triton_backend")  # skipped wherever the Triton backend cannot run

op_module = importlib.import_module("tldr_fast.kernels.perturb")


def noise(shape, kind, seed):
    return op_module.perturb_noise(torch.Size(shape), kind, seed, torch.device(DEVICE))


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_output_is_clip_of_the_philox_noise(triton_backend, gen, kind):
    x = rand(gen, 5, 3, 13, 17, scale=0.6)
    seed = int(torch.randint(0, 2**40, (), generator=gen))
    y = triton_backend.perturb(x, 0.3, -1.0, 1.0, kind, seed)
    # one rounding apart at most (the GPU may fuse x + eps * s into an FMA)
    assert_close(y, (x + 0.3 * noise(x.shape, kind, seed)).clamp(-1.0, 1.0), rtol=0, atol=1e-6, what="y")


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_noise_law(gen, kind):
    seed = int(torch.randint(0, 2**40, (), generator=gen))
    s = noise((1 << 17,), kind, seed).double()
    n = s.numel()
    if kind == "rademacher":
        assert torch.equal(s.abs(), torch.ones_like(s))
    if kind == "uniform":
        assert (s >= -1).all() and (s < 1).all()
    mean, var = {"rademacher": (0, 1), "uniform": (0, 1 / 3), "gaussian": (0, 1)}[kind]
    assert abs(s.mean().item() - mean) < 6 * math.sqrt(var / n)
    assert abs(s.var().item() - var) < 0.02 * var
    # neighbouring elements (lanes of one Philox draw) are uncorrelated
    lag1 = ((s[1:] - mean) * (s[:-1] - mean)).mean().item() / var
    assert abs(lag1) < 6 / math.sqrt(n)


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_noise_depends_only_on_seed_and_element(kind):
    """The first elements of a larger tensor get the same noise, and another seed gives another one."""
    small, large = noise((1000,), kind, 5), noise((3, 7, 300), kind, 5)
    assert torch.equal(small, large.flatten()[:1000])
    assert not torch.equal(small, noise((1000,), kind, 6))


def test_gradient_on_the_bounds_follows_torch_clamp(triton_backend, gen):
    """x + eps s lands exactly on lo or hi: torch.clamp passes the gradient there (inclusive bounds),
    and so must the recomputed mask."""
    x = torch.full((3, 2, 8, 8), 0.5, device=DEVICE, requires_grad=True)
    y = triton_backend.perturb(x, 0.5, 0.0, 1.0, "rademacher", 21)
    assert ((y == 0) | (y == 1)).all()
    up = rand(gen, *x.shape)
    (y * up).sum().backward()
    assert torch.equal(x.grad, up)


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_gradient_is_the_mask_of_the_same_noise(triton_backend, gen, kind):
    x = rand(gen, 6, 2, 10, 12, scale=0.8).requires_grad_(True)
    seed = 99
    y = triton_backend.perturb(x, 0.3, -1.0, 1.0, kind, seed)
    up = rand(gen, *x.shape)
    (y * up).sum().backward()
    v = x.detach() + 0.3 * noise(x.shape, kind, seed)
    assert_close(x.grad, torch.where((v >= -1) & (v <= 1), up, torch.zeros_like(up)), what="d/dimages")


def test_dtype_is_preserved(triton_backend, gen):
    x = rand(gen, 2, 3, 4, 5, dtype=torch.float64, scale=0.5)
    assert triton_backend.perturb(x, 0.1, -1.0, 1.0, "uniform", 1).dtype == torch.float64


def test_opcheck(gen):
    x = rand(gen, 2, 3, 5, 6).requires_grad_(True)
    for kind in range(len(PERTURBATIONS)):
        torch.library.opcheck(op_module._perturb_op, (x, 0.1, -1.0, 1.0, kind, 5))
        torch.library.opcheck(
            op_module._perturb_backward_op, (rand(gen, 2, 3, 5, 6), x.detach(), 0.1, -1.0, 1.0, kind, 5)
        )


def test_torch_compile_fullgraph(triton_backend, gen):
    x = rand(gen, 3, 3, 8, 8, scale=0.8)

    def block(xi):
        return (triton_backend.perturb(torch.tanh(xi), 0.2, -0.9, 0.9, "gaussian", 4) ** 2).sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = []
    for fn in (compiled, block):
        xi = x.clone().requires_grad_(True)
        fn(xi).backward()
        out.append(xi.grad)
    assert_close(out[0], out[1], what="d/dimages")
