"""benchmarks/tables.py and the curated results file: BENCHMARKS.md is what the file says, every row is
complete, and a saved pytest-benchmark run goes in as the rows it holds."""

import json
import os
import re
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import tables  # noqa: E402

BENCHMARKS_MD = os.path.join(os.path.dirname(HERE), "BENCHMARKS.md")


def test_benchmarks_md_is_generated_from_the_results_file(capsys):
    assert tables.main(["--check", BENCHMARKS_MD]) == 0, capsys.readouterr().err
    names = [m.group(2) for m in tables.BLOCK.finditer(open(BENCHMARKS_MD).read())]
    assert len(names) == len(set(names)) and set(names) == set(tables.BLOCKS)  # every table once, none unused


def test_every_row_has_card_versions_date_source_and_value():
    rows = tables.read_results()
    assert len(rows) > 600
    assert tables.check_rows(rows) == []
    for r in rows:
        assert r["card"] and isinstance(r["versions"], dict) and r["versions"].get("torch"), r
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", r["date"]), r
        # a raw file in git history, a number typed in BENCHMARKS.md, or a saved run appended with --add
        assert r["source"].startswith(("benchmarks/results/", "BENCHMARKS.md ")) or re.match(
            r"\S+\.json \(pytest-benchmark saved run, commit ", r["source"]
        ), r
        assert all(v is None or isinstance(v, (int, float)) for v in r["value"].values()), r
        assert set(r["value"]) <= set(r["unit"]), r


def test_check_rows_names_what_is_missing():
    row = {
        "card": "X",
        "versions": {"torch": "2"},
        "date": "2026-01-02",
        "source": "s",
        "run": "r",
        "value": {"median": 1.0},
        "unit": {"median": "ms"},
    }
    assert tables.check_rows([row]) == []
    assert tables.check_rows([{k: v for k, v in row.items() if k != "versions"}]) == ["row 0: missing versions"]
    assert tables.check_rows([dict(row, value={"median": "1.0"})]) == ["row 0: value median is not a number"]
    assert tables.check_rows([dict(row, unit={})]) == ["row 0: value median has no unit"]


def saved_run() -> dict:
    """A small saved pytest-benchmark run, as ``--benchmark-save`` writes it (times in seconds)."""

    def bench(name, info, median, q1, q3, rounds):
        return {
            "group": None,
            "name": name,
            "fullname": f"benchmarks/benchmark_head_loss.py::{name}",
            "params": {},
            "param": None,
            "extra_info": info,
            "options": {},
            "stats": {
                "min": q1,
                "max": q3,
                "mean": median,
                "stddev": 0.0,
                "rounds": rounds,
                "median": median,
                "iqr": q3 - q1,
                "q1": q1,
                "q3": q3,
                "iqr_outliers": 0,
                "stddev_outliers": 0,
                "outliers": "0;0",
                "ld15iqr": q1,
                "hd15iqr": q3,
                "ops": 1 / median,
                "total": median * rounds,
                "iterations": 1,
            },
        }

    info = {
        "op": "head_loss",
        "case": "B=1024 K=10 D=256",
        "dtype": "float32",
        "device": "cuda",
        "baseline": "eager",
        "bytes": 4_000_000,
    }
    return {
        "machine_info": {
            "node": "n",
            "processor": "x86_64",
            "machine": "x86_64",
            "python_version": "3.11.7",
            "cpu": {"brand_raw": "Some CPU"},
            "torch": "2.13.0+cu130",
            "triton": "3.6.0",
            "torch_threads": 16,
            "gpu": "NVIDIA H100 80GB HBM3",
        },
        "commit_info": {"id": "0123456789abcdef", "dirty": True},
        "benchmarks": [
            bench(
                "test_copy[cuda-1024]",
                {
                    "op": "copy",
                    "impl": "torch",
                    "case": "1024 MiB",
                    "dtype": "float32",
                    "device": "cuda",
                    "baseline": None,
                    "bytes": 2 * 2**30,
                    "peak_mb": 0.0,
                    "gbps": 999.0,
                },
                0.0008,
                0.00079,
                0.00081,
                500,
            ),
            bench(
                "test_head_loss[cuda-eager]",
                dict(info, impl="eager", peak_mb=12.5, x_eager=1.0, gbps=1.0),
                0.002,
                0.0019,
                0.0021,
                400,
            ),
            bench(
                "test_head_loss[cuda-triton]",
                dict(info, impl="triton", peak_mb=3.25, x_eager=2.0, gbps=2.0, frac_copy=0.001),
                0.0005,
                0.00048,
                0.00052,
                900,
            ),
        ],
        "datetime": "2026-12-07T10:11:12.131415+00:00",
        "version": "5.1.0",
    }


def test_add_appends_a_saved_run_as_curated_rows(tmp_path):
    saved, results = tmp_path / "0003_h100.json", tmp_path / "results.jsonl"
    saved.write_text(json.dumps(saved_run()))
    results.write_text("")
    assert tables.main(["--add", str(saved), "--results", str(results)]) == 0
    rows = tables.read_results(str(results))
    assert [(r["op"], r["impl"]) for r in rows] == [("copy", "torch"), ("head_loss", "eager"), ("head_loss", "triton")]
    copy, eager, triton = rows
    assert eager["value"] == {"median": 2.0, "q1": 1.9, "q3": 2.1, "peak": 12.5}
    assert eager["unit"] == {"median": "ms", "q1": "ms", "q3": "ms", "peak": "MiB"}
    assert triton["value"]["median"] == 0.5 and triton["value"]["peak"] == 3.25 and triton["rounds"] == 900
    for r in rows:  # what the run measured and where, not what tables.py derives from it
        assert r["card"] == "NVIDIA H100 80GB HBM3" and r["device"] == "cuda"
        assert r["versions"] == {"torch": "2.13.0+cu130", "triton": "3.6.0", "python": "3.11.7"}
        assert r["date"] == "2026-12-07" and r["run"] == "2026-12-07/0003_h100"
        assert r["source"] == "0003_h100.json (pytest-benchmark saved run, commit 0123456789, dirty)"
        assert not {"x_eager", "gbps", "frac_copy", "peak_mb"} & set(r)
    assert triton["bytes"] == 4_000_000 and triton["baseline"] == "eager" and copy["baseline"] is None
    assert tables.check_rows(rows) == []

    # its tables: the speed-up, GB/s and the fraction of the run's copy bandwidth are computed from the medians
    flat = {r["impl"]: r for r in tables.derive([tables.flat(r) for r in rows])}
    assert flat["triton"]["x_eager"] == pytest.approx(4.0)
    assert flat["triton"]["gbps"] == pytest.approx(8.0)  # 4e6 bytes in 0.5 ms
    assert flat["torch"]["gbps"] == pytest.approx(2 * 2**30 / 0.8e-3 / 1e9)
    assert flat["triton"]["frac_copy"] == pytest.approx(8.0 / (2 * 2**30 / 0.8e-3 / 1e9))
    assert tables.cell(flat["triton"]) == "0.500 ms · 4.00× · 8.00 GB/s (0%) · 3.25 MB"
    text = tables.BLOCKS["suite-runs"](rows)
    assert "`0003_h100`" in text and "#### head_loss, float32: NVIDIA H100 80GB HBM3 (× over `eager`" in text

    # the same run twice is refused, and the file is left as it was
    before = results.read_text()
    with pytest.raises(SystemExit, match="already holds run"):
        tables.main(["--add", str(saved), "--results", str(results)])
    assert results.read_text() == before


def test_check_fails_on_a_stale_table_and_update_mends_it(tmp_path, capsys):
    doc = open(BENCHMARKS_MD).read()
    stale = tmp_path / "BENCHMARKS.md"
    stale.write_text(doc.replace("| 0.183 |", "| 0.180 |", 1))
    assert stale.read_text() != doc
    assert tables.main(["--check", str(stale)]) == 1
    assert "distributed" in capsys.readouterr().err
    assert tables.main(["--update", str(stale)]) == 0
    assert stale.read_text() == doc


def test_former_names_show_under_the_current_one_and_stay_in_the_rows():
    assert [tables.current_name(n) for n in ("cuda", "cuda+graph", "cuda+compile", "cuda-head-bf16")] == [
        "extension",
        "extension+graph",
        "extension+compile",
        "extension-head-bf16",
    ]
    assert [tables.current_name(n) for n in ("compile-ro", "torch.compile", "triton+graph", "extension", None)] == [
        "compile-ro",
        "torch.compile",
        "triton+graph",
        "extension",
        None,
    ]
    rows = tables.read_results()
    old = [r for r in rows if r.get("impl") == "cuda+graph"]
    assert old and all(tables.flat(r)["impl"] == "extension+graph" for r in old)  # the file keeps what was run
    shown = {r["impl"] for r in tables.op_rows(rows)}
    assert "extension-head" in shown and not any(n.split("+")[0].split("-")[0] == "cuda" for n in shown)


def test_leakage_means_are_over_the_seeds_of_every_run_named():
    rows = tables.read_results()
    kkt = tables.runs_of(rows, ["2026-12-06/k1c", "2026-12-06/k1c12"], "mnist-cnn-10", "kkt-1")
    assert sorted(r["seed"] for r in kkt) == [0, 1, 2]
    assert [r["value"]["attack_accuracy"] for r in sorted(kkt, key=lambda r: r["seed"])] == [0.895, 0.855, 0.875]
    assert tables.pm(kkt, "attack_accuracy") == "0.88 ± 0.02"  # mean 0.875, sample std 0.020
    assert tables._fixed(0.835, 2) == "0.84" and tables._fixed(-0.0001, 3) == "0.000"
