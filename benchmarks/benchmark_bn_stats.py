"""bn_stats (the BatchNorm-statistics prior of one layer) for each implementation (``common.OP_IMPLS``),
forward + backward, as the step runs it once per BatchNorm layer of the classifier.

    pytest benchmarks/benchmark_bn_stats.py --benchmark-only [--bench-batch 1024,65536 ...]
    python benchmarks/benchmark_bn_stats.py [the same options]

Activations [B, C, H, W] of a conv layer (32x14x14 and 64x7x7, the shapes of the benchmark's CNN) and
[B, 256] of a BatchNorm1d. The fused backends read the activations twice (statistics, then the gradient
in the backward) and write the gradient once; bytes count the minimum, one read and one write.
"""

import sys

import pytest
import torch
from common import OP_IMPLS, nbytes, op_impl

SHAPES = {"32x14x14": (32, 14, 14), "64x7x7": (64, 7, 7), "256": (256,)}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", OP_IMPLS)
def test_bn_stats(bench, device, batch, dtype, impl, shape):
    if not bench.timed and shape != "32x14x14":
        pytest.skip("an untimed (smoke) run checks one shape")
    fn = op_impl("bn_stats", impl, device, bench.timed)
    g = torch.Generator().manual_seed(batch)
    a = (torch.randn(batch, *SHAPES[shape], generator=g) * 1.5 + 0.3).to(device, getattr(torch, dtype))
    a.requires_grad_(True)
    c = SHAPES[shape][0]
    mean, var = torch.zeros(c, device=device), torch.ones(c, device=device)
    bench(
        lambda: torch.autograd.grad(fn(a, mean, var), a),
        "bn_stats",
        impl,
        f"B={batch} {shape}",
        dtype,
        bytes=2 * nbytes(a),
    )


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--benchmark-only", *sys.argv[1:]]))
