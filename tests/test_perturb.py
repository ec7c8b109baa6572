"""perturb: clip(x + eps * s, lo, hi) - noise law, clipping, gradient mask and reproducibility; with theta,
the warp of the perturbed images (values and gradients).

Backends draw noise from their own generators (torch's, Triton's Philox), so the checks read the noise
back from the output and test the properties every backend must have.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import DEVICE, assert_close, assert_low_precision_close, backend_or_skip, rand
from tldr_fast import reference
from tldr_fast.ops.perturb import WARP_MODES
from tldr_fast.reference import PERTURBATIONS


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    return backend_or_skip(request.param)


SHAPES = [(3, 1, 8, 8), (5, 3, 13, 17), (64, 1, 28, 28)]


@pytest.mark.parametrize("kind", PERTURBATIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_noise_law_and_clipping(backend, gen, kind, shape):
    x = rand(gen, *shape, scale=0.4).clamp(-1, 1)
    eps = 0.2
    y = backend.perturb(x, eps, -1.0, 1.0, kind, seed=1234)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    assert (y >= -1).all() and (y <= 1).all()
    inside = (y > -1) & (y < 1)
    s = (y - x)[inside] / eps
    if kind == "rademacher":
        torch.testing.assert_close(s.abs(), torch.ones_like(s), rtol=0, atol=1e-5)
    elif kind == "uniform":
        assert (s.abs() <= 1 + 1e-5).all()
    if kind != "gaussian":  # where it clipped, the unclipped value lay beyond the bound
        assert ((x[y == 1] + eps) >= 1 - 1e-6).all() and ((x[y == -1] - eps) <= -1 + 1e-6).all()
    n = s.numel()
    if n >= 20000:  # moments of the noise, 6 standard errors
        mean, var = {"rademacher": (0, 1), "uniform": (0, 1 / 3), "gaussian": (0, 1)}[kind]
        assert abs(s.mean().item() - mean) < 6 * math.sqrt(var / n)
        assert abs(s.var().item() - var) < 0.05 * var


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_seed_reproducible_and_distinct(backend, gen, kind):
    x = rand(gen, 4, 3, 9, 11, scale=0.3)
    a = backend.perturb(x, 0.1, -1.0, 1.0, kind, seed=7)
    b = backend.perturb(x, 0.1, -1.0, 1.0, kind, seed=7)
    c = backend.perturb(x, 0.1, -1.0, 1.0, kind, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_gradient_is_the_clip_mask(backend, gen, kind):
    x = rand(gen, 6, 2, 10, 12, scale=0.8).requires_grad_(True)
    y = backend.perturb(x, 0.3, -1.0, 1.0, kind, seed=99)
    up = rand(gen, *x.shape)
    (y * up).sum().backward()
    inside = ((y > -1) & (y < 1)).detach()
    torch.testing.assert_close(x.grad, torch.where(inside, up, torch.zeros_like(up)))


def test_unknown_kind_is_a_clear_error(backend, gen):
    x = rand(gen, 2, 1, 8, 8)
    with pytest.raises(ValueError, match="perturbation"):
        backend.perturb(x, 0.1, -1.0, 1.0, "salt", seed=0)


# --- with theta: the warp of the perturbed images --------------------------------------------------------

WARPS = {"shift": (3, 0.0, 0.0), "affine": (2, 20.0, 0.2)}  # warp_theta's shift (px), rotate (degrees), scale
WARP_SHAPES = [(5, 3, 13, 17), (3, 2, 19, 8)]
# Every implementation rounds the source points of the warp its own way (F.affine_grid's linspace and
# matrix product, grid_sample's unnormalisation, FMAs; on the CPU and the GPU differently): about one fp32
# ulp of the pixel coordinate (2e-6 at W = 17), which moves a bilinear output by that times a neighbour
# difference (<= hi - lo) and a gradient by that times the upstream gradients. The fp32 reference is as
# far (4e-6) from its own fp64 evaluation.
WARP_ATOL = 1e-5


def random_theta(gen, shape, warp):
    """``warp_theta``'s transforms for images of ``shape``, drawn on the CPU from ``gen``: ``[B, 2, 3]``."""
    return reference.warp_theta(shape[0], shape[2:], *WARPS[warp], gen, "cpu").to(DEVICE)


def near_tie(theta, shape):
    """``[B, 1, H, W]``: the output pixels whose source point lies within 1e-4 px of a half-integer, where
    "nearest" may round either way within the implementations' rounding (fp64 source points)."""
    grid = F.affine_grid(theta.double(), list(shape), align_corners=False)  # [B, H, W, 2]
    size = torch.tensor([shape[3], shape[2]], dtype=torch.float64, device=theta.device)  # (W, H)
    uv = (grid + 1) * size / 2 - 0.5
    return ((uv - uv.floor() - 0.5).abs() < 1e-4).any(-1)[:, None]


@pytest.mark.parametrize("warp", WARPS)
@pytest.mark.parametrize("mode", WARP_MODES)
@pytest.mark.parametrize("kind", PERTURBATIONS)
@pytest.mark.parametrize("shape", WARP_SHAPES)
def test_theta_warps_the_perturbed_images(backend, gen, shape, kind, mode, warp):
    """``perturb(..., theta, mode) = reference.warp(perturb(...), theta, fill=lo, mode)``, and its gradient
    is autograd's of that composition: the same noise, moved. With "nearest", the pixels on a rounding tie
    are left out (their values, and their upstream gradients)."""
    x = rand(gen, *shape, scale=0.6)
    theta = random_theta(gen, shape, warp)
    seed = int(torch.randint(0, 2**40, (), generator=gen))
    lo, hi = -0.9, 1.0
    tie = near_tie(theta, shape) if mode == "nearest" else torch.zeros((), dtype=torch.bool, device=DEVICE)
    up = rand(gen, *shape).masked_fill(tie, 0.0)

    def fused(xi):
        return backend.perturb(xi, 0.3, lo, hi, kind, seed, theta, mode)

    def composed(xi):
        return reference.warp(backend.perturb(xi, 0.3, lo, hi, kind, seed), theta, lo, mode)

    out = []
    for fn in (fused, composed):
        xi = x.clone().requires_grad_(True)
        y = fn(xi)
        out.append((y.detach().masked_fill(tie, 0.0), *torch.autograd.grad((y * up).sum(), xi)))
    (y, grad), (y_ref, grad_ref) = out
    assert tie.float().mean() < 0.01  # nearly every pixel compared
    assert_close(y, y_ref, atol=WARP_ATOL, what="y")
    assert_close(grad, grad_ref, atol=WARP_ATOL, what="d/dimages")


@pytest.mark.parametrize("mode", WARP_MODES)
def test_no_theta_is_the_perturbation_alone(backend, gen, mode):
    x = rand(gen, 4, 3, 9, 11, scale=0.5)
    assert torch.equal(
        backend.perturb(x, 0.2, -1.0, 1.0, "uniform", 5, None, mode), backend.perturb(x, 0.2, -1.0, 1.0, "uniform", 5)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_theta_in_low_precision(backend, gen, dtype):
    """bf16/fp16 images: the warp of the perturbed images, within the composition's own rounding error (the
    composition rounds the perturbed images, then the output), against the composition in fp32."""
    shape = (5, 3, 13, 17)
    x = rand(gen, *shape, scale=0.6).to(dtype)
    theta = random_theta(gen, shape, "affine")

    def composed(images):
        return reference.warp(backend.perturb(images, 0.2, -1.0, 1.0, "rademacher", 3), theta, -1.0)

    y = backend.perturb(x, 0.2, -1.0, 1.0, "rademacher", 3, theta)
    assert y.dtype == dtype
    assert_low_precision_close(y, composed(x), composed(x.float()), what="y")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, gen, dtype):
    x = rand(gen, 512, 3, 32, 32, scale=0.4).clamp(-1, 1).to(dtype)
    y = backend.perturb(x, 0.125, -1.0, 1.0, "rademacher", seed=3)
    assert y.dtype == dtype
    inside = (y > -1) & (y < 1)
    s = (y.float() - x.float())[inside] / 0.125
    torch.testing.assert_close(s.abs(), torch.ones_like(s), rtol=0, atol=0.07)  # one bf16 rounding
