"""The tldr-fast command line: help, one-line errors, and every subcommand end to end on tiny budgets."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tldr_fast.cli import build_parser, main
from tldr_fast.grid import grid_size
from tldr_fast.models import load_classifier
from tldr_fast.samples import load_sample

COMMANDS = ("train-classifier", "invert", "sample", "evaluate", "audit", "leakage", "info", "demo")
TINY = ["--batch-size", "8", "--device", "cpu", "--backend", "torch", "--quiet"]


def _cli(*args, cwd=None):
    """Run ``python -m tldr_fast.cli`` in a subprocess; no just-in-time extension build."""
    env = {**os.environ, "TLDR_FAST_JIT": "0"}
    return subprocess.run(
        [sys.executable, "-m", "tldr_fast.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"tldr-fast {command}" in out and "--" in out


def test_every_command_is_registered():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)


@pytest.mark.parametrize(
    "argv,reason",
    [
        (["train-classifier", "--data", "cifar", "--out", "x.pt"], "unknown data set 'cifar'"),
        (["train-classifier", "--epochs", "zero", "--out", "x.pt"], "argument --epochs: expected a positive integer"),
        (
            ["train-classifier", "--data", "digits", "--n-per-class", "500", "--out", "x.pt"],
            "fewer than n_per_class=500",
        ),
        (["invert", "--classifier", "absent.pt", "--out", "inv.pt"], "no such classifier checkpoint: absent.pt"),
        (["evaluate", "--images", "absent.npz", "--out", "e"], "no training set to compare with"),
        (["sample", "--out", "s.npz"], "the following arguments are required: --inversion"),
        (
            ["sample", "--inversion", "inv.pt", "--out", "s.npz", "--shard-size", "0"],
            "argument --shard-size: expected a positive integer",
        ),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_is_one_line(argv, reason, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and reason in err and "Traceback" not in err, err


def test_bad_input_through_the_console(tmp_path):
    r = _cli("invert", "--classifier", "absent.pt", "--out", "inv.pt", cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip() == "tldr-fast invert: error: no such classifier checkpoint: absent.pt"
    r = _cli("evaluate", "--out", "e", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--inversion" in r.stderr


def test_info(monkeypatch, capsys):
    monkeypatch.setenv("TLDR_FAST_JIT", "0")  # report the extension, never build it here
    assert main(["info", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["backends"]["cpu"]["torch"] == "ok" and set(facts["backends"]["cuda"]) == {
        "reference",
        "torch",
        "triton",
        "extension",
    }
    assert {"torch", "triton", "extension", "cuda_devices"} <= set(facts)
    assert main(["info"]) == 0 and "backends:" in capsys.readouterr().out


def test_train_invert_sample_evaluate(tmp_path, capsys):
    clf, inv = tmp_path / "clf.pt", tmp_path / "inv.pt"
    assert (
        main(
            [
                "train-classifier",
                "--data",
                "digits",
                "--n-per-class",
                "20",
                "--epochs",
                "3",
                "--arch",
                "mlp",
                "--test-data",
                "digits",
                "--device",
                "cpu",
                "--quiet",
                "--out",
                str(clf),
            ]
        )
        == 0
    )
    assert "train accuracy" in capsys.readouterr().out
    assert main(["invert", "--classifier", str(clf), "--out", str(inv), "--steps", "4", *TINY]) == 0
    assert "after 4 steps" in capsys.readouterr().out
    assert (
        main(
            [
                "invert",
                "--classifier",
                str(clf),
                "--resume",
                str(inv),
                "--out",
                str(inv),
                "--steps",
                "6",
                "--compile",
                *TINY,
            ]
        )
        == 0
    )
    assert "after 6 steps" in capsys.readouterr().out
    from tldr_fast.checkpoint import load_checkpoint

    assert load_checkpoint(inv)["config"]["compile"] is True  # resumed under torch.compile

    assert (
        main(
            [
                "sample",
                "--inversion",
                str(inv),
                "--n-per-class",
                "3",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "s.npz"),
            ]
        )
        == 0
    )
    with np.load(tmp_path / "s.npz") as z:
        assert z["images"].shape == (30, 1, 8, 8) and z["images"].dtype == np.uint8
        assert z["labels"].tolist() == [c for c in range(10) for _ in range(3)]
        single = z["images"]
    capsys.readouterr()
    assert (
        main(
            [
                "sample",
                "--inversion",
                str(inv),
                "--n-per-class",
                "3",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "big.npz"),
                "--shard-size",
                "8",
                "--quiet",
            ]
        )
        == 0
    )
    assert f"to {tmp_path / 'big-index.json'}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.glob("big-*.npz")) == [f"big-0000{i}-of-00004.npz" for i in range(4)]
    np.testing.assert_array_equal(load_sample(tmp_path / "big-index.json")[0], single)
    assert (
        main(
            [
                "sample",
                "--inversion",
                str(inv),
                "--n-per-class",
                "2",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "pngs"),
            ]
        )
        == 0
    )
    pngs = sorted((tmp_path / "pngs").glob("*/*.png"))
    assert len(pngs) == 20 and pngs[0].parent.name == "0"
    with Image.open(pngs[0]) as im:
        assert im.size == (8, 8)

    out = tmp_path / "eval"
    evaluate_args = ["--classifier", str(clf), "--eval-classifier", str(clf), "--backend", "torch", "--device", "cpu"]
    evaluate_args += ["--quiet", "--grid-per-class", "2"]
    assert main(["evaluate", "--images", str(tmp_path / "s.npz"), *evaluate_args, "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_generated"] == 30 and m["num_train"] == 200 and m["train_source"] == "digits"
    assert m["overall"]["attack_accuracy"] is not None and m["generated_from"] == {"images": str(tmp_path / "s.npz")}
    with Image.open(out / "grid.png") as im:
        assert im.size == grid_size(10, 2, 8, 8)
    assert (out / "summary.txt").read_text().startswith("30 generated images")
    sharded = tmp_path / "eval-sharded"  # the sharded sample's index evaluates as the single .npz does
    assert main(["evaluate", "--images", str(tmp_path / "big-index.json"), *evaluate_args, "--out", str(sharded)]) == 0
    assert json.loads((sharded / "metrics.json").read_text())["overall"] == m["overall"]

    assert (
        main(
            [
                "evaluate",
                "--inversion",
                str(inv),
                "--classifier",
                str(clf),
                "--n-per-class",
                "2",
                "--backend",
                "torch",
                "--device",
                "cpu",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_generated"] == 20 and m["overall"]["target_confidence"] is not None
    assert "cas" not in m["overall"]  # no test images, no students
    # real images it never saw: what the generated images teach (students of 3 steps: the plumbing only)
    teach = ["--test-data", "digits", "--teach-per-class", "3", "--student-steps", "3", "--cache-dir", str(tmp_path)]
    assert main(["evaluate", "--inversion", str(inv), *evaluate_args, *teach, "--out", str(out)]) == 0
    o = json.loads((out / "metrics.json").read_text())["overall"]
    assert o["teach_images"] == 30 and set(o["real_curve"]) == {"1", "3", "10"}  # the training set has 20 per class
    assert 0 <= o["cas"] <= 1 and 0 <= o["distill_accuracy"] <= 1 and o["precision"] is not None
    assert len(list(tmp_path.glob("real-curve-*.json"))) == 1


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Digits as an .npz, 10-class classifiers (two seeds), a 5-class and a colour one, and an inversion."""
    import torch

    from tldr_fast import invert
    from tldr_fast.data import colourise, load_digits, subset
    from tldr_fast.models import save_classifier, train_classifier

    root = tmp_path_factory.mktemp("files")
    ds = subset(load_digits(), 10, seed=0)
    np.savez(root / "digits.npz", images=np.rint(ds.images.numpy() * 255).astype(np.uint8), labels=ds.labels.numpy())
    five = ds.select(torch.nonzero(ds.labels < 5).view(-1))
    five.class_names = five.class_names[:5]
    f = {"data": str(root / "digits.npz")}
    for name, data, seed in (("c10", ds, 0), ("other", ds, 1), ("c5", five, 0), ("colour", colourise(ds, 0), 0)):
        f[name] = str(root / f"{name}.pt")
        save_classifier(train_classifier(data, "mlp", epochs=1, batch_size=32, seed=seed, device="cpu"), f[name])
    f["inv"] = str(root / "inv.pt")
    clf = load_classifier(f["c10"])
    tiny = dict(steps=2, batch_size=8, nz=8, ngf=8, device="cpu", progress=False, backend="torch", eval_per_class=1)
    invert(clf, 10, (1, 8, 8), checkpoint=f["inv"], select=1, **tiny)
    return f


def _run(capsys, *argv):
    """``main(argv)``: the exit status and stderr."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


EVAL = ["--backend", "torch", "--device", "cpu", "--quiet", "--n-per-class", "2"]


def test_evaluate_refuses_classifiers_that_do_not_fit(files, tmp_path, capsys):
    f, out = files, tmp_path / "e"
    cases = [
        (
            ["--inversion", f["inv"], "--eval-classifier", f["c5"]],
            f"--eval-classifier {f['c5']} has 5 classes, the data have 10",
        ),
        (["--images", f["data"], "--classifier", f["c5"]], f"--classifier {f['c5']} has 5 classes, the data have 10"),
        (
            ["--images", f["data"], "--eval-classifier", f["colour"]],
            f"--eval-classifier {f['colour']} takes images of shape [3, 8, 8] (3 channel(s)), the data are [1, 8, 8] (1 channel(s))",
        ),
        (
            ["--inversion", f["inv"], "--classifier", f["c5"]],
            f"--classifier {f['c5']} does not fit --inversion {f['inv']}: the classifier has 5 classes",
        ),
    ]
    for args, reason in cases:
        code, err = _run(capsys, "evaluate", *args, "--data", f["data"], "--out", out, *EVAL)
        assert code == 1 and reason in err and "out of bounds" not in err, err


def test_evaluate_reads_a_png_sample_folder(files, tmp_path, capsys):
    sample = ["sample", "--inversion", files["inv"], "--n-per-class", "2", "--device", "cpu", "--quiet", "--out"]
    assert _run(capsys, *sample, tmp_path / "pngs")[0] == 0
    assert _run(capsys, *sample, tmp_path / "s.npz")[0] == 0
    for got, want in zip(load_sample(tmp_path / "pngs"), load_sample(tmp_path / "s.npz")):
        np.testing.assert_array_equal(got, want)  # class by class: the order of --n-per-class
    code, err = _run(
        capsys, "evaluate", "--images", tmp_path / "pngs", "--data", files["data"], "--out", tmp_path / "e", *EVAL
    )
    assert code == 0, err
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["num_generated"] == 20
    code, err = _run(capsys, "evaluate", "--images", tmp_path, "--data", files["data"], "--out", tmp_path / "e", *EVAL)
    assert code == 1 and f"{tmp_path} is a folder without a readable samples.json" in err


def test_files_that_are_not_checkpoints_are_named(files, tmp_path, capsys):
    for name, content in (("random.pt", bytes(range(256)) * 3), ("pickle.pt", b"\x80\x02" + bytes(200))):
        bad = tmp_path / name
        bad.write_bytes(content)
        for argv in (
            ["evaluate", "--images", files["data"], "--classifier", bad, "--out", tmp_path / "e", *EVAL],
            ["sample", "--inversion", bad, "--out", tmp_path / "s.npz"],
            ["invert", "--classifier", files["c10"], "--resume", bad, "--out", tmp_path / "i.pt", *TINY],
        ):
            code, err = _run(capsys, *argv)
            assert code == 1 and f"{bad} is not a valid tldr_fast" in err, err
            assert "weights_only" not in err and "False" not in err  # never the advice to unpickle anything


def test_cli_options_are_named(files, tmp_path, capsys):
    code, err = _run(capsys, "sample", "--inversion", files["inv"], "--select", "4", "--out", tmp_path / "s.npz")
    assert code == 1 and "--select 4 needs --classifier" in err and "Inversion.load" not in err, err
    blocker = tmp_path / "notes.py"
    blocker.write_text("")
    for argv in (
        ["sample", "--inversion", files["inv"], "--out", blocker / "s.npz"],
        ["sample", "--inversion", files["inv"], "--out", blocker / "pngs"],
        ["evaluate", "--images", files["data"], "--data", files["data"], "--out", blocker / "e", *EVAL],
        ["invert", "--classifier", files["c10"], "--out", blocker / "x.pt", *TINY],
    ):
        code, err = _run(capsys, *argv)
        assert code == 1 and f"{blocker} is a file, not a folder" in err and "File exists" not in err, err


def test_cli_resume_against_another_classifier(files, tmp_path, capsys):
    run = tmp_path / "run.pt"
    invert = [
        "invert",
        "--out",
        run,
        "--steps",
        "2",
        "--set",
        "ngf=8",
        "--set",
        "nz=8",
        "--set",
        "eval_per_class=1",
        *TINY,
    ]
    assert _run(capsys, *invert, "--classifier", files["c10"])[0] == 0
    code, err = _run(capsys, *invert, "--classifier", files["other"], "--resume", run, "--steps", "3")
    assert code == 1 and f"{run} was trained against another classifier" in err and "--allow-other-classifier" in err
    code, err = _run(
        capsys, *invert, "--classifier", files["other"], "--resume", run, "--steps", "3", "--allow-other-classifier"
    )
    assert code == 0, err


def test_demo_end_to_end(tmp_path):
    """The embedded demo on a tiny budget, through the console: files, JSON fields, PNG, then the cache."""
    out, cache = tmp_path / "demo", tmp_path / "cache"
    args = [
        "demo",
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
        "--train-per-class",
        "10",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--n-per-class",
        "3",
        "--grid-per-class",
        "3",
        "--device",
        "cpu",
        "--quiet",
        "--judge-train-per-class",
        "20",
        "--judge-epochs",
        "1",
        "--teach-per-class",
        "4",
        "--student-steps",
        "5",
    ]  # no --backend: the default a user gets
    r = _cli(*args, "--steps", "6")
    assert r.returncode == 0, r.stderr
    assert {p.name for p in out.iterdir()} == {
        "metrics.json",
        "grid.png",
        "summary.txt",
        "classifier.pt",
        "inversion.pt",
        "report.html",
        "report.json",
        "grids",
        "cache",
        "audit-state.json",
    }
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_generated"] == 30 and m["num_train"] == 100 and m["train_source"] == "mnist:train"
    assert set(m["overall"]) >= {
        "nn_ssim_mean",
        "reconstructed_nn",
        "reconstructed_matched",
        "target_confidence",
        "attack_accuracy",
        "same_class_ssim_mean",
        "train_control_ssim_mean",
        "held_out_ssim_mean",
        "leakage_gap",
        "closer_to_train",
        "n_train_matched",
        "nn_ssim_ci_mean",
        "cas",
        "real_curve",
        "worth_real_per_class",
        "distill_accuracy",
        "precision",
        "recall",
        "density",
        "coverage",
        "feature_nn_ratio",
    }
    teach = ("cas", "distill_accuracy", "feature_nn_ratio")
    assert m["overall"]["precision"] is None  # 3 images per class: k = 3 needs more than 3 of each
    assert all(
        m["overall"][k] is not None
        for k in ("attack_accuracy", "same_class_ssim_mean", "leakage_gap", "held_out_ssim_mean", *teach)
    )
    assert m["overall"]["teach_images"] == 40 and set(m["overall"]["real_curve"]) == {"1", "3", "10", "100"}
    assert "what they teach" in (out / "summary.txt").read_text()
    assert len(list(cache.glob("real-curve-*.json"))) == 1
    assert 0 <= m["demo"]["eval_classifier_accuracy"] <= 1 and m["demo"]["eval_classifier"] == "lenet"
    assert m["demo"]["inversion_steps"] == 6 and len(m["images"]) == 30
    assert json.loads((out / "report.json").read_text())["verdict"] == m["demo"]["audit"]
    with Image.open(out / "grid.png") as im:
        assert im.format == "PNG" and im.size == grid_size(10, 3, 28, 28)
    assert "reconstructed (SSIM >= 0.4)" in (out / "summary.txt").read_text()
    assert len(list(cache.glob("demo-*.pt"))) == 1 and len(list(cache.glob("*judge*.pt"))) == 1
    r = _cli(*args, "--steps", "2")
    assert r.returncode == 0 and "reusing the classifier cached" in r.stderr, r.stderr
    assert "training the evaluation classifier" not in r.stderr  # cached too
    # a cached file this version cannot read (another version's model, a damaged file) is retrained
    (stale,) = cache.glob("demo-*.pt")
    stale.write_bytes(b"not a checkpoint")
    r = _cli(*args, "--steps", "2")
    assert r.returncode == 0 and "not reusing the cached classifier" in r.stderr, r.stderr
    r = _cli(*args, "--steps", "2")
    assert r.returncode == 0 and "reusing the classifier cached" in r.stderr, r.stderr


def test_progress_bars_are_throttled_in_logs():
    """A bar writing to a file (a batch job's log) updates at most every LOG_INTERVAL_S seconds; on a
    terminal it keeps tqdm's fast redraw."""
    import io
    import time

    from tqdm import tqdm

    from tldr_fast.progress import LOG_INTERVAL_S, progress_bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    def redraws(make):
        out = io.StringIO()
        bar = make(total=20, file=out)
        for _ in range(20):
            time.sleep(0.03)
            bar.update()
        bar.close()
        return out.getvalue().count("\r")

    assert redraws(tqdm) >= 5  # plain tqdm: a redraw every 0.1 s, each one a line in a log
    assert redraws(progress_bar) <= 2  # throttled: the first line and the final one
    assert progress_bar(total=1, file=Terminal()).mininterval < 1
    assert LOG_INTERVAL_S >= 10


def test_train_classifier_offers_every_architecture_of_the_registry():
    """One list of architectures (tldr_fast.models.ARCHS): the command line trains each, and the leakage
    benchmark's targets are among them (plain_cnn included)."""
    from tldr_fast import leakage
    from tldr_fast.models import ARCHS

    parser = build_parser()
    for arch in ARCHS:
        assert parser.parse_args(["train-classifier", "--data", "digits", "--arch", arch, "--out", "c.pt"]).arch == arch
    assert "plain_cnn" in leakage.ARCHS and set(leakage.ARCHS) <= set(ARCHS)


def test_checkpoint_minutes_reaches_invert():
    from tldr_fast.cli import _invert_overrides

    args = build_parser().parse_args(["invert", "--classifier", "c.pt", "--out", "i.pt", "--checkpoint-minutes", "2.5"])
    assert _invert_overrides(args)["checkpoint_minutes"] == 2.5
    assert "checkpoint_minutes" not in _invert_overrides(
        build_parser().parse_args(["invert", "--classifier", "c.pt", "--out", "i.pt"])
    )


def test_config_options_come_from_the_fields():
    """invert, demo and leakage offer every InversionConfig field a command-line value expresses, typed and
    documented from the field; each is None until given (so --config and a resumed run's own apply)."""
    from tldr_fast.cli import _given_options

    base = {"invert": ["--classifier", "c.pt", "--out", "i.pt"], "demo": [], "leakage": []}
    given = [
        "--eps",
        "0.25",
        "--zoom",
        "3",
        "--diversity",
        "class",
        "--paired",
        "--betas",
        "0.4",
        "0.9",
        "--head",
        "fc",
    ]
    for command, required in base.items():
        assert _given_options(build_parser().parse_args([command, *required])) == {}
        args = build_parser().parse_args([command, *required, *given])
        assert _given_options(args) == {
            "eps": 0.25,
            "zoom": 3,
            "diversity": "class",
            "paired": True,
            "betas": [0.4, 0.9],
            "head": "fc",
        }
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["invert"]
    helps = {a.dest: a.help for a in sub._actions}
    assert helps["zoom"].startswith("Zoom (Plug-In Inversion") and helps["surrogate_relu"]
    assert "(default: 600)" in sub.format_help().replace("\n", " ").split("--steps STEPS")[-1][:80]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["invert", "--classifier", "c.pt", "--out", "i.pt", "--eps", "2"])
