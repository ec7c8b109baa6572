"""The reference classifiers: shapes, the tldr_meta contract with invert, training, weights-only checkpoints."""

import json
import os
import pickle

import pytest
import torch
import torch.nn as nn

from tldr_fast.classifier import FrozenClassifier
from tldr_fast.data import load_dataset, load_digits, subset
from tldr_fast.models import (
    SmallCNN,
    accuracy,
    build_classifier,
    load_classifier,
    normalize,
    predict_logits,
    save_classifier,
    train_classifier,
)

META_KEYS = {
    "arch",
    "input_shape",
    "num_classes",
    "mean",
    "std",
    "class_names",
    "train_source",
    "train_indices",
    "test_accuracy",
}


@pytest.fixture(scope="module")
def mnist_1k():
    return subset(load_dataset("mnist"), 100, seed=0)


@pytest.fixture(scope="module")
def cnn(mnist_1k):
    test = subset(load_dataset("mnist:test"), 50, seed=0)
    return train_classifier(mnist_1k, "cnn", seed=0, device="cpu", test=test)


@pytest.mark.parametrize("arch", ["cnn", "mlp"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (2, 9, 13), (3, 64, 48)])
def test_shapes_and_head(arch, shape):
    model = build_classifier(arch, shape, 7).eval()
    x = torch.randn(3, *shape)
    feats = model.features(x)
    assert isinstance(model.head, nn.Linear) and feats.shape == (3, model.head.in_features)
    logits = model(x)
    assert logits.shape == (3, 7)
    torch.testing.assert_close(logits, model.head(feats))


def test_bad_shapes():
    with pytest.raises(ValueError, match="H, W >= 8"):
        SmallCNN([1, 7, 28], 10)
    with pytest.raises(ValueError, match="arch"):
        build_classifier("resnet", [1, 28, 28], 10)
    with pytest.raises(ValueError, match="num_classes"):
        build_classifier("mlp", [1, 8, 8], 1)


def test_cnn_fits_1000_mnist_images(cnn, mnist_1k):
    meta = cnn.tldr_meta
    assert meta["train_accuracy"] >= 0.97, meta
    assert meta["test_accuracy"] >= 0.85, meta
    assert accuracy(cnn, mnist_1k) == pytest.approx(meta["train_accuracy"])
    assert not cnn.training


def test_meta_contract(cnn, mnist_1k):
    meta = cnn.tldr_meta
    assert META_KEYS <= set(meta)
    assert meta["arch"] == "cnn" and meta["input_shape"] == [1, 28, 28] and meta["num_classes"] == 10
    assert meta["class_names"] == mnist_1k.class_names
    assert meta["train_indices"] == mnist_1k.indices.tolist() and meta["train_source"] == "mnist:train"
    x = mnist_1k.images
    torch.testing.assert_close(torch.tensor(meta["mean"]), x.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(torch.tensor(meta["std"]), x.std(dim=(0, 2, 3)))
    # forward takes (x01 - mean) / std
    x01 = x[:16]
    expected = cnn((x01 - meta["mean"][0]) / meta["std"][0])
    torch.testing.assert_close(predict_logits(cnn, x01), expected)
    torch.testing.assert_close(normalize(cnn, x01), (x01 - meta["mean"][0]) / meta["std"][0])
    # the lead's invert wraps it: features are the head's input, logits the head's output
    frozen = FrozenClassifier(cnn, 10, (1, 28, 28), quiet=True)
    with torch.no_grad():
        logits, feats = frozen(x01 * 2 - 1)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert feats.shape == (16, cnn.head.in_features)


def test_training_is_seeded_and_leaves_the_global_rng_alone():
    ds = subset(load_digits(), 10, seed=0)
    state = torch.random.get_rng_state()
    a = train_classifier(ds, "mlp", epochs=2, batch_size=16, seed=5, device="cpu")
    assert torch.equal(torch.random.get_rng_state(), state)
    b = train_classifier(ds, "mlp", epochs=2, batch_size=16, seed=5, device="cpu")
    c = train_classifier(ds, "mlp", epochs=2, batch_size=16, seed=6, device="cpu")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert any(not torch.equal(va, vc) for va, vc in zip(a.state_dict().values(), c.state_dict().values()))


def test_train_arguments_are_checked():
    ds = subset(load_digits(), 2, seed=0)
    with pytest.raises(ValueError, match="epochs"):
        train_classifier(ds, epochs=0)
    with pytest.raises(ValueError, match="arch"):
        train_classifier(ds, "vit", epochs=1)


def test_save_load_roundtrip(cnn, tmp_path):
    path = tmp_path / "sub" / "clf.pt"
    save_classifier(cnn, path)
    assert os.listdir(path.parent) == ["clf.pt"]  # no temporary file left behind
    back = load_classifier(path)
    assert back.tldr_meta == cnn.tldr_meta and not back.training
    x = torch.rand(8, 1, 28, 28)
    torch.testing.assert_close(predict_logits(back, x), predict_logits(cnn, x), rtol=0, atol=0)
    # overwriting replaces the file as a whole
    mlp = train_classifier(subset(load_digits(), 5, seed=0), "mlp", epochs=1, device="cpu")
    save_classifier(mlp, path)
    assert load_classifier(path).tldr_meta["arch"] == "mlp"


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_refuses_a_tampered_pickle(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    state = {"format": "tldr_fast.classifier/1", "meta": "{}", "state_dict": {}, "payload": _Exploit(str(marker))}
    torch.save(state, path)  # a real torch zip file whose pickle runs code when unpickled unsafely
    with pytest.raises(ValueError, match="refused"):
        load_classifier(path)
    assert not marker.exists()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Exploit(str(marker)), protocol=2))
    with pytest.raises(ValueError, match="refused"):
        load_classifier(raw)
    assert not marker.exists()


def test_load_refuses_other_checkpoints(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="not a tldr_fast classifier checkpoint"):
        load_classifier(path)
    with pytest.raises(FileNotFoundError):
        load_classifier(tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="tldr_meta"):
        save_classifier(nn.Linear(3, 2), tmp_path / "x.pt")


def test_load_refuses_a_checkpoint_of_another_layout(cnn, tmp_path):
    """A file saved by a version whose model had other layers: a clear error, not a state_dict dump."""
    path = tmp_path / "old.pt"
    save_classifier(cnn, path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"] = {f"old.{k}": v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="do not match .* retrain"):
        load_classifier(path)


@pytest.fixture(scope="module")
def digits_mlp():
    return train_classifier(subset(load_digits(), 3, seed=0), "mlp", epochs=1, device="cpu")


def _edited(meta, **changes):
    """The JSON of ``meta`` with ``changes`` (a value of None removes the key)."""
    d = {**json.loads(meta), **changes}
    return json.dumps({k: v for k, v in d.items() if v is not None})


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c.pop("meta"), r"incomplete classifier checkpoint: it lacks meta"),
        (lambda c: c.update(meta="{not json"), r"field 'meta' must be a JSON object"),
        (
            lambda c: c.update(meta=_edited(c["meta"], num_classes=None)),
            r"\(its meta\) is an incomplete .* lacks num_classes",
        ),
        (
            lambda c: c.update(meta=_edited(c["meta"], arch="resnet")),
            r"its meta does not describe .*: arch must be one of",
        ),
        (lambda c: c.update(state_dict=[1]), r"field 'state_dict' must be a dict of tensors"),
    ],
)
def test_a_hand_edited_classifier_names_the_file_and_the_field(digits_mlp, tmp_path, edit, match):
    path = tmp_path / "edited.pt"
    save_classifier(digits_mlp, path)
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=match) as e:
        load_classifier(path)
    assert str(path) in str(e.value)


@pytest.mark.gpu
def test_train_and_load_on_the_gpu(mnist_1k, tmp_path):
    model = train_classifier(mnist_1k, "cnn", epochs=10, seed=0, device="cuda")
    assert next(model.parameters()).is_cuda and model.tldr_meta["train_accuracy"] >= 0.97
    save_classifier(model, tmp_path / "clf.pt")
    back = load_classifier(tmp_path / "clf.pt", device="cuda")
    x = mnist_1k.images[:64]
    torch.testing.assert_close(predict_logits(back, x), predict_logits(model, x))


def test_a_field_of_a_newer_version_is_a_warning(digits_mlp, tmp_path, capsys):
    path = tmp_path / "newer.pt"
    save_classifier(digits_mlp, path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["calibration"] = torch.ones(3)
    torch.save(ckpt, path)
    assert load_classifier(path).tldr_meta == digits_mlp.tldr_meta
    assert f"warning: {path}: ignoring field(s) this version does not know: calibration" in capsys.readouterr().err
