"""The benchmark suite's pytest configuration, on top of pytest-benchmark.

    pytest benchmarks/ --benchmark-only --benchmark-save=NAME     # time every benchmark, save the run
    pytest benchmarks/ --benchmark-only --benchmark-compare       # ... and compare with the last saved run
    pytest benchmarks/ --benchmark-disable                        # every benchmark once, small shapes (CI)

Each benchmark is parametrised over ``device`` ("cpu", and "cuda" where there is a GPU) and over the
axes it asks for: ``batch`` (B), ``chw`` (image shape), ``dtype``, and any axis a file declares in its
``AXES`` (values per device type, and "smoke" for untimed runs). The ``--bench-*`` options below
override them. A row that cannot run here (no GPU, a backend not built, Triton on a CPU while timing)
is skipped with the reason.

Timing: ``bench(step, ...)`` calls ``step`` once untimed (compilation, autotuning), then
``benchmark.pedantic`` with 2 warm-up rounds and enough one-call rounds to fill
``--benchmark-max-time`` (at least ``--benchmark-min-rounds``, at most 1000). On a GPU the timer is
``CudaEventClock`` (CUDA events around each call, synchronised) unless the file sets its own
(``benchmark_host_overhead.py`` times wall-clock host time). Each row's ``extra_info`` holds its op,
implementation, case, dtype and device, peak CUDA memory, and, in a saved or ``--benchmark-json`` run,
its ratio to the eager reference (``x_eager``) and, for ops given the bytes they must move, GB/s and
the fraction of the same run's copy bandwidth (``frac_copy``).
"""

from __future__ import annotations

import itertools
import math
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Callable, Optional

import pytest
import torch
from common import GRAPH, CudaEventClock, cuda_graphed, derive, peak_mb

HAS_CUDA = torch.cuda.is_available()
WARMUP_ROUNDS = 2
MAX_ROUNDS = 1000
# Default values of each axis: on a GPU, on a CPU (timed), and in untimed runs ("smoke": CI, on any device).
AXES = {
    "batch": {"cuda": (1024, 65536), "cpu": (1024,), "smoke": (16,)},
    "chw": {"cuda": ((1, 28, 28), (3, 32, 32)), "cpu": ((1, 28, 28), (3, 32, 32)), "smoke": ((1, 28, 28),)},
    "dtype": {"cuda": ("float32", "bfloat16"), "cpu": ("float32", "bfloat16"), "smoke": ("float32",)},
}
_CUDA_CLOCK = CudaEventClock() if HAS_CUDA else None


def _ints(s: str) -> tuple:
    return tuple(int(v) for v in s.split(","))


def _shapes(s: str) -> tuple:
    return tuple(tuple(int(d) for d in v.split("x")) for v in s.split(","))


def _names(s: str) -> tuple:
    return tuple(s.split(","))


OPTIONS = {  # axis: (parser, help)
    "device": (_names, "devices, e.g. cpu,cuda (default: cpu, and cuda when there is a GPU)"),
    "batch": (_ints, "batch sizes, e.g. 1024,65536"),
    "chw": (_shapes, "image shapes, e.g. 1x28x28,3x32x32"),
    "dtype": (_names, "input dtypes of the loss ops, e.g. float32,bfloat16"),
    "impl": (_names, "only these implementations (the rest deselected), e.g. eager,extension,extension+graph"),
}


def pytest_addoption(parser):
    group = parser.getgroup("tldr_fast benchmarks")
    for axis, (_, help) in OPTIONS.items():
        group.addoption(f"--bench-{axis}", default=None, help=help)


def option(config, axis: str) -> Optional[tuple]:
    value = config.getoption(f"bench_{axis}")
    return OPTIONS[axis][0](value) if value else None


def timed(config) -> bool:
    return bool(config.getoption("benchmark_enable") or not config.getoption("benchmark_disable"))


def _label(axis: str, value) -> str:
    if axis == "batch":
        return f"B{value}"
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)


def pytest_generate_tests(metafunc):
    """Parametrise ``device`` and, per device, every axis the benchmark asks for (see the module doc)."""
    if "device" not in metafunc.fixturenames:
        return
    config = metafunc.config
    axes = {**AXES, **getattr(metafunc.module, "AXES", {})}
    wanted = [a for a in axes if a in metafunc.fixturenames]
    devices = option(config, "device") or (("cpu", "cuda") if HAS_CUDA else ("cpu",))
    values, ids = [], []
    for device in devices:
        key = device if timed(config) else "smoke"
        per_axis = [(option(config, a) if a in OPTIONS else None) or axes[a][key] for a in wanted]
        for combo in itertools.product(*per_axis):
            values.append((device, *combo))
            ids.append("-".join([device, *(_label(a, v) for a, v in zip(wanted, combo))]))
    metafunc.parametrize(["device", *wanted], values, ids=ids)


def pytest_collection_modifyitems(config, items):
    """``--bench-impl`` deselects the other implementations; rows on the GPU get the CUDA-event clock
    unless their file chose a timer."""
    impls = option(config, "impl")
    if impls:
        keep = [
            i for i in items if getattr(i, "callspec", None) is None or i.callspec.params.get("impl", impls[0]) in impls
        ]
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
    for item in items:
        params = getattr(item, "callspec", None) and item.callspec.params
        marker = item.get_closest_marker("benchmark")
        if params and params.get("device") == "cuda" and HAS_CUDA and not (marker and "timer" in marker.kwargs):
            item.add_marker(pytest.mark.benchmark(timer=_CUDA_CLOCK))


@pytest.fixture
def bench(request, benchmark, device):
    """``bench(step, op, impl, case, ...)``: time ``step`` as one row (see ``Bench.__call__``)."""
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("no CUDA GPU")
    # each row compiles its own case: past dynamo's recompile limit (8 per function) later rows would run eagerly
    torch.compiler.reset()
    marker = request.node.get_closest_marker("benchmark")
    clock = marker.kwargs["timer"] if marker and "timer" in marker.kwargs else time.perf_counter
    return Bench(benchmark, device, timed(request.config), clock, request.config)


class Bench:
    def __init__(self, benchmark, device: str, timed: bool, clock: Callable[[], float], config) -> None:
        self.benchmark, self.device, self.timed, self.clock = benchmark, device, timed, clock
        self.max_time = float(config.getoption("benchmark_max_time"))
        self.min_rounds = int(config.getoption("benchmark_min_rounds"))

    def __call__(
        self,
        step: Callable[[], object],
        op: str,
        impl: str,
        case: str,
        dtype: str = "float32",
        bytes: Optional[int] = None,
        items: Optional[int] = None,
        unit: Optional[str] = None,
        baseline: Optional[str] = "eager",
        iterations: int = 1,
        **extra,
    ) -> None:
        """Time ``step`` (all its work, forward and backward) as the row ``op``/``impl``/``case``. ``bytes``:
        the least the op must move (for GB/s); ``items``, ``unit``: what one call processes (e.g. pairs),
        for a rate; ``baseline``: the impl whose median ``x_eager`` divides by (None: no ratio); ``iterations``: calls per
        round (rounds of several calls time launches without a sync in between); ``extra``: more keys for
        ``extra_info``. An impl ending in
        "+graph" times ``step`` captured in a CUDA graph and replayed. Untimed runs call ``step`` once."""
        if impl.endswith(GRAPH):
            if self.device != "cuda":
                pytest.skip("CUDA graphs need a GPU")
            step = cuda_graphed(step)
        b = self.benchmark
        b.group = f"{op} {case} {dtype} {self.device}"
        info = dict(op=op, impl=impl, case=case, dtype=dtype, device=self.device, baseline=baseline)
        info.update({k: v for k, v in dict(bytes=bytes, items=items, unit=unit, **extra).items() if v is not None})
        b.extra_info.update(info)
        if not self.timed:
            b.pedantic(step)
            return
        step()  # compilation, autotuning, lazy initialisation, graph capture: not timed
        start = self.clock()
        for _ in range(iterations):
            step()
        seconds = max(self.clock() - start, 1e-9)
        rounds = min(MAX_ROUNDS, max(self.min_rounds, math.ceil(self.max_time / seconds)))
        b.pedantic(step, rounds=rounds, warmup_rounds=WARMUP_ROUNDS, iterations=iterations)
        if self.device == "cuda":
            b.extra_info["peak_mb"] = peak_mb(step)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Each saved row's ``x_eager``, ``gbps``, ``frac_copy`` and rates, from this run's medians."""
    rows = [dict(b["extra_info"], ms=b["stats"]["median"] * 1e3) for b in output_json["benchmarks"]]
    derive(rows)
    for b, r in zip(output_json["benchmarks"], rows):
        b["extra_info"].update({k: v for k, v in r.items() if k not in b["extra_info"] and k != "ms"})


def pytest_benchmark_update_machine_info(config, machine_info):
    """The versions and the card, beside pytest-benchmark's CPU and platform (a comparison with a run
    that differs in them warns)."""
    try:
        triton = version("triton")
    except PackageNotFoundError:
        triton = None
    machine_info.update(torch=torch.__version__, triton=triton, torch_threads=torch.get_num_threads())
    machine_info["gpu"] = torch.cuda.get_device_name() if HAS_CUDA else None
