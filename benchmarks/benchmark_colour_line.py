"""colour_line (the variance of each image's colours off their principal line) for each implementation
(``common.OP_IMPLS``), forward + backward, as the step runs it on the generator's images.

    pytest benchmarks/benchmark_colour_line.py --benchmark-only [--bench-batch 1024,65536 ...]
    python benchmarks/benchmark_colour_line.py [the same options]

Images [B, 3, H, W] in (-1, 1), the suite's H and W with three channels (the op takes RGB images only);
bytes: the images read once and their gradient written once (the fused backends read the images twice:
the colour sums, then the gradient in the backward).
"""

import sys

import pytest
import torch
from benchmark_image_prior import make_images
from common import OP_IMPLS, nbytes, op_impl


@pytest.mark.parametrize("impl", OP_IMPLS)
def test_colour_line(bench, device, batch, chw, dtype, impl):
    fn = op_impl("colour_line", impl, device, bench.timed)
    rgb = (3, *chw[1:])
    x = make_images(batch, rgb, device, dtype)
    case = f"B={batch} {'x'.join(map(str, rgb))}"
    bench(lambda: torch.autograd.grad(fn(x), x), "colour_line", impl, case, dtype, bytes=2 * nbytes(x))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--benchmark-only", *sys.argv[1:]]))
