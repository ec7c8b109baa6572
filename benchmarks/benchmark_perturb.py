"""perturb for each implementation (``common.OP_IMPLS``; the extension has none): forward alone, and
forward + backward; without and with the warp (``theta``: "eager" and "compile" are the reference's
perturb then warp, F.affine_grid + F.grid_sample; "triton" the fused kernel).

    pytest benchmarks/benchmark_perturb.py --benchmark-only [--bench-batch 1024,65536 ...]
    python benchmarks/benchmark_perturb.py [the same options]

Rademacher noise (the default) on images [B, C, H, W]; the warps of ``benchmark_method_terms.WARPS``
(drawn once), with the step's resampling: "nearest" for the whole-pixel shifts, "bilinear" for the
affine maps. Bytes: forward, the images read and the output written; forward + backward, also the
upstream gradient read and the images' gradient written (the goal is >= 70% of the copy bandwidth at
large B).
"""

import sys

import pytest
import torch
from benchmark_image_prior import make_images
from benchmark_method_terms import WARPS
from common import OP_IMPLS, nbytes, op_impl

from tldr_fast import reference

EPS, KIND, SEED = 0.1, "rademacher", 1234
MODES = {"shift": "nearest", "affine": "bilinear"}  # as the step resamples each kind of warp
# A fresh torch.Generator per call, which CUDA graph capture refuses
NO_GRAPH = "the reference perturb seeds a new generator per call: CUDA graph capture refuses it"


def time_perturb(bench, device, batch, chw, dtype, impl, backward, warp=None):
    """One row: ``perturb`` of ``impl`` on [batch, *chw] images, moved by the transforms of ``warp`` (or not)."""
    if impl == "eager+graph":
        pytest.skip(NO_GRAPH)
    fn = op_impl("perturb", impl, device, bench.timed)
    x = make_images(batch, chw, device, dtype)
    up = torch.ones_like(x)
    case = f"B={batch} {'x'.join(map(str, chw))} {'fwd+bwd' if backward else 'fwd'}"
    warp_args = ()
    if warp is not None:
        theta = reference.warp_theta(batch, chw[1:], *WARPS[warp], torch.Generator(device).manual_seed(0), device)
        warp_args, case = (theta, MODES[warp]), f"{warp} {case}"

    def step():
        with torch.set_grad_enabled(backward):
            y = fn(x, EPS, -1.0, 1.0, KIND, SEED, *warp_args)
        return torch.autograd.grad(y, x, up) if backward else y

    bench(step, "perturb", impl, case, dtype, bytes=nbytes(x) * (4 if backward else 2))


@pytest.mark.parametrize("backward", (False, True), ids=("fwd", "fwd+bwd"))
@pytest.mark.parametrize("impl", OP_IMPLS)
def test_perturb(bench, device, batch, chw, dtype, impl, backward):
    time_perturb(bench, device, batch, chw, dtype, impl, backward)


@pytest.mark.parametrize("warp", WARPS)
@pytest.mark.parametrize("backward", (False, True), ids=("fwd", "fwd+bwd"))
@pytest.mark.parametrize("impl", OP_IMPLS)
def test_perturb_warp(bench, device, batch, chw, dtype, impl, backward, warp):
    time_perturb(bench, device, batch, chw, dtype, impl, backward, warp)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--benchmark-only", *sys.argv[1:]]))
