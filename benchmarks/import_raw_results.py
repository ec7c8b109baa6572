"""One-off: build ``benchmarks/results.jsonl`` from the raw files under ``benchmarks/results/`` (and, for the
few numbers no raw file holds, from BENCHMARKS.md's own tables and text, transcribed and marked so).

Kept in the commit that creates the curated file, removed with the raw files it reads: ``git show`` that
commit to see how each row was made. Every number is read from a machine-written file (the JSON lines of
the earlier scripts, their logs' tables, pytest-free ``results.json`` of the leakage benchmark, GNU time's
output, ``kkt_signature.py``'s table) or, where marked ``BENCHMARKS.md ... (transcribed)``, copied as typed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RAW = os.path.join(HERE, "results")
COMMIT = "0ad4224"  # a commit that holds every raw file read here (they are removed after this import)
assert subprocess.run(["git", "cat-file", "-e", f"{COMMIT}:benchmarks/results/2026-11-26-h200/run1-bench.log"], cwd=ROOT).returncode == 0

H200 = dict(card="NVIDIA H200", device="cuda")
H200_VERSIONS = None  # read from the env logs
CPU_CARD = "2-core x86-64 CPU"
OP_UNITS = {"median": "ms", "peak": "MiB", "gbps": "GB/s"}


def src(path: str) -> str:
    return f"benchmarks/results/{path} (git {COMMIT})"


# ---------------------------------------------------------------- environment (env logs of the GPU runs)

def env(path: str) -> Dict:
    text = open(os.path.join(RAW, path)).read()
    m = re.search(r"NVIDIA H200, (\d+) MiB, ([\d.]+),", text)
    v = re.search(r"^([\d.]+) torch (\S+) triton (\S+) (.+)$", text, re.M)
    assert m and v and v.group(4) == "NVIDIA H200", path
    when = text.splitlines()[0]
    return {"versions": {"torch": v.group(2), "triton": v.group(3), "python": v.group(1), "driver": m.group(2)},
            "card_memory_mib": int(m.group(1)), "env_logged": when}


# ---------------------------------------------------------------- the earlier scripts' logs and JSON lines

ROW = re.compile(r"^(?P<head>\S.*?)\s+(?P<ms>-|[\d.]+)\s+(?P<x>-|[\d.]+)\s+(?P<peak>-|[\d.]+)\s+(?P<gbps>-|[\d.]+)(?:  (?P<note>.*))?$")
OPS = ("loss_block", "pairwise_ssim", "step", "image_prior", "perturb", "head_loss", "feature_loss", "host_us")


def parse_log(path: str) -> List[Dict]:
    """The result tables of a log: one dict per table line, with the command of its block and that
    block's copy bandwidth (``device copy bandwidth: N GB/s``)."""
    rows, command, copy = [], None, None
    for line in open(os.path.join(RAW, path)).read().splitlines():
        m = re.match(r"^\[\d+s\] bench \(\d+ s\): (.*)$", line) or re.match(r"^## S3\.4c: (.*)$", line)
        if m:
            command, copy = m.group(1), None
            continue
        m = re.match(r"^device copy bandwidth: (\d+) GB/s$", line)
        if m:
            copy = float(m.group(1))
            rows.append(dict(op="copy", impl="torch", case="device to device", ms=None, gbps=copy, command=command))
            continue
        if not line.split(" ", 1)[0] in OPS:
            continue
        m = ROW.match(line)
        assert m, line
        op, rest = m.group("head").split(None, 1)
        impl, case = rest.split(None, 1)
        glued = re.match(r"^(.+?)(\dx\d+x\d+)$", impl)
        if op == "step" and glued:  # a long impl name runs into the case column
            impl, case = glued.group(1), glued.group(2) + " " + case
        num = lambda k: None if m.group(k) == "-" else float(m.group(k))  # noqa: E731
        rows.append(dict(op=op, impl=impl, case=case.strip(), ms=num("ms"), peak_mb=num("peak"), gbps=num("gbps"),
                         note=(m.group("note") or "").strip(), command=command))
    return rows


def jsonl(path: str) -> List[Dict]:
    return [json.loads(line) for line in open(os.path.join(RAW, path)) if line.strip()]


BASELINE = {"pairwise_ssim": "reference", "step": "eager-head", "host_us": None}


def op_row(r: Dict, run: str, source: str, extra: Dict) -> Dict:
    """A row of the earlier scripts as a curated row."""
    op, impl = r["op"], r["impl"]
    row = {"benchmark": _script(r.get("command")), "command": r.get("command"), "op": op, "impl": impl,
           "case": r.get("size", r.get("case")), "dtype": "bfloat16" if impl.endswith("-bf16") else "float32"}
    if op == "host_us":  # host_overhead.py: microseconds of host time per call, in its "ms" field
        row["value"], row["unit"] = {"host_time": r["ms"]}, {"host_time": "us"}
    elif op == "copy":
        row["value"], row["unit"] = {"gbps": r["gbps"]}, {"gbps": "GB/s"}
    else:
        value = {"median": r["ms"]}
        if r.get("peak_mb") is not None:
            value["peak"] = r["peak_mb"]
        if r.get("gbps") is not None:
            value["gbps"] = r["gbps"]
        row["value"], row["unit"] = value, {k: OP_UNITS[k] for k in value}
    if r.get("note"):
        row["note"] = r["note"]
    base = BASELINE.get(op, "eager") if op != "copy" else None
    if base:
        row["baseline"] = base
    items = _items(op, row["case"])
    if items:
        row["items"], row["items_unit"] = items
    row.update(extra)
    row.update(run=run, source=source)
    if row["command"] is None:
        del row["command"]
    return row


def _script(command: Optional[str]) -> Optional[str]:
    return command.split()[0] if command else None


def _items(op: str, case: str):
    if op == "step":
        return int(re.search(r"B=(\d+)", case).group(1)), "images"
    if op == "pairwise_ssim":
        m = re.match(r"(\d+)x(\d+)", case)
        return int(m.group(1)) * int(m.group(2)), "pairs"
    return None


def gpu_runs() -> List[Dict]:
    """The H200 runs of 2026-11-26, in the order they ran: (run id, log, JSON lines, env log)."""
    s1, s2, s3 = "2026-11-26-h200", "2026-11-26-h200-session2", "2026-11-26-h200-session3"
    runs = [
        ("h200-1", f"{s1}/run1-bench.log", None, f"{s1}/env.log"),
        ("h200-2", f"{s1}/run2-bench.log", f"{s1}/run2-bench.jsonl", f"{s1}/env.log"),
        ("h200-3", None, f"{s1}/run3-bench.jsonl", f"{s1}/env.log"),
        ("h200-4", f"{s2}/run1-bench.log", f"{s2}/run1-bench.jsonl", f"{s2}/env.log"),
        ("h200-5", f"{s2}/run2-bench.log", f"{s2}/run2-bench.jsonl", f"{s2}/env.log"),
        ("h200-6", f"{s3}/run1-bench.log", f"{s3}/run1-bench.jsonl", f"{s3}/run1-env.log"),
        ("h200-7", f"{s3}/run2-bench.log", f"{s3}/run2-bench.jsonl", f"{s3}/run2-env.log"),
        ("h200-8", f"{s3}/run3-bench.log", f"{s3}/run3-bench.jsonl", f"{s3}/run3-env.log"),
        ("h200-9", f"{s3}/run4-bench.log", f"{s3}/run4-bench.jsonl", f"{s3}/run4-env.log"),
        ("h200-10", f"{s3}/run4-extra.log", None, f"{s3}/run4-env.log"),
    ]
    out = []
    for run, log, jl, envlog in runs:
        e = env(envlog)
        extra = dict(H200, versions=e["versions"], date="2026-11-26")
        logged = parse_log(log) if log else []
        if jl is None:  # the log is the only record (the script's JSON lines were never written)
            for r in logged:
                out.append(logged_row(op_row(r, f"2026-11-26/{run}", src(log), extra)))
            continue
        rows = jsonl(jl)
        table = [r for r in logged if r["op"] != "copy"]
        if log:  # the log shows the same rows (4 decimals): check, and take each row's command from it
            # (the log of h200-9 ends before the script's last 16 rows, head_loss and feature_loss: JSON lines only)
            assert len(table) == len(rows) or (run == "h200-9" and len(rows) - len(table) == 16), (log, len(table), len(rows))
            for r, t in zip(rows, table):
                assert (r["op"], r["impl"], r["size"]) == (t["op"], t["impl"], t["case"]), (r, t)
                assert (r["ms"] is None) == (t["ms"] is None) and (r["ms"] is None or abs(r["ms"] - t["ms"]) < 6e-5), (r, t)
                r["command"] = t["command"]
        for r in rows:
            assert r["device"] in ("NVIDIA H200", None, "") or r["op"] == "pairwise_ssim", r
            row = op_row(r, f"2026-11-26/{run}", src(jl), extra)
            if (r.get("device") or "").startswith("CPU"):  # scikit-image's row ran on the GPU machine's CPU
                row.update(card=f"host CPU of the H200 machine ({r['device'][4:]})", device="cpu")
            out.append(row)
        for r in logged:  # the copy bandwidth is in the log only
            if r["op"] == "copy":
                out.append(logged_row(op_row(r, f"2026-11-26/{run}", src(log), dict(extra, device="cuda"))))
    return out


LOG_RESOLUTION = {"median": 1e-4, "host_time": 1e-4, "peak": 0.1, "gbps": 1}  # the digits the logs' tables print


def logged_row(row: Dict) -> Dict:
    res = {k: LOG_RESOLUTION[k] for k, v in row["value"].items() if v is not None}
    if res:
        row["resolution"] = res
    return row


def cpu_extension_runs() -> List[Dict]:
    d = "2026-11-26-cpu-session3"
    rows = jsonl(f"{d}/extension_cpu.jsonl")
    assert len(rows) == 33
    out = []
    for i in range(3):
        log = parse_log(f"{d}/extension_cpu-run{i + 1}.log")
        part = rows[11 * i: 11 * (i + 1)]
        for r, t in zip(part, log):
            assert (r["op"], r["impl"], r["size"]) == (t["op"], t["impl"], t["case"]) and abs(r["ms"] - t["ms"]) < 6e-5
            row = op_row(r, f"2026-11-26/cpu-{i + 1}", src(f"{d}/extension_cpu.jsonl"), dict(
                card=CPU_CARD, device="cpu", threads=2, versions={"torch": "2.13.0+cpu"},
                versions_source="BENCHMARKS.md section heading (the JSON lines name no versions)", date=r["date"]))
            row["benchmark"] = "benchmark_extension_cpu.py"
            row["value"].pop("peak", None)
            out.append(row)
    return out


# ---------------------------------------------------------------- the leakage benchmark

METRICS = {  # results.json's per-run keys -> (curated name, unit)
    "attack_accuracy": ("attack_accuracy", "fraction"),
    "nn_ssim_mean": ("nn_ssim", "SSIM"),
    "train_control_ssim_mean": ("control_train_ssim", "SSIM"),
    "held_out_ssim_mean": ("control_held_out_ssim", "SSIM"),
    "closer_to_train": ("closer_to_train", "fraction"),
    "matched_ssim_mean": ("matched_ssim", "SSIM"),
    "n_train_matched": ("n_train_matched", "images"),
    "same_class_ssim_mean": ("same_class_ssim", "SSIM"),
    "target_accuracy": ("target_accuracy", "fraction"),
    "target_confidence": ("target_confidence", "probability"),
    "seconds": ("seconds", "s"),
}
LEAKAGE_DIRS = [  # (results file, the cache of target classifiers it used, named by the date it was made; a note)
    ("2026-12-05-cpu-leakage/default/results.json", "2026-12-05 cache", None),
    ("2026-12-05-cpu-leakage/ablation-1000/results.json", "2026-12-05 cache", None),
    ("2026-12-05-cpu-leakage/ablation-cnn-1000-b/results.json", "2026-12-05 cache", None),
    ("2026-12-05-cpu-leakage/ablation-plain-1000-seed0/results.json", "2026-12-05 cache", None),
    ("2026-12-05-cpu-leakage/select-4/results-a.json", "2026-12-05 cache", None),
    ("2026-12-05-cpu-leakage/select-4/results-b.json", "2026-12-05 cache", None),
    ("2026-12-06-cpu-leakage/default/results.json", "2026-12-06 cache", "the whole default suite as one process (2 threads) on the otherwise idle machine, fresh cache"),
    ("2026-12-06-cpu-leakage/all60k-cnn/results.json", "2026-12-05 cache", None),
    ("2026-12-06-cpu-leakage/all60k-plain/results.json", "2026-12-05 cache", None),
    ("2026-12-06-cpu-leakage/k1c/results.json", "2026-12-05 cache", None),
    ("2026-12-06-cpu-leakage/k1c12/results.json", "2026-12-05 cache", None),
    ("2026-12-06-cpu-leakage/k10c/results.json", "2026-12-05 cache", None),
    ("2026-12-06-cpu-leakage/k1p/results.json", "2026-12-05 cache", None),
    ("2026-12-06-cpu-leakage/k1p12/results.json", "2026-12-05 cache", None),
    ("2026-12-06-cpu-leakage/m10/results.json", "2026-12-05 cache", "select 1 (the defaults before 2026-12-06)"),
    ("2026-12-06-cpu-leakage/m100/results.json", "2026-12-05 cache", "select 1 (the defaults before 2026-12-06)"),
    ("2026-12-06-cpu-leakage/bin1p/results.json", "2026-12-05 cache",
     "an experiment outside the library: a binarisation prior mean((1 - x^2) / 4) (weight 1) added to the reference image_prior by a patched script"),
    ("2026-12-06-cpu-leakage/fashion-trials/results.json", "2026-12-05 cache", None),
]


def _values(d: Dict) -> Dict:
    value = {METRICS[k][0]: d[k] for k in METRICS if k in d}
    return value, {METRICS[k][0]: METRICS[k][1] for k in METRICS if k in d}


def leakage() -> List[Dict]:
    out, seen = [], {}
    for path, targets, note in LEAKAGE_DIRS:
        doc = json.load(open(os.path.join(RAW, path)))
        suite_dir = os.path.dirname(path).split("/", 1)[1] + ("" if os.path.basename(path) == "results.json"
                                                               else "/" + os.path.basename(path)[len("results-"):-5])
        common = dict(card=CPU_CARD, device="cpu", threads=doc["machine"]["cpu_threads"], versions=doc["versions"],
                      date=doc["date"], source=src(path))
        run = f"{path[:10]}/{suite_dir}"
        assert doc["settings"]["eval_per_class"] == 20 and doc["settings"]["held_out_per_class"] == 400
        for data, j in doc["judges"].items():
            key = ("judge", targets, data)
            row = dict(benchmark="leakage", kind="evaluation classifier", targets=targets, data=data, arch=j["arch"],
                       n_train=j["n_train"], value={"held_out_accuracy": j["held_out_accuracy"]},
                       unit={"held_out_accuracy": "fraction"}, run=run, **common)
            if _once(seen, key, row):
                out.append(row)
        for t in doc["targets"]:
            base = dict(benchmark="leakage", targets=targets, target=t["target"], data=t["data"], arch=t["arch"],
                        n_per_class=t["n_per_class"], n_train=t["n_train"])
            row = dict(base, kind="target classifier", value={"train_accuracy": t["train_accuracy"],
                       "held_out_accuracy": t["held_out_accuracy"]},
                       unit={"train_accuracy": "fraction", "held_out_accuracy": "fraction"}, run=run, **common)
            if _once(seen, ("target", targets, t["target"]), row):
                out.append(row)
            for ref, r in t["references"].items():
                value, unit = _values(r)
                row = dict(base, kind="reference", reference=ref, value=value, unit=unit, run=run, **common)
                if _once(seen, ("reference", targets, t["target"], ref), row):
                    out.append(row)
            for vname, v in t["variants"].items():
                for r in v["runs"]:
                    value, unit = _values(r)
                    row = dict(base, kind="inversion", variant=vname, overrides=v["overrides"], seed=r["seed"],
                               steps=r["steps"], value=value, unit=unit, run=run, **common)
                    if note:
                        row["note"] = note
                    out.append(row)
    return out


def _once(seen: Dict, key, row: Dict) -> bool:
    """Judges, targets and references repeat in every file of a cache: keep the first, check the rest."""
    if key in seen:
        assert seen[key]["value"] == row["value"], (key, seen[key]["value"], row["value"])
        return False
    seen[key] = row
    return True


def leakage_extras() -> List[Dict]:
    out = []
    d = "2026-12-06-cpu-leakage"
    common = dict(card=CPU_CARD, device="cpu", versions={"torch": "2.13.0+cpu"},
                  versions_source=f"benchmarks/results/{d}/README.md", date="2026-12-06")
    text = open(os.path.join(RAW, d, "default/time.txt")).read()
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\d+):([\d.]+)", text)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    out.append(dict(benchmark="tldr-fast leakage", kind="suite", suite="default", threads=2,
                    case="whole default suite, one process on the otherwise idle machine, fresh cache (training the targets and evaluation classifiers included)",
                    value={"wall": round(int(m.group(1)) * 60 + float(m.group(2)), 2), "max_rss": rss},
                    unit={"wall": "s", "max_rss": "KiB"}, run="2026-12-06/default", **common,
                    source=src(f"{d}/default/time.txt")))
    for line in open(os.path.join(RAW, d, "kkt_signature-100-per-class.md")):
        m = re.match(r"^\| leakage-v1-(\S+?)-e\d+ \| (-?[\d.]+) \| (-?[\d.]+) \|$", line.strip())
        if m:
            out.append(dict(benchmark="kkt_signature.py", command="python benchmarks/kkt_signature.py --per-class 100",
                            target=m.group(1), value={"cos_train": float(m.group(2)), "cos_held_out": float(m.group(3))},
                            unit={"cos_train": "cosine", "cos_held_out": "cosine"}, resolution={"cos_train": 0.001, "cos_held_out": 0.001},
                            run="2026-12-06/kkt-signature",
                            **common, source=src(f"{d}/kkt_signature-100-per-class.md")))
    assert sum(r["benchmark"] == "kkt_signature.py" for r in out) == 6
    return out


# ---------------------------------------------------------------- numbers only BENCHMARKS.md holds

def typed(text: str):
    """A number as BENCHMARKS.md typed it ("2,021", "0.96", "5.1 k", "3.27 M") -> (value, resolution)."""
    scale = {"k": 1e3, "M": 1e6}.get(text.split()[-1], 1) if " " in text else 1
    digits = text.split()[0].replace(",", "")
    decimals = len(digits.split(".")[1]) if "." in digits else 0
    return round(float(digits) * scale, 9), round(10.0 ** -decimals * scale, 9)


def typed_value(**metrics):
    value, res = {}, {}
    for k, text in metrics.items():
        value[k], res[k] = typed(text)
    return value, res


def transcribed() -> List[Dict]:
    out = []
    cpu = dict(card=CPU_CARD, device="cpu")
    v213 = {"torch": "2.13.0+cpu"}

    def t(section: str, kind: str = "table") -> str:
        return f"BENCHMARKS.md {kind} (transcribed), {section}"

    # the leakage suite's wall times (BENCHMARKS.md text)
    sec = "Leakage benchmark (reconstruction quality)"
    for suite, case, wall, unit, run in (
            ("default", "whole default suite, one process beside another benchmark", "57", "min", "2026-12-05/default"),
            ("quick", "the quick suite (CI smoke test, two variants), inside a test run", "27", "s", "2026-12-05/quick")):
        value, res = typed_value(wall=wall)
        out.append(dict(benchmark="tldr-fast leakage", kind="suite", suite=suite, case=case, value=value, unit={"wall": unit},
                        resolution=res, run=run, date="2026-12-05", versions=v213, **cpu, source=t(sec, "text")))

    # the new forms of feature_loss and image_prior: benchmark_extension_cpu.py --quick, 2026-12-05
    sec = "The new forms of feature_loss and image_prior (`benchmark_extension_cpu.py --quick`), 2026-12-05"
    quick = [("feature_loss", "B=1024 D=256", ("4.04", "2.47", "1.54")),
             ("feature_loss", "B=1024 D=256, diversity=\"class\" (K=10 labels)", ("18.59", "16.49", "1.33")),
             ("image_prior", "B=1024 1x28x28 (TV, Pix)", ("4.24", "1.08", "1.20")),
             ("image_prior", "B=1024 1x28x28 + Moments", ("9.15", "1.32", "0.96"))]
    for op, case, mss in quick:
        for impl, ms in zip(("eager", "torch.compile", "extension"), mss):
            value, res = typed_value(median=ms)
            out.append(dict(benchmark="benchmark_extension_cpu.py", command="benchmark_extension_cpu.py --quick", op=op,
                            impl=impl, case=case, dtype="float32", value=value, unit={"median": "ms"}, resolution=res,
                            baseline="eager", note="forward + backward, median of 10 calls, idle machine", threads=2,
                            run="2026-12-05/cpu-quick", date="2026-12-05", versions=v213, **cpu, source=t(sec)))

    # pairwise SSIM on the CPU
    sec = "CPU — Pairwise SSIM (`benchmark_pairwise_ssim.py --device cpu`)"
    ssim = [("128x2048 1x28x28", (("5.1 k", None), ("33 k", None), ("341 k", None), ("3.27 M", "637"))),
            ("64x512 3x32x32", (("2.9 k", None), ("9.4 k", None), ("60 k", None), ("879 k", "302")))]
    for case, cells in ssim:
        for impl, (rate, x) in zip(("skimage", "reference", "torch", "extension"), cells):
            value, res = typed_value(rate=rate, **({"x_skimage": x} if x else {}))
            unit = {"rate": "pairs/s", **({"x_skimage": "x"} if x else {})}
            out.append(dict(benchmark="benchmark_pairwise_ssim.py", command="benchmark_pairwise_ssim.py --device cpu",
                            op="pairwise_ssim", impl=impl, case=case, dtype="float32", value=value, unit=unit, resolution=res,
                            threads=2, run="2026-11-26/cpu-ssim", date="2026-11-26", versions=v213, **cpu, source=t(sec)))

    # the whole step on the CPU (BENCHMARKS.md text: two runs)
    sec = "CPU — Whole step on the CPU (`benchmark_step.py --device cpu --configs 1x28x28:256`)"
    for run, cells in (("2026-11-26/cpu-step-1", (("eager-full", "2,021"), ("eager-head", "786"), ("cuda-head", "750"))),
                       ("2026-11-26/cpu-step-2", (("eager-full", "1,482"), ("eager-head", "702"), ("compile-head", "685"),
                                                  ("cuda-head", "822")))):
        for impl, ms in cells:
            value, res = typed_value(median=ms)
            out.append(dict(benchmark="benchmark_step.py", command="benchmark_step.py --device cpu --configs 1x28x28:256",
                            op="step", impl=impl, case="1x28x28 B=256", dtype="float32", value=value, unit={"median": "ms"},
                            resolution=res, baseline="eager-head", items=256, items_unit="images", threads=2, run=run,
                            date="2026-11-26", versions=v213, **cpu, source=t(sec, "text")))

    # data-parallel inversion, 1 process vs 2 ranks (gloo)
    sec = "Data-parallel inversion (torchrun): 1 vs 2 ranks on the CPU (gloo)"
    for ranks, s in ((1, "0.183"), (2, "0.185")):
        value, res = typed_value(step=s)
        out.append(dict(benchmark="benchmark_distributed.py", command="python benchmarks/benchmark_distributed.py --batch-size 128 --steps 20",
                        op="inversion step", impl=f"{ranks} rank" + ("s" if ranks > 1 else ""), case="global batch 128",
                        ranks=ranks, global_batch=128, backend="gloo", dtype="float32", value=value, unit={"step": "s"},
                        resolution=res, threads=1,
                        note="one thread per rank, 20 timed steps, under contention (load average 2.3 on the 2 cores)",
                        run="2026-12-06/distributed", date="2026-12-06", versions=v213, **cpu, source=t(sec)))
    return out


def main() -> None:
    rows = gpu_runs() + cpu_extension_runs() + leakage() + leakage_extras() + transcribed()
    for r in rows:
        for k in ("card", "versions", "date", "source", "value", "run"):
            assert k in r, (k, r)
    with open(os.path.join(HERE, "results.jsonl"), "w") as f:
        for r in rows:
            r = {k: v for k, v in r.items() if v is not None}  # not recorded: absent
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(len(rows), "rows")


if __name__ == "__main__":
    main()
