"""head_loss, forward + backward, for each implementation (``common.OP_IMPLS``).

    pytest benchmarks/benchmark_head_loss.py --benchmark-only [--bench-batch 1024,65536 ...]
    python benchmarks/benchmark_head_loss.py [the same options]

Clean and perturbed logits [2B, K = 10], hot conditioning, features [B, D = 256] with the closed-form
head grad-norm (head with bias). Bytes: logits, target, labels and features read once, their
gradients written once.
"""

import sys

import pytest
import torch
import torch.nn.functional as F
from common import OP_IMPLS, nbytes, op_impl

K, D = 10, 256


def make_inputs(b: int, device: str, dtype: str = "float32"):
    """logits [2B, K], target [B, K] (one-hot), labels [B], features [B, D] (post-ReLU), weights [5]."""
    g = torch.Generator().manual_seed(b)
    dt = getattr(torch, dtype)
    labels = torch.randint(0, K, (b,), generator=g)
    logits = (3 * torch.randn(2 * b, K, generator=g)).to(device, dt).requires_grad_(True)
    features = torch.randn(b, D, generator=g).relu().to(device, dt).requires_grad_(True)
    target = F.one_hot(labels, K).to(device, dt)
    weights = torch.tensor([1.0, 1.0, 0.5, 0.5, 0.1], device=device)
    return logits, target, labels.to(device), features, weights


@pytest.mark.parametrize("impl", OP_IMPLS)
def test_head_loss(bench, device, batch, dtype, impl):
    fn = op_impl("head_loss", impl, device, bench.timed)
    logits, target, labels, features, w = make_inputs(batch, device, dtype)

    def step():
        loss, _ = fn(logits, target, labels, features, w, True)
        return torch.autograd.grad(loss, (logits, features))

    moved = 2 * nbytes(logits, features) + nbytes(target, labels)
    bench(step, "head_loss", impl, f"B={batch} K={K} D={D}", dtype, bytes=moved)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--benchmark-only", *sys.argv[1:]]))
