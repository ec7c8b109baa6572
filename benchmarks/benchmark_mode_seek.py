"""mode_seek (the mode-seeking term of a paired batch) for each implementation (``common.OP_IMPLS``),
forward + backward, as the step runs it on the generator's images and latents.

    pytest benchmarks/benchmark_mode_seek.py --benchmark-only [--bench-batch 1024,65536 ...]
    python benchmarks/benchmark_mode_seek.py [the same options]

Images [B, C, H, W] in (-1, 1) and latents [B, 100]; bytes: the images read once and their gradient
written once (the fused backends read the images twice: the pair differences, then the gradient in the
backward).
"""

import sys

import pytest
import torch
from benchmark_image_prior import make_images
from common import OP_IMPLS, nbytes, op_impl


@pytest.mark.parametrize("impl", OP_IMPLS)
def test_mode_seek(bench, device, batch, chw, dtype, impl):
    fn = op_impl("mode_seek", impl, device, bench.timed)
    x = make_images(batch, chw, device, dtype)
    z = torch.randn(batch, 100, generator=torch.Generator().manual_seed(batch)).to(device)
    case = f"B={batch} {'x'.join(map(str, chw))}"
    bench(lambda: torch.autograd.grad(fn(x, z), x), "mode_seek", impl, case, dtype, bytes=2 * nbytes(x))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--benchmark-only", *sys.argv[1:]]))
