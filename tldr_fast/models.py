"""The reference classifiers for small images, their training loop, and weights-only checkpoints.

Contract with ``tldr_fast.invert`` (and ``tldr_fast.evaluate``): a classifier built here carries
``model.tldr_meta``, a plain dict with at least ``arch``, ``input_shape`` ``[C, H, W]``, ``num_classes``,
``mean`` and ``std`` (per channel, of [0, 1] images) and ``class_names``. ``forward`` takes images
normalised as ``(x01 - mean) / std`` and returns logits ``[B, K]``; the final layer, ``model.head``, is an
``nn.Linear`` fed by the penultimate features ``model.features(x)`` ``[B, D]``.

Checkpoints are one ``torch.save`` file of tensors and a JSON string, loaded with
``torch.load(weights_only=True)``: loading never runs code from the file. Writes are atomic.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backends import resolve_device
from .checkpoint import (
    PathLike,
    atomic_save,
    check_writable,
    drop_unknown,
    field_error,
    load_checkpoint,
    refuse_overwriting_inputs,
    require_keys,
)
from .classifier import ClassifierError
from .data import ImageDataset, load_dataset, subset
from .progress import progress_bar

Tensor = torch.Tensor
TRAIN_PER_CLASS = 100  # the command line's and the demo's: 1,000 MNIST training images
EPOCHS = 10

CHECKPOINT_FORMAT = "tldr_fast.classifier/1"


def _check_shape(input_shape: Sequence[int]) -> Tuple[int, int, int]:
    if len(input_shape) != 3 or min(input_shape) < 1 or min(input_shape[1:]) < 8:
        raise ValueError(f"input_shape must be [C, H, W] with H, W >= 8, got {list(input_shape)}")
    return int(input_shape[0]), int(input_shape[1]), int(input_shape[2])


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _dense_block(cin: int, cout: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(cin, cout, bias=False), nn.BatchNorm1d(cout), nn.ReLU(inplace=True), nn.Dropout(dropout)
    )


class SmallCNN(nn.Module):
    """Three 3x3 conv blocks (batch norm, ReLU; max-pool after the first two), a dense feature layer
    with batch norm and dropout, and a linear head. Any ``[C, H, W]`` with H, W >= 8.

    >>> SmallCNN([1, 28, 28], 10)(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        width: int = 16,
        feature_dim: int = 128,
        dropout: float = 0.25,
    ):
        super().__init__()
        c, h, w = _check_shape(input_shape)
        pooled = (min(h // 4, 7), min(w // 4, 7))
        self.features = nn.Sequential(  # [B, C, H, W] -> [B, feature_dim]
            _conv_block(c, width),
            nn.MaxPool2d(2),  # [B, width, H/2, W/2]
            _conv_block(width, 2 * width),
            nn.MaxPool2d(2),  # [B, 2 width, H/4, W/4]
            _conv_block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(pooled),  # the identity up to 28 x 28 (and 8 x 8 at most)
            nn.Dropout(dropout),
            nn.Flatten(),
            _dense_block(4 * width * pooled[0] * pooled[1], feature_dim, dropout),
        )
        self.head = nn.Linear(feature_dim, num_classes)  # [B, feature_dim] -> logits [B, K]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class PlainCNN(nn.Module):
    """The shape of most published small-image CNNs: three (3x3 conv, ReLU, 2x2 max-pool) blocks, a
    dense feature layer with ReLU and dropout, and a linear head - no BatchNorm anywhere. Any
    ``[C, H, W]`` with H, W >= 8.

    >>> PlainCNN([1, 28, 28], 10)(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        width: int = 32,
        feature_dim: int = 256,
        dropout: float = 0.25,
    ):
        super().__init__()
        c, h, w = _check_shape(input_shape)
        layers = []
        for cin, cout in ((c, width), (width, 2 * width), (2 * width, 4 * width)):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        self.features = nn.Sequential(  # [B, C, H, W] -> [B, feature_dim]
            *layers,  # [B, 4 width, H/8, W/8]
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(4 * width * (h // 8) * (w // 8), feature_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.head = nn.Linear(feature_dim, num_classes)  # [B, feature_dim] -> logits [B, K]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class LeNet(nn.Module):
    """A widened LeNet-5: two (5x5 conv, ReLU, 2x2 max-pool) blocks, a dense layer with dropout, a
    linear head. The leakage benchmark's evaluation classifier: an architecture none of its targets has.

    >>> LeNet([1, 28, 28], 10)(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        width: int = 32,
        feature_dim: int = 256,
        dropout: float = 0.3,
    ):
        super().__init__()
        c, h, w = _check_shape(input_shape)
        self.features = nn.Sequential(  # [B, C, H, W] -> [B, feature_dim]
            nn.Conv2d(c, width, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * (h // 4) * (w // 4), feature_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.head = nn.Linear(feature_dim, num_classes)  # [B, feature_dim] -> logits [B, K]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class SmallMLP(nn.Module):
    """Two dense layers (batch norm, ReLU, dropout) and a linear head, on flattened images.

    >>> SmallMLP([1, 8, 8], 10)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden: int = 256,
        feature_dim: int = 128,
        dropout: float = 0.2,
    ):
        super().__init__()
        c, h, w = _check_shape(input_shape)
        self.features = nn.Sequential(  # [B, C, H, W] -> [B, feature_dim]
            nn.Flatten(),
            _dense_block(c * h * w, hidden, dropout),
            _dense_block(hidden, feature_dim, dropout),
        )
        self.head = nn.Linear(feature_dim, num_classes)  # [B, feature_dim] -> logits [B, K]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


ARCHS = {"cnn": SmallCNN, "plain_cnn": PlainCNN, "mlp": SmallMLP, "lenet": LeNet}


def build_classifier(arch: str, input_shape: Sequence[int], num_classes: int, **arch_kwargs: Any) -> nn.Module:
    """A fresh classifier of ``ARCHS``: ``"cnn"`` (with BatchNorm), ``"plain_cnn"`` (without), ``"mlp"``
    or ``"lenet"`` (``arch_kwargs``: the class's own options, e.g. ``width``)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {tuple(ARCHS)}, got {arch!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    return ARCHS[arch](list(input_shape), num_classes, **arch_kwargs)


def shift_images(x: Tensor, max_shift: int, generator: torch.Generator, fill: float) -> Tensor:
    """Each image of ``x`` ``[B, C, H, W]`` moved by its own random whole-pixel shift in
    ``[-max_shift, max_shift]`` per axis (drawn on the CPU from ``generator``); uncovered pixels read ``fill``."""
    b, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=fill)  # [B, C, H + 2p, W + 2p]
    dy, dx = (torch.randint(0, 2 * p + 1, (b,), generator=generator).to(x.device) for _ in range(2))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(b, x.shape[1], h, w + 2 * p)
    out = padded.gather(2, rows)  # [B, C, H, W + 2p]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(b, x.shape[1], h, w)
    return out.gather(3, cols)


def normalize(model: nn.Module, x01: Tensor) -> Tensor:
    """Images in [0, 1] as ``model`` takes them: ``(x01 - mean) / std`` from its ``tldr_meta``, or
    unchanged for a model without one (such a model takes [0, 1] images)."""
    meta = getattr(model, "tldr_meta", None)
    if not meta:
        return x01
    mean = torch.tensor(meta["mean"], dtype=x01.dtype, device=x01.device).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"], dtype=x01.dtype, device=x01.device).view(1, -1, 1, 1)
    if mean.shape[1] not in (1, x01.shape[1]):  # never broadcast grey images to a colour classifier's channels
        raise ClassifierError(
            f"the classifier takes {mean.shape[1]}-channel images (its normalisation, tldr_meta), these images have "
            f"{x01.shape[1]} channel(s)"
        )
    return (x01 - mean) / std


def check_classifier(model: nn.Module, num_classes: int, image_shape: Sequence[int], name: str = "classifier") -> None:
    """Refuse a classifier that does not fit the data, before it is used: a ``ClassifierError`` naming
    it (``name``: the argument or file it came from) when its recorded input shape (``tldr_meta``) is
    not ``image_shape`` ``[C, H, W]``, when it fails on two images of that shape, or when its logits
    have another number of classes than ``num_classes`` (the data's)."""
    meta = getattr(model, "tldr_meta", None) or {}
    shape, want = meta.get("input_shape"), list(image_shape)
    if shape is not None and list(shape) != want:
        raise ClassifierError(
            f"{name} takes images of shape {list(shape)} ({shape[0]} channel(s)), the data are {want} ({want[0]} "
            "channel(s)): give a classifier of this data"
        )
    try:
        logits = predict_logits(model, torch.rand(2, *want))
    except ClassifierError as e:
        raise ClassifierError(f"{name}: {e}") from e
    except Exception as e:
        raise ClassifierError(f"{name} fails on images of the data's shape {want}: {' '.join(str(e).split())}") from e
    if logits.shape != (2, num_classes):
        got = f"{logits.shape[1]} classes" if logits.dim() == 2 else f"logits of shape {list(logits.shape)}"
        raise ClassifierError(
            f"{name} has {got}, the data have {num_classes} classes: give a classifier of these classes"
        )


@torch.no_grad()
def predict_logits(model: nn.Module, x01: Tensor, batch_size: int = 1024, features: bool = False) -> Tensor:
    """Logits ``[N, K]`` (fp32, CPU) of ``model`` in eval mode on images ``[N, C, H, W]`` in [0, 1],
    normalised by ``normalize``; batched on the model's device. The model's mode is restored.
    ``features``: the penultimate features ``model.features(x)`` ``[N, D]`` instead (the head's input)."""
    if features and not callable(getattr(model, "features", None)):
        raise ValueError(
            f"{type(model).__name__} has no .features(x) (the penultimate features that feed its head): "
            "feature-space metrics need a classifier of tldr_fast.models or one with that method"
        )
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")

    def fn(x: Tensor) -> Tensor:
        y = model.features(x) if features else model(x)
        return y[0] if isinstance(y, tuple) else y  # a classifier returning (logits, features)

    was_training = model.training
    model.eval()
    try:
        out = [
            fn(normalize(model, x01[i : i + batch_size].to(device))).float().flatten(1).cpu()
            for i in range(0, len(x01), batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0)


def accuracy(model: nn.Module, ds: ImageDataset, batch_size: int = 1024) -> float:
    """Fraction of ``ds`` that ``model`` classifies correctly."""
    return (predict_logits(model, ds.images, batch_size).argmax(1) == ds.labels).float().mean().item()


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T^2 KL(softmax(teacher/T) || softmax(student/T))``, the batch mean (logits ``[B, K]``): the
    ``T^2`` keeps the gradient's scale independent of ``T`` (Hinton et al. 2015)."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True, reduction="batchmean")
    return kl * t * t


def train_classifier(
    dataset: ImageDataset,
    arch: str = "cnn",
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    device: str = "auto",
    progress: bool = False,
    test: Optional[ImageDataset] = None,
    weight_decay: float = 1e-4,
    augment: int = 0,
    teacher: Optional[Callable[[Tensor], Tensor]] = None,
    temperature: float = 4.0,
    **arch_kwargs: Any,
) -> nn.Module:
    """Train a classifier of ``ARCHS`` on ``dataset`` and return it in eval mode on ``device``.

    Adam with a one-cycle learning-rate schedule, cross-entropy, no augmentation by default (the model
    is meant to fit its training set, as the models that inversion audits do); ``augment=n`` moves each
    training image by a random whole-pixel shift in [-n, n] per axis every time it is seen (for judges,
    such as the leakage benchmark's evaluation classifier, which should generalise). Normalisation mean/std are the
    training images' per-channel statistics. Deterministic for a given ``seed`` on the CPU; the global
    RNG is left as it was. ``teacher`` (a function of ``[B, C, H, W]`` images in [0, 1] returning logits
    ``[B, K]``) makes it knowledge distillation (Hinton et al. 2015): the loss is ``T^2 KL(softmax(t/T) ||
    softmax(s/T))`` at ``T = temperature`` against the teacher's logits on each (shifted) batch, and the
    labels serve only the reported accuracy. ``model.tldr_meta`` records the architecture, normalisation, class names,
    the training subset (``train_source``, ``train_indices``), ``train_accuracy`` and, when ``test`` is
    given, ``test_accuracy``.
    """
    if len(dataset) == 0:
        raise ValueError("cannot train on an empty data set")
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if isinstance(augment, bool) or not isinstance(augment, int) or augment < 0:
        raise ValueError(f"augment must be an int >= 0 (pixels), got {augment!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    if test is not None and test.image_shape != dataset.image_shape:
        raise ValueError(f"test images are {test.image_shape}, training images {dataset.image_shape}")
    dev = resolve_device(device)
    x = dataset.images
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        model = build_classifier(arch, dataset.image_shape, dataset.num_classes, **arch_kwargs).to(dev)
        gen = torch.Generator().manual_seed(seed)
        xn = ((x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).to(dev)
        x01 = x.to(dev) if augment or teacher is not None else None
        mean_d, std_d = mean.view(1, -1, 1, 1).to(dev), std.view(1, -1, 1, 1).to(dev)
        y = dataset.labels.to(dev)
        steps_per_epoch = math.ceil(len(x) / batch_size)
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
        model.train()
        bar = progress_bar(range(epochs), desc=f"train {arch}", unit="epoch", disable=not progress)
        for _ in bar:
            order = torch.randperm(len(x), generator=gen).to(dev)
            correct, total_loss = 0, 0.0
            for i in range(steps_per_epoch):
                idx = order[i * batch_size : (i + 1) * batch_size]
                if len(idx) < 2:  # batch norm needs two samples
                    continue
                xb, xb01 = xn[idx], None if x01 is None else x01[idx]
                if augment:  # shift the [0, 1] images (background 0), then normalise
                    xb01 = shift_images(xb01, augment, gen, 0.0)
                    xb = (xb01 - mean_d) / std_d
                logits = model(xb)
                if teacher is None:
                    loss = F.cross_entropy(logits, y[idx])
                else:
                    with torch.no_grad():
                        t_logits = teacher(xb01).float().to(dev)  # [B, K]
                    loss = distillation_loss(logits, t_logits, temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total_loss += loss.detach() * len(idx)
                correct += (logits.detach().argmax(1) == y[idx]).sum()
            bar.set_postfix(loss=f"{float(total_loss) / len(x):.3f}", acc=f"{int(correct) / len(x):.3f}")
    model.eval()
    model.tldr_meta = {
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs),
        "input_shape": dataset.image_shape,
        "num_classes": dataset.num_classes,
        "mean": mean.tolist(),
        "std": std.tolist(),
        "class_names": list(dataset.class_names),
        "train_source": dataset.source,
        "train_indices": dataset.indices.tolist(),
        "epochs": epochs,
        "augment": augment,
        "distillation_temperature": temperature if teacher is not None else None,
        "seed": seed,
        "test_source": test.source if test is not None else None,
    }
    model.tldr_meta["train_accuracy"] = accuracy(model, dataset)  # needs the normalisation above
    model.tldr_meta["test_accuracy"] = accuracy(model, test) if test is not None else None
    return model


def train_and_save(
    *,
    data: str = "mnist",
    n_per_class: Union[int, str] = TRAIN_PER_CLASS,
    test_data: Optional[str] = None,
    arch: str = "cnn",
    epochs: int = EPOCHS,
    batch_size: int = 64,
    lr: float = 3e-3,
    out: str,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    say: Callable[[str], None] = lambda msg: None,
) -> nn.Module:
    """Train a small CNN or MLP on a class-balanced subset and save it.

    Train the reference CNN (or MLP) on n images per class of a data set and save weights + metadata
    (architecture, normalisation, class names, the subset's indices, accuracies) to a weights-only checkpoint.

    Args:
        data: the data set (anything ``load_dataset`` reads)
        n_per_class: training images per class, or 'all'
        test_data: held-out data set for the test accuracy, e.g. mnist:test (default: none)
        arch: classifier architecture: cnn (with BatchNorm), plain_cnn (without), mlp or lenet
        epochs: training epochs
        batch_size: training batch size
        lr: peak learning rate
        out: checkpoint to write (.pt)
        seed: seed of the subset, initialisation and batches
        say: where progress messages go

    Returns:
        The trained classifier.
    """
    refuse_overwriting_inputs("--out", out, [Path(out)], {"--data": data, "--test-data": test_data})
    check_writable(out, "--out")
    train = subset(load_dataset(data, seed=seed), n_per_class, seed=seed)
    test = load_dataset(test_data) if test_data else None
    say(f"training a {arch} on {len(train)} images of {train.source}")
    model = train_classifier(train, arch, epochs, batch_size, lr, seed, device, progress=progress, test=test)
    save_classifier(model, out)
    return model


def save_classifier(model: nn.Module, path: PathLike) -> None:
    """Write the weights and ``model.tldr_meta`` (as JSON) to ``path`` atomically."""
    meta = getattr(model, "tldr_meta", None)
    if not meta or meta.get("arch") not in ARCHS:
        raise ValueError(
            "save_classifier saves the classifiers of tldr_fast.models (built with a tldr_meta); save others with torch.save"
        )
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_save({"format": CHECKPOINT_FORMAT, "meta": json.dumps(meta), "state_dict": state}, path, "classifier")


def load_classifier(path: PathLike, device: str = "cpu") -> nn.Module:
    """A classifier saved by ``save_classifier``, in eval mode on ``device``, with its ``tldr_meta``.

    The file is read with ``torch.load(weights_only=True)``: a file holding anything but tensors and
    plain data (e.g. a tampered pickle) is refused with a ``ValueError`` and nothing in it runs; so is
    one whose parameters do not fit this version's model of its architecture.
    """
    ckpt = load_checkpoint(path, CHECKPOINT_FORMAT, "classifier")
    require_keys(ckpt, ("meta", "state_dict"), path, "classifier")
    ckpt = drop_unknown(ckpt, ("format", "meta", "state_dict"), path)
    try:
        meta: Dict[str, Any] = json.loads(ckpt["meta"])
    except (TypeError, ValueError):
        meta = None
    if not isinstance(meta, dict):
        raise field_error(path, "meta", "a JSON object (the classifier's tldr_meta)", ckpt["meta"], "classifier")
    require_keys(meta, ("arch", "input_shape", "num_classes", "mean", "std"), f"{path} (its meta)", "classifier")
    if not isinstance(ckpt["state_dict"], dict):
        raise field_error(path, "state_dict", "a dict of tensors", ckpt["state_dict"], "classifier")
    try:
        model = build_classifier(meta["arch"], meta["input_shape"], meta["num_classes"], **meta.get("arch_kwargs", {}))
    except Exception as e:
        raise ValueError(f"{path}: its meta does not describe a classifier this tldr_fast builds: {e}") from e
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:  # parameters of another layout: saved by an older tldr_fast's model code
        raise ValueError(
            f"{path} holds a {meta['arch']!r} classifier whose layers do not match this tldr_fast's "
            f"{meta['arch']!r} model (saved by another version?); retrain it"
        ) from e
    model.tldr_meta = meta
    return model.to(resolve_device(device)).eval()


def training_set(classifier: Optional[nn.Module]) -> ImageDataset:
    """The training subset recorded in ``classifier``'s ``tldr_meta`` (by ``train_classifier``), loaded."""
    meta = getattr(classifier, "tldr_meta", None) or {}
    if "train_source" not in meta:
        raise ValueError(
            "no training set to compare with: give --data, or --classifier with a recorded training subset"
        )
    return load_dataset(meta["train_source"]).select_source(meta["train_indices"])


def accuracies(meta: Dict[str, Any]) -> str:
    """A classifier's recorded accuracies, e.g. ``"train accuracy 0.990, test accuracy 0.950"``."""
    test = meta.get("test_accuracy")
    return f"train accuracy {meta['train_accuracy']:.3f}" + (f", test accuracy {test:.3f}" if test is not None else "")


class Scripted(nn.Module):
    """A TorchScript classifier as an ``nn.Module`` of this library: its layers cannot be hooked, so its
    ``forward`` must return ``(logits [B, K], features [B, D])`` for the feature terms; ``features(x)`` is
    the second (what the feature-space metrics read). Its head is not found either: invert it with
    ``grad_norm="full"`` or ``"off"``."""

    def __init__(self, net: torch.jit.ScriptModule):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Any:
        return self.net(x)

    def features(self, x: Tensor) -> Tensor:
        out = self.net(x)
        if not isinstance(out, tuple) or len(out) != 2:
            raise ValueError("a TorchScript classifier's features are the second output of (logits, features)")
        return out[1]


def parse_preprocess(text: str) -> Dict[str, Any]:
    """``--preprocess``: what a classifier of another library expects of the generator's [0, 1] images, as
    the ``mean``/``std`` of a ``tldr_meta``: ``unit`` (the [0, 1] images), ``identity`` ([-1, 1]), or
    ``MEAN,STD`` with numbers or ``:``-separated numbers per channel, e.g. ``0.1307,0.3081`` or
    ``0.485:0.456:0.406,0.229:0.224:0.225``."""
    named = {"unit": ([0.0], [1.0]), "identity": ([0.5], [0.5])}
    try:
        mean, std = named[text] if text in named else ([float(v) for v in part.split(":")] for part in text.split(","))
    except ValueError:
        mean, std = None, None
    if mean is None or not std or len(mean) != len(std) or min(std) <= 0:
        raise ValueError(
            f"--preprocess expects unit, identity or MEAN,STD (per channel: M1:M2:M3,S1:S2:S3; std > 0), got {text!r}"
        )
    return {"mean": mean, "std": std}


def _is_torchscript(path: PathLike) -> bool:
    """Whether ``path`` is a TorchScript file (a zip archive with ``constants.pkl``, as ``torch.jit.save`` writes)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") for n in archive.namelist())


def load_model(
    spec: str, device: str = "cpu", weights: Optional[PathLike] = None, preprocess: Optional[str] = None
) -> nn.Module:
    """A classifier named on the command line, in eval mode on ``device``: a checkpoint of
    ``save_classifier``, a TorchScript file (``Scripted``), or ``module:factory`` (a function of an
    importable module that builds the ``nn.Module``) with its state dict ``weights``. The last two learn
    their input normalisation from ``preprocess`` (``parse_preprocess``; default ``unit``) as the
    ``tldr_meta`` of this library's classifiers. Errors name the argument."""
    import importlib

    if weights is not None and ":" not in str(spec):
        raise ValueError("--weights is for a --classifier given as module:factory")
    if Path(spec).is_file():
        if _is_torchscript(spec):
            model: nn.Module = Scripted(torch.jit.load(spec, map_location=device))
        else:
            if preprocess is not None:
                raise ValueError(
                    "--preprocess is for a TorchScript or module:factory classifier; a checkpoint records its own"
                )
            return load_classifier(spec, device)
    elif ":" in spec:
        module_name, _, factory = spec.partition(":")
        try:
            build = getattr(importlib.import_module(module_name), factory)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"--classifier {spec!r}: cannot import {factory} from {module_name} ({e})") from e
        model = build()
        if not isinstance(model, nn.Module):
            raise ValueError(f"--classifier {spec!r}: {factory}() returned a {type(model).__name__}, not an nn.Module")
        if weights is None:
            raise ValueError(f"--classifier {spec!r} needs --weights: the state dict of the model it builds")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        except (RuntimeError, TypeError, AttributeError) as e:
            raise ValueError(
                f"--weights {weights}: not a state dict of {spec} ({' '.join(str(e).split())[:200]})"
            ) from e
    else:
        raise FileNotFoundError(f"--classifier {spec!r} is neither a file nor module:factory")
    model.tldr_meta = parse_preprocess(preprocess or "unit")
    return model.to(device).eval()
