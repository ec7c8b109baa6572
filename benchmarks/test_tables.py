"""benchmarks/tables.py and the curated results file: BENCHMARKS.md and README.md are what the file says,
README's numbers are BENCHMARKS.md's, every row is complete, and saved and leakage runs go in as rows."""

import json
import os
import re
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import results_file  # noqa: E402
import tables  # noqa: E402

BENCHMARKS_MD = os.path.join(os.path.dirname(HERE), "BENCHMARKS.md")
README_MD = os.path.join(os.path.dirname(HERE), "README.md")


def test_benchmarks_md_and_readme_are_generated_from_the_results_file(capsys):
    assert tables.main(["--check", BENCHMARKS_MD, README_MD]) == 0, capsys.readouterr().err
    names = [[m.group(2) for m in tables.BLOCK.finditer(open(p).read())] for p in (BENCHMARKS_MD, README_MD)]
    assert all(len(n) == len(set(n)) for n in names)  # each table once per file
    assert set(names[0]) | set(names[1]) == set(tables.SPECS) and not set(names[0]) & set(names[1])  # none unused
    assert len(open(BENCHMARKS_MD).read().splitlines()) <= 430 and len(open(README_MD).read().splitlines()) <= 150


def cells(path: str) -> dict:
    """Every cell of the generated tables of ``path``: {(the row's first cell, the column's header): cell}."""
    out = {}
    for m in tables.BLOCK.finditer(open(path).read()):
        head = None
        for line in m.group(3).splitlines():
            row = [c.strip() for c in line.strip("|").split("|")] if line.startswith("|") else None
            if row is None or set(line) <= set("|-"):
                head = None if row is None else head
                continue
            if head is None:
                head = row
                continue
            out.update({(row[0], h): c for h, c in zip(head[1:], row[1:])})
    return out


def test_readme_numbers_are_those_of_benchmarks_md():
    readme, benchmarks = cells(README_MD), cells(BENCHMARKS_MD)
    assert len(readme) >= 30  # README's results table: a row per target, a column per metric
    for key, value in readme.items():  # the same target and metric: the same number, in one spelling
        assert benchmarks.get(key) == value, (key, value, benchmarks.get(key))


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
    flat = {r["impl"]: r for r in results_file.derive([results_file.flat(r) for r in rows])}
    assert flat["triton"]["x_eager"] == pytest.approx(4.0)
    assert flat["triton"]["gbps"] == pytest.approx(8.0)  # 4e6 bytes in 0.5 ms
    assert flat["torch"]["gbps"] == pytest.approx(2 * 2**30 / 0.8e-3 / 1e9)
    assert flat["triton"]["frac_copy"] == pytest.approx(8.0 / (2 * 2**30 / 0.8e-3 / 1e9))
    assert tables.cell(flat["triton"]) == "0.500 ms · 4.00× · 8.00 GB/s (0%) · 3.25 MB"
    text = tables.render(tables.SPECS["ops-gpu"], rows)
    assert "#### head_loss, float32: NVIDIA H100 80GB HBM3, 2026-12-07 (× over `eager`); runs `0003_h100`" in text
    assert (
        "| B=1024 K=10 D=256 | 2.00 ms · 2.00 GB/s (0%) · 12.5 MB | 0.500 ms · 4.00× · 8.00 GB/s (0%) · 3.25 MB |"
        in text
    )

    # a newer run replaces the older one's cells in the tables of current numbers, the older stays in the file
    newer = dict(saved_run(), datetime="2026-12-08T00:00:00+00:00")
    newer["benchmarks"][2]["stats"]["median"] = 0.00025
    del newer["benchmarks"][1]  # triton again, without eager: its cell is the newer run's, eager's the older's
    rows += results_file.saved_run_rows(newer, "0004_h100.json")
    text = tables.render(tables.SPECS["ops-gpu"], rows)
    assert "2026-12-07, 2026-12-08 (× over `eager`); runs `0003_h100`, `0004_h100`" in text
    assert "| 2.00 ms · 2.00 GB/s (0%) · 12.5 MB | 0.250 ms · 16.0 GB/s (1%) · 3.25 MB |" in text

    # the same run twice is refused, and the file is left as it was
    before = results.read_text()
    with pytest.raises(SystemExit, match="already holds run"):
        tables.main(["--add", str(saved), "--results", str(results)])
    assert results.read_text() == before


@pytest.mark.parametrize("path, block", [(BENCHMARKS_MD, "leakage-defaults"), (README_MD, "leakage-summary")])
def test_check_fails_on_a_stale_table_and_update_mends_it(tmp_path, capsys, path, block):
    doc = open(path).read()
    m = next(m for m in tables.BLOCK.finditer(doc) if m.group(2) == block)
    stale = tmp_path / os.path.basename(path)
    stale.write_text(doc[: m.start(3)] + m.group(3).replace("0.85 ± 0.05", "0.86 ± 0.05", 1) + doc[m.end(3) :])
    assert stale.read_text() != doc
    assert tables.main(["--check", str(stale)]) == 1
    assert f"stale: {block} differ" in capsys.readouterr().err
    assert tables.main(["--update", str(stale)]) == 0
    assert stale.read_text() == doc


def test_former_names_show_under_the_current_one_and_stay_in_the_rows():
    assert [results_file.current_name(n) for n in ("cuda", "cuda+graph", "cuda+compile", "cuda-head-bf16")] == [
        "extension",
        "extension+graph",
        "extension+compile",
        "extension-head-bf16",
    ]
    assert [
        results_file.current_name(n) for n in ("compile-ro", "torch.compile", "triton+graph", "extension", None)
    ] == [
        "compile-ro",
        "torch.compile",
        "triton+graph",
        "extension",
        None,
    ]
    rows = tables.read_results()
    old = [r for r in rows if r.get("impl") == "cuda+graph"]
    assert old and all(results_file.flat(r)["impl"] == "extension+graph" for r in old)  # the file keeps what was run
    shown = {r["impl"] for r in results_file.op_rows(rows)}
    assert "extension-head" in shown and not any(n.split("+")[0].split("-")[0] == "cuda" for n in shown)


def test_leakage_means_are_over_the_seeds_of_every_run_named():
    rows = tables.read_results()
    runs = ("2026-12-06/k1c", "2026-12-06/k1c12")
    kkt = [r for r in rows if r["run"] in runs and r.get("target") == "mnist-cnn-10" and r.get("variant") == "kkt-1"]
    assert sorted(r["seed"] for r in kkt) == [0, 1, 2]
    assert [r["value"]["attack_accuracy"] for r in sorted(kkt, key=lambda r: r["seed"])] == [0.895, 0.855, 0.875]
    assert tables.pm(kkt, "attack_accuracy") == "0.88 ± 0.02"  # mean 0.875, sample std 0.020
    assert tables._fixed(0.835, 2) == "0.84" and tables._fixed(-0.0001, 3) == "0.000"
    with pytest.raises(ValueError, match="a seed twice"):  # two runs of one configuration pool distinct seeds only
        tables.pm(kkt + kkt[:1], "attack_accuracy")


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
    assert {r["targets"] for r in results_file.leakage_rows(data, "r", source)} == {"2026-12-07 cache"}
    assert {r["threads"] for r in results_file.leakage_rows(data, "r", source, threads=1)} == {1}
    with pytest.raises(ValueError, match="name the card"):
        results_file.leakage_rows(dict(data, machine={"device": "cuda", "cpu_threads": 16}), "r", source)
    data["targets"][0]["variants"]["defaults"]["runs"][0]["fid"] = 1.0  # a new metric is named, not lost
    with pytest.raises(ValueError, match="unknown metric.*fid"):
        results_file.leakage_rows(data, "r", source)


def test_teaching_real_curve_and_reference_tables_of_the_newest_defaults_run():
    rows = results_file.leakage_rows(leakage_results(), "2026-12-07/default", "benchmarks/results/x.json (git abc1234)")
    older = results_file.leakage_rows(dict(leakage_results(), date="2026-12-01"), "2026-12-01/default", "s")
    rows = older + rows  # the newest run of the defaults is the one shown

    def render(name):
        return tables.render(tables.SPECS[name], rows)

    assert render("leakage-teaching") == (
        "| target | NN-SSIM contrast-inv. | CAS | worth (real images/class) | distill acc | precision | recall "
        "| density | coverage | feature NN ratio |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
        "| MNIST plain CNN, 1,000/class | 0.60 ± 0.14 | 0.50 (seed 0) | 1.4 ± 0.9 | 0.60 ± 0.14 | 0.60 ± 0.14 "
        "| 0.60 ± 0.14 | 0.60 ± 0.14 | 0.60 ± 0.14 | 0.60 ± 0.14 |\n"
        "| MNIST MLP, 1,000/class | 0.40 | 0.40 | 0.4 | 0.40 | 0.40 | 0.40 | 0.40 | 0.40 | 0.40 |\n"
    )
    assert render("leakage-real-curves") == (
        "| data | 1/class | 3/class | 10/class | 100/class |\n|---|---|---|---|---|\n| MNIST | 0.50 | 0.70 | 0.90 | 0.99 |\n"
    )
    refs = render("leakage-references").splitlines()  # once per training set: both targets share theirs
    assert [r.split(" | ")[:3] for r in refs[2:]] == [
        ["| MNIST, 1,000/class", "real unseen images", "0.90"],
        ["| MNIST, 1,000/class", "uniform noise", "0.10"],
        ["| MNIST, 1,000/class", "a black image", "0.00"],
    ]
    assert "| 0.900 / 0.900 | 0.90 | 3.0 of 10,000 |" in refs[2]
    assert "2026-12-01" not in render("leakage-judges") and "| MNIST | lenet | 5,800 | 0.9900 |" in render(
        "leakage-judges"
    )
    with pytest.raises(ValueError, match="no leakage run of the defaults"):
        tables.render(tables.SPECS["leakage-defaults"], [r for r in rows if r.get("variant") != "defaults"])


def test_a_new_leakage_run_with_overrides_shows_in_the_levers_table(tmp_path):
    """A run added with --add-leakage on the defaults' targets is a row of the levers' table, named by its
    --label or its overrides; a run on another cache of targets is not (its classifiers are others)."""
    results, doc = tmp_path / "results.jsonl", tmp_path / "doc.md"
    results.write_text("")
    doc.write_text(
        "x\n<!-- generated by benchmarks/tables.py: leakage-levers; do not edit -->\n<!-- end generated -->\n"
    )
    source = "benchmarks/results/2026-12-07-cpu-leakage/{}/results.json (git abc1234)"

    def add(name, overrides, *extra, cache="2026-12-07 cache"):
        data = leakage_results()
        for t in data["targets"]:
            t["variants"] = {"defaults": dict(t["variants"]["defaults"], overrides=overrides)}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(data))
        argv = ["--add-leakage", str(path), "--run", f"2026-12-07/{name}", "--source", source.format(name)]
        assert tables.main([*argv, "--targets-cache", cache, "--results", str(results), *extra]) == 0

    add("default", {})
    add("zoom-adv", {"zoom": 4, "adversarial": 0.3})
    add("student", {"adversarial": 0.5}, "--label", "adversarial student 0.5")
    add("other-cache", {"zoom": 2}, cache="2026-12-08 cache")
    assert tables.main(["--update", str(doc), "--results", str(results)]) == 0
    body = [line.split(" | ")[:2] for line in doc.read_text().splitlines()[4:-1]]
    assert body == [
        ["| the defaults", "`default`"],
        ["| `zoom=4, adversarial=0.3`", "`zoom-adv`"],
        ["| adversarial student 0.5", "`student`"],
    ]
    assert {r.get("label") for r in tables.read_results(str(results)) if r["run"] == "2026-12-07/student"} >= {
        "adversarial student 0.5"
    }


def test_a_newer_run_of_other_targets_leaves_the_defaults_tables_alone(tmp_path):
    """The defaults' tables (README's among them) show the newest defaults run of the default suite's targets:
    a newer defaults run of other targets alone (e.g. the colour suite's) does not replace it."""
    results = tmp_path / "results.jsonl"
    results.write_text("")
    source = "benchmarks/results/2026-12-07-cpu-leakage/{}/results.json (git abc1234)"
    for name, data in (("default", leakage_results()), ("colour", leakage_results())):
        if name == "colour":
            for t in data["targets"]:
                t["target"], t["data"] = t["target"].replace("mnist", "colour-mnist"), "colour-mnist"
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(data))
        argv = ["--add-leakage", str(path), "--run", f"2026-12-07/{name}", "--source", source.format(name)]
        assert tables.main([*argv, "--results", str(results)]) == 0
    assert tables.defaults_run(tables.read_results(str(results))) == "2026-12-07/default"


def test_the_colour_table_shows_every_colour_run_by_target_and_configuration(tmp_path):
    """Runs on colour data sets, and only those, are rows of the colour table: the defaults, a labelled run and
    an unlabelled one named by its overrides, one row per target and configuration."""
    results, doc = tmp_path / "results.jsonl", tmp_path / "doc.md"
    results.write_text("")
    doc.write_text("<!-- generated by benchmarks/tables.py: leakage-colour; do not edit -->\n<!-- end generated -->\n")
    source = "benchmarks/results/2026-12-08-cpu-leakage/{}/results.json (git abc1234)"
    for name, overrides, extra, colour in (
        ("mnist", {}, [], False),
        ("colour", {}, [], True),
        ("line", {"colour_line": 10.0}, ["--label", "colour line 10"], True),
        ("olah", {"decorrelated_colour": True}, [], True),
    ):
        data = leakage_results()
        for t in data["targets"]:
            t["variants"] = {"defaults": dict(t["variants"]["defaults"], overrides=overrides)}
            if colour:
                t["target"], t["data"] = t["target"].replace("mnist", "colour-mnist"), "colour-mnist"
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(data))
        argv = ["--add-leakage", str(path), "--run", f"2026-12-08/{name}", "--source", source.format(name), *extra]
        assert tables.main([*argv, "--results", str(results)]) == 0
    assert tables.main(["--update", str(doc), "--results", str(results)]) == 0
    body = [line.split(" | ")[:3] for line in doc.read_text().splitlines()[3:-1]]
    assert body == [
        [f"| colour MNIST {arch}, 1,000/class", configuration, f"`{run}`"]
        for arch in ("plain CNN", "MLP")
        for configuration, run in (
            ("the defaults", "colour"), ("colour line 10", "line"), ("`decorrelated_colour=true`", "olah")
        )
    ]  # fmt: skip


def _audit_report(seed: int, effect: float, wall: bool = True) -> dict:
    settings = {
        "classifier_file": "/cache/leakage-v1-mnist-plain_cnn-10-e60.pt", "classifier": {"fingerprint": "ab12"},
        "seed": seed, "n_per_class": 100, "real_unseen": 3000, "inversion": {"steps": 600}, "device": "cpu",
        "versions": {"tldr_fast": "0.1.0", "torch": "2.13.0+cpu"}, "date": "2026-12-07 22:23 UTC",
        **({"wall_seconds": 106.4, "peak_rss_mb": 1259.2} if wall else {}),
    }  # fmt: skip
    return {
        "settings": settings,
        "verdict_kind": "leakage",
        "closer_to_train": {"generated": 0.45 + effect, "null": 0.45, "effect": effect, "interval": [effect - 0.02,
                            effect + 0.02], "p_value": 0.0005},
        "excess_matches": {"excess": 4.0, "interval": [-1.0, 9.0]},
    }  # fmt: skip


def test_add_audit_appends_a_row_per_report_and_the_audit_table_shows_them(tmp_path):
    results = tmp_path / "results.jsonl"
    results.write_text("")
    paths = []
    for seed, effect, wall in ((0, 0.25, True), (1, 0.21, False)):
        paths.append(tmp_path / f"r{seed}.json")
        paths[-1].write_text(json.dumps(_audit_report(seed, effect, wall)))
    source = "benchmarks/results/2026-12-07-cpu-audit/ (git abc1234)"
    argv = ["--add-audit", *map(str, paths), "--run", "2026-12-07/audit", "--source", source, "--note", "alone"]
    assert tables.main([*argv, "--results", str(results)]) == 0
    rows = tables.read_results(str(results))
    assert tables.check_rows(rows) == [] and [(r["kind"], r["target"], r["seed"]) for r in rows] == [
        ("audit", "mnist-plain_cnn-10", 0),
        ("audit", "mnist-plain_cnn-10", 1),
    ]
    assert rows[0]["value"]["wall"] == 106.4 and "wall" not in rows[1]["value"] and rows[0]["date"] == "2026-12-07"
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- generated by benchmarks/tables.py: audit; do not edit -->\n<!-- end generated -->\n")
    assert tables.main(["--update", str(doc), "--results", str(results)]) == 0
    lines = doc.read_text().splitlines()
    assert lines[3] == (
        "| mnist-plain_cnn-10 | 0 | leakage | 0.70 / 0.45 | +0.25 [+0.23, +0.27] | 0.0005 | +4 [-1, +9] | 106 s "
        "| 1.26 GB | alone |"
    )
    assert "| not measured | not measured |" in lines[4]
    with pytest.raises(SystemExit, match="already holds run"):
        tables.main([*argv, "--results", str(results)])
