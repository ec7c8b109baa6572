"""The timing harness shared by every benchmark script.

Each script compares implementations of one op side by side in one run - the eager reference,
``torch.compile`` of it, and each fast backend - and prints one table row per (implementation, size)
with the median time, peak memory and, where the script gives the bytes the op must move, achieved
GB/s. ``--json PATH`` appends the rows to a JSON-lines file that ``BENCHMARKS.md`` is written from.

GPU timing uses CUDA events around each call after warm-up, median of many repeats; CPU timing uses
``time.perf_counter`` the same way. Peak memory is ``torch.cuda.max_memory_allocated`` over one call,
minus what was allocated before it (the inputs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional, Tuple

import torch


@dataclass
class Row:
    op: str
    impl: str
    size: str
    ms: Optional[float]  # None: the implementation failed or is unavailable; see note
    peak_mb: Optional[float] = None
    gbps: Optional[float] = None
    note: str = ""
    device: str = ""
    date: str = field(default_factory=lambda: datetime.date.today().isoformat())


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def time_fn(fn: Callable[[], object], device: str, warmup: int = 5, reps: int = 50, max_s: float = 2.0) -> float:
    """Median milliseconds of ``fn()`` (which must do all its work, forward and backward)."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    budget = time.perf_counter() + max_s
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
            if time.perf_counter() > budget and len(times) >= 5:
                break
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            if time.perf_counter() > budget and len(times) >= 5:
                break
    return statistics.median(times)


def cuda_graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` (forward and backward) captured in one CUDA graph on its first call, replayed after: what
    the host costs when launches are not the limit. Warm-up (autotuning, lazy initialisation) runs on
    a side stream first, as capture requires."""
    graph: List[torch.cuda.CUDAGraph] = []

    def replay() -> None:
        if not graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            graph.append(g)
        graph[0].replay()

    return replay


def peak_mb(fn: Callable[[], object], device: str) -> Optional[float]:
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(op: str, impl: str, size: str, fn: Callable[[], object], device: str, nbytes: Optional[int] = None, **kw) -> Row:
    """Time ``fn`` and build its row; an exception becomes a row with the error as its note."""
    try:
        ms = time_fn(fn, device, **kw)
        mb = peak_mb(fn, device)
    except Exception as e:  # a failing implementation is reported, not hidden; its traceback to stderr
        traceback.print_exc()
        return Row(op, impl, size, None, note=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}", device=device_name(device))
    gbps = nbytes / (ms * 1e-3) / 1e9 if nbytes else None
    return Row(op, impl, size, ms, mb, gbps, device=device_name(device))


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> Optional[float]:
    """Measured device-to-device copy bandwidth in GB/s (bytes read + written), the ceiling for
    memory-bound kernels."""
    if not device.startswith("cuda"):
        return None
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), device, warmup=3, reps=20)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="append rows as JSON lines to this file")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats (smoke run)")
    return p


SIZES = (256, 1024, 8192, 65536)
QUICK_SIZES = (16,)  # --quick: a smoke run (the Triton interpreter on a CPU is slow)
QUICK_TIMING = dict(warmup=1, reps=2, max_s=0.2)
IMAGE_SHAPES = ((1, 28, 28), (3, 32, 32))


def bench_args(description: str) -> argparse.Namespace:
    """``parser`` plus ``--sizes`` (batch sizes) and ``--shapes`` (image shapes); sets ``sizes``,
    ``shapes`` and ``timing``."""
    p = parser(description)
    p.add_argument("--sizes", type=lambda s: tuple(int(v) for v in s.split(",")), help="batch sizes, e.g. 1024,65536")
    p.add_argument("--impls", type=lambda s: set(s.split(",")), help="only these implementations, e.g. eager,compile,triton")
    p.add_argument("--graph", action="store_true", help="also time each implementation captured in a CUDA graph (GPU)")
    p.add_argument(
        "--shapes",
        type=lambda s: tuple(tuple(int(d) for d in v.split("x")) for v in s.split(",")),
        help="image shapes, e.g. 1x28x28,3x32x32",
    )
    args = p.parse_args()
    args.sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    args.shapes = args.shapes or IMAGE_SHAPES
    args.timing = QUICK_TIMING if args.quick else {}
    return args


def implementations(op: str, device: str, quick: bool) -> List[Tuple[str, Optional[Callable], str]]:
    """(name, function or None, note) for the eager and compiled reference and each fast backend."""
    from tldr_fast import reference as ref
    from tldr_fast.backends import BackendUnavailable, resolve

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


def run(op: str, args: argparse.Namespace, impls, cases) -> None:
    """The loop every op script shares: time each implementation on each case, then print the copy
    bandwidth and the table.

    ``impls``: ``(name, fn or None, note)`` as from ``implementations``; ``cases``: ``(size label,
    build)`` where ``build(fn)`` makes the inputs and returns ``(step, minimum bytes moved)``. With
    ``--graph`` on a GPU, each implementation but the compiled ones gets a second row, "<name>+graph":
    its step replayed from a CUDA graph (peak MB of those rows excludes the graph's memory pool)."""
    rows = []
    graph = args.graph and args.device.startswith("cuda")
    for name, fn, note in impls:
        if args.impls and name not in args.impls:
            continue
        for size, build in cases:
            if fn is None:
                rows.append(Row(op, name, size, None, note=note))
                continue
            step, nbytes = build(fn)
            rows.append(measure(op, name, size, step, args.device, nbytes, **args.timing))
            if graph and "compile" not in name:
                rows.append(measure(op, f"{name}+graph", size, cuda_graphed(step), args.device, nbytes, **args.timing))
    bw = copy_bandwidth(args.device)
    print(f"device copy bandwidth: {f'{bw:.0f} GB/s' if bw else 'n/a'}")
    report(rows, args.json)


def report(rows: List[Row], json_path: Optional[str] = None, baseline: str = "eager") -> None:
    """Print a table (with speed-up over ``baseline`` for the same op and size) and save JSON lines."""
    base = {(r.op, r.size): r.ms for r in rows if r.impl == baseline and r.ms}
    print(f"{'op':<14}{'impl':<18}{'size':<22}{'ms':>10}{'x ' + baseline:>10}{'peak MB':>10}{'GB/s':>9}  note")
    for r in rows:
        ms = f"{r.ms:.4f}" if r.ms is not None else "-"
        sp = f"{base[(r.op, r.size)] / r.ms:.2f}" if r.ms and base.get((r.op, r.size)) else "-"
        mb = f"{r.peak_mb:.1f}" if r.peak_mb is not None else "-"
        gb = f"{r.gbps:.0f}" if r.gbps is not None else "-"
        print(f"{r.op:<14}{r.impl:<18}{r.size:<22}{ms:>10}{sp:>10}{mb:>10}{gb:>9}  {r.note}")
    sys.stdout.flush()
    if json_path:
        with open(json_path, "a") as f:
            for r in rows:
                f.write(json.dumps(asdict(r)) + "\n")
