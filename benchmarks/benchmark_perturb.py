"""perturb for each implementation (``common.OP_IMPLS``; the extension has none): forward alone, and
forward + backward.

    pytest benchmarks/benchmark_perturb.py --benchmark-only [--bench-batch 1024,65536 ...]
    python benchmarks/benchmark_perturb.py [the same options]

Rademacher noise (the default) on images [B, C, H, W]. Bytes: forward, the images read and the output
written; forward + backward, also the upstream gradient read and the images' gradient written (the
goal is >= 70% of the copy bandwidth at large B).
"""

import sys

import pytest
import torch
from benchmark_image_prior import make_images
from common import OP_IMPLS, nbytes, op_impl

EPS, KIND, SEED = 0.1, "rademacher", 1234
# A fresh torch.Generator per call, which CUDA graph capture refuses
NO_GRAPH = "the reference perturb seeds a new generator per call: CUDA graph capture refuses it"


@pytest.mark.parametrize("backward", (False, True), ids=("fwd", "fwd+bwd"))
@pytest.mark.parametrize("impl", OP_IMPLS)
def test_perturb(bench, device, batch, chw, dtype, impl, backward):
    if impl == "eager+graph":
        pytest.skip(NO_GRAPH)
    fn = op_impl("perturb", impl, device, bench.timed)
    x = make_images(batch, chw, device, dtype)
    up = torch.ones_like(x)

    def step():
        with torch.set_grad_enabled(backward):
            y = fn(x, EPS, -1.0, 1.0, KIND, SEED)
        return torch.autograd.grad(y, x, up) if backward else y

    case = f"B={batch} {'x'.join(map(str, chw))} {'fwd+bwd' if backward else 'fwd'}"
    bench(step, "perturb", impl, case, dtype, bytes=nbytes(x) * (4 if backward else 2))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--benchmark-only", *sys.argv[1:]]))
