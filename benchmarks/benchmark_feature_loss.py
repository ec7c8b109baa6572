"""Benchmark feature_loss, forward + backward: eager reference, torch.compile(reference), Triton, CUDA.

    python benchmarks/benchmark_feature_loss.py [--device cuda] [--json out.jsonl] [--quick]

Features [B, D = 256] (post-ReLU), B in {256, 1024, 8192, 65536}; Cos and Ortho by their closed forms
(D x D Gram), and "by class" rows: the same-label form (diversity="class", K = 10 labels; its Gram is
B x B masked to equal labels, or per-class D x D sums). GB/s counts the bytes the op must move at least: the features read once, their gradient
written once (the Gram products make this op compute-bound at large B in fp32).
"""

import torch

from common import bench_args, implementations, run

D = 256


K = 10


def make_inputs(b: int, device: str, dtype=torch.float32):
    g = torch.Generator().manual_seed(b)
    features = (torch.randn(b, D, generator=g) + 0.3).relu().to(device, dtype).requires_grad_(True)
    labels = torch.randint(0, K, (b,), generator=g).to(device)
    return features, torch.tensor([1.0, 0.1], device=device), labels


def main() -> None:
    args = bench_args(__doc__.splitlines()[0])

    def case(b, by_class):
        def build(fn):
            features, w, labels = make_inputs(b, args.device)
            extra = (labels, K) if by_class else ()
            nbytes = 2 * features.numel() * features.element_size()
            return (lambda: torch.autograd.grad(fn(features, w, *extra)[0], features)), nbytes

        return f"B={b} D={D}{' by class' if by_class else ''}", build

    cases = [case(b, by_class) for by_class in (False, True) for b in args.sizes]
    run("feature_loss", args, implementations("feature_loss", args.device, args.quick), cases)


if __name__ == "__main__":
    main()
