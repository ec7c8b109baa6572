"""Nothing lost, nothing silent: checkpoints never written from a bad state, diverged runs as errors,
resume that applies or refuses changed options, interrupts (Ctrl-C, SIGTERM) at consistent states, output
paths checked before the work, streamed samples, and clear errors for bad input. Each test reproduces a
reported failure."""

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from tldr_fast import Inversion, evaluate, invert
from tldr_fast.checkpoint import atomic_save, load_checkpoint
from tldr_fast.classifier import ClassifierError, fingerprint
from tldr_fast.cli import main as cli_main
from tldr_fast.errors import NoSpaceLeft
from tldr_fast.invert import InversionDiverged
from tldr_fast.models import PlainCNN, save_classifier
from tldr_fast.samples import iter_sample, load_sample, write_samples

TINY = dict(
    steps=6, batch_size=8, nz=8, ngf=8, device="cpu", progress=False, eval_per_class=2, log_every=2, backend="torch"
)
SHAPE = (1, 16, 16)


def plain(seed=0):
    torch.manual_seed(seed)
    m = PlainCNN(list(SHAPE), 3, width=4, feature_dim=8).eval()
    m.tldr_meta = {"mean": [0.2], "std": [0.3], "input_shape": list(SHAPE)}
    return m


class SignalAt(nn.Module):
    """A classifier that sends its own process ``sig`` during its ``at``-th forward (a Ctrl-C mid-step)."""

    def __init__(self, sig, at):
        super().__init__()
        self.net, self.sig, self.at, self.calls = plain(), sig, at, 0
        self.head = self.net.head
        self.tldr_meta = self.net.tldr_meta

    def forward(self, x):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), self.sig)
        return self.net(x)


# --- checkpoints ----------------------------------------------------------------------------------------


def test_a_non_finite_run_never_overwrites_a_good_checkpoint(tmp_path):
    ckpt = tmp_path / "run.pt"
    invert(plain(), 3, SHAPE, checkpoint=ckpt, **TINY)
    good = ckpt.read_bytes()
    with pytest.raises(FloatingPointError, match="non-finite"):
        invert(plain(), 3, SHAPE, resume=ckpt, steps=12, tv=1e38, checkpoint_every=1)  # the loss overflows to inf
    assert ckpt.read_bytes() == good  # the good checkpoint is still there
    Inversion.load(ckpt)


def test_loading_a_non_finite_generator_is_an_error(tmp_path):
    inv = invert(plain(), 3, SHAPE, **TINY)
    state = inv.state()
    state["generator"] = {
        k: v.float() * float("nan") if v.is_floating_point() else v for k, v in state["generator"].items()
    }
    bad = tmp_path / "nan.pt"
    atomic_save({"format": "tldr_fast.inversion/1", **state}, bad)
    with pytest.raises(ValueError, match="not finite"):
        Inversion.load(bad)
    with pytest.raises(ValueError, match="not finite"):
        invert(plain(), 3, SHAPE, resume=bad, steps=8)


def test_a_diverged_run_is_an_error(tmp_path):
    ckpt = tmp_path / "run.pt"
    with pytest.raises((InversionDiverged, FloatingPointError), match="diverged|non-finite"):
        invert(plain(), 3, SHAPE, checkpoint=ckpt, **{**TINY, "lr": 1e6, "steps": 30, "log_every": 30})
    assert not ckpt.exists()  # nothing saved from the degenerate state


def test_resume_applies_a_new_learning_rate(tmp_path):
    ckpt = tmp_path / "run.pt"
    invert(plain(), 3, SHAPE, checkpoint=ckpt, **TINY)
    invert(plain(), 3, SHAPE, resume=ckpt, steps=8, lr=1e-4)
    state = load_checkpoint(ckpt)
    assert state["config"]["lr"] == 1e-4
    assert all(g["lr"] == 1e-4 for g in state["optimizer"]["param_groups"])  # applied, not only recorded


def test_resume_refuses_another_generator_layout(tmp_path):
    ckpt = tmp_path / "run.pt"
    invert(plain(), 3, SHAPE, checkpoint=ckpt, **TINY)
    with pytest.raises(ValueError, match="layout.*ngf"):
        invert(plain(), 3, SHAPE, resume=ckpt, steps=8, ngf=16)


def test_resume_refuses_another_classifier(tmp_path, capsys):
    ckpt = tmp_path / "run.pt"
    invert(plain(), 3, SHAPE, checkpoint=ckpt, **TINY)
    with pytest.raises(ValueError, match=f"{ckpt} was trained against another classifier.*--allow-other-classifier"):
        invert(plain(seed=1), 3, SHAPE, resume=ckpt, steps=8)
    assert load_checkpoint(ckpt)["step"] == 6  # nothing was trained or saved
    resumed = invert(plain(seed=1), 3, SHAPE, resume=ckpt, steps=8, allow_other_classifier=True)  # asked for
    assert resumed.step == 8 and load_checkpoint(ckpt)["classifier"] == fingerprint(plain(seed=1))
    state = load_checkpoint(ckpt)
    del state["classifier"]  # as a checkpoint of an older version
    atomic_save(state, ckpt)
    capsys.readouterr()
    assert invert(plain(), 3, SHAPE, resume=ckpt, steps=10).step == 10
    assert f"{ckpt} does not record which classifier" in capsys.readouterr().err


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda s: s["config"].update(batch_size="16"), r"config: batch_size must be an int, got '16'"),
        (lambda s: s["config"].pop("weights"), r"config field 'weights' must be a dict"),
        (lambda s: s["config"]["weights"].update(tv="x"), r"config: weight 'tv' must be a finite number"),
        (lambda s: s.update(step="3"), r"field 'step' must be an int >= 0, got '3'"),
        (lambda s: s.update(image_shape=[1, 16]), r"field 'image_shape' must be \[C, H, W\]"),
        (lambda s: s.update(history=[1]), r"field 'history' must be a dict of lists"),
    ],
)
def test_a_hand_edited_checkpoint_names_the_file_and_the_field(inv, tmp_path, edit, match):
    path = tmp_path / "edited.pt"
    state = {"format": "tldr_fast.inversion/1", **inv.state()}
    edit(state)
    atomic_save(state, path)
    for load in (lambda: Inversion.load(path), lambda: invert(plain(), 3, SHAPE, resume=path)):
        with pytest.raises(ValueError, match=match) as e:
            load()
        assert str(path) in str(e.value)


def test_fields_of_a_newer_version_are_a_warning(inv, tmp_path, capsys):
    path = tmp_path / "newer.pt"
    state = {"format": "tldr_fast.inversion/1", **inv.state(), "bogus": 1}
    state["config"]["bogus"] = 2
    state["config"]["weights"]["new_term"] = 1.0
    state["config"]["schedules"] = {"new_term": {"start": 0.0, "end": 1.0}}
    atomic_save(state, path)
    loaded = Inversion.load(path)
    assert loaded.config == inv.config and loaded.step == inv.step
    err = capsys.readouterr().err
    for where, name in (
        ("", "bogus"),
        ("config ", "bogus"),
        ("config.weights ", "new_term"),
        ("config.schedules ", "new_term"),
    ):
        assert f"warning: {path}: ignoring {where}field(s) this version does not know: {name}" in err, err
    assert invert(plain(), 3, SHAPE, resume=path, steps=8).step == 8


def test_unwritable_checkpoint_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    calls = []

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = plain()
            self.head = self.net.head

        def forward(self, x):
            calls.append(1)
            return self.net(x)

    with pytest.raises(NotADirectoryError, match=f"cannot write .*: {blocker} is a file, not a folder"):
        invert(Counting(), 3, SHAPE, checkpoint=blocker / "run.pt", **TINY)
    assert not calls  # not even the probe ran
    with pytest.raises(IsADirectoryError):
        invert(plain(), 3, SHAPE, checkpoint=tmp_path, **TINY)


def test_stale_temporary_files_are_cleaned(tmp_path):
    ckpt = tmp_path / "run.pt"
    stale = tmp_path / ".run.pt.abc123.tmp"  # what a kill -9 during a write leaves
    stale.write_bytes(b"half a checkpoint")
    invert(plain(), 3, SHAPE, checkpoint=ckpt, **TINY)
    assert ckpt.exists() and not stale.exists()


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(IsADirectoryError, match="directory"):
        Inversion.load(tmp_path)
    partial = tmp_path / "partial.pt"
    atomic_save({"format": "tldr_fast.inversion/1", "step": 3}, partial)
    with pytest.raises(ValueError, match="lacks generator"):
        Inversion.load(partial)


# --- interrupts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_step_saves_the_state_before_it_and_resumes_exactly(tmp_path, sig):
    full = invert(plain(), 3, SHAPE, **TINY)
    ckpt = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        invert(SignalAt(sig, at=4), 3, SHAPE, checkpoint=ckpt, **TINY)  # 2 probe forwards, steps 0 and 1 (signal)
    assert load_checkpoint(ckpt)["step"] == 2  # the step in progress finished, then the run stopped
    resumed = invert(plain(), 3, SHAPE, resume=ckpt)
    for (name, p), q in zip(full.generator.state_dict().items(), resumed.generator.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=name)  # BatchNorm statistics included


def test_an_interrupt_after_training_keeps_the_run(tmp_path):
    ckpt = tmp_path / "run.pt"
    # forwards: 2 of the probe, 6 steps, then the final metrics' batches: interrupt during the metrics
    with pytest.raises(KeyboardInterrupt):
        invert(SignalAt(signal.SIGINT, at=2 + 6 + 1), 3, SHAPE, checkpoint=ckpt, **{**TINY, "checkpoint_every": 0})
    assert load_checkpoint(ckpt)["step"] == 6


def test_a_raised_interrupt_mid_step_restores_the_statistics(tmp_path):
    class Raise(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.calls = plain(), 0
            self.head = self.net.head
            self.tldr_meta = self.net.tldr_meta

        def forward(self, x):
            self.calls += 1
            if self.calls == 5:  # 2 probe forwards, steps 0 and 1, then mid-step 2
                raise KeyboardInterrupt
            return self.net(x)

    full = invert(plain(), 3, SHAPE, **TINY)
    ckpt = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        invert(Raise(), 3, SHAPE, checkpoint=ckpt, **TINY)
    assert load_checkpoint(ckpt)["step"] == 2
    resumed = invert(plain(), 3, SHAPE, resume=ckpt)
    for (name, p), q in zip(full.generator.state_dict().items(), resumed.generator.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=name)


# --- input checks -------------------------------------------------------------------------------------------


def test_image_shape_must_be_the_classifiers():
    with pytest.raises(ClassifierError, match=r"trained on images of shape \(1, 16, 16\)"):
        invert(plain(), 3, (1, 24, 24), **TINY)


class DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(256, 3)

    def forward(self, x):
        return {"logits": self.fc(x.flatten(1))}


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: invert(plain(), 3, SHAPE, **{**TINY, "lr": float("inf")}), ValueError, "lr"),
        (lambda: invert(plain(), 3, SHAPE, **{**TINY, "lr": True}), ValueError, "lr"),
        (lambda: invert(plain(), 3, SHAPE, **{**TINY, "tv": float("inf")}), ValueError, "tv"),
        (lambda: invert(plain(), 3, SHAPE, **{**TINY, "schedules": {"tv": (0.0, float("nan"))}}), ValueError, "Ramp"),
        (lambda: invert(DictNet(), 3, SHAPE, **TINY), ClassifierError, "dict"),
        (lambda: invert(plain(), 3, SHAPE, **{**TINY, "device": "meta"}), ValueError, "device"),
        (lambda: invert(plain(), 3, SHAPE, **{**TINY, "device": "gpu7"}), ValueError, "device"),
    ],
)
def test_bad_input_is_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.fixture(scope="module")
def inv():
    return invert(plain(), 3, SHAPE, **TINY)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_per_class": -3}, "n_per_class"),
        ({"n_per_class": 0}, "n_per_class"),
        ({"labels": ["3"]}, "ints"),
        ({"labels": [1.5]}, "ints"),
        ({"labels": [[1, 2]]}, "ints"),
        ({"labels": torch.tensor([[1, 2]])}, "one-dimensional"),
        ({"labels": torch.tensor([0.5])}, "integers"),
        ({"labels": [7]}, r"\[0, 2\]"),
    ],
)
def test_bad_labels(inv, kwargs, match):
    with pytest.raises(ValueError, match=match):
        inv.sample(**kwargs)


def test_numpy_labels_work(inv):
    assert inv.sample(labels=np.array([0, 2])).shape == (2, *SHAPE)


def test_evaluate_needs_a_positive_count(inv):
    from tldr_fast.data import load_digits

    with pytest.raises(ValueError, match="n_per_class"):
        evaluate(inv, load_digits(), n_per_class=0)


# --- samples on disk ----------------------------------------------------------------------------------------


def test_npz_is_streamed_and_any_case(inv, tmp_path):
    labels = inv.labels(n_per_class=5)
    out = write_samples(inv, tmp_path / "S.NPZ", labels, batch_size=4)
    assert out.is_file()
    with np.load(out) as d:
        assert (
            d["images"].shape == (15, *SHAPE)
            and d["images"].dtype == np.uint8
            and d["labels"].tolist() == labels.tolist()
        )
        expected = ((inv.sample(labels=labels) + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
        assert np.abs(d["images"].astype(int) - expected.astype(int)).max() <= 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_png_folder_resumes_and_replaces_another_sample(inv, tmp_path):
    out = tmp_path / "pngs"
    big = inv.labels(n_per_class=6)
    write_samples(inv, out, big, batch_size=4)
    assert len(list(out.glob("*/*.png"))) == 18
    first = (out / "1" / "00002.png").stat().st_mtime_ns
    write_samples(inv, out, big, batch_size=4)  # the same sample again: nothing regenerated
    assert (out / "1" / "00002.png").stat().st_mtime_ns == first
    write_samples(inv, out, inv.labels(n_per_class=2), batch_size=4)  # a smaller, different sample
    assert sorted(p.name for p in (out / "0").glob("*.png")) == ["00000.png", "00001.png"]
    with pytest.raises(ValueError, match="empty"):
        write_samples(inv, "", big)


def test_sharded_npz_checks_its_shards_and_replaces_another_sample(inv, tmp_path):
    labels = inv.labels(n_per_class=3)
    out = tmp_path / "s.npz"
    for bad in (0, -2, True, 2.0):
        with pytest.raises(ValueError, match="shard_size must be a positive int"):
            write_samples(inv, out, labels, shard_size=bad)
    with pytest.raises(ValueError, match="applies to an .npz"):
        write_samples(inv, tmp_path / "pngs", labels, shard_size=4)
    index = write_samples(inv, out, labels, batch_size=4, shard_size=4)
    assert index == tmp_path / "s-index.json" and not out.exists()
    assert [len(y) for _, y in iter_sample(index)] == [4, 4, 1]
    expected = load_sample(write_samples(inv, tmp_path / "one.npz", labels, batch_size=4))
    for got, want in zip(load_sample(index), expected):
        np.testing.assert_array_equal(got, want)

    other = invert(plain(1), 3, SHAPE, **{**TINY, "steps": 1})  # another inversion's index over these shards
    index.write_text(write_samples(other, tmp_path / "o" / "s.npz", labels, select=1, shard_size=4).read_text())
    with pytest.raises(ValueError, match="s-00000-of-00003.npz is a shard of another sample"):
        load_sample(index)
    write_samples(inv, out, labels, batch_size=4, shard_size=5)  # this sample again, other shards: replaces them all
    assert sorted(p.name for p in tmp_path.glob("s-*")) == [
        "s-00000-of-00002.npz",
        "s-00001-of-00002.npz",
        "s-index.json",
    ]
    for got, want in zip(load_sample(index), expected):
        np.testing.assert_array_equal(got, want)
    (tmp_path / "s-00001-of-00002.npz").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_sample(index)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="neither an .npz nor the index"):
        load_sample(tmp_path / "x.json")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_sample(tmp_path / "absent-index.json")


def test_a_single_npz_under_several_ranks_asks_for_shards(inv, tmp_path, monkeypatch):
    from tldr_fast import distributed

    monkeypatch.setattr(distributed, "world", lambda: (0, 2))  # refused before any collective
    with pytest.raises(ValueError, match="under torchrun give a shard size"):
        write_samples(inv, tmp_path / "s.npz", inv.labels(n_per_class=1))


# --- the command line -----------------------------------------------------------------------------------


def _cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "tldr_fast.cli", *map(str, args)], capture_output=True, text=True, **kw
    )


@pytest.fixture(scope="module")
def clf_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("clf") / "clf.pt"
    from tldr_fast.data import load_dataset, subset
    from tldr_fast.models import train_classifier

    save_classifier(
        train_classifier(subset(load_dataset("mnist:test"), 5, seed=0), "mlp", epochs=1, device="cpu"), path
    )
    return path


COMMON = ("--steps", "4", "--device", "cpu", "--backend", "torch", "--quiet", "--set", "ngf=8", "--set", "nz=8")


def test_cli_resume_keeps_the_runs_options(clf_file, tmp_path):
    out = tmp_path / "x.pt"
    r = _cli("invert", "--classifier", clf_file, "--out", out, "--seed", "3", "--batch-size", "8", *COMMON)
    assert r.returncode == 0, r.stderr
    r = _cli("invert", "--classifier", clf_file, "--resume", out, "--out", out, "--steps", "6", "--quiet")
    assert r.returncode == 0, r.stderr
    cfg = load_checkpoint(out)["config"]
    assert (cfg["seed"], cfg["batch_size"], cfg["steps"], cfg["ngf"], cfg["backend"]) == (3, 8, 6, 8, "torch")


def test_cli_config_file_and_set(clf_file, tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"eps": 0.05, "weights": {"tv": 0.01}, "batch_size": 8}))
    out = tmp_path / "x.pt"
    r = _cli(
        "invert",
        "--classifier",
        clf_file,
        "--out",
        out,
        "--config",
        tmp_path / "run.json",
        "--set",
        "diversity=class",
        *COMMON,
    )
    assert r.returncode == 0, r.stderr
    cfg = load_checkpoint(out)["config"]
    assert (cfg["eps"], cfg["weights"]["tv"], cfg["diversity"]) == (0.05, 0.01, "class")
    r = _cli("invert", "--classifier", clf_file, "--out", out, "--set", "tvv=1", *COMMON)
    assert r.returncode == 1 and "did you mean 'tv'" in r.stderr


def test_cli_unwritable_out_fails_at_once(clf_file, tmp_path):
    blocker = tmp_path / "f"
    blocker.write_text("")
    for args in (
        ["invert", "--classifier", clf_file, "--out", blocker / "x.pt", *COMMON],
        ["train-classifier", "--data", "digits", "--out", blocker / "c.pt", "--epochs", "1", "--quiet"],
    ):
        r = _cli(*args)
        assert r.returncode == 1 and "cannot write" in r.stderr, r.stderr


def test_cli_interrupt_saves_and_says_how_to_resume(clf_file, tmp_path):
    out = tmp_path / "x.pt"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tldr_fast.cli",
            "invert",
            "--classifier",
            str(clf_file),
            "--out",
            str(out),
            "--steps",
            "100000",
            "--device",
            "cpu",
            "--backend",
            "torch",
            "--set",
            "ngf=8",
            "--set",
            "nz=8",
            "--batch-size",
            "8",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = 120
    import time

    start = time.time()
    while time.time() - start < deadline:  # wait for the progress bar: training has started
        if proc.stderr.readable():
            line = proc.stderr.readline()
            if "invert" in line:
                break
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and out.is_file()
    assert load_checkpoint(out)["step"] > 0


def test_cli_quiet_is_quiet(clf_file, tmp_path):
    r = _cli(
        "invert", "--classifier", clf_file, "--out", tmp_path / "x.pt", "--steps", "2", "--set", "ngf=8", "--quiet"
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_cli_sample_outputs(clf_file, tmp_path):
    inv_file = tmp_path / "x.pt"
    assert _cli("invert", "--classifier", clf_file, "--out", inv_file, *COMMON).returncode == 0
    r = _cli("sample", "--inversion", inv_file, "--out", tmp_path / "S.NPZ", "--n-per-class", "2", "--quiet")
    assert r.returncode == 0 and (tmp_path / "S.NPZ").is_file(), r.stderr
    r = _cli("sample", "--inversion", inv_file, "--out", "", "--quiet")
    assert r.returncode == 1 and "empty" in r.stderr
    r = _cli(
        "sample", "--inversion", inv_file, "--out", tmp_path / "p", "--n-per-class", "2", "--select", "3", "--quiet"
    )
    assert r.returncode == 1 and "classifier" in r.stderr  # selecting needs the target
    r = _cli(
        "sample",
        "--inversion",
        inv_file,
        "--classifier",
        clf_file,
        "--out",
        tmp_path / "p",
        "--n-per-class",
        "2",
        "--select",
        "3",
        "--quiet",
    )
    assert r.returncode == 0 and len(list((tmp_path / "p").glob("*/*.png"))) == 20, r.stderr


# --- writes: outputs that are inputs, arguments before files, atomic files, checked shards, full disks ---------


def _files(folder):
    """``{relative path: bytes}`` of every file under ``folder`` (hidden temporary files included)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _temps(folder):
    return sorted(p.name for p in folder.rglob("*.tmp"))


def _refused(capsys, argv, kept, options):
    before = kept.read_bytes()
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert all(o in err for o in options) and "destroy that input" in err, err
    assert kept.read_bytes() == before


def test_cli_refuses_an_output_that_is_one_of_its_inputs(tmp_path, capsys):
    clf = tmp_path / "clf.pt"
    clf.write_bytes(b"a trained classifier")  # refused before anything is read
    (tmp_path / "link.pt").symlink_to(clf)
    cfg = tmp_path / "run.json"
    cfg.write_text("{}")
    data = tmp_path / "data.npz"
    data.write_bytes(b"a data set")
    index = tmp_path / "s-index.json"
    index.write_text("{}")
    (tmp_path / "eval").mkdir()
    images = tmp_path / "eval" / "metrics.json"
    images.write_text("{}")
    cache = tmp_path / "cache"
    cache.mkdir()
    cached = cache / "demo-cnn-mnist-100pc-10ep-seed0.pt"
    cached.write_bytes(b"the demo's cached classifier")
    (tmp_path / "demo").mkdir()
    os.link(cached, tmp_path / "demo" / "classifier.pt")
    cases = [
        (["invert", "--classifier", clf, "--out", clf], clf, ["--out", "--classifier"]),
        (["invert", "--classifier", clf, "--out", tmp_path / "link.pt"], clf, ["--out", "--classifier"]),
        (["invert", "--classifier", clf, "--config", cfg, "--out", cfg], cfg, ["--out", "--config"]),
        (["train-classifier", "--data", data, "--out", data], data, ["--out", "--data"]),
        (["train-classifier", "--data", f"{data}:test", "--out", data], data, ["--out", "--data"]),
        (["sample", "--inversion", clf, "--out", clf], clf, ["--out", "--inversion"]),
        (["sample", "--inversion", index, "--out", tmp_path / "s.npz", "--shard-size", "2"], index, ["--inversion"]),
        (["evaluate", "--images", images, "--out", tmp_path / "eval"], images, ["--out", "--images"]),
        (
            [
                "evaluate",
                "--inversion",
                clf,
                "--eval-classifier",
                tmp_path / "x" / ".." / "eval" / "metrics.json",
                "--out",
                tmp_path / "eval",
            ],
            images,
            ["--out", "--eval-classifier"],
        ),
        (["demo", "--cache-dir", cache, "--out", tmp_path / "demo"], cached, ["--out", "--cache-dir"]),
    ]
    for argv, kept, options in cases:
        _refused(capsys, [str(a) for a in argv], kept, options)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": -4}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"seed": "7"}, "seed"),
        ({"labels": [7]}, r"\[0, 2\]"),
    ],
)
def test_write_samples_checks_every_argument_before_touching_a_file(inv, tmp_path, kwargs, match):
    labels = inv.labels(n_per_class=2)
    write_samples(inv, tmp_path / "pngs", labels, batch_size=4)
    write_samples(inv, tmp_path / "s.npz", labels, batch_size=4, shard_size=4)
    write_samples(inv, tmp_path / "one.npz", labels, batch_size=4)
    before = _files(tmp_path)
    other = inv.labels(n_per_class=3)  # another sample: a valid call would replace the files
    for out, shards in ((tmp_path / "pngs", None), (tmp_path / "s.npz", 4), (tmp_path / "one.npz", None)):
        with pytest.raises(ValueError, match=match):
            write_samples(inv, out, **{"labels": other, "shard_size": shards, **kwargs})
    assert _files(tmp_path) == before


def _sharded(inv, folder, n_per_class=3):
    """A sample of ``n_per_class`` x 3 images in shards of 4 (3 shards); returns its index."""
    return write_samples(inv, folder / "s.npz", inv.labels(n_per_class=n_per_class), batch_size=4, shard_size=4)


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda shards: shards[:1] + shards[2:],
            r"shard entry 1 \(s-00002-of-00003.npz\) starts at image 8.* end at 4",
        ),
        (lambda shards: shards[:1] + shards, r"shard entry 1 \(s-00000-of-00003.npz\) starts at image 0.* end at 4"),
        (lambda shards: shards[:2], "the shard entries hold 8 images, but the index's count is 9"),
        (lambda shards: shards[:1] + [{**shards[1], "start": "4"}] + shards[2:], "shard entry 1 .* needs"),
    ],
)
def test_load_sample_checks_the_index_entries(inv, tmp_path, edit, match):
    index = _sharded(inv, tmp_path)
    data = json.loads(index.read_text())
    index.write_text(json.dumps({**data, "shards": edit(data["shards"])}))
    with pytest.raises(ValueError, match=rf"s-index.json: {match}"):
        load_sample(index)


def _flip(path, at=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_shard_is_named_on_load_and_written_again_on_resume(inv, tmp_path, capsys):
    index = _sharded(inv, tmp_path)
    assert all(len(s["sha256"]) == 64 for s in json.loads(index.read_text())["shards"])
    good = _files(tmp_path)
    damaged = tmp_path / "s-00001-of-00003.npz"
    _flip(damaged)
    with pytest.raises(ValueError, match="s-00001-of-00003.npz does not match the sha256 in the index"):
        load_sample(index)
    kept = {p: (tmp_path / p).stat().st_mtime_ns for p in ("s-00000-of-00003.npz", "s-00002-of-00003.npz")}
    capsys.readouterr()
    _sharded(inv, tmp_path)  # the same sample again: the damaged shard is written again, and said so
    assert "s-00001-of-00003.npz does not match the sha256 in the index" in capsys.readouterr().err
    assert _files(tmp_path) == good
    assert {p: (tmp_path / p).stat().st_mtime_ns for p in kept} == kept  # the intact shards were kept
    load_sample(index)

    one = write_samples(inv, tmp_path / "one.npz", inv.labels(n_per_class=3), batch_size=4)
    _flip(one)
    with pytest.raises(ValueError, match="one.npz is not a readable sample .npz"):
        load_sample(one)


def test_a_damaged_shard_of_an_unfinished_index_is_found_by_its_crc(inv, tmp_path, capsys):
    index = _sharded(inv, tmp_path)
    good = _files(tmp_path)
    data = json.loads(index.read_text())  # as the index is before the last shard is written: no checksums
    index.write_text(
        json.dumps({**data, "shards": [{k: v for k, v in s.items() if k != "sha256"} for s in data["shards"]]})
    )
    _flip(tmp_path / "s-00000-of-00003.npz", at=0.3)
    _sharded(inv, tmp_path)
    assert "s-00000-of-00003.npz" in capsys.readouterr().err
    assert _files(tmp_path) == good


def test_temporary_files_of_a_killed_write_are_removed_and_nothing_else(inv, tmp_path):
    labels = inv.labels(n_per_class=2)
    ours = [".one.npz.12345.tmp", ".one.npz.k2x_9q1a.tmp", ".s-00001-of-00002.npz.77.tmp", ".s-index.json.5.tmp"]
    ours += ["pngs/1/.00001.png.tmp", "pngs/1/.00000.png.ab12cd34.tmp", "pngs/.samples.json.4242.tmp"]
    theirs = [".one.npz.backup", "one.npz.tmp", ".one.npz.my copy.tmp", ".other.npz.123.tmp", "pngs/1/.notes.tmp"]
    for name in ours + theirs:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"half a file")
    write_samples(inv, tmp_path / "one.npz", labels, batch_size=4)
    write_samples(inv, tmp_path / "s.npz", labels, batch_size=4, shard_size=4)
    write_samples(inv, tmp_path / "pngs", labels, batch_size=4)
    assert _temps(tmp_path) == sorted(Path(n).name for n in theirs if n.endswith(".tmp"))
    assert all((tmp_path / n).exists() for n in theirs)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs mounted for the test, unmounted after it whatever happens (mounting needs root:
    skipped where it is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True
        )
    except FileNotFoundError:
        pytest.skip("no mount command: the full-disk cases need a small tmpfs")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for the full-disk cases (needs root): {r.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=False)


def fill(disk, leave_pages=0):
    """Fill ``disk`` up with 4 KiB files, then free ``leave_pages`` of them."""
    fillers = []
    try:
        while True:
            fillers.append(disk / f"filler-{len(fillers)}")
            with open(fillers[-1], "wb", buffering=0) as f:
                f.write(b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    for f in fillers[:leave_pages]:
        f.unlink()


def test_a_full_disk_leaves_the_previous_evaluation_files(small_disk):
    from tldr_fast.data import load_digits, subset

    report = evaluate(torch.rand(6, 1, 8, 8), subset(load_digits(), 2, seed=0), torch.tensor([0, 0, 1, 1, 2, 2]))
    report.save_json(small_disk / "metrics.json", {"run": 1})
    report.save_grid(small_disk / "grid.png")
    good = _files(small_disk)
    fill(small_disk)
    with pytest.raises(NoSpaceLeft, match="no space left on device while writing .*metrics.json; the previous file"):
        report.save_json(small_disk / "metrics.json", {"run": 2, "padding": "x" * 10_000})
    with pytest.raises(NoSpaceLeft, match="grid.png; the previous grid is intact"):
        report.save_grid(small_disk / "grid.png")
    assert {k: v for k, v in _files(small_disk).items() if not k.startswith("filler")} == good
    assert json.loads((small_disk / "metrics.json").read_text())["run"] == 1


def test_a_full_disk_during_a_checkpoint_save_is_named_and_keeps_the_checkpoint(inv, small_disk):
    ckpt = small_disk / "run.pt"
    inv.save(ckpt)
    good = ckpt.read_bytes()
    fill(small_disk, leave_pages=1)  # room for part of the checkpoint only
    with pytest.raises(
        NoSpaceLeft, match=f"no space left on device while writing {ckpt}; the previous checkpoint is intact"
    ):
        inv.save(ckpt)
    assert ckpt.read_bytes() == good and not _temps(small_disk)


def test_a_full_disk_mid_checkpoint_is_named_where_it_cannot_be_mounted(inv, tmp_path, monkeypatch):
    """The same, by a file that refuses writes beyond 2 KiB as a full disk does (always runs)."""
    from tldr_fast import checkpoint

    class Full:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 2048:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    ckpt = tmp_path / "run.pt"
    inv.save(ckpt)
    good = ckpt.read_bytes()
    fdopen = os.fdopen
    monkeypatch.setattr(checkpoint.os, "fdopen", lambda *a, **k: Full(fdopen(*a, **k)))
    with pytest.raises(NoSpaceLeft, match=f"while writing {ckpt}; the previous checkpoint is intact") as e:
        inv.save(ckpt)
    assert "unexpected pos" in str(e.value.__cause__) and e.value.errno == errno.ENOSPC  # torch's zip writer's error
    assert ckpt.read_bytes() == good and not _temps(tmp_path)


def test_a_full_disk_leaves_no_temporary_png_files(inv, small_disk):
    fill(small_disk, leave_pages=3)  # the manifest and two images
    with pytest.raises(NoSpaceLeft, match=r"while writing .*\.png"):
        write_samples(inv, small_disk / "pngs", inv.labels(n_per_class=8), batch_size=4)
    assert not _temps(small_disk)


def test_a_failed_png_write_leaves_no_temporary_file(inv, tmp_path, monkeypatch):
    """The same, by PNG writes that fail half-way as on a full disk (always runs)."""
    from PIL import Image

    def save(self, fp, *args, **kwargs):
        with open(fp, "wb") if isinstance(fp, (str, os.PathLike)) else contextlib.nullcontext(fp) as f:
            f.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", save)
    with pytest.raises(NoSpaceLeft, match=r"while writing .*00000\.png; no partial file was left"):
        write_samples(inv, tmp_path / "pngs", inv.labels(n_per_class=2), batch_size=4)
    assert not _temps(tmp_path) and not list(tmp_path.rglob("*.png"))
