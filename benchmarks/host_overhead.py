"""Where the host time of a small loss op goes: microseconds of CPU per call, for each layer from a bare
Triton launch up to forward + backward of each op through autograd.

    python benchmarks/host_overhead.py [--device cuda] [--json out.jsonl] [--batch 1024]

At B = 1024 the kernels take a few microseconds of GPU time, so a loop of calls without a sync is
paced by the host: its wall time per call is the host cost. Rows: an empty Triton kernel launched
directly (no arguments; 16 arguments), ``torch.empty``, then each op of each fast backend (forward
under ``no_grad``; forward + backward through ``torch.autograd.grad``). The ``ms`` column holds
microseconds here.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, List

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_head_loss import make_inputs as head_inputs  # noqa: E402
from benchmark_image_prior import make_images  # noqa: E402
from common import Row, device_name, parser, report  # noqa: E402
from tldr_fast.backends import BackendUnavailable, resolve  # noqa: E402


@triton.jit
def _empty_kernel():
    pass


@triton.jit
def _args_kernel(p0, p1, p2, p3, p4, p5, p6, p7, n0, n1, n2, n3, f0, f1, f2, f3, B: tl.constexpr):
    pass


def host_us(fn: Callable[[], object], device: str, n: int = 300) -> float:
    """Wall microseconds per call of ``fn`` over ``n`` calls without a sync in between."""
    for _ in range(20):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1024)
    args = p.parse_args()
    dev, b = args.device, args.batch
    rows: List[Row] = []

    def add(impl: str, what: str, fn: Callable[[], object]) -> None:
        try:
            rows.append(Row("host_us", impl, what, host_us(fn, dev), device=device_name(dev)))
        except Exception as e:  # reported, not hidden
            rows.append(Row("host_us", impl, what, None, note=f"{type(e).__name__}: {str(e)[:100]}", device=device_name(dev)))

    if dev.startswith("cuda"):
        t = [torch.empty(16, device=dev) for _ in range(8)]
        add("triton", "launch, 0 args", lambda: _empty_kernel[(1,)]())
        add("triton", "launch, 16 args", lambda: _args_kernel[(1,)](*t, 1, 2, 3, 4, 0.5, 1.5, 2.5, 3.5, B=16))
    add("torch", "empty", lambda: torch.empty(1024, device=dev))

    logits, target, labels, features, w_head = head_inputs(b, dev)
    images = make_images(b, (1, 28, 28), dev)
    w2 = torch.tensor([1.0, 0.1], device=dev)
    w3 = torch.tensor([1e-3, 1.0, 0.0], device=dev)
    for name in ("triton", "cuda"):
        try:
            ops = resolve(name, dev, fallback=False)
        except BackendUnavailable as e:
            rows.append(Row("host_us", name, "-", None, note=f"unavailable: {str(e)[:80]}"))
            continue
        cases = {
            "head_loss": (lambda: ops.head_loss(logits, target, labels, features, w_head, True)[0], (logits, features)),
            "feature_loss": (lambda: ops.feature_loss(features, w2)[0], (features,)),
            "image_prior": (lambda: ops.image_prior(images, w3, -1.0, 1.0)[0], (images,)),
        }
        if hasattr(ops, "perturb"):
            cases["perturb"] = (lambda: ops.perturb(images, 0.1, -1.0, 1.0, "rademacher", 7).sum(), (images,))
        for op, (fwd, leaves) in cases.items():
            with torch.no_grad():
                add(name, f"{op} fwd (no_grad)", fwd)
            add(name, f"{op} fwd+bwd", lambda fwd=fwd, leaves=leaves: torch.autograd.grad(fwd(), leaves))
    print(f"device: {device_name(dev)}, B={b}; the ms column is microseconds of host time per call")
    report(rows, args.json, baseline="none")


if __name__ == "__main__":
    main()
