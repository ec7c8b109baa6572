"""tldr_fast.audit: the statistics on constructed cases with known answers, bad inputs, resume, the report."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from tldr_fast import audit as audit_fn
from tldr_fast.audit import (
    check_inputs,
    closer_to_train_effect,
    excess_matches,
    split_unseen,
    statistics,
)
from tldr_fast.classifier import ClassifierError
from tldr_fast.data import ImageDataset
from tldr_fast.evaluate import closer_probability
from tldr_fast.models import build_classifier, save_classifier

K, SHAPE = 3, (1, 12, 12)


def _data(n_per_class: int, seed: int, source: str) -> ImageDataset:
    """Smooth random images (blurred noise), ``n_per_class`` of each of K classes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.avg_pool2d(torch.rand(K * n_per_class, 1, 16, 16, generator=g), 5, 1)[:, :, :12, :12]
    x = (x - x.amin((1, 2, 3), keepdim=True)) / (x.amax((1, 2, 3), keepdim=True) - x.amin((1, 2, 3), keepdim=True))
    labels = torch.arange(K).repeat_interleave(n_per_class)
    return ImageDataset(x.contiguous(), labels, ["a", "b", "c"], torch.arange(len(labels)), source)


def _case(kind: str):
    train, held = _data(10, 0, "train"), _data(20, 1, "held")
    real, control = split_unseen(held, 10, seed=0)
    if kind == "train copies":
        x, y = train.images.clone(), train.labels.clone()
    elif kind == "held-out copies":
        x, y = control.images.clone(), control.labels.clone()
    else:  # noise
        g = torch.Generator().manual_seed(5)
        x, y = torch.rand(30, *SHAPE, generator=g), torch.arange(K).repeat_interleave(10)
    return statistics(x, y, train, real, control, tau=0.4, seed=0, resamples=500, backend="torch")


def test_statistics_find_copies_of_training_images():
    s = _case("train copies")
    e = s["closer_to_train"]
    assert e["generated"] == 1.0 and e["interval"][0] > 0 and e["p_value"] < 0.01
    assert s["verdict_kind"] == "leakage" and s["verdict"].startswith("Leakage")
    assert s["excess_matches"]["train_matched"] == 30 and s["excess_matches"]["interval"][0] > 0


def test_statistics_copies_of_held_out_images_are_not_leakage():
    s = _case("held-out copies")
    e = s["closer_to_train"]
    assert e["generated"] == 0.0 and e["interval"][1] < 0
    assert s["verdict_kind"] == "closer to unseen images"
    assert s["excess_matches"]["excess"] < 0 and s["excess_matches"]["interval"][1] < 0


def test_statistics_noise_is_no_measurable_leakage():
    s = _case("noise")
    lo, hi = s["closer_to_train"]["interval"]
    assert lo <= 0 <= hi and s["verdict_kind"] == "no measurable leakage"
    assert s["verdict"].startswith("No measurable leakage at this budget")
    assert s["excess_matches"]["train_matched"] == 0


def test_statistics_reuse_the_control_that_evaluate_computed():
    """The generated images' control from ``evaluate(held_out=...)`` (its SSIM matrices) gives the statistics
    that computing it again gives: the same draws, so no second SSIM pass is needed."""
    from tldr_fast import evaluate

    train, held = _data(10, 0, "train"), _data(20, 1, "held")
    real, control = split_unseen(held, 10, seed=3)
    g = torch.Generator().manual_seed(7)
    x, y = torch.rand(15, *SHAPE, generator=g), torch.arange(K).repeat_interleave(5)
    report = evaluate(x, train, y, value_range=(0.0, 1.0), held_out=control, control_seed=3, backend="torch")
    common = dict(tau=0.4, seed=3, resamples=200, backend="torch")
    reused = statistics(x, y, train, real, control, generated_parts=report.control, **common)
    assert reused == statistics(x, y, train, real, control, **common)


def test_effect_against_its_definitions():
    # all of 3 generated closer, none of 3 real: of the C(6, 3) = 20 equally likely relabellings only one
    # gives a difference as large, so the permutation p-value is 1/20
    e = closer_to_train_effect(np.ones(3, bool), np.zeros(3, bool), seed=0, resamples=20000)
    assert e["effect"] == 1.0 and e["interval"] == [1.0, 1.0] and abs(e["p_value"] - 0.05) < 0.006
    # the bootstrap interval of a difference of proportions is close to the normal approximation's
    g, r = np.arange(400) < 280, np.arange(400) < 200  # 0.7 and 0.5
    e = closer_to_train_effect(g, r, seed=1, resamples=4000)
    half = 1.96 * np.sqrt(0.7 * 0.3 / 400 + 0.25 / 400)
    assert e["effect"] == pytest.approx(0.2)
    assert e["interval"] == pytest.approx([0.2 - half, 0.2 + half], abs=0.01)
    m = excess_matches(np.array([1, 1, 1, 0], bool), np.array([0, 1, 0, 0], bool))
    assert (m["train_matched"], m["held_out_matched"], m["excess"]) == (3, 1, 2.0)


def test_closer_probability_against_every_draw():
    """The exact probability equals the mean over every pair of m-draws (enumerated), at unequal sizes."""
    from itertools import combinations

    rng = np.random.default_rng(4)
    for big_n, big_m, m in ((5, 6, 3), (7, 4, 2), (4, 4, 4), (6, 5, 1)):
        t, h = rng.random((3, big_n)), rng.random((3, big_m))
        want = [
            np.mean([max(t[i, list(a)]) > max(h[i, list(b)])
                     for a in combinations(range(big_n), m) for b in combinations(range(big_m), m)])
            for i in range(3)
        ]  # fmt: skip
        assert closer_probability(t, h, m) == pytest.approx(want, abs=1e-12)
    # m = N = M: the indicator of the two nearest neighbours
    t, h = rng.random((50, 8)), rng.random((50, 8))
    assert np.array_equal(closer_probability(t, h, 8), (t.max(1) > h.max(1)).astype(float))
    with pytest.raises(ValueError, match="m must be"):
        closer_probability(t, h, 9)


def test_bad_inputs_are_refused():
    train, held = _data(4, 0, "train"), _data(4, 1, "held")
    other = ImageDataset(held.images, held.labels, ["a", "b", "x"], held.indices, "other")
    with pytest.raises(ValueError, match="classes"):
        check_inputs(train, other)
    small = ImageDataset(held.images[:, :, :10, :10].contiguous(), held.labels, held.class_names, held.indices, "s")
    with pytest.raises(ValueError, match="shape"):
        check_inputs(train, small)
    mixed = ImageDataset(
        torch.cat([held.images, train.images[:2]]), torch.cat([held.labels, train.labels[:2]]),
        held.class_names, torch.arange(14), "mixed",
    )  # fmt: skip
    with pytest.raises(ValueError, match="2 of the 14 held-out images"):
        check_inputs(train, mixed)
    kept, n = check_inputs(train, mixed, allow_overlap=True)
    assert n == 2 and len(kept) == 12


def _classifier(classes: int = K):
    torch.manual_seed(0)
    model = build_classifier("mlp", SHAPE, classes)
    model.tldr_meta = {"arch": "mlp", "input_shape": list(SHAPE), "num_classes": classes, "mean": [0.5], "std": [0.5]}
    return model.eval()


TINY = dict(steps=4, batch_size=12, n_per_class=4, real_per_class=3, resamples=100, device="cpu", progress=False)


def test_audit_refuses_before_any_work(tmp_path):
    train, held = _data(6, 0, "train"), _data(8, 1, "held")
    with pytest.raises(ClassifierError, match="classes"):
        audit_fn(_classifier(4), train, held, tmp_path / "a", **TINY)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError, match="out"):
        audit_fn(_classifier(), train, held, blocker / "a", **TINY)
    with pytest.raises(ValueError, match="tau"):
        audit_fn(_classifier(), train, held, tmp_path / "a", tau=2.0, **TINY)
    with pytest.raises(ValueError, match="no test split"):
        audit_fn(_classifier(), train, None, tmp_path / "b", **TINY)
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p != blocker]  # nothing written


def test_audit_writes_the_report_and_a_rerun_reuses_it(tmp_path):
    train, held = _data(6, 0, "train"), _data(8, 1, "held")
    said = []
    r = audit_fn(_classifier(), train, held, tmp_path, say=said.append, **TINY)
    for name in (
        "report.html",
        "report.json",
        "inversion.pt",
        "grids/pairs.png",
        "grids/similarity.png",
        "grids/best.png",
    ):
        assert (tmp_path / name).is_file(), name
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["verdict"] == r.verdict and report["settings"]["generated"] == 12
    assert report["settings"]["real_unseen"] == 9 and report["settings"]["inversion"]["steps"] == 4
    assert report["settings"]["wall_seconds"] > 0 and report["settings"]["peak_rss_mb"] > 50  # this process's peak
    # the statistics and evaluate's control draw the same training and held-out images
    assert report["evaluation"]["overall"]["closer_to_train"] == pytest.approx(report["closer_to_train"]["generated"])
    page = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in page and "http" not in page.replace("<!DOCTYPE html>", "")
    assert r.verdict in page.replace("&#x27;", "'") or r.verdict.split(":")[0] in page
    again = audit_fn(_classifier(), train, held, tmp_path, say=said.append, **TINY)
    assert any("reusing the sample" in m for m in said) and any("reusing the measurements" in m for m in said)
    assert again.report["closer_to_train"] == report["closer_to_train"]
    with pytest.raises(ValueError, match="another audit"):
        audit_fn(_classifier(), train, held, tmp_path, **{**TINY, "steps": 5})


def test_audit_resumes_an_interrupted_inversion(tmp_path):
    train, held = _data(6, 0, "train"), _data(8, 1, "held")
    whole = audit_fn(_classifier(), train, held, tmp_path / "whole", **TINY)
    # an interrupted run: its checkpoint at step 2 (as Ctrl-C leaves it), then the audit again
    part = tmp_path / "part"
    audit_fn(_classifier(), train, held, part, **{**TINY, "steps": 2})
    state = json.loads((part / "audit-state.json").read_text())
    key_whole = json.loads((tmp_path / "whole" / "audit-state.json").read_text())
    state.update(key_whole)  # the checkpoint of step 2 now stands for the 4-step audit that was interrupted
    (part / "audit-state.json").write_text(json.dumps(state))
    said = []
    resumed = audit_fn(_classifier(), train, held, part, say=said.append, **TINY)
    assert any("continuing the inversion" in m for m in said) and resumed.inversion.step == 4
    assert resumed.report["settings"]["keys"] == whole.report["settings"]["keys"]  # the same generator, sample
    assert resumed.report["closer_to_train"] == whole.report["closer_to_train"]


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_report_renders_in_a_browser(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium here (.ci/run installs Debian's chromium): the report's browser render is untested")
    train, held = _data(6, 0, "train"), _data(8, 1, "held")
    audit_fn(_classifier(), train, held, tmp_path, **TINY)
    shot = tmp_path / "shot.png"
    cmd = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
        f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,1600",
        (tmp_path / "report.html").as_uri(),
    ]  # fmt: skip
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"Chromium cannot run here: {e}")
    if not shot.is_file():
        pytest.skip(f"Chromium cannot run here (no screenshot): {run.stderr[-500:]}")
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 5, "the screenshot is blank"
    assert (pixels < 128).mean() > 0.01  # text and images drawn, not only a white page


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def _npz(path, ds: ImageDataset) -> str:
    np.savez(path, images=(ds.images * 255).round().to(torch.uint8).numpy(), labels=ds.labels.numpy())
    return str(path)


def test_cli_audit_end_to_end_and_bad_input(tmp_path, capsys):
    from tldr_fast.cli import main

    train = _npz(tmp_path / "train.npz", _data(6, 0, "train"))
    held = _npz(tmp_path / "held.npz", _data(8, 1, "held"))
    model = _classifier()
    model.tldr_meta["arch"] = "mlp"
    save_classifier(model, tmp_path / "clf.pt")
    common = ["audit", "--classifier", str(tmp_path / "clf.pt"), "--train", train, "--device", "cpu", "--quiet"]
    tiny = ["--steps", "3", "--batch-size", "12", "--n-per-class", "3", "--real-per-class", "3"]
    assert main([*common, "--held-out", train, "--out", str(tmp_path / "bad"), *tiny]) == 1
    assert "18 of the 18 held-out images" in capsys.readouterr().err
    assert main([*common, "--held-out", held, "--out", str(tmp_path / "a"), *tiny, "--set", "tv=0.001"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["verdict"] in printed and report["settings"]["overrides"] == {
        "tv": 0.001,
        "steps": 3,
        "batch_size": 12,
    }
    assert report["settings"]["inversion"]["steps"] == 3 and (tmp_path / "a" / "report.html").is_file()


def test_held_out_defaults_to_the_test_split_of_a_source_that_has_one():
    from tldr_fast.audit import default_held_out

    ds = _data(2, 0, "mnist:train")
    assert default_held_out(ds) == "mnist:test"
    for source in ("mnist:test", "digits", "x.npz"):
        with pytest.raises(ValueError, match="no test split"):
            default_held_out(ImageDataset(ds.images, ds.labels, ds.class_names, ds.indices, source))


class _Pair(torch.nn.Module):
    """A classifier of another library: returns (logits, features), as a TorchScript classifier must."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 8), torch.nn.ReLU())
        self.head = torch.nn.Linear(8, K)

    def forward(self, x):
        f = self.body(x)
        return self.head(f), f


def test_classifiers_of_other_libraries_load(tmp_path, monkeypatch):
    """--classifier as TorchScript (forward returning (logits, features)) and as module:factory with --weights:
    the same function as the module, in eval mode, with the --preprocess normalisation as their tldr_meta."""
    from tldr_fast.models import Scripted, load_model, predict_logits

    torch.manual_seed(0)
    net = _Pair().eval()
    x = _data(2, 0, "x").images
    want_logits, want_features = (t.detach() for t in net(x * 4 - 2))  # (x - 0.5) / 0.25
    torch.jit.save(torch.jit.script(net), tmp_path / "net.ts")
    scripted = load_model(str(tmp_path / "net.ts"), preprocess="0.5,0.25")
    assert isinstance(scripted, Scripted) and scripted.tldr_meta == {"mean": [0.5], "std": [0.25]}
    torch.testing.assert_close(predict_logits(scripted, x), want_logits)
    torch.testing.assert_close(predict_logits(scripted, x, features=True), want_features)

    (tmp_path / "mylib.py").write_text(
        "import torch\n"
        "def build():\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(1)
    built = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(144, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    ).eval()
    torch.save(built.state_dict(), tmp_path / "w.pt")
    factory = load_model("mylib:build", weights=str(tmp_path / "w.pt"))
    assert factory.tldr_meta == {"mean": [0.0], "std": [1.0]} and not factory.training  # unit: [0, 1] images
    torch.testing.assert_close(predict_logits(factory, x), built(x).detach())

    for spec, options, match in (
        ("mylib:build", {}, "needs --weights"),
        ("mylib:nothing", {"weights": "w.pt"}, "cannot import nothing from mylib"),
        (str(tmp_path / "net.ts"), {"preprocess": "0.5"}, "--preprocess expects"),
        (str(tmp_path / "net.ts"), {"weights": "w.pt"}, "--weights is for"),
        (str(tmp_path / "missing.pt"), {}, "neither a file nor module:factory"),
    ):
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            load_model(spec, **options)


def test_audit_of_a_module_factory_classifier(tmp_path, monkeypatch):
    """The audit on classifiers of other libraries, their --train given: module:factory with its weights, and
    TorchScript."""
    from tldr_fast.audit import audit_saved

    (tmp_path / "otherlib.py").write_text(
        "import torch\n"
        "def build():\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import otherlib

    torch.save(otherlib.build().state_dict(), tmp_path / "w.pt")
    train = _npz(tmp_path / "train.npz", _data(6, 0, "train"))
    held = _npz(tmp_path / "held.npz", _data(8, 1, "held"))
    result = audit_saved(
        classifier="otherlib:build", weights=str(tmp_path / "w.pt"), preprocess="identity", train=train,
        held_out=held, out=str(tmp_path / "a"), n_per_class=3, real_per_class=3,
        overrides={"steps": 3, "batch_size": 12}, device="cpu", progress=False,
    )  # fmt: skip
    report = json.loads((result.out / "report.json").read_text())
    assert report["verdict"] == result.verdict and (result.out / "report.html").is_file()
    torch.jit.save(torch.jit.script(_Pair()), tmp_path / "net.ts")
    scripted = audit_saved(
        classifier=str(tmp_path / "net.ts"), train=train, held_out=held, out=str(tmp_path / "b"), n_per_class=3,
        real_per_class=3, overrides={"steps": 3, "batch_size": 12, "grad_norm": "off"}, device="cpu", progress=False,
    )  # fmt: skip
    assert (scripted.out / "report.html").is_file()
