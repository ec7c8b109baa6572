"""Benchmark head_loss, forward + backward: eager reference, torch.compile(reference), Triton, CUDA.

    python benchmarks/benchmark_head_loss.py [--device cuda] [--json out.jsonl] [--quick]

Clean and perturbed logits (N = 2B), K = 10 classes, hot conditioning, D = 256 features with the
closed-form head grad-norm (head with bias), B in {256, 1024, 8192, 65536}. GB/s counts the bytes the
op must move at least: logits, target, labels and features read once, their gradients written once.
"""

import torch
import torch.nn.functional as F

from common import bench_args, implementations, run

K, D = 10, 256


def make_inputs(b: int, device: str, dtype=torch.float32):
    g = torch.Generator().manual_seed(b)
    labels = torch.randint(0, K, (b,), generator=g)
    logits = (3 * torch.randn(2 * b, K, generator=g)).to(device, dtype).requires_grad_(True)
    features = torch.randn(b, D, generator=g).relu().to(device, dtype).requires_grad_(True)
    target = F.one_hot(labels, K).to(device, dtype)
    weights = torch.tensor([1.0, 1.0, 0.5, 0.5, 0.1], device=device)
    return logits, target, labels.to(device), features, weights


def min_bytes(logits, target, labels, features) -> int:
    grads = logits.numel() * logits.element_size() + features.numel() * features.element_size()
    return 2 * grads + target.numel() * target.element_size() + labels.numel() * labels.element_size()


def main() -> None:
    args = bench_args(__doc__.splitlines()[0])

    def case(b):
        def build(fn):
            logits, target, labels, features, w = make_inputs(b, args.device)

            def step():
                loss, _ = fn(logits, target, labels, features, w, True)
                return torch.autograd.grad(loss, (logits, features))

            return step, min_bytes(logits, target, labels, features)

        return f"B={b} K={K} D={D}", build

    run("head_loss", args, implementations("head_loss", args.device, args.quick), [case(b) for b in args.sizes])


if __name__ == "__main__":
    main()
