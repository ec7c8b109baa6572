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


TEACH_METRICS = ("nn_ssim_ci_mean", "cas", "worth_real_per_class", "distill_accuracy", "precision", "recall")


def leak_metrics(x: float, **changes) -> dict:
    """A run's or a reference's metrics as ``tldr-fast leakage`` writes them (every one ``x``, the count 3)."""
    names = ("attack_accuracy", "nn_ssim_mean", "train_control_ssim_mean", "held_out_ssim_mean", "leakage_gap")
    names += ("closer_to_train", "matched_ssim_mean", "same_class_ssim_mean", "target_accuracy", "target_confidence")
    m = dict.fromkeys(names + TEACH_METRICS + ("density", "coverage", "feature_nn_ratio"), x)
    return {**m, "n_train_matched": 3, **changes}


def leakage_results() -> dict:
    """A small results.json of ``tldr-fast leakage`` (the shape of the quick suite's): two MNIST targets of
    one training-set size, so the same references; two seeds of one, the second without a CAS."""
    refs = {
        "real_unseen": leak_metrics(0.9, cas=None, worth_real_per_class=None, distill_accuracy=None),
        "noise": leak_metrics(0.1, cas=None, worth_real_per_class=None, distill_accuracy=None),
        "black": leak_metrics(0.0, cas=None, worth_real_per_class=None, distill_accuracy=None),
    }

    def target(arch, runs):
        return {
            "target": f"mnist-{arch}-1000",
            "data": "mnist",
            "arch": arch,
            "n_per_class": 1000,
            "n_train": 10000,
            "train_accuracy": 1.0,
            "held_out_accuracy": 0.97,
            "references": refs,
            "variants": {"defaults": {"overrides": {}, "runs": runs, "mean": {}, "std": {}}},
        }

    return {
        "suite": "default",
        "date": "2026-12-07",
        "versions": {"tldr_fast": "0.1.0", "torch": "2.13.0+cpu", "python": "3.11.7"},
        "machine": {"device": "cpu", "cpu_threads": 2, "processor": "x86_64"},
        "settings": {"seeds": [0, 1], "teaching": {"arch": "lenet", "steps": 400, "real_sizes": [1, 3, 10, 100]}},
        "variants": {"defaults": {}},
        "judges": {"mnist": {"arch": "lenet", "n_train": 5800, "held_out_accuracy": 0.99}},
        "targets": [
            target(
                "plain_cnn",
                [
                    {"seed": 0, "seconds": 100.0, "steps": 600, **leak_metrics(0.5, worth_real_per_class=2.0)},
                    {"seed": 1, "seconds": 120.0, "steps": 600, **leak_metrics(0.7, cas=None)},
                ],
            ),
            target("mlp", [{"seed": 0, "seconds": 50.0, "steps": 600, **leak_metrics(0.4)}]),
        ],
        "skipped": {},
        "real_curves": {"mnist": {"1": 0.5, "10": 0.9, "100": 0.985, "3": 0.7}},
    }


def test_add_leakage_appends_a_leakage_results_json_as_rows_of_the_existing_kinds(tmp_path):
    path, results = tmp_path / "results.json", tmp_path / "results.jsonl"
    path.write_text(json.dumps(leakage_results()))
    results.write_text("")
    source = "benchmarks/results/2026-12-07-cpu-leakage/default/results.json (git abc1234)"
    argv = ["--add-leakage", str(path), "--run", "2026-12-07/default", "--source", source, "--results", str(results)]
    assert tables.main([*argv, "--targets-cache", "2026-12-06 cache"]) == 0
    rows = tables.read_results(str(results))
    assert tables.check_rows(rows) == []
    assert [(r["kind"], r.get("target"), r.get("reference"), r.get("seed")) for r in rows] == [
        ("evaluation classifier", None, None, None),
        ("real curve", None, None, None),
        ("target classifier", "mnist-plain_cnn-1000", None, None),
        ("reference", "mnist-plain_cnn-1000", "real_unseen", None),
        ("reference", "mnist-plain_cnn-1000", "noise", None),
        ("reference", "mnist-plain_cnn-1000", "black", None),
        ("inversion", "mnist-plain_cnn-1000", None, 0),
        ("inversion", "mnist-plain_cnn-1000", None, 1),
        ("target classifier", "mnist-mlp-1000", None, None),
        ("reference", "mnist-mlp-1000", "real_unseen", None),
        ("reference", "mnist-mlp-1000", "noise", None),
        ("reference", "mnist-mlp-1000", "black", None),
        ("inversion", "mnist-mlp-1000", None, 0),
    ]
    judge, curve, classifier, real, _, _, seed0, seed1 = rows[:8]
    for r in rows:  # where and how it was measured: the results' machine, versions and date, the given names
        assert r["card"] == "2-core x86-64 CPU" and r["device"] == "cpu" and r["threads"] == 2
        assert r["versions"] == {"tldr_fast": "0.1.0", "torch": "2.13.0+cpu", "python": "3.11.7"}
        assert (r["date"], r["run"], r["source"], r["targets"]) == (
            "2026-12-07",
            "2026-12-07/default",
            source,
            "2026-12-06 cache",
        )
    assert judge["value"] == {"held_out_accuracy": 0.99} and judge["unit"] == {"held_out_accuracy": "fraction"}
    assert (judge["data"], judge["arch"], judge["n_train"]) == ("mnist", "lenet", 5800)
    assert classifier["value"] == {"train_accuracy": 1.0, "held_out_accuracy": 0.97}
    assert curve["value"] == {"real_1": 0.5, "real_3": 0.7, "real_10": 0.9, "real_100": 0.985}  # by n, not as text
    assert set(curve["unit"].values()) == {"fraction"} and curve["teaching"]["steps"] == 400
    # the existing names (nn_ssim, control_*_ssim, ...), the new metrics as they are; leakage_gap is derived
    assert list(seed0["value"]) == [
        "attack_accuracy", "nn_ssim", "control_train_ssim", "control_held_out_ssim", "closer_to_train",
        "matched_ssim", "n_train_matched", "same_class_ssim", "target_accuracy", "target_confidence",
        "nn_ssim_ci", "cas", "worth_real_per_class", "distill_accuracy", "precision", "recall", "density",
        "coverage", "feature_nn_ratio", "seconds",
    ]  # fmt: skip
    assert seed0["value"]["nn_ssim"] == 0.5 and seed0["value"]["worth_real_per_class"] == 2.0
    assert seed0["value"]["n_train_matched"] == 3 and seed0["value"]["seconds"] == 100.0
    assert seed0["unit"]["worth_real_per_class"] == "real images per class" and seed0["unit"]["seconds"] == "s"
    assert seed0["unit"]["feature_nn_ratio"] == seed0["unit"]["density"] == "ratio"
    assert seed0["unit"]["coverage"] == seed0["unit"]["cas"] == "fraction" and seed0["unit"]["nn_ssim_ci"] == "SSIM"
    assert "cas" not in seed1["value"] and "cas" not in seed1["unit"]  # null: not measured
    assert (seed1["variant"], seed1["overrides"], seed1["steps"], seed1["n_train"]) == ("defaults", {}, 600, 10000)
    assert {"cas", "worth_real_per_class", "distill_accuracy", "seconds"}.isdisjoint(real["value"])
    assert real["value"]["nn_ssim"] == 0.9 and real["value"]["precision"] == 0.9

    # the rows have the keys of the rows converted by hand before (a note was added by hand to some)
    for kind, new in (
        ("inversion", seed0),
        ("reference", real),
        ("target classifier", classifier),
        ("evaluation classifier", judge),
    ):
        old = next(r for r in tables.read_results() if r.get("benchmark") == "leakage" and r.get("kind") == kind)
        assert set(new) == set(old) - {"note"}, kind

    # the same run twice is refused, the file left as it was; so is a source that is not a committed raw file
    before = results.read_text()
    with pytest.raises(SystemExit, match="already holds run"):
        tables.main(argv)
    with pytest.raises(SystemExit, match="--source"):
        tables.main([*argv[:-4], "--source", "/tmp/lq/results.json", *argv[-2:]])
    assert results.read_text() == before

    # the defaults: the cache named by the results' date; --threads; a GPU's results need their card
    data = leakage_results()
    assert {r["targets"] for r in tables.leakage_rows(data, "r", source)} == {"2026-12-07 cache"}
    assert {r["threads"] for r in tables.leakage_rows(data, "r", source, threads=1)} == {1}
    with pytest.raises(ValueError, match="name the card"):
        tables.leakage_rows(dict(data, machine={"device": "cuda", "cpu_threads": 16}), "r", source)
    data["targets"][0]["variants"]["defaults"]["runs"][0]["fid"] = 1.0  # a new metric is named, not lost
    with pytest.raises(ValueError, match="unknown metric.*fid"):
        tables.leakage_rows(data, "r", source)


def test_teaching_table_means_over_seeds_the_real_curve_and_the_references_once():
    rows = tables.leakage_rows(leakage_results(), "2026-12-07/default", "benchmarks/results/x.json (git abc1234)")
    text = tables.teaching_table(rows, "2026-12-07/default", "defaults", ["mnist-plain_cnn-1000", "mnist-mlp-1000"])
    assert text == (
        "| target | NN-SSIM train | NN-SSIM contrast-inv. | CAS | worth (real images/class) | distill acc "
        "| precision | recall | density | coverage | feature NN ratio |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
        "| MNIST plain CNN, 1,000/class | 0.60 ± 0.14 | 0.60 ± 0.14 | 0.50 (seed 0) | 1.4 ± 0.9 | 0.60 ± 0.14 "
        "| 0.60 ± 0.14 | 0.60 ± 0.14 | 0.60 ± 0.14 | 0.60 ± 0.14 | 0.60 ± 0.14 |\n"
        "| MNIST MLP, 1,000/class | 0.40 | 0.40 | 0.40 | 0.4 | 0.40 | 0.40 | 0.40 | 0.40 | 0.40 | 0.40 |\n"
        "\n"
        "MNIST: real curve (the students' recipe on n real training images per class): "
        "1/class 0.50, 3/class 0.70, 10/class 0.90, 100/class 0.99.\n"
        "\n"
        "| training set | reference | NN-SSIM train | NN-SSIM contrast-inv. | precision | recall | density "
        "| coverage | feature NN ratio |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
        "| MNIST, 1,000/class | real unseen images | 0.90 | 0.90 | 0.90 | 0.90 | 0.90 | 0.90 | 0.90 |\n"
        "| MNIST, 1,000/class | uniform noise | 0.10 | 0.10 | 0.10 | 0.10 | 0.10 | 0.10 | 0.10 |\n"
        "| MNIST, 1,000/class | a black image | 0.00 | 0.00 | 0.00 | 0.00 | 0.00 | 0.00 | 0.00 |\n"
    )
    assert "leakage-teaching" in tables.BLOCKS  # BENCHMARKS.md's block of TEACH_RUN
    with pytest.raises(KeyError, match="no leakage rows"):
        tables.teaching_table(rows, tables.TEACH_RUN)  # a target of ORDER the run lacks
