"""Benchmark head_loss, forward + backward: eager reference, torch.compile(reference), Triton, CUDA.

    python benchmarks/benchmark_head_loss.py [--device cuda] [--json out.jsonl] [--quick]

Clean and perturbed logits (N = 2B), K = 10 classes, hot conditioning, D = 256 features with the
closed-form head grad-norm (head with bias), B in {256, 1024, 8192, 65536}. GB/s counts the bytes the
op must move at least: logits, target, labels and features read once, their gradients written once.
"""

import argparse
from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F

from common import Row, copy_bandwidth, measure, parser, report
from tldr_fast import reference as ref
from tldr_fast.backends import BackendUnavailable, resolve

SIZES = (256, 1024, 8192, 65536)
QUICK_SIZES = (16,)  # --quick: a smoke run (the Triton interpreter on a CPU is slow)
QUICK_TIMING = dict(warmup=1, reps=2, max_s=0.2)
K, D = 10, 256


def bench_args(description: str) -> argparse.Namespace:
    """common.parser plus ``--sizes`` (batch sizes, e.g. ``1024,65536``); sets ``sizes`` and ``timing``."""
    p = parser(description)
    p.add_argument("--sizes", type=lambda s: tuple(int(v) for v in s.split(",")), help="batch sizes, e.g. 1024,65536")
    args = p.parse_args()
    args.sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    args.timing = QUICK_TIMING if args.quick else {}
    return args


def implementations(op: str, device: str, quick: bool) -> List[Tuple[str, Callable, str]]:
    """(name, function or None, note) for the eager and compiled reference and each fast backend."""
    fn = getattr(ref, op)
    out = [("eager", fn, ""), ("compile", None, "skipped with --quick") if quick else ("compile", torch.compile(fn, dynamic=False), "")]
    for name in ("triton", "cuda"):
        try:
            out.append((name, getattr(resolve(name, device, fallback=False), op), ""))
        except BackendUnavailable as e:
            out.append((name, None, f"unavailable: {str(e)[:100]}"))
        except AttributeError:
            out.append((name, None, f"backend {name!r} has no {op}"))
    return out


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
    rows = []
    for name, fn, note in implementations("head_loss", args.device, args.quick):
        for b in args.sizes:
            size = f"B={b} K={K} D={D}"
            if fn is None:
                rows.append(Row("head_loss", name, size, None, note=note))
                continue
            logits, target, labels, features, w = make_inputs(b, args.device)

            def step():
                loss, _ = fn(logits, target, labels, features, w, True)
                return torch.autograd.grad(loss, (logits, features))

            rows.append(measure("head_loss", name, size, step, args.device, min_bytes(logits, target, labels, features), **args.timing))
    bw = copy_bandwidth(args.device)
    print(f"device copy bandwidth: {f'{bw:.0f} GB/s' if bw else 'n/a'}")
    report(rows, args.json)


if __name__ == "__main__":
    main()
