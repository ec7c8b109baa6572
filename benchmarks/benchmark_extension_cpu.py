"""The C++ extension's CPU kernels against the eager reference and torch.compile of it, forward + backward.

    python benchmarks/benchmark_extension_cpu.py [--quick] [--json rows.jsonl]

Sizes of a TLDR step at B=1024 on 1x28x28 images: head_loss on [2B, K=10] logits with [B, D=256] features
(all five terms), feature_loss on [B, 256], image_prior on [B, 1, 28, 28]; pairwise_ssim (forward only, when
the loaded extension has it) on 32 x 512 pairs of 1x28x28 images. Each timed call runs the forward and
the backward of the weighted loss. The GPU rows of the extension live in the per-op GPU benchmark scripts.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Row, measure, parser, report  # noqa: E402

from tldr_fast import extension, reference  # noqa: E402

Tensor = torch.Tensor


def fwd_bwd(op: Callable, leaves: List[Tensor], *args) -> Callable[[], None]:
    """A closure running ``op(*args)`` and the backward of its loss into ``leaves``."""

    def run() -> None:
        for t in leaves:
            t.grad = None
        loss, _ = op(*args)
        loss.backward()

    return run


def cases(b: int, gen: torch.Generator):
    """``(op name, size label, {impl: closure})`` for every loss op at batch ``b``."""
    k, d = 10, 256
    labels = torch.randint(0, k, (b,), generator=gen)
    target = torch.nn.functional.one_hot(labels, k).float()
    logits = (torch.randn(2 * b, k, generator=gen) * 3).requires_grad_(True)
    feats = torch.randn(b, d, generator=gen).requires_grad_(True)
    phi = (torch.randn(b, d, generator=gen) + 0.3).requires_grad_(True)
    images = torch.randn(b, 1, 28, 28, generator=gen).tanh().requires_grad_(True)
    w5, w2, w3 = (torch.rand(n, generator=gen) + 0.5 for n in (5, 2, 3))
    moments = torch.tensor([[0.13], [0.31]])
    specs = [
        ("head_loss", f"B={b} K={k} D={d}", "head_loss", [logits, feats], (logits, target, labels, feats, w5, True)),
        ("feature_loss", f"B={b} D={d}", "feature_loss", [phi], (phi, w2)),
        ("feature_loss", f"B={b} D={d} by class", "feature_loss", [phi], (phi, w2, labels, k)),
        ("image_prior", f"B={b} 1x28x28", "image_prior", [images], (images, w3, -1.0, 1.0)),
        ("image_prior", f"B={b} 1x28x28 +moments", "image_prior", [images], (images, w3, -1.0, 1.0, moments)),
    ]
    for name, size, op, leaves, args in specs:
        ref_op = getattr(reference, op)
        impls = {
            "eager": fwd_bwd(ref_op, leaves, *args),
            "torch.compile": fwd_bwd(torch.compile(ref_op), leaves, *args),
            "extension": fwd_bwd(getattr(extension, op), leaves, *args),
        }
        yield name, size, impls


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args()
    if args.device != "cpu":
        sys.exit("this benchmark times the CPU kernels: run it with --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    extension.require("cpu")
    gen = torch.Generator().manual_seed(0)
    reps = dict(warmup=2, reps=10, max_s=1.0) if args.quick else dict(warmup=5, reps=50, max_s=3.0)
    rows: List[Row] = []
    for name, size, impls in cases(1024, gen):
        for impl, fn in impls.items():
            rows.append(measure(name, impl, size, fn, "cpu", **reps))
    if hasattr(extension, "pairwise_ssim"):
        a, b = torch.rand(32, 1, 28, 28, generator=gen), torch.rand(512, 1, 28, 28, generator=gen)
        size = "32x512 pairs 1x28x28"
        rows.append(measure("pairwise_ssim", "eager", size, lambda: reference.pairwise_ssim(a, b), "cpu", **reps))
        rows.append(measure("pairwise_ssim", "extension", size, lambda: extension.pairwise_ssim(a, b), "cpu", **reps))
    report(rows, args.json)


if __name__ == "__main__":
    main()
