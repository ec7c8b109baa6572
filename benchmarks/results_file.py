"""The curated results file, ``benchmarks/results.jsonl``: its rows' schema, their check, and the rows a saved
pytest-benchmark run or a leakage benchmark's ``results.json`` become. ``benchmarks/tables.py`` appends them
(``--add``, ``--add-leakage``) and makes the Markdown tables from them.

Every row has ``value`` (``{metric: number}``; null: it ran and failed, see ``note``; absent: not measured)
and ``unit`` (``{metric: unit}``); ``card`` (the GPU or the CPU), ``device``, ``threads`` (CPU rows),
``versions``, ``date``; ``run`` (rows of one run were measured side by side: a speed-up is taken within a
run) and ``source`` (a saved run, a raw file in git history, or "BENCHMARKS.md ... (transcribed)"). Op rows
name ``benchmark``, ``command``, ``op``, ``impl`` (the name it ran under), ``case``, ``dtype``, ``baseline``,
``bytes``/``items``/``items_unit`` and ``resolution`` (``{metric: step}`` for a value recorded to fewer
digits than a float holds). Leakage rows (``leakage_rows``) name ``kind``, ``targets`` (the cache of target
classifiers, by the date it was made: the numbers move with the classifiers more than with the seeds),
``target``, ``variant``, ``overrides``, ``seed``, ``steps``, and optionally ``note`` and ``label`` (how the
tables name the configuration). Derived numbers (speed-ups, GB/s, means over seeds) are never stored.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results.jsonl")
REQUIRED = ("card", "versions", "date", "source", "run", "value", "unit")
DERIVED = ("x_eager", "gbps", "frac_copy", "peak_mb")  # extra_info keys of a saved run that are not stored as such
CPU_CARD = "2-core x86-64 CPU"  # the CPU rows' machine unless --card names another
FORMER_NAMES = {"cuda": "extension"}  # backend names the rows keep as they ran, shown under the current name


def read_results(path: str = RESULTS) -> List[Dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def check_rows(rows: Sequence[Dict]) -> List[str]:
    """What is wrong with curated rows: missing keys, values that are not numbers, metrics without a unit."""
    errors = []
    for i, r in enumerate(rows):
        missing = [k for k in REQUIRED if k not in r or r[k] in ("", None)]
        if missing:
            errors.append(f"row {i}: missing {', '.join(missing)}")
            continue
        if not isinstance(r["value"], dict) or not r["value"]:
            errors.append(f"row {i}: value is not a non-empty object")
            continue
        for k, v in r["value"].items():
            if v is not None and not isinstance(v, (int, float)):
                errors.append(f"row {i}: value {k} is not a number")
            if k not in r["unit"]:
                errors.append(f"row {i}: value {k} has no unit")
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(r["date"])):
            errors.append(f"row {i}: date {r['date']!r} is not YYYY-MM-DD")
    return errors


def saved_run_rows(run: Dict, path: str) -> List[Dict]:
    """A saved pytest-benchmark run (``--benchmark-save``/``--benchmark-json``) as curated rows."""
    m, commit, name = run["machine_info"], run.get("commit_info") or {}, os.path.basename(path)
    cpu = (m.get("cpu") or {}).get("brand_raw") or m.get("processor") or m.get("machine") or "CPU"
    date = run["datetime"][:10]
    source = (
        f"{name} (pytest-benchmark saved run, commit {str(commit.get('id') or '?')[:10]}"
        f"{', dirty' if commit.get('dirty') else ''})"
    )
    versions = {
        k: m[key] for k, key in (("torch", "torch"), ("triton", "triton"), ("python", "python_version")) if m.get(key)
    }
    rows = []
    for b in run["benchmarks"]:
        info, s = b["extra_info"], b["stats"]
        row = {"benchmark": b["fullname"].split("::")[0].rsplit("/", 1)[-1], "name": b["fullname"]}
        row.update(op=info["op"], impl=info["impl"], case=info["case"], dtype=info.get("dtype", "float32"))
        value = {"median": s["median"] * 1e3, "q1": s["q1"] * 1e3, "q3": s["q3"] * 1e3}
        if info.get("peak_mb") is not None:
            value["peak"] = info["peak_mb"]
        row.update(value=value, unit={k: ("MiB" if k == "peak" else "ms") for k in value}, rounds=s["rounds"])
        for k, v in info.items():  # bytes, items, unit, baseline, and any key a benchmark added
            if k not in row and k not in DERIVED and k != "device" and not k.endswith("_per_s"):
                row["items_unit" if k == "unit" else k] = v
        row.update(device=info["device"], card=(m.get("gpu") or "GPU") if info["device"] == "cuda" else cpu)
        if info["device"] == "cpu":
            row["threads"] = m.get("torch_threads")
        run_name = f"{date}/{os.path.splitext(name)[0]}"
        rows.append(dict(row, versions=versions, date=date, run=run_name, saved_run=name, source=source))
    return rows


def _append(rows: List[Dict], where: str, results: str) -> List[Dict]:
    """Append the rows of one run to the results file: refused if it holds the run already or a row is incomplete."""
    have = {r["run"] for r in read_results(results)} if os.path.exists(results) else set()
    if rows and rows[0]["run"] in have:
        sys.exit(f"{results} already holds run {rows[0]['run']!r}")
    errors = check_rows(rows)
    if errors:
        sys.exit(f"{where}: " + "; ".join(errors))
    with open(results, "a") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return rows


def add(saved: str, results: str = RESULTS) -> List[Dict]:
    """Append the saved run ``saved`` to the results file; refuses a run that is there already."""
    with open(saved) as f:
        return _append(saved_run_rows(json.load(f), saved), saved, results)


# A leakage results.json's metric -> (the rows' name, unit), in the rows' order; leakage_gap is derived, not stored
# fmt: off
LEAK_METRICS = {
    "attack_accuracy": ("attack_accuracy", "fraction"), "nn_ssim_mean": ("nn_ssim", "SSIM"),
    "train_control_ssim_mean": ("control_train_ssim", "SSIM"), "held_out_ssim_mean": ("control_held_out_ssim", "SSIM"),
    "closer_to_train": ("closer_to_train", "fraction"), "matched_ssim_mean": ("matched_ssim", "SSIM"),
    "n_train_matched": ("n_train_matched", "images"), "same_class_ssim_mean": ("same_class_ssim", "SSIM"),
    "target_accuracy": ("target_accuracy", "fraction"), "target_confidence": ("target_confidence", "probability"),
    "nn_ssim_ci_mean": ("nn_ssim_ci", "SSIM"), "cas": ("cas", "fraction"),
    "worth_real_per_class": ("worth_real_per_class", "real images per class"),
    "distill_accuracy": ("distill_accuracy", "fraction"), "precision": ("precision", "fraction"),
    "recall": ("recall", "fraction"), "density": ("density", "ratio"), "coverage": ("coverage", "fraction"),
    "feature_nn_ratio": ("feature_nn_ratio", "ratio"), "seconds": ("seconds", "s"),
}
# fmt: on
LEAK_DERIVED = ("leakage_gap",)


def _leak_value(metrics: Dict, where: str, skip: Sequence[str] = ()) -> Tuple[Dict, Dict]:
    """``metrics`` (a run or a reference of a results.json) as a row's value and unit; nulls dropped."""
    unknown = set(metrics) - set(LEAK_METRICS) - set(LEAK_DERIVED) - set(skip)
    if unknown:  # a new metric of the benchmark: name it in LEAK_METRICS rather than lose it
        raise ValueError(f"{where}: unknown metric(s) {', '.join(sorted(unknown))} (add them to LEAK_METRICS)")
    have = [(name, u, metrics[k]) for k, (name, u) in LEAK_METRICS.items() if metrics.get(k) is not None]
    return {n: v for n, _, v in have}, {n: u for n, u, _ in have}


def leakage_rows(
    results: Dict,
    run: str,
    source: str,
    targets: Optional[str] = None,
    threads: Optional[int] = None,
    card: Optional[str] = None,
    note: Optional[str] = None,
    label: Optional[str] = None,
) -> List[Dict]:
    """A leakage benchmark's ``results.json`` as curated rows: an "evaluation classifier" and a "real curve"
    row per data set, then per target a "target classifier" row, a "reference" row per reference and an
    "inversion" row per variant and seed. ``targets`` names the cache of target classifiers (default: "<the
    results' date> cache"); ``threads`` replaces ``machine.cpu_threads``; ``card``: the GPU (CPU rows:
    ``CPU_CARD``); ``note`` and ``label`` go on the inversion rows (how they were run; how tables name them)."""
    machine = results["machine"]
    if card is None and machine["device"] != "cpu":
        raise ValueError(f"results of device {machine['device']!r}: name the card")
    tail = {"run": run, "card": card or CPU_CARD, "device": machine["device"]}
    if threads is not None or machine["device"] == "cpu":
        tail["threads"] = machine.get("cpu_threads") if threads is None else threads
    tail.update(versions=results["versions"], date=results["date"], source=source)
    head = {"benchmark": "leakage", "targets": targets or f"{results['date']} cache"}

    def row(fields: Dict, kind: str, value: Dict, unit: Dict, **extra) -> Dict:
        return {**fields, "kind": kind, **extra, "value": value, "unit": unit, **tail}

    rows = []
    for data, j in results.get("judges", {}).items():
        fields = {**head, "data": data, "arch": j["arch"], "n_train": j["n_train"]}
        acc = {"held_out_accuracy": j["held_out_accuracy"]}
        rows.append(row(fields, "evaluation classifier", acc, {"held_out_accuracy": "fraction"}))
    teaching = results.get("settings", {}).get("teaching")
    for data, curve in results.get("real_curves", {}).items():
        points = sorted(curve.items(), key=lambda kv: int(kv[0]))
        value = {f"real_{n}": a for n, a in points}
        extra = {"teaching": teaching} if teaching else {}
        rows.append(row({**head, "data": data}, "real curve", value, dict.fromkeys(value, "fraction"), **extra))
    for e in results["targets"]:
        t = {**head, **{k: e[k] for k in ("target", "data", "arch", "n_per_class", "n_train")}}
        acc = {k: e[k] for k in ("train_accuracy", "held_out_accuracy") if e.get(k) is not None}
        rows.append(row(t, "target classifier", acc, dict.fromkeys(acc, "fraction")))
        for ref, metrics in e.get("references", {}).items():
            rows.append(row(t, "reference", *_leak_value(metrics, f"{e['target']} / {ref}"), reference=ref))
        for variant, v in e["variants"].items():
            for r in v["runs"]:
                value, unit = _leak_value(r, f"{e['target']} / {variant}", skip=("seed", "steps"))
                extra = {
                    "variant": variant,
                    "overrides": v.get("overrides", {}),
                    "seed": r["seed"],
                    "steps": r["steps"],
                }
                rows.append(row(t, "inversion", value, unit, **extra))
                rows[-1].update({k: x for k, x in (("note", note), ("label", label)) if x})
    return rows


def add_leakage(path: str, run: str, source: str, results: str = RESULTS, **kw) -> List[Dict]:
    """Append the leakage results.json ``path`` to the results file as run ``run`` (``leakage_rows``);
    refuses a run that is there already and a source that is not a raw file under benchmarks/results/."""
    if not source.startswith("benchmarks/results/"):
        sys.exit(f"--source {source!r}: name the raw file as committed, 'benchmarks/results/... (git <commit>)'")
    with open(path) as f:
        return _append(leakage_rows(json.load(f), run, source, **kw), path, results)


def audit_rows(reports: Sequence[Tuple[str, Dict]], run: str, source: str, note: Optional[str] = None) -> List[Dict]:
    """Audits' ``report.json`` files ``(path, report)`` as curated rows of kind "audit", one per report: the
    target (the leakage cache's name of the classifier file, else its stem), seed, verdict, the closer-to-train
    fractions, effect, interval and p-value, the excess matches, and the audit's wall time and peak memory
    (``settings.wall_seconds``, ``settings.peak_rss_mb``) where the report has them."""
    rows = []
    for path, rep in reports:
        s, e, x = rep["settings"], rep["closer_to_train"], rep["excess_matches"]
        stem = os.path.basename(s.get("classifier_file") or path).rsplit(".", 1)[0]
        m = re.fullmatch(r"leakage-v\d+-(.+)-e\d+", stem)
        value = {
            "closer_generated": e["generated"], "closer_null": e["null"], "effect": e["effect"],
            "effect_lo": e["interval"][0], "effect_hi": e["interval"][1], "p_value": e["p_value"],
            "excess": x["excess"], "excess_lo": x["interval"][0], "excess_hi": x["interval"][1],
            "wall": s.get("wall_seconds"), "peak_rss": s.get("peak_rss_mb"),
        }  # fmt: skip
        value = {k: v for k, v in value.items() if v is not None}
        unit = {k: {"wall": "s", "peak_rss": "MB", "p_value": "probability"}.get(k, "fraction") for k in value}
        unit.update({k: "images" for k in ("excess", "excess_lo", "excess_hi") if k in unit})
        rows.append({
            "benchmark": "audit", "kind": "audit", "target": m.group(1) if m else stem, "seed": s["seed"],
            "verdict": rep["verdict_kind"], "classifier": s["classifier"]["fingerprint"],
            "n_per_class": s["n_per_class"], "real_unseen": s["real_unseen"], "steps": s["inversion"]["steps"],
            "value": value, "unit": unit, "run": run, "card": CPU_CARD if s["device"] == "cpu" else s["device"],
            "device": s["device"], "versions": s["versions"], "date": s["date"][:10], "source": source,
            **({"note": note} if note else {}),
        })  # fmt: skip
    return rows


def add_audit(paths: Sequence[str], run: str, source: str, results: str = RESULTS, **kw) -> List[Dict]:
    """Append audits' report.json files ``paths`` to the results file as run ``run`` (``audit_rows``)."""
    if not source.startswith("benchmarks/results/"):
        sys.exit(f"--source {source!r}: name the raw files as committed, 'benchmarks/results/... (git <commit>)'")
    reports = []
    for path in paths:
        with open(path) as f:
            reports.append((path, json.load(f)))
    return _append(audit_rows(reports, run, source, **kw), ", ".join(paths), results)


# ---------------------------------------------------------------- op rows as the tables show them: flat, derived


def _ms(value: Dict, unit: Dict, key: str) -> Optional[float]:
    v = value.get(key)
    return None if v is None else v * {"ms": 1.0, "s": 1e3, "us": 1e-3, "µs": 1e-3}[unit[key]]


def current_name(impl: Optional[str]) -> Optional[str]:
    """``impl`` under its current name: a former backend name (``FORMER_NAMES``) replaced, alone or as the
    first part of a compound name ("cuda+graph" -> "extension+graph", "cuda-head-bf16" -> "extension-head-bf16")."""
    m = re.match(r"[^+-]+", impl or "")
    return FORMER_NAMES.get(m.group(0), m.group(0)) + impl[m.end() :] if m else impl


def flat(r: Dict) -> Dict:
    """A curated op row as ``cell`` takes it: ms, peak_mb, gbps, note, items..., the device as its card (and
    threads), the implementation and baseline under their current names, each value's recorded resolution."""
    v, u = r["value"], r["unit"]
    keep = ("op", "case", "dtype", "run", "date", "command", "note", "bytes", "items")
    f = {k: r[k] for k in keep if r.get(k) is not None}
    device = f"{r['card']}, {r['threads']} threads" if r.get("threads") and r.get("device") == "cpu" else r["card"]
    f.update(device=device, impl=current_name(r.get("impl")), baseline=current_name(r.get("baseline")))
    f.update(unit=r.get("items_unit"), source=r["source"])
    time_key = next((k for k in ("median", "host_time", "step") if k in v), None)
    res = r.get("resolution") or {}  # how precisely a value was recorded (a log's printed digits, a typed number)
    f["ms"] = time_key and _ms(v, u, time_key)
    f["res"] = {"ms": time_key and _ms(res, u, time_key), "peak_mb": res.get("peak"), "gbps": res.get("gbps")}
    f["res"].update(rate=res.get("rate"), x_stated=res.get("x_skimage"))
    if v.get("peak") is not None:
        f["peak_mb"] = v["peak"]
    if v.get("gbps") is not None:
        f["gbps"] = v["gbps"]
    if "rate" in v:
        f["rate"], f["x_stated"] = v["rate"], v.get("x_skimage")
    return f


def derive(rows: List[Dict]) -> List[Dict]:
    """Fill in, in place, what a run's medians give, per run and command: ``gbps`` from ``bytes``, ``x_eager``
    (the baseline's median over this one, same op, case and dtype; a ratio of rates when the rows give
    ``items``), ``frac_copy`` (of the same device's copy row) and ``<unit>_per_s``."""
    groups: Dict[Tuple, List[Dict]] = {}
    for r in rows:
        groups.setdefault((r.get("run"), r.get("command")), []).append(r)
    for g in groups.values():
        for r in g:
            if r.get("bytes") and r.get("ms") and "gbps" not in r:
                r["gbps"] = r["bytes"] / (r["ms"] * 1e-3) / 1e9
        copy = {r["device"]: r["gbps"] for r in g if r["op"] == "copy" and r.get("gbps")}
        by: Dict[Tuple, List[Dict]] = {}
        for r in g:
            if r.get("ms"):
                by.setdefault((r["op"], r["case"], r.get("dtype"), r["impl"]), []).append(r)
        for r in (r for r in g if r.get("ms")):
            bases = by.get((r["op"], r["case"], r.get("dtype"), r.get("baseline")), [])
            base = next((b for b in bases if b["device"] == r["device"]), bases[0] if len(bases) == 1 else None)
            if base:
                r["x_eager"] = (base["ms"] / base.get("items", 1)) / (r["ms"] / r.get("items", 1))
            if r.get("gbps") and r["op"] != "copy" and r["device"] in copy:
                r["frac_copy"] = r["gbps"] / copy[r["device"]]
            if r.get("items"):
                r[f"{r.get('unit') or 'items'}_per_s"] = r["items"] / (r["ms"] * 1e-3)
    return rows


def op_rows(rows: Sequence[Dict], **match) -> List[Dict]:
    """The op rows (flat, derived) of the curated rows whose keys equal ``match``'s."""
    return derive([flat(r) for r in rows if "op" in r and all(r.get(k) == v for k, v in match.items())])
