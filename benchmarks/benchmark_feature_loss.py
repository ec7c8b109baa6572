"""Benchmark feature_loss, forward + backward: eager reference, torch.compile(reference), Triton, CUDA.

    python benchmarks/benchmark_feature_loss.py [--device cuda] [--json out.jsonl] [--quick]

Features [B, D = 256] (post-ReLU), B in {256, 1024, 8192, 65536}; Cos and Ortho by their closed forms
(D x D Gram). GB/s counts the bytes the op must move at least: the features read once, their gradient
written once (the Gram products make this op compute-bound at large B in fp32).
"""

import torch

from common import bench_args, implementations, run

D = 256


def make_inputs(b: int, device: str, dtype=torch.float32):
    g = torch.Generator().manual_seed(b)
    features = (torch.randn(b, D, generator=g) + 0.3).relu().to(device, dtype).requires_grad_(True)
    return features, torch.tensor([1.0, 0.1], device=device)


def main() -> None:
    args = bench_args(__doc__.splitlines()[0])

    def case(b):
        def build(fn):
            features, w = make_inputs(b, args.device)
            return (lambda: torch.autograd.grad(fn(features, w)[0], features)), 2 * features.numel() * features.element_size()

        return f"B={b} D={D}", build

    run("feature_loss", args, implementations("feature_loss", args.device, args.quick), [case(b) for b in args.sizes])


if __name__ == "__main__":
    main()
