"""What the benchmark files share besides the pytest fixtures (``conftest.py``): the implementations of
an op by name, the CUDA-event clock, CUDA-graph capture, and the numbers derived from a run's medians.

Implementation names, one per row of a table: "eager" (``tldr_fast.reference``), "compile"
(``torch.compile`` of the reference), "triton" (``tldr_fast.kernels``), "extension" (the C++/CUDA
extension: CUDA kernels on a GPU, C++ kernels on a CPU; "cuda" in runs before 2026-12-06), and
"<name>+graph": the same step captured once in a CUDA graph and replayed (GPU only; the kernels' own time,
without the host's).
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Iterable, List, Optional

import pytest
import torch

from tldr_fast import reference
from tldr_fast.backends import Backend, BackendUnavailable, resolve

GRAPH = "+graph"
OP_IMPLS = ("eager", "compile", "triton", "extension", "eager" + GRAPH, "triton" + GRAPH, "extension" + GRAPH)


def backend_or_skip(name: str, device: str, timed: bool, fallback: bool = False) -> Backend:
    """The backend ``name`` ("triton" or "extension") on ``device``, or a pytest skip saying why it cannot
    run here. Triton on a CPU runs only under ``TRITON_INTERPRET=1`` and only untimed (``--benchmark-disable``
    with its small shapes): timing the interpreter would measure the interpreter."""
    if name == "triton" and device == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton runs on CUDA tensors; on a CPU only under TRITON_INTERPRET=1 (untimed)")
        if timed:
            pytest.skip("Triton on a CPU runs under the interpreter, which is not timed (use --benchmark-disable)")
    try:
        return resolve(name, device, quiet=True, fallback=fallback)
    except BackendUnavailable as e:
        pytest.skip(f"backend {name!r} unavailable on {device}: {str(e).splitlines()[0]}")


def op_impl(op: str, impl: str, device: str, timed: bool) -> Callable:
    """``op`` ("head_loss", "feature_loss", "image_prior" or "perturb") as implemented by ``impl`` (one
    of ``OP_IMPLS``; "+graph" is the bench fixture's business), or a pytest skip saying why not."""
    base = impl.removesuffix(GRAPH)
    if base == "eager":
        return getattr(reference, op)
    if base == "compile":
        return torch.compile(getattr(reference, op), dynamic=False)
    ops = backend_or_skip(base, device, timed)
    if not hasattr(ops, op):
        pytest.skip(f"backend {base!r} has no {op}")
    return getattr(ops, op)


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class CudaEventClock:
    """A pytest-benchmark timer on the GPU's clock: each call records a CUDA event on the current
    stream, waits for it, and returns the seconds elapsed on the GPU since the first call. pytest-benchmark
    reads it before and after each round, so a round's time is the GPU time between two events around
    the call, as with ``start.record(); fn(); end.record()``. Consecutive events are differenced (CUDA
    gives fp32 milliseconds) and summed in fp64, so the clock stays precise over a long run."""

    __name__ = "cuda_event_clock"  # the timer's name in pytest-benchmark's saved options

    def __init__(self) -> None:
        self._last: Optional[torch.cuda.Event] = None
        self._seconds = 0.0

    def __call__(self) -> float:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        event.synchronize()
        if self._last is not None:
            self._seconds += self._last.elapsed_time(event) / 1e3
        self._last = event
        return self._seconds


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


def peak_mb(fn: Callable[[], object]) -> float:
    """Peak CUDA memory of one call of ``fn`` above what was allocated before it (the inputs), MiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def derive(rows: Iterable[Dict]) -> None:
    """Fill in the numbers derived from medians, in place, for rows of one run: ``{"op", "impl",
    "case", "dtype", "device", "ms", ...}`` with optional ``"bytes"`` (the least the op must move),
    ``"items"`` and ``"unit"`` (e.g. pairs), ``"baseline"`` (the eager reference's impl name, default
    "eager"). Adds ``"x_eager"`` (the baseline's median over this one, same op, case, dtype and device),
    ``"gbps"`` and ``"frac_copy"`` (of the same device's "copy" row, ``benchmark_copy.py``, when the run
    has it) and ``"<unit>_per_s"``. With ``"items"``, ``x_eager`` is a ratio of rates. Rows without a
    median (``"ms"`` None) get none."""
    rows = [r for r in rows if r.get("ms")]
    by_key = {(r["op"], r["impl"], r["case"], r.get("dtype"), r["device"]): r for r in rows}
    for r in rows:
        if r.get("bytes"):
            r["gbps"] = r["bytes"] / (r["ms"] * 1e-3) / 1e9
    copy = {r["device"]: r["gbps"] for r in rows if r["op"] == "copy" and "gbps" in r}
    for r in rows:
        base = by_key.get((r["op"], r.get("baseline", "eager"), r["case"], r.get("dtype"), r["device"]))
        if base:  # a ratio of rates: rows that process different numbers of items (a sample of pairs) compare too
            r["x_eager"] = (base["ms"] / base.get("items", 1)) / (r["ms"] / r.get("items", 1))
        if "gbps" in r and r["op"] != "copy" and r["device"] in copy:
            r["frac_copy"] = r["gbps"] / copy[r["device"]]
        if r.get("items"):
            r[f"{r.get('unit', 'items')}_per_s"] = r["items"] / (r["ms"] * 1e-3)
