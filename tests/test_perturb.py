"""perturb: clip(x + eps * s, lo, hi) - noise law, clipping, gradient mask and reproducibility.

Backends draw noise from their own generators (torch's, Triton's Philox), so the checks read the noise
back from the output and test the properties every backend must have.
"""

import math

import pytest
import torch

from tests.helpers import backend_or_skip, rand
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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, gen, dtype):
    x = rand(gen, 512, 3, 32, 32, scale=0.4).clamp(-1, 1).to(dtype)
    y = backend.perturb(x, 0.125, -1.0, 1.0, "rademacher", seed=3)
    assert y.dtype == dtype
    inside = (y > -1) & (y < 1)
    s = (y.float() - x.float())[inside] / 0.125
    torch.testing.assert_close(s.abs(), torch.ones_like(s), rtol=0, atol=0.07)  # one bf16 rounding
