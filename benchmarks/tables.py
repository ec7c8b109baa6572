"""Markdown tables from saved benchmark runs: one table per (device, op, dtype), a row per case, a column
per implementation.

    python benchmarks/tables.py RUN.json [RUN2.json ...]               # the tables on stdout
    python benchmarks/tables.py RUN.json --into BENCHMARKS.md          # ... between its "generated" markers

RUN.json: a run of the suite saved by pytest-benchmark (``--benchmark-save``, under ``.benchmarks/``,
or ``--benchmark-json``), or a JSON-lines file of the earlier scripts (``benchmarks/results/*/*.jsonl``:
one row per line, ``op``, ``impl``, ``size``, ``ms``, ``peak_mb``, ``gbps``, ``device``, ``date``). A cell
holds the median, its speed-up over the eager reference ("x"), GB/s and the fraction of the run's copy
bandwidth for the ops given their bytes, a rate (pairs/s, images/s) where the row has one, and the
peak CUDA memory above the inputs. Every number comes from the file: nothing is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import derive  # noqa: E402

# The eager reference of the earlier scripts' rows, where it is not "eager" (host_us: none)
LEGACY_BASELINE = {"pairwise_ssim": "reference", "step": "eager-head", "host_us": None}
BEGIN, END = "<!-- generated tables: begin -->", "<!-- generated tables: end -->"


def load(path: str) -> Tuple[str, List[Dict]]:
    """``(a line saying where and when the run was, its rows)``; rows as ``common.derive`` takes them."""
    with open(path) as f:
        text = f.read()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:  # several lines: JSON lines
        doc = None
    if isinstance(doc, dict) and "benchmarks" in doc:
        return _pytest_benchmark(path, doc)
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    devices = [r["device"] for r in rows if r.get("device")]
    usual = max(set(devices), key=devices.count) if devices else "?"  # rows of unavailable impls name none
    rows = [dict(r, case=r["size"], dtype="float32", device=r.get("device") or usual,
                 baseline=LEGACY_BASELINE.get(r["op"], "eager")) for r in rows]
    for r in rows:
        if r["op"] == "host_us" and r["ms"]:  # host_overhead.py wrote microseconds in its "ms" field
            r["ms"] /= 1e3
    derive(rows)
    dates = sorted({r.get("date", "?") for r in rows})
    return f"`{path}` (JSON lines of the earlier scripts), {', '.join(dates)}", rows


def _pytest_benchmark(path: str, run: Dict) -> Tuple[str, List[Dict]]:
    m = run["machine_info"]
    cpu = (m.get("cpu") or {}).get("brand_raw") or m.get("processor") or m.get("machine")
    names = {"cuda": m.get("gpu") or "GPU", "cpu": f"CPU {cpu}, {m.get('torch_threads', '?')} threads"}
    rows = []
    for b in run["benchmarks"]:
        info = b["extra_info"]
        rows.append(dict(info, ms=b["stats"]["median"] * 1e3, device=names.get(info["device"], info["device"])))
    commit = run.get("commit_info", {})
    where = (f"`{os.path.basename(path)}`, {run['datetime'][:10]}, commit {str(commit.get('id', '?'))[:10]}"
             f"{' (dirty)' if commit.get('dirty') else ''}, torch {m.get('torch')}, Triton {m.get('triton')}")
    return where, rows


def cell(r: Dict) -> str:
    if not r.get("ms"):
        return (r.get("note") or "n/a").split(":")[0]
    parts = [f"{_num(r['ms'])} ms" if r["ms"] >= 0.1 else f"{_num(r['ms'] * 1e3)} µs"]
    if "x_eager" in r and r["impl"] != r.get("baseline", "eager"):
        parts.append(f"{_num(r['x_eager'])}×")
    if r.get("gbps"):
        parts.append(f"{_num(r['gbps'])} GB/s" + (f" ({r['frac_copy']:.0%})" if "frac_copy" in r else ""))
    rate = next((k for k in r if k.endswith("_per_s")), None)
    if rate:
        parts.append(f"{_si(r[rate])} {rate[: -len('_per_s')]}/s")
    if r.get("peak_mb") is not None:
        parts.append(f"{_num(r['peak_mb'])} MB")
    return " · ".join(parts)


def _num(x: float) -> str:
    """Three significant digits, without an exponent: 0.0907, 3.60, 22.6, 1,234."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.{2 - math.floor(math.log10(x)) if x > 0 else 0}f}"


def _si(x: float) -> str:
    for scale, prefix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if x >= scale:
            return f"{_num(x / scale)}{prefix}"
    return _num(x)


def markdown(where: str, rows: List[Dict]) -> str:
    tables: Dict[Tuple[str, str, str], List[Dict]] = {}
    for r in rows:
        tables.setdefault((r["device"], r["op"], r.get("dtype", "float32")), []).append(r)
    out = [f"Run: {where}."]
    for (device, op, dtype), rs in tables.items():
        impls = list(dict.fromkeys(r["impl"] for r in rs))
        cases = list(dict.fromkeys(r["case"] for r in rs))
        at = {(r["case"], r["impl"]): r for r in rs}
        copy = next((r["gbps"] / r["frac_copy"] for r in rs if r.get("frac_copy")), None)
        base = next((r.get("baseline", "eager") for r in rs if "x_eager" in r), None)
        notes = [f"× over `{base}`" if base else "", f"copy bandwidth {copy:,.0f} GB/s" if copy else ""]
        out += ["", f"#### {op}, {dtype}: {device}" + (f" ({'; '.join(n for n in notes if n)})" if any(notes) else ""), ""]
        out.append("| case | " + " | ".join(impls) + " |")
        out.append("|---" * (len(impls) + 1) + "|")
        for c in cases:
            out.append(f"| {c} | " + " | ".join(cell(at[c, i]) if (c, i) in at else "—" for i in impls) + " |")
    return "\n".join(out) + "\n"


def into(path: str, text: str) -> None:
    """Replace what lies between the BEGIN and END markers of ``path`` with ``text``."""
    with open(path) as f:
        doc = f.read()
    if BEGIN not in doc or END not in doc:
        sys.exit(f"{path} has no {BEGIN} ... {END} section")
    head, rest = doc.split(BEGIN, 1)
    with open(path, "w") as f:
        f.write(head + BEGIN + "\n" + text + END + rest.split(END, 1)[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="pytest-benchmark JSON files or JSON-lines files of the earlier scripts")
    p.add_argument("--into", help="write the tables between the generated-tables markers of this Markdown file")
    args = p.parse_args()
    text = "\n".join(markdown(*load(path)) for path in args.runs)
    if args.into:
        into(args.into, text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
