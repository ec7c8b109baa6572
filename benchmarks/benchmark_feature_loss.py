"""feature_loss, forward + backward, for each implementation (``common.OP_IMPLS``).

    pytest benchmarks/benchmark_feature_loss.py --benchmark-only [--bench-batch 1024,65536 ...]
    python benchmarks/benchmark_feature_loss.py [the same options]

Features [B, D = 256] (post-ReLU); Cos and Ortho by their closed forms (D x D Gram), Act (-mean |phi|) in
the same passes, and "by class": the same-label form (``diversity="class"``, K = 10 labels; per-class D x D
sums). Compute-bound at large B in fp32 (the Gram products), so no GB/s.
"""

import sys

import pytest
import torch
from common import OP_IMPLS, op_impl

D, K = 256, 10


def make_inputs(b: int, device: str, dtype: str = "float32"):
    """features [B, D] (post-ReLU), weights [3] (Cos, Ortho, Act), labels [B] in [0, K)."""
    g = torch.Generator().manual_seed(b)
    features = (torch.randn(b, D, generator=g) + 0.3).relu().to(device, getattr(torch, dtype)).requires_grad_(True)
    labels = torch.randint(0, K, (b,), generator=g).to(device)
    return features, torch.tensor([1.0, 0.1, 0.1], device=device), labels


@pytest.mark.parametrize("by_class", (False, True), ids=("batch", "by-class"))
@pytest.mark.parametrize("impl", OP_IMPLS)
def test_feature_loss(bench, device, batch, dtype, impl, by_class):
    fn = op_impl("feature_loss", impl, device, bench.timed)
    features, w, labels = make_inputs(batch, device, dtype)
    extra = (labels, K) if by_class else ()

    def step():
        return torch.autograd.grad(fn(features, w, *extra)[0], features)

    bench(step, "feature_loss", impl, f"B={batch} D={D}{' by class' if by_class else ''}", dtype)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--benchmark-only", *sys.argv[1:]]))
