"""perturb, Triton-specific: the fused output is exactly clip(x + eps * s) for the noise s of the same
Philox stream (``perturb_noise``), the noise law, per-element reproducibility, the backward's recomputed
mask on the clip bounds, dtypes and torch.library registration (compilation for Hopper:
test_kernels_aot.py); with theta, the same noise at each source pixel, grid_sample's rounding of halves
and far-away transforms. Properties every backend shares live in test_perturb.py."""

import importlib
import math

import pytest
import torch

from tests.helpers import DEVICE, assert_close, rand
from tldr_fast import reference
from tldr_fast.ops.perturb import WARP_MODES
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
    theta = reference.warp_theta(2, (4, 5), 1, 20.0, 0.2, gen, "cpu", torch.float64).to(DEVICE)
    assert triton_backend.perturb(x, 0.1, -1.0, 1.0, "uniform", 1, theta).dtype == torch.float64


# --- with theta ---------------------------------------------------------------------------------------


def identity(b):
    return torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], device=DEVICE).repeat(b, 1, 1)  # [B, 2, 3]


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_warp_samples_the_noise_of_the_op_without_theta(triton_backend, gen, kind):
    """The identity moved by "nearest" reads every pixel at its own place: the output is exactly the warp
    of the op without theta (``(p - lo) + lo``, as grid_sample of ``p - lo``) and the gradient exactly its
    gradient, so each source pixel got the noise of its own element."""
    x = rand(gen, 3, 2, 11, 37, scale=0.8)
    seed = int(torch.randint(0, 2**40, (), generator=gen))
    up = rand(gen, *x.shape)
    out = []
    for theta in (identity(3), None):
        xi = x.clone().requires_grad_(True)
        y = triton_backend.perturb(xi, 0.3, -1.0, 1.0, kind, seed, theta, "nearest")
        out.append((y.detach(), *torch.autograd.grad((y * up).sum(), xi)))
    (y, grad), (y0, grad0) = out
    assert torch.equal(y, reference.warp(y0, identity(3), -1.0, "nearest")) and torch.equal(grad, grad0)


def test_nearest_rounds_halves_to_even(triton_backend, gen):
    """Moves by half a pixel put every source point on a tie: like grid_sample (nearbyint), -0.5 and 0.5
    go to pixel 0 and 1.5 to pixel 2 (outside: the fill). 2x2 images, whose grid F.affine_grid computes
    exactly; eps = 0."""
    x = rand(gen, 2, 3, 2, 2, scale=0.2).clamp(-0.9, 0.9)
    theta = identity(2)
    theta[:, 0, 2] = torch.tensor([0.5, -0.5])  # half a pixel in x: source points 0.5, 1.5 and -0.5, 0.5
    up = rand(gen, *x.shape)
    xi = x.clone().requires_grad_(True)
    y = triton_backend.perturb(xi, 0.0, -1.0, 1.0, "rademacher", 0, theta, "nearest")
    (grad,) = torch.autograd.grad((y * up).sum(), xi)
    first, fill = (x[..., 0] + 1.0) - 1.0, torch.full_like(x[..., 0], -1.0)  # what each output pixel reads
    assert torch.equal(y, torch.stack([torch.stack([first[0], fill[0]], -1), torch.stack([first[1], first[1]], -1)]))
    assert torch.equal(y, reference.warp(x, theta, -1.0, "nearest"))
    zero = torch.zeros_like(up[..., 0])
    assert torch.equal(
        grad, torch.stack([torch.stack([up[0, ..., 0], zero[0]], -1), torch.stack([up[1].sum(-1), zero[1]], -1)])
    )


@pytest.mark.parametrize("mode", WARP_MODES)
def test_transforms_far_outside_read_the_fill(triton_backend, gen, mode):
    """Source points far outside (up to 1e30 pixels, clamped before they become indices) read lo and
    pass no gradient."""
    x = rand(gen, 3, 2, 7, 9).requires_grad_(True)
    theta = identity(3)
    theta[:, 0, 2] = torch.tensor([2.5, -1e6, 1e30])
    theta[2, 1, 1] = -3e30
    y = triton_backend.perturb(x, 0.1, -0.5, 1.0, "gaussian", 3, theta, mode)
    assert torch.equal(y, torch.full_like(y, -0.5))
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_opcheck(gen):
    x = rand(gen, 2, 3, 5, 6).requires_grad_(True)
    theta = reference.warp_theta(2, (5, 6), 1, 20.0, 0.2, gen, "cpu").to(DEVICE)
    for kind in range(len(PERTURBATIONS)):
        torch.library.opcheck(op_module._perturb_op, (x, 0.1, -1.0, 1.0, kind, 5))
        for warp in (None, theta):
            for mode in range(len(WARP_MODES)):
                torch.library.opcheck(op_module._perturb_op, (x, 0.1, -1.0, 1.0, kind, 5, warp, mode))
                torch.library.opcheck(
                    op_module._perturb_backward_op,
                    (rand(gen, 2, 3, 5, 6), x.detach(), 0.1, -1.0, 1.0, kind, 5, warp, mode),
                )


@pytest.mark.parametrize("warp", [False, True])
def test_torch_compile_fullgraph(triton_backend, gen, warp):
    x = rand(gen, 3, 3, 8, 8, scale=0.8)
    theta = reference.warp_theta(3, (8, 8), 1, 20.0, 0.2, gen, "cpu").to(DEVICE) if warp else None

    def block(xi):
        return (triton_backend.perturb(torch.tanh(xi), 0.2, -0.9, 0.9, "gaussian", 4, theta) ** 2).sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = []
    for fn in (compiled, block):
        xi = x.clone().requires_grad_(True)
        fn(xi).backward()
        out.append(xi.grad)
    assert_close(out[0], out[1], what="d/dimages")
