"""Nothing lost, nothing silent: checkpoints never written from a bad state, diverged runs as errors,
resume that applies or refuses changed options, interrupts (Ctrl-C, SIGTERM) at consistent states, output
paths checked before the work, streamed samples, and clear errors for bad input. Each test reproduces a
reported failure."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from tldr_fast import Inversion, evaluate, invert
from tldr_fast.checkpoint import atomic_save, load_checkpoint
from tldr_fast.classifier import ClassifierError, fingerprint
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
