"""The method's reference-only term ``warp``, forward + backward: the eager reference against torch.compile of it.

    pytest benchmarks/benchmark_method_terms.py --benchmark-only
    python benchmarks/benchmark_method_terms.py [the same options]

``warp`` (the geometric transforms of the perturbed copies, ``warp_theta`` drawn once: "shift", a
whole-pixel shift of up to 2 px, and "affine", shift + rotation up to 15 degrees + scale 0.9-1.1).
It has no fused kernel: it is a few PyTorch ops (affine_grid, grid_sample) that torch fuses itself; the
rows say what it costs next to the fused loss ops. ``bn_stats`` and ``mode_seek`` have their fused kernels
and their own benchmarks (``benchmark_bn_stats.py``, ``benchmark_mode_seek.py``). Bytes: the
input read once and its gradient written once.
"""

import sys

import pytest
import torch
from benchmark_image_prior import make_images
from common import nbytes

from tldr_fast import reference

IMPLS = ("eager", "compile")
WARPS = {"shift": (2, 0.0, 0.0), "affine": (2, 15.0, 0.1)}  # shift (px), rotate (degrees), scale


def timed_grad(bench, fn, x, op, impl, case):
    """Time the gradient of ``fn()`` (eager, or compiled) with respect to ``x``."""
    f = fn if impl == "eager" else torch.compile(fn, dynamic=False)
    bench(lambda: torch.autograd.grad(f(), x), op, impl, case, bytes=2 * nbytes(x))


@pytest.mark.parametrize("kind", WARPS)
@pytest.mark.parametrize("impl", IMPLS)
def test_warp(bench, device, batch, chw, impl, kind):
    x = make_images(batch, chw, device)
    theta = reference.warp_theta(batch, chw[1:], *WARPS[kind], torch.Generator(device).manual_seed(0), device)
    shape = "x".join(map(str, chw))
    timed_grad(bench, lambda: reference.warp(x, theta, -1.0).sum(), x, "warp", impl, f"{kind} B={batch} {shape}")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--benchmark-only", *sys.argv[1:]]))
