"""Benchmark of one whole TLDR training step (generator forward, one 2B classifier forward/backward,
all losses, Adam), built from the objects ``invert`` builds, for each backend and variant, side by side
in one run. Two settings differ from a default ``invert``: TF32 matmuls are on (on a GPU), and the
classifier takes [0, 1] images (``preprocess="unit"``, no normalisation).

The classifier is DESIGN.md §8.1's: a 3-conv CNN with a 256-wide penultimate layer. Rows: median ms per
step, images/s, peak memory. Example:

    python benchmarks/benchmark_step.py --device cuda --json out.jsonl
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(__file__))
from common import Row, measure, parser, report  # noqa: E402

from tldr_fast.backends import BackendUnavailable, resolve  # noqa: E402
from tldr_fast.classifier import FrozenClassifier  # noqa: E402
from tldr_fast.config import InversionConfig  # noqa: E402
from tldr_fast.generator import ConditionedGenerator  # noqa: E402
from tldr_fast.step import TLDRObjective  # noqa: E402


def cnn(c: int, k: int = 10, d: int = 256) -> nn.Module:
    """The benchmark target: 3 conv layers, global pooling, a 256-wide penultimate layer, a linear head."""
    return nn.Sequential(
        nn.Conv2d(c, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(512, d), nn.ReLU(), nn.Linear(d, k),
    )  # fmt: skip


def step_fn(shape, b, backend, grad_norm, dtype, compile_modules, cuda_graph, device):
    """A closure running one full optimisation step, built exactly as ``invert`` builds it."""
    cfg = InversionConfig(batch_size=b, grad_norm=grad_norm, dtype=dtype, backend=backend, device=device, steps=10**6,
                          compile=compile_modules, cuda_graph=cuda_graph)
    dev = torch.device(device)
    torch.manual_seed(0)
    target = FrozenClassifier(cnn(shape[0]), 10, shape, "unit", None, grad_norm == "full", quiet=True, device=dev)
    g = ConditionedGenerator(10, shape, cfg.nz, cfg.ngf).to(dev)
    ops = resolve(backend, dev, quiet=True)
    objective = TLDRObjective(g, target, cfg, ops, dev)
    opt = torch.optim.Adam(g.parameters(), lr=cfg.lr, betas=cfg.betas)
    params = list(g.parameters())
    counter = [0]

    def step():
        loss, _ = objective(counter[0])
        opt.zero_grad(set_to_none=True)
        loss.backward(inputs=params)
        opt.step()
        counter[0] += 1

    return step


VARIANTS = [  # (impl label, backend, grad_norm, dtype, InversionConfig.compile, InversionConfig.cuda_graph)
    ("eager-full", "torch", "full", "float32", False, False),
    ("eager-head", "torch", "head", "float32", False, False),
    ("compile-head", "torch", "head", "float32", True, False),
    ("triton-head", "triton", "head", "float32", False, False),
    ("cuda-head", "cuda", "head", "float32", False, False),
    ("triton-head-bf16", "triton", "head", "bfloat16", False, False),
    ("cuda-head-bf16", "cuda", "head", "bfloat16", False, False),
    ("eager-head-graph", "torch", "head", "float32", False, True),
    ("triton-head-graph", "triton", "head", "float32", False, True),
    ("cuda-head-graph", "cuda", "head", "float32", False, True),
    ("triton-head-compile", "triton", "head", "float32", True, False),
    ("cuda-head-compile", "cuda", "head", "float32", True, False),
    ("triton-head-compile-graph", "triton", "head", "float32", True, True),
    ("cuda-head-compile-graph", "cuda", "head", "float32", True, True),
]


def main():
    p = parser(__doc__)
    p.add_argument("--variants", default=",".join(v[0] for v in VARIANTS))
    p.add_argument("--configs", default="1x28x28:1024,3x32x32:1024,1x28x28:4096", help="image shape:batch, comma-separated")
    args = p.parse_args()
    device = args.device
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    configs = [(tuple(int(d) for d in c.split(":")[0].split("x")), int(c.split(":")[1])) for c in args.configs.split(",")]
    if args.quick:
        configs = [((1, 28, 28), 64)]
    wanted = set(args.variants.split(","))
    rows = []
    for shape, b in configs:
        size = f"{'x'.join(map(str, shape))} B={b}"
        for label, backend, gn, dtype, comp, graph in VARIANTS:
            if label not in wanted:
                continue
            try:
                fn = step_fn(shape, b, backend, gn, dtype, comp, graph, device)
            except (BackendUnavailable, RuntimeError, ValueError) as e:
                rows.append(Row("step", label, size, None, note=f"unavailable: {str(e).splitlines()[0][:100]}"))
                continue
            reps = 5 if args.quick or device == "cpu" else 20
            row = measure("step", label, size, fn, device, warmup=3, reps=reps, max_s=20)
            if row.ms:
                row.note = (row.note + f" {b / row.ms * 1e3 / 1e3:.1f}k img/s").strip()
            rows.append(row)
            print(f"  {label:<18} {size:<16} {row.ms and round(row.ms, 3)} ms  {row.note}", flush=True)
    report(rows, args.json, baseline="eager-full")


if __name__ == "__main__":
    main()
