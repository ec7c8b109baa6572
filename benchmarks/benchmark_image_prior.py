"""image_prior for each implementation (``common.OP_IMPLS``): the forward call alone, and forward +
backward.

    pytest benchmarks/benchmark_image_prior.py --benchmark-only [--bench-batch 1024,65536 ...]
    python benchmarks/benchmark_image_prior.py [the same options]

Images [B, C, H, W] in [-1, 1]; TV and pixel range, and "+moments": the Moments term too (per-channel
mean/std against given training moments, a second pass). Bytes: the images read once, their gradient
written once (compare with the copy bandwidth: the goal is >= 70% of it at large B). "fwd" is the
forward call alone: for the fused backends that is the whole kernel (loss and gradient in one read and
one write), for the reference the loss only. "fwd+bwd" adds autograd's backward, which for the fused
backends scales the saved gradient by the upstream one (a second read and write).
"""

import sys

import pytest
import torch
from common import OP_IMPLS, nbytes, op_impl


def make_images(b: int, chw, device: str, dtype: str = "float32") -> torch.Tensor:
    """[B, C, H, W] in (-1, 1), a leaf that requires grad."""
    g = torch.Generator().manual_seed(b)
    return (1.2 * torch.randn(b, *chw, generator=g)).tanh().to(device, getattr(torch, dtype)).requires_grad_(True)


@pytest.mark.parametrize("moments", (False, True), ids=("tv-pix", "moments"))
@pytest.mark.parametrize("backward", (False, True), ids=("fwd", "fwd+bwd"))
@pytest.mark.parametrize("impl", OP_IMPLS)
def test_image_prior(bench, device, batch, chw, dtype, impl, backward, moments):
    fn = op_impl("image_prior", impl, device, bench.timed)
    x = make_images(batch, chw, device, dtype)
    w = torch.tensor([1e-3, 1.0, 1.0], device=device)
    m = torch.tensor([[0.13] * chw[0], [0.31] * chw[0]], device=device) if moments else None  # [2, C]

    def step():
        if backward:
            return torch.autograd.grad(fn(x, w, -1.0, 1.0, m)[0], x)
        return fn(x, w, -1.0, 1.0, m)

    kind = "fwd+bwd" if backward else "fwd"
    case = f"{kind} B={batch} {'x'.join(map(str, chw))}{' +moments' if moments else ''}"
    bench(step, "image_prior", impl, case, dtype, bytes=2 * nbytes(x))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--benchmark-only", *sys.argv[1:]]))
