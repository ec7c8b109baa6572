"""Leakage evaluation: Hungarian matching, nearest-neighbour SSIM, reconstructed fractions, classifier
metrics, the JSON report and the grid."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from tldr_fast import invert
from tldr_fast.classifier import ClassifierError
from tldr_fast.data import colourise, load_dataset, load_digits, subset
from tldr_fast.evaluate import DEFINITIONS, closer_probability, evaluate, match_one_to_one
from tldr_fast.grid import grid_size
from tldr_fast.models import predict_logits, train_classifier
from tldr_fast.reference import pairwise_ssim as reference_ssim

SSIM = dict(backend="torch", device="cpu")


@pytest.fixture(scope="module")
def train():
    return subset(load_dataset("mnist:test"), 12, seed=0)  # 120 real 28 x 28 digits


@pytest.fixture(scope="module")
def digits_clf():
    ds = subset(load_digits(), 30, seed=0)
    return ds, train_classifier(ds, "mlp", epochs=8, batch_size=32, device="cpu")


def _noise(gen, n, shape=(1, 28, 28)):
    return torch.rand(n, *shape, generator=gen) * 2 - 1  # in [-1, 1]


def _brute_force(sim: np.ndarray) -> float:
    n, m = sim.shape
    if n <= m:
        return max(sim[np.arange(n), list(cols)].sum() for cols in itertools.permutations(range(m), n))
    return max(sim[list(rows), np.arange(m)].sum() for rows in itertools.permutations(range(n), m))


@pytest.mark.parametrize("n,m", [(1, 1), (3, 3), (4, 6), (5, 5), (2, 7), (6, 3), (5, 1)])
def test_matching_is_optimal_and_one_to_one(gen, n, m):
    sim = torch.rand(n, m, generator=gen, dtype=torch.float64).numpy()
    partner, score = match_one_to_one(sim)
    matched = partner >= 0
    assert matched.sum() == min(n, m)
    assert len(set(partner[matched].tolist())) == matched.sum()  # one-to-one
    assert np.all(np.isnan(score[~matched]))
    np.testing.assert_allclose(score[matched], sim[matched.nonzero()[0], partner[matched]])
    assert score[matched].sum() == pytest.approx(_brute_force(sim), rel=1e-12)


def test_planted_copy_is_found_and_counted(gen, train):
    images = _noise(gen, 20)
    labels = torch.arange(10).repeat_interleave(2)  # two per class
    pos = int(torch.nonzero(train.labels == 3)[5])
    images[7] = train.images[pos] * 2 - 1  # generated image 7 (class 3) copies a training image
    r = evaluate(images, train, labels, tau=0.4, **SSIM)
    assert r.nn_ssim[7].item() == pytest.approx(1.0, abs=1e-5)
    assert int(r.nn_index[7]) == pos and int(r.matched_index[7]) == pos
    assert r.matched_ssim[7].item() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(r.nearest[7], train.images[pos])
    others = torch.arange(20) != 7
    assert (r.nn_ssim[others] < 0.4).all()  # noise is not reconstruction
    d = r.to_dict()
    assert d["overall"]["reconstructed_nn"] == pytest.approx(1 / 20)
    assert d["overall"]["reconstructed_matched"] == pytest.approx(1 / 20)
    c3 = next(c for c in d["per_class"] if c["class"] == 3)
    assert c3["reconstructed_nn"] == 0.5 and c3["nn_ssim_max"] == pytest.approx(1.0, abs=1e-5)
    assert d["images"][7]["nn_source_index"] == int(train.indices[pos])


def test_nearest_neighbour_is_the_best_of_its_class(gen, train):
    images = _noise(gen, 6) * 0.3 + 0.2 + torch.linspace(-0.5, 0.5, 28).view(1, 1, 1, 28)  # some structure
    labels = torch.tensor([0, 0, 4, 4, 4, 9])
    r = evaluate(images.clamp(-1, 1), train, labels, **SSIM)
    x01 = ((images.clamp(-1, 1) + 1) / 2).double()
    for i, c in enumerate(labels.tolist()):
        members = torch.nonzero(train.labels == c).view(-1)
        s = reference_ssim(x01[i : i + 1], train.images[members].double())[0]
        assert r.nn_ssim[i].item() == pytest.approx(s.max().item(), abs=1e-4)
        assert int(train.labels[r.nn_index[i]]) == c
        assert int(r.nn_index[i]) == int(members[s.argmax()])


def test_value_range(gen, train):
    x01 = (_noise(gen, 10) + 1) / 2
    labels = torch.arange(10)
    a = evaluate(x01, train, labels, value_range=(0, 1), **SSIM)
    b = evaluate(x01 * 2 - 1, train, labels, **SSIM)
    torch.testing.assert_close(a.nn_ssim, b.nn_ssim)
    assert torch.equal(a.nn_index, b.nn_index)


def test_more_generated_than_training_images(gen):
    ds = subset(load_digits(), 2, seed=1)  # two training images per class
    images = _noise(gen, 5, (1, 8, 8))
    labels = torch.tensor([1, 1, 1, 1, 2])
    r = evaluate(images, ds, labels, **SSIM)
    cls1 = labels == 1
    assert int((r.matched_index[cls1] >= 0).sum()) == 2  # only two partners exist
    assert torch.isnan(r.matched_ssim[cls1]).sum() == 2
    data = json.loads(r.to_json())  # NaN is written as null, not as invalid JSON
    unmatched = [im for im in data["images"] if im["matched_ssim"] is None]
    assert len(unmatched) == 2 and all(im["matched_train_index"] is None for im in unmatched)


def test_classifier_metrics(gen, digits_clf):
    ds, clf = digits_clf
    images = ds.images[:20] * 2 - 1  # training images: the classifier knows them
    labels = ds.labels[:20].clone()
    labels[:3] = (labels[:3] + 1) % 10  # three conditioned on the wrong class
    r = evaluate(images, ds, labels, classifier=clf, eval_classifier=clf, **SSIM)
    p = torch.softmax(predict_logits(clf, ds.images[:20]), 1)
    torch.testing.assert_close(r.target_prob, p[torch.arange(20), labels])
    o = r.to_dict()["overall"]
    expected = (p.argmax(1) == labels).double().mean().item()
    assert o["attack_accuracy"] == pytest.approx(expected) and o["target_accuracy"] == pytest.approx(expected)
    assert o["target_confidence"] == pytest.approx(p[torch.arange(20), labels].mean().item(), rel=1e-6)
    assert o["reconstructed_nn"] == 1.0  # every image is a training image


def test_report_json_summary_and_grid(gen, digits_clf, tmp_path):
    ds, clf = digits_clf
    labels = torch.arange(10).repeat_interleave(3)
    r = evaluate(_noise(gen, 30, (1, 8, 8)), ds, labels, classifier=clf, **SSIM)
    r.save_json(tmp_path / "m.json")
    d = json.loads((tmp_path / "m.json").read_text())
    assert set(d) >= {
        "tau",
        "definitions",
        "num_generated",
        "num_train",
        "train_source",
        "overall",
        "per_class",
        "images",
    }
    assert set(d["definitions"]) == set(DEFINITIONS)
    keys = {
        "n_generated",
        "nn_ssim_mean",
        "nn_ssim_median",
        "nn_ssim_max",
        "matched_ssim_mean",
        "reconstructed_nn",
        "reconstructed_matched",
        "n_train_matched",
        "same_class_ssim_mean",
        "nn_ssim_ci_mean",
        "attack_accuracy",
        "target_accuracy",
        "target_confidence",
    }
    assert set(d["overall"]) == keys and all(set(c) == keys | {"class", "name", "n_train"} for c in d["per_class"])
    assert d["overall"]["attack_accuracy"] is None and d["overall"]["target_confidence"] is not None
    assert len(d["images"]) == 30 and d["num_train"] == 300 and len(d["per_class"]) == 10
    text = r.summary()
    assert f"{100 * d['overall']['reconstructed_nn']:.1f}%" in text and len(text.splitlines()) == 7 + 10
    size = r.save_grid(tmp_path / "g.png", per_class=2)
    with Image.open(tmp_path / "g.png") as im:
        assert im.format == "PNG" and im.size == size == grid_size(10, 2, 8, 8)
        assert im.size[0] > 2 * 2 * 8 * 2  # upscaled: each 8 x 8 image is at least 56 px wide


def test_inversion_input(digits_clf):
    ds, clf = digits_clf
    inv = invert(
        clf,
        10,
        (1, 8, 8),
        steps=3,
        batch_size=8,
        ngf=8,
        nz=8,
        eval_per_class=2,
        device="cpu",
        backend="torch",
        progress=False,
    )
    r = evaluate(inv, ds, n_per_class=3, **SSIM)
    assert r.labels.tolist() == [c for c in range(10) for _ in range(3)]
    assert r.generated.min() >= 0 and r.generated.max() <= 1
    torch.testing.assert_close(r.generated, (inv.sample(n_per_class=3) + 1) / 2)
    # without an explicit classifier, confidence comes from the inversion's own target
    p = torch.softmax(predict_logits(clf, r.generated), 1)
    torch.testing.assert_close(r.target_prob, p[torch.arange(30), r.labels], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="labels= is only for image tensors"):
        evaluate(inv, ds, torch.zeros(30), **SSIM)


def test_bad_input(train):
    x = torch.zeros(4, 1, 28, 28)
    with pytest.raises(ValueError, match="labels="):
        evaluate(x, train, **SSIM)
    with pytest.raises(ValueError, match="training images"):
        evaluate(torch.zeros(4, 1, 8, 8), train, torch.zeros(4), **SSIM)
    with pytest.raises(ValueError, match="tau"):
        evaluate(x, train, torch.zeros(4), tau=2, **SSIM)
    with pytest.raises(TypeError, match="Inversion"):
        evaluate([1, 2], train, **SSIM)
    tensors = evaluate(x, (train.images, train.labels), torch.zeros(4), **SSIM)  # (images, labels) works too
    assert math.isfinite(tensors.nn_ssim[0].item())


def _subset_classifier(ds, classes=None, colour=False):
    """A tiny MLP on ``ds`` (its first ``classes`` classes only; in colour with ``colour``)."""
    if classes is not None:
        ds = ds.select(torch.nonzero(ds.labels < classes).view(-1))
        ds.class_names = ds.class_names[:classes]
    return train_classifier(colourise(ds, 0) if colour else ds, "mlp", epochs=1, batch_size=32, device="cpu")


def test_every_classifier_must_fit_the_data(digits_clf):
    ds, clf = digits_clf  # 10 classes of 1 x 8 x 8 digits
    images, labels = ds.images[:20], ds.labels[:20]
    five, colour = _subset_classifier(ds, classes=5), _subset_classifier(ds, colour=True)
    for name in ("classifier", "eval_classifier"):
        with pytest.raises(ClassifierError, match=f"^{name} has 5 classes, the data have 10 classes"):
            evaluate(images, ds, labels, value_range=(0, 1), **{name: five}, **SSIM)
        with pytest.raises(ClassifierError, match=rf"^{name} takes images of shape \[3, 8, 8\] \(3 channel"):
            evaluate(images, ds, labels, value_range=(0, 1), **{name: colour}, **SSIM)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(192, 10))  # no tldr_meta: found by a probe
    with pytest.raises(ClassifierError, match=r"^eval_classifier fails on images of the data's shape \[1, 8, 8\]"):
        evaluate(images, ds, labels, value_range=(0, 1), eval_classifier=plain, **SSIM)
    # the normalisation never broadcasts grey images to a colour classifier's three channels
    with pytest.raises(ClassifierError, match=r"takes 3-channel images .* these images have 1 channel"):
        predict_logits(colour, images)


def test_non_finite_images_are_named(train):
    x = torch.zeros(4, 1, 28, 28)
    x[2, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="^generated images: image 2 holds NaN"):
        evaluate(x, train, torch.zeros(4), **SSIM)
    bad = train.images.clone()
    bad[5, 0, 0, 0], bad[7, 0, 1, 1] = float("inf"), float("nan")
    with pytest.raises(ValueError, match=r"^held_out: image 5 holds Inf pixel values \(1 more image"):
        evaluate(x.nan_to_num(), train, torch.zeros(4), held_out=(bad, train.labels), **SSIM)


def test_same_class_ssim_is_the_nearest_other_image(gen, train):
    images = _noise(gen, 7).clamp(-1, 1)
    images[1] = images[0]  # a collapsed pair in class 2
    labels = torch.tensor([2, 2, 2, 5, 5, 7, 2])
    r = evaluate(images, train, labels, **SSIM)
    x01 = ((images + 1) / 2).double()
    for i, c in enumerate(labels.tolist()):
        others = [j for j in range(7) if labels[j] == c and j != i]
        if not others:
            assert math.isnan(r.same_class_ssim[i])  # alone in its class
            continue
        best = max(float(reference_ssim(x01[i : i + 1], x01[j : j + 1])) for j in others)
        assert r.same_class_ssim[i].item() == pytest.approx(best, abs=1e-4)
    assert r.same_class_ssim[0].item() == pytest.approx(1.0, abs=1e-5)


def test_control_against_held_out_images(gen, train):
    held = subset(load_dataset("mnist:test"), 20, seed=9)
    held = held.select(torch.nonzero(~torch.isin(held.indices, train.indices)).view(-1))
    labels = torch.arange(10).repeat_interleave(2)
    images = (
        torch.stack([train.images[torch.nonzero(train.labels == c)[k, 0]] for c in range(10) for k in (0, 1)]) * 2 - 1
    )
    r = evaluate(images, train, labels, held_out=held, control_seed=4, **SSIM)
    x01 = (images + 1) / 2
    gen_c = torch.Generator().manual_seed(4)  # the control's draws, in its order: per class, train then held-out
    for c in range(10):
        t_pos = torch.nonzero(train.labels == c).view(-1)
        h_pos = torch.nonzero(held.labels == c).view(-1)
        m = min(len(t_pos), len(h_pos))
        t_sel = t_pos[torch.randperm(len(t_pos), generator=gen_c)[:m]]
        h_sel = h_pos[torch.randperm(len(h_pos), generator=gen_c)[:m]]
        for i in torch.nonzero(labels == c).view(-1).tolist():
            t = reference_ssim(x01[i : i + 1].double(), train.images[t_sel].double()).max()
            h = reference_ssim(x01[i : i + 1].double(), held.images[h_sel].double()).max()
            assert r.train_control_ssim[i].item() == pytest.approx(float(t), abs=1e-4)
            assert r.held_out_ssim[i].item() == pytest.approx(float(h), abs=1e-4)
            # closer to train: the exact probability over every draw, from all the class's images
            t_all = reference_ssim(x01[i : i + 1].double(), train.images[t_pos].double()).view(1, -1).numpy()
            h_all = reference_ssim(x01[i : i + 1].double(), held.images[h_pos].double()).view(1, -1).numpy()
            assert r.closer_to_train[i].item() == pytest.approx(closer_probability(t_all, h_all, m)[0], abs=1e-6)
    o = r.to_dict()["overall"]
    gap = (r.train_control_ssim - r.held_out_ssim).double().mean().item()
    assert o["leakage_gap"] == pytest.approx(gap) and o["leakage_gap"] > 0.1  # copies of training images leak
    assert o["closer_to_train"] == pytest.approx(r.closer_to_train.mean().item())
    assert o["n_train_matched"] == 20  # twenty distinct training images, each matched at SSIM 1
    assert "control:" in r.summary()


def test_one_progress_bar_for_the_evaluation(gen, train, capsys):
    """Every SSIM comparison of an evaluation (per class: against the training images, plain and
    contrast-inverted, against each other, and the control's held-out images) advances one bar, which
    ends full; nothing is printed per class or per block."""
    held = subset(load_dataset("mnist:test"), 3, seed=9)
    labels = torch.tensor([0, 0, 0, 1, 2, 2, 5])
    capsys.readouterr()
    evaluate(_noise(gen, len(labels)), train, labels, held_out=held, progress=True, **SSIM)
    lines = [line for line in capsys.readouterr().err.split("\n") if line]  # a bar redraws on its line ("\r")
    assert len(lines) == 1 and lines[0].lstrip("\r").startswith("SSIM:"), lines
    final = lines[0].split("\r")[-1]
    pairs = 9 + 1 + 4 + 1 + 2 * 7 * 12 + 7 * 3  # same-class, training set (12 per class) twice, held-out (3)
    assert "100%|" in final and f"{pairs}/{pairs} [" in final, final


def test_the_progress_bar_counts_every_held_out_image_of_a_larger_held_out_set(gen, train, capsys):
    """With more held-out than training images per class, the control still compares every generated image
    with every held-out image of its class (for the exact closer-to-train probability): the bar ends full."""
    held = subset(load_dataset("mnist"), 20, seed=9)
    labels = torch.tensor([0, 0, 0, 1, 2, 2, 5])
    capsys.readouterr()
    evaluate(_noise(gen, len(labels)), train, labels, held_out=held, progress=True, **SSIM)
    final = capsys.readouterr().err.strip().split("\r")[-1]
    pairs = 9 + 1 + 4 + 1 + 2 * 7 * 12 + 7 * 20  # same-class, training set (12 per class) twice, held-out (20)
    assert "100%|" in final and f"{pairs}/{pairs} [" in final, final


def test_one_progress_bar_for_the_students(gen, train, capsys, tmp_path):
    """What the images teach is one stage with one bar: the CAS student and every student of the real curve
    advance it, each without a bar of its own."""
    from tldr_fast.utility import Teaching

    labels = torch.arange(10).repeat_interleave(2)
    recipe = Teaching(arch="mlp", steps=6, batch_size=8, real_sizes=(1, 2), draws=2)
    capsys.readouterr()
    evaluate(
        _noise(gen, 20),
        train,
        labels,
        test=train,
        teaching=recipe,
        teach_per_class=2,
        cache=tmp_path,
        progress=True,
        **SSIM,
    )
    lines = [line for line in capsys.readouterr().err.split("\n") if line]
    assert [line.lstrip("\r").split(":")[0] for line in lines] == ["SSIM", "teach"], lines
    final = lines[1].split("\r")[-1]
    assert "100%|" in final and "5/5 [" in final, final  # CAS + 2 sizes x 2 draws of the real curve


@pytest.mark.gpu
def test_gpu_matches_cpu(gen, train):
    images = _noise(gen, 20)
    images[3] = train.images[0] * 2 - 1
    labels = torch.arange(10).repeat_interleave(2)
    labels[3] = train.labels[0]
    cpu = evaluate(images, train, labels, backend="torch", device="cpu")
    gpu = evaluate(images, train, labels, backend="auto", device="cuda")
    torch.testing.assert_close(gpu.nn_ssim, cpu.nn_ssim, rtol=0, atol=1e-4)
    assert torch.equal(gpu.nn_index[3], cpu.nn_index[3]) and gpu.nn_ssim[3] > 0.9999
