"""The leakage benchmark: a fixed, seeded suite that measures how training-like an inversion's images are.

For each **target** (a classifier the benchmark trains itself, cached: a data set, a training-set size
per class and an architecture) and each seed, it inverts the target with the library's defaults (plus
the overrides of the variant under test) and evaluates the generated images (``tldr_fast.evaluate``):

* attack accuracy under an independent **evaluation classifier** (a LeNet, an architecture no target
  has, trained with shift augmentation on part of the test split: data disjoint from every target's
  training set); its own accuracy on held-out images is reported;
* nearest-neighbour SSIM to the target's training images and, as the **control**, to an equally large
  held-out set of the same classes; one-to-one matched SSIM and the number of distinct training images
  matched at SSIM >= tau; same-class diversity; the target's own accuracy and confidence;
* the same metrics for **reference images**: real unseen images, uniform noise, and an all-black image
  (on MNIST-like data most 7x7 windows of a digit are background, so black alone scores ~0.5).

The test split of each data set is divided, per class and seeded, into the held-out control set, the
real reference images, and the evaluation classifier's training set. Results: ``results.json`` (every
run, means and spreads over seeds, references, versions, settings), ``results.md`` (tables) and a grid
per target and variant (``grids/<target>--<variant>.png``, the first seed's images beside their nearest
training images). Every finished run is kept in ``runs/`` and reused by a rerun with the same settings.

    tldr-fast leakage --suite quick            # CI smoke test, < 3 minutes on 2 CPU cores
    tldr-fast leakage                          # the default suite (< 45 minutes on 2 CPU cores)
    tldr-fast leakage --suite colour           # coloured MNIST and Fashion-MNIST, plain and BN CNNs
    tldr-fast leakage --suite full             # every target (hours on a CPU; for a GPU)
    tldr-fast leakage --variant class:diversity=class --variant no-bn:bn_stats=0   # an ablation
    tldr-fast leakage --data mine=train.npz,test.npz --targets mine-cnn-100   # a data set of your own
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from . import checkpoint, models
from .checkpoint import atomic_write, atomic_write_text, cache_dir, check_folder, json_digest, output_folder
from .config import InversionConfig, parse_overrides
from .data import COLOUR_PREFIX, SPLIT_DATA, DataUnavailable, ImageDataset, content_digest, load_dataset, subset
from .evaluate import EvaluationReport, evaluate
from .models import load_classifier, save_classifier, train_classifier
from .progress import progress_bar
from .utility import Teaching

PathLike = Union[str, os.PathLike]

# the numbers every run reports, in table order (keys of EvaluationReport's "overall", plus seconds)
METRICS = (
    "attack_accuracy",
    "nn_ssim_mean",
    "train_control_ssim_mean",
    "held_out_ssim_mean",
    "leakage_gap",
    "closer_to_train",
    "matched_ssim_mean",
    "n_train_matched",
    "same_class_ssim_mean",
    "target_accuracy",
    "target_confidence",
    # what the images teach (tldr_fast.utility): metrics a dark background cannot fool
    "nn_ssim_ci_mean",
    "cas",
    "worth_real_per_class",
    "distill_accuracy",
    "precision",
    "recall",
    "density",
    "coverage",
    "feature_nn_ratio",
)
REFERENCES = ("real_unseen", "noise", "black")
CACHE_VERSION = 1  # part of every cached classifier's file name: bump when a training recipe changes
# the target architectures: every one of tldr_fast.models.ARCHS but the evaluation classifier's (LeNet)
ARCHS = tuple(a for a in models.ARCHS if a != "lenet")
DATA = SPLIT_DATA  # the data sets with a train and a test split
COLOUR_DATA = tuple(d for d in DATA if d.startswith(COLOUR_PREFIX))


@dataclass(frozen=True)
class Target:
    """A classifier the benchmark trains on ``n_per_class`` images of each class of ``data``'s train split."""

    data: str  # a load_dataset name with a test split: "mnist", "fashion-mnist", "colour-mnist", ...
    n_per_class: Union[int, str]  # or "all"
    arch: str  # a key of tldr_fast.models.ARCHS

    @property
    def name(self) -> str:
        return f"{self.data}-{self.arch}-{self.n_per_class}"

    @classmethod
    def parse(cls, name: str, data: Sequence[str] = DATA) -> "Target":
        """``"mnist-plain_cnn-1000"`` -> ``Target("mnist", 1000, "plain_cnn")``; a ``ValueError`` that lists
        the valid data sets (``data``) and architectures for a name of another form."""
        parts = name.rsplit("-", 2)
        if len(parts) == 3 and parts[0] in data and parts[1] in ARCHS:
            data, arch, n = parts
            if n == "all" or (n.isdigit() and int(n) > 0):
                return cls(data, n if n == "all" else int(n), arch)
        raise ValueError(
            f"target {name!r} is not DATA-ARCH-N: DATA one of {', '.join(data)}; ARCH one of {', '.join(ARCHS)}; "
            "N images per class (a positive integer) or 'all'; e.g. mnist-cnn-1000"
        )


@dataclass(frozen=True)
class Suite:
    """Targets, seeds and the sizes of the measurement.

    ``invert`` holds the suite's own inversion settings (empty for the real suites: the library's
    defaults are what they measure; the quick suite shrinks the run to a smoke test).
    """

    targets: Tuple[Target, ...]
    seeds: Tuple[int, ...] = (0, 1, 2)
    eval_per_class: int = 20  # generated images per class that are evaluated
    teach_per_class: int = 100  # generated images per class the students of CAS and distillation learn from
    teaching: Teaching = Teaching()  # the students' recipe and the real curve's sizes
    held_out_per_class: int = 400  # the control set, from the test split
    real_per_class: int = 20  # real unseen reference images, from the test split
    judge_epochs: int = 20
    judge_max_per_class: Optional[int] = None  # None: the rest of the test split
    target_epochs: Tuple[Tuple[Any, int], ...] = ((10, 60), (100, 30), (1000, 15), ("all", 3))
    invert: Tuple[Tuple[str, Any], ...] = ()


def _grid(data: Sequence[str], archs: Sequence[str], sizes: Sequence[Any]) -> Tuple[Target, ...]:
    return tuple(Target(d, n, a) for d in data for n in sizes for a in archs)


SUITES: Dict[str, Suite] = {
    # CI smoke test: one tiny target, one seed, a short inversion; checks that everything runs and
    # writes well-formed results (no quality threshold is meaningful at this size)
    "quick": Suite(
        targets=(Target("mnist", 10, "mlp"),),
        seeds=(0,),
        eval_per_class=4,
        teach_per_class=4,
        teaching=Teaching(steps=10, real_sizes=(1, 4), draws=1),
        held_out_per_class=10,
        real_per_class=4,
        judge_epochs=2,
        judge_max_per_class=50,
        target_epochs=((10, 30),),
        invert=(("steps", 20), ("batch_size", 32)),
    ),
    # what fits in 45 minutes on a 2-core CPU: the two CNNs at 1,000 per class, the memorising regime at
    # 10 per class, an MLP and Fashion-MNIST
    "default": Suite(
        targets=_grid(["mnist"], ["plain_cnn", "cnn"], [10, 1000])
        + (Target("mnist", 1000, "mlp"), Target("fashion-mnist", 100, "cnn")),
    ),
    # colour: coloured MNIST and Fashion-MNIST (each image's ink and background drawn per image), 100 per class
    "colour": Suite(targets=_grid(COLOUR_DATA, ["plain_cnn", "cnn"], [100])),
    # everything: MNIST at 10, 100, 1,000 per class and all 60k, Fashion-MNIST at 100, three architectures,
    # and the colour suite's targets
    "full": Suite(
        targets=_grid(["mnist"], ARCHS, [10, 100, 1000, "all"])
        + _grid(["fashion-mnist"], ARCHS, [100])
        + _grid(COLOUR_DATA, ["plain_cnn", "cnn"], [100])
    ),
}


@dataclass
class Split:
    """A data set's parts: the targets' pool (train split) and the test split's three disjoint parts."""

    train: ImageDataset
    held_out: ImageDataset  # the control set
    real: ImageDataset  # real unseen reference images
    judge: ImageDataset  # the evaluation classifier's training set
    digest: Optional[str] = None  # a user data set's content (pixels and labels of both splits): in every recipe


def user_data(sources: Optional[Mapping[str, Sequence[Any]]], what: str = "data") -> Dict[str, Tuple[Any, ...]]:
    """The user's data sets ``{name: (train, test)}`` loaded and checked: ``{name: (train, test, digest)}``.

    ``train`` and ``test`` are anything ``load_dataset`` reads (an ``.npz`` file, a folder of class folders,
    IDX files), grey or colour; targets name the data set like the built-in ones (``NAME-ARCH-N``). The two
    must have the same classes and image shape; ``digest`` (their pixels and labels) goes into the cached
    classifiers' recipes and the stored runs' keys, so edited files are never mistaken for the old ones.
    Errors name ``what`` and the data set."""
    loaded: Dict[str, Tuple[Any, ...]] = {}
    for name, pair in (sources or {}).items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+)*", name):
            raise ValueError(f"{what}: name {name!r} must be letters, digits, '_', '.' and inner '-'")
        if name in DATA:
            raise ValueError(f"{what}: {name!r} is a built-in data set; give yours another name")
        if isinstance(pair, (str, bytes)) or len(pair) != 2:
            raise ValueError(f"{what}[{name!r}] must be (train, test): two data sets load_dataset reads")
        train, test = (load_dataset(p) for p in pair)
        if train.class_names != test.class_names or train.image_shape != test.image_shape:
            raise ValueError(
                f"{what}[{name!r}]: the train and test sets differ: {train.num_classes} classes of "
                f"{tuple(train.image_shape)} against {test.num_classes} of {tuple(test.image_shape)}"
            )
        loaded[name] = (train, test, content_digest(train, test))
    return loaded


def split(data: str, suite: Suite, seed: int = 12345, user: Optional[Mapping[str, Tuple[Any, ...]]] = None) -> Split:
    """The seeded, per-class split of ``data``'s test split (see the module docstring); ``user``: the user's
    data sets as ``user_data`` returns them."""
    if user and data in user:
        train, test, digest = user[data]
    else:
        train, test, digest = load_dataset(f"{data}:train"), load_dataset(f"{data}:test"), None
    held = subset(test, suite.held_out_per_class, seed=seed)
    rest = _without(test, held)
    real = subset(rest, suite.real_per_class, seed=seed + 1)
    judge = _without(rest, real)
    if suite.judge_max_per_class is not None:
        judge = subset(judge, suite.judge_max_per_class, seed=seed + 2)
    return Split(train, held, real, judge, digest)


def _without(ds: ImageDataset, part: ImageDataset) -> ImageDataset:
    keep = ~torch.isin(ds.indices, part.indices)
    return ds.select(torch.nonzero(keep).view(-1))


def _recipe(kind: str, data: str, arch: str, train_set: ImageDataset, epochs: int, **more: Any) -> Dict[str, Any]:
    """What a cached classifier was trained from: stored in its file and checked when it is loaded."""
    return {
        "kind": kind,
        "cache_version": CACHE_VERSION,
        "data": data,
        "arch": arch,
        "n_train": len(train_set),
        "train_indices": json_digest(train_set.indices.tolist()),
        "epochs": epochs,
        "seed": 0,
        "num_classes": train_set.num_classes,
        "input_shape": list(train_set.image_shape),
        **more,
    }


def _content(parts: Split) -> Dict[str, str]:
    """A user data set's digest for a recipe (nothing for the built-in data sets, whose recipes name them)."""
    return {} if parts.digest is None else {"data_digest": parts.digest}


def _mismatch(meta: Dict[str, Any], recipe: Dict[str, Any]) -> Optional[str]:
    """Why a loaded classifier is not the one ``recipe`` trains (``None``: it is)."""
    if meta.get("num_classes") != recipe["num_classes"]:
        return f"it has {meta.get('num_classes')} classes, the data {recipe['num_classes']}"
    if list(meta.get("input_shape") or []) != recipe["input_shape"]:
        return f"it takes images of shape {meta.get('input_shape')}, the data's are {recipe['input_shape']}"
    stored = meta.get("leakage_recipe")
    if not isinstance(stored, dict):
        return "it records no training recipe"
    differ = [k for k in recipe if stored.get(k) != recipe[k]]
    if differ:
        return "its training recipe differs in " + ", ".join(
            f"{k} ({stored.get(k)!r}, not {recipe[k]!r})" for k in differ
        )
    return None


def _cached(
    path: Path, recipe: Dict[str, Any], train: Callable[[], nn.Module], device: str, say: Callable[[str], None]
) -> nn.Module:
    """The classifier cached at ``path`` if it was trained by ``recipe`` for this data, else ``train()``'s
    (saved there with its recipe)."""
    if path.is_file():
        try:
            model = load_classifier(path, device)
            why = _mismatch(model.tldr_meta, recipe)
        except Exception as e:  # noqa: BLE001 - an unreadable cache file is retrained, whatever its fault
            model, why = None, f"it does not load ({type(e).__name__}: {' '.join(str(e).split())})"
        if why is None:
            return model
        say(f"retraining the cached classifier {path}: {why}")
    model = train()
    model.tldr_meta["leakage_recipe"] = recipe
    save_classifier(model, path)
    return model


def judge(data: str, parts: Split, suite: Suite, cache: Path, device: str, say: Callable[[str], None]) -> nn.Module:
    """The evaluation classifier of ``data`` (trained once, then loaded from ``cache``)."""
    n = len(parts.judge)
    path = cache / f"leakage-v{CACHE_VERSION}-judge-{data}-lenet-{n}-e{suite.judge_epochs}.pt"
    recipe = _recipe("judge", data, "lenet", parts.judge, suite.judge_epochs, augment=2, **_content(parts))

    def train() -> nn.Module:
        say(f"training the evaluation classifier (lenet) on {n} {data} test-split images")
        return train_classifier(
            parts.judge, "lenet", epochs=suite.judge_epochs, augment=2, device=device, test=parts.held_out
        )

    return _cached(path, recipe, train, device, say)


def target(t: Target, parts: Split, suite: Suite, cache: Path, device: str, say: Callable[[str], None]) -> nn.Module:
    """The classifier of target ``t`` (trained once, then loaded from ``cache``)."""
    epochs = dict(suite.target_epochs)[t.n_per_class]
    path = cache / f"leakage-v{CACHE_VERSION}-{t.name}-e{epochs}.pt"
    train_set = subset(parts.train, t.n_per_class, seed=0)
    batch = 64 if len(train_set) <= 20_000 else 128
    recipe = _recipe("target", t.data, t.arch, train_set, epochs, batch_size=batch, **_content(parts))

    def train() -> nn.Module:
        say(f"training target {t.name} on {len(train_set)} images ({epochs} epochs)")
        return train_classifier(train_set, t.arch, epochs=epochs, batch_size=batch, device=device, test=parts.held_out)

    return _cached(path, recipe, train, device, say)


def _training_set(model: nn.Module) -> ImageDataset:
    meta = model.tldr_meta
    return load_dataset(meta["train_source"]).select_source(meta["train_indices"])


def _overall(report: EvaluationReport) -> Dict[str, Any]:
    o = report.to_dict()["overall"]
    return {k: o.get(k) for k in METRICS}


def references(
    model: nn.Module, judge_model: nn.Module, train_set: ImageDataset, parts: Split, suite: Suite, device: str
) -> Dict[str, Dict[str, Any]]:
    """The metrics of real unseen images, uniform noise and an all-black image, as if generated."""
    real = parts.real
    gen = torch.Generator().manual_seed(0)
    images = {
        "real_unseen": real.images,
        "noise": torch.rand(real.images.shape, generator=gen),
        "black": torch.zeros_like(real.images),
    }
    out = {}
    for name, x01 in images.items():
        report = evaluate(
            x01,
            train_set,
            real.labels,
            value_range=(0.0, 1.0),
            classifier=model,
            eval_classifier=judge_model,
            held_out=parts.held_out,
            device=device,
        )
        out[name] = _overall(report)
    return out


def _summary(runs: List[Dict[str, Any]]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    mean, spread = {}, {}
    for k in METRICS + ("seconds",):
        values = [r[k] for r in runs if r.get(k) is not None]
        mean[k] = statistics.fmean(values) if values else None
        spread[k] = statistics.stdev(values) if len(values) > 1 else None
    return mean, spread


# the invert keywords every run gets from the benchmark itself, and where each is given instead
RESERVED = {"seed": "--seeds (seeds=)", "device": "--device (device=)", "progress": "--quiet (progress=)"}
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a variant's name is part of its grid's file name


def check_overrides(overrides: Mapping[str, Any], what: str = "variants") -> None:
    """A ``ValueError`` naming ``what`` unless ``overrides`` are ``invert`` options a run may take (not one
    of ``RESERVED``, each known and valid for ``InversionConfig``)."""
    for key, instead in RESERVED.items():
        if key in overrides:
            raise ValueError(f"{what}: {key!r} is set by the benchmark for every run; give it with {instead}")
    try:
        InversionConfig().with_overrides(**overrides)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: {e}") from e


def parse_variants(
    common: Mapping[str, Any], specs: Sequence[str], ablation: bool = False
) -> Dict[str, Dict[str, Any]]:
    """The command line's variants: ``{"defaults": common}`` (the options of ``--set``) and one variant per
    ``specs`` entry ``NAME:KEY=VALUE[,KEY=VALUE]`` (``--variant``; with ``ablation``, every variant of
    ``ABLATION`` too), each over ``common``; each checked, an error names the option."""
    check_overrides(common, "--set")
    variants = {"defaults": dict(common)}
    specs = list(specs)
    if ablation:
        specs += [
            f"{name}:" + ",".join(f"{k}={json.dumps(v)}" for k, v in changes.items())
            for name, changes in ABLATION.items()
        ]
    for spec in specs:
        name, sep, rest = spec.partition(":")
        if not sep or not name:
            raise ValueError(f"--variant expects NAME:KEY=VALUE[,KEY=VALUE], got {spec!r}")
        check_variant_name(name, "--variant")
        if name in variants:
            taken = "the runs of --set's options" if name == "defaults" else "another variant (--variant or --ablation)"
            raise ValueError(f"--variant {name!r}: that name is taken by {taken}; give each variant its own name")
        try:  # split at the commas before a KEY=: "eps=0.1,betas=[0.5,0.9]" is two pairs
            changes = parse_overrides([p for p in re.split(r",(?=[^,=\[\]{}]+=)", rest) if p])
        except ValueError as e:
            raise ValueError(f"--variant {name}: {e}") from None
        check_overrides(changes, f"--variant {name}")
        variants[name] = {**common, **changes}
        check_overrides(variants[name], f"--variant {name} with --set")
    return variants


def parse_data(specs: Sequence[str]) -> Dict[str, Tuple[str, str]]:
    """The command line's data sets of the user: ``{NAME: (TRAIN, TEST)}`` from ``NAME=TRAIN,TEST`` entries
    (``--data``), for ``run``'s ``data``; an error names the option."""
    data: Dict[str, Tuple[str, str]] = {}
    for spec in specs:
        name, equals, paths = spec.partition("=")
        train, comma, test = paths.partition(",")
        if not (name and equals and train and comma and test):
            raise ValueError(
                f"--data expects NAME=TRAIN,TEST (your data set's name, train and test sets), got {spec!r}"
            )
        if name in data:
            raise ValueError(f"--data gives {name!r} twice; give each data set its own name")
        data[name] = (train, test)
    return data


def check_variant_name(name: Any, what: str = "variants") -> None:
    """A ``ValueError`` naming ``what`` unless ``name`` can name a variant (and its grid file)."""
    if not isinstance(name, str) or not VARIANT_NAME.fullmatch(name):
        raise ValueError(
            f"{what}: a variant's name is letters, digits, '.', '_' and '-' (it names its grid file), got {name!r}"
        )


def check_seeds(seeds: Sequence[Any], what: str = "seeds") -> Tuple[int, ...]:
    """``seeds`` as a tuple if they are distinct integers >= 0 (one run each), else a ``ValueError`` naming ``what``."""
    seeds = tuple(seeds)
    if not seeds:
        raise ValueError(f"{what} is empty: give at least one seed, e.g. 0,1,2")
    for x in seeds:
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            raise ValueError(f"{what}: a seed is an integer >= 0, got {x!r}")
    twice = [x for i, x in enumerate(seeds) if x in seeds[:i]]
    if twice:
        raise ValueError(f"{what} gives seed {twice[0]} more than once; each seed is one run, give it once")
    return seeds


def choose_targets(
    suite: Suite, names: Optional[Sequence[str]] = None, what: str = "targets", data: Sequence[str] = DATA
) -> List[Target]:
    """The targets ``names`` (``Target.name``s; ``None``: the suite's), checked before any work: each of the
    form DATA-ARCH-N (DATA one of ``data``), N one of the suite's sizes (it sets the epochs), none twice.
    Errors name ``what``."""
    if names is None:
        return list(suite.targets)
    if isinstance(names, str):
        raise ValueError(f"{what} is a list of target names, got the string {names!r}")
    known = {t.name: t for t in suite.targets}
    sizes = [n for n, _ in suite.target_epochs]
    chosen: List[Target] = []
    for name in names:
        try:
            t = known.get(name) or Target.parse(name, data)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
        if t.n_per_class not in sizes:
            raise ValueError(
                f"{what}: target {name!r}: this suite trains targets of {', '.join(map(str, sizes))} images per "
                f"class (the N of DATA-ARCH-N; it sets the epochs), not {t.n_per_class}"
            )
        if t in chosen:
            raise ValueError(f"{what} names {name!r} twice")
        chosen.append(t)
    if not chosen:
        raise ValueError(f"{what} is empty: give at least one target, e.g. mnist-cnn-1000")
    return chosen


def _read_record(path: Path, key: str) -> Optional[Dict[str, Any]]:
    """The stored record at ``path`` if it is readable and was stored under ``key``, else ``None``."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("key") == key else None


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


class _Store:
    """The finished parts of a suite, one JSON file each under ``out/runs/<target>/``, keyed by a digest of
    everything that decides their numbers: a target's record (its classifiers' numbers, the references,
    the judge's) and each run's (its numbers, the real curve, and its grid beside it as a PNG)."""

    def __init__(self, folder: Path, common: Dict[str, Any]):
        self.folder = folder
        self.common = common  # what every key holds: versions, device, the suite's measurement settings

    def target_key(self, t: Target) -> str:
        return json_digest({"target": t.name, **self.common})

    def run_key(self, t: Target, settings: Mapping[str, Any]) -> str:
        return json_digest({"target": self.target_key(t), "invert": dict(settings)})

    def path(self, t: Target, key: str, kind: str, suffix: str = ".json") -> Path:
        return self.folder / t.name / f"{kind}-{key[:24]}{suffix}"

    def target(self, t: Target) -> Optional[Dict[str, Any]]:
        key = self.target_key(t)
        return _read_record(self.path(t, key, "target"), key)

    def run(self, t: Target, key: str) -> Optional[Dict[str, Any]]:
        record = _read_record(self.path(t, key, "run"), key)
        return record if record is not None and self.path(t, key, "run", ".png").is_file() else None


def run(
    suite: Union[str, Suite] = "default",
    out: PathLike = "leakage_out",
    variants: Optional[Mapping[str, Mapping[str, Any]]] = None,
    targets: Optional[Sequence[str]] = None,
    seeds: Optional[Sequence[int]] = None,
    cache: Optional[PathLike] = None,
    device: str = "cpu",
    progress: bool = True,
    say: Callable[[str], None] = lambda msg: None,
    data: Optional[Mapping[str, Sequence[Any]]] = None,
) -> Dict[str, Any]:
    """Run the benchmark; write ``results.json``, ``results.md`` and ``grids/`` into ``out``; return the results.

    Every finished run is stored under ``out/runs/`` as it finishes, keyed by a digest of all that decides
    its numbers (target, seed, invert options, the suite's measurement and teaching settings, tldr_fast's
    version, device); a rerun reuses what is stored and says how many runs it reused, and its results
    equal an uninterrupted run's. ``results.json`` holds the targets finished so far, rewritten after each;
    before the suite ends it is never replaced by one that lacks a target it holds.

    Args:
        suite: "quick", "default", "colour", "full" or a ``Suite``.
        variants: ``{name: invert overrides}``, each measured on every target (default: ``{"defaults": {}}``,
            the library's defaults). Overrides are ``invert`` keywords, e.g. ``{"diversity": "class"}``;
            not ``seed``, ``device`` or ``progress``, which the benchmark sets itself.
        targets: target names (``Target.name``) to run instead of the suite's, e.g. ``["mnist-cnn-1000"]``.
        seeds: replace the suite's seeds (distinct integers >= 0).
        cache: where trained classifiers are kept (``cache_dir``).
        device: where everything runs.
        data: the user's data sets, ``{name: (train, test)}``, each anything ``load_dataset`` reads (see
            ``user_data``); ``targets`` name them like the built-in ones, e.g. ``{"mine": ("tr.npz",
            "te.npz")}`` and ``targets=["mine-cnn-100"]``.

    Raises:
        ValueError, NotADirectoryError: a bad argument (named), before any work.
    """
    from . import __version__, invert

    if isinstance(suite, str) and suite not in SUITES:
        raise ValueError(f"suite must be one of {', '.join(SUITES)} or a Suite, got {suite!r}")
    s = SUITES[suite] if isinstance(suite, str) else suite
    suite_name = suite if isinstance(suite, str) else "custom"
    user = user_data(data)
    chosen = choose_targets(s, targets, data=DATA + tuple(user))
    seeds = check_seeds(s.seeds if seeds is None else seeds)
    variants = dict(variants or {"defaults": {}})
    for vname, overrides in variants.items():
        check_variant_name(vname)
        check_overrides(overrides, f"variants[{vname!r}]")
    out = check_folder(Path(out), "out")
    cache_path = check_folder(cache_dir(cache), "cache")
    (out / "grids").mkdir(parents=True, exist_ok=True)
    cache_path.mkdir(parents=True, exist_ok=True)
    header: Dict[str, Any] = {
        "suite": suite_name,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "versions": {"tldr_fast": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "machine": {
            "device": device,
            "cpu_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
        },
        "settings": {**{k: v for k, v in asdict(s).items() if k != "targets"}, "seeds": list(seeds), "tau": 0.4},
        "variants": {k: dict(v) for k, v in variants.items()},
    }
    measurement = {k: v for k, v in asdict(s).items() if k not in ("targets", "seeds", "invert")}
    common = {"versions": [__version__, CACHE_VERSION], "device": device, "suite": measurement}
    if user:  # their content decides the numbers too
        common["data"] = {name: u[2] for name, u in sorted(user.items())}
    store = _Store(out / "runs", common)

    def run_keys(t: Target) -> Dict[Tuple[str, int], str]:  # (variant, seed) -> the key of its run
        return {
            (v, seed): store.run_key(t, {**dict(s.invert), **dict(o), "seed": seed})
            for v, o in variants.items()
            for seed in seeds
        }

    n_runs = len(variants) * len(seeds)
    reused = sum(store.run(t, key) is not None for t in chosen for key in run_keys(t).values())
    if reused:
        say(f"reusing {reused} of {len(chosen) * n_runs} runs stored in {store.folder} (the same settings)")
    done: List[Tuple[Target, Dict[str, Any], Dict[Tuple[str, int], Dict[str, Any]]]] = []
    skipped: Dict[str, str] = {}
    splits: Dict[str, Split] = {}
    judges: Dict[str, nn.Module] = {}
    bar = progress_bar(total=len(chosen) * n_runs, desc="leakage", unit="run", disable=not progress)
    for t in chosen:
        keys = run_keys(t)
        records = {key: store.run(t, key) for key in keys.values()}
        todo = [(v, seed) for (v, seed), key in keys.items() if records[key] is None]
        bar.update(n_runs - len(todo))
        record = store.target(t)
        if record is None or todo:
            try:
                if t.data not in splits:
                    splits[t.data] = split(t.data, s, user=user)
                    judges[t.data] = judge(t.data, splits[t.data], s, cache_path, device, say)
            except DataUnavailable as e:
                skipped[t.name] = str(e)
                say(f"skipping {t.name}: {e}")
                bar.update(len(todo))
                continue
            parts, judge_model = splits[t.data], judges[t.data]
            model = target(t, parts, s, cache_path, device, say)
            train_set = _training_set(model)
            if record is None:
                record = {
                    "key": store.target_key(t),
                    "judge": {
                        "arch": judge_model.tldr_meta["arch"],
                        "n_train": len(parts.judge),
                        "held_out_accuracy": judge_model.tldr_meta["test_accuracy"],
                    },
                    "entry": {
                        "target": t.name,
                        "data": t.data,
                        "arch": t.arch,
                        "n_per_class": t.n_per_class,
                        "n_train": len(train_set),
                        "train_accuracy": model.tldr_meta["train_accuracy"],
                        "held_out_accuracy": model.tldr_meta["test_accuracy"],
                        "references": references(model, judge_model, train_set, parts, s, device),
                    },
                }
                _write_json(store.path(t, record["key"], "target"), record)
            for vname, seed in todo:
                key = keys[vname, seed]
                if records[key] is not None:  # another variant with the same settings measured it
                    bar.update()
                    continue
                bar.set_postfix(target=t.name, variant=vname, seed=seed, refresh=False)
                settings = {**dict(s.invert), **dict(variants[vname]), "seed": seed}
                numbers, report = _measure(
                    invert, model, train_set, parts, judge_model, s, settings, cache_path, device
                )
                report.save_grid(store.path(t, key, "run", ".png"), per_class=8)
                records[key] = {
                    "key": key,
                    "settings": settings,
                    "run": numbers,
                    "real_curve": report.utility["real_curve"],
                }
                _write_json(store.path(t, key, "run"), records[key])  # last: a run is done once this exists
                bar.update()
        for vname in variants:  # the grid of each variant's first seed
            grid = store.path(t, keys[vname, seeds[0]], "run", ".png").read_bytes()
            atomic_write(out / "grids" / f"{t.name}--{vname}.png", lambda f, grid=grid: f.write(grid))
        done.append((t, record, {vs: records[key] for vs, key in keys.items()}))
        _write(out, _assemble(header, done, variants, seeds, skipped), final=False)
    bar.close()
    results = _assemble(header, done, variants, seeds, skipped)
    _write(out, results, final=True)
    return results


def run_options(
    common: Mapping[str, Any],
    *,
    suite: Literal["quick", "default", "colour", "full"] = "default",
    targets: Optional[str] = None,
    seeds: Optional[Sequence[int]] = None,
    variants: Sequence[str] = (),
    ablation: bool = False,
    out: str = "leakage_out",
    cache_dir: Optional[str] = None,
    data: Sequence[str] = (),
    overrides: Sequence[str] = (),
    device: str = "cpu",
    progress: bool = True,
    say: Callable[[str], None] = lambda msg: None,
) -> Dict[str, Any]:
    """The leakage benchmark: invert classifiers it trains, measure how training-like the images are.

    Train (or reuse from --cache-dir) the suite's target classifiers and an independent evaluation
    classifier, invert each target over several seeds, and measure attack accuracy, nearest-neighbour SSIM to
    the training images against the control (as many held-out images), one-to-one matches and same-class
    diversity, beside the same metrics of real unseen images, noise and a black image. Writes results.json,
    results.md and grids/ into --out. The invert options apply to every run, --set after them.

    Args:
        common: the invert options of every run, before --set's
        suite: quick: CI smoke test; default: < 45 min; full: every target
        targets: comma-separated target names to run instead of the suite's, e.g.
            mnist-cnn-1000,mnist-plain_cnn-10
        seeds: comma-separated seeds (default: the suite's, 0,1,2)
        variants: measure a variant beside the defaults, e.g. --variant no-bn:bn_stats=0 (repeatable)
        ablation: measure every variant of tldr_fast.leakage.ABLATION beside the defaults
        out: output folder
        cache_dir: where trained classifiers are cached (default: $TLDR_FAST_CACHE or ~/.cache/tldr_fast)
        data: NAME=TRAIN,TEST: a data set of yours, its train and test sets (.npz, a folder of IDX files or of
            class folders); targets name it like the built-in ones, e.g. --data mine=tr.npz,te.npz --targets
            mine-cnn-100 (repeatable)
        overrides: an invert option for every run, e.g. --set diversity=class (repeatable; after the options)

    Returns:
        ``run``'s results; every option is checked before any work, an error names the option.
    """
    try:
        common = {**common, **parse_overrides(overrides)}
    except ValueError as e:
        raise ValueError(f"--set: {e}") from None
    user = parse_data(data)
    chosen_variants = parse_variants(common, variants, ablation)
    seeds = None if seeds is None else check_seeds(seeds, "--seeds")
    chosen = None
    if targets is not None:
        names = [n.strip() for n in targets.split(",")]
        chosen = [t.name for t in choose_targets(SUITES[suite], names, "--targets", DATA + tuple(user))]
    folder = check_folder(checkpoint.cache_dir(cache_dir), "--cache-dir (or $TLDR_FAST_CACHE)")
    output_folder(out)
    return run(suite, out, chosen_variants, chosen, seeds, folder, device, progress, say, user or None)


def _measure(
    invert: Callable[..., Any],
    model: nn.Module,
    train_set: ImageDataset,
    parts: Split,
    judge_model: nn.Module,
    s: Suite,
    settings: Dict[str, Any],
    cache: Path,
    device: str,
) -> Tuple[Dict[str, Any], EvaluationReport]:
    """One run: invert ``model`` with ``settings`` and evaluate the images; its numbers and the report."""
    meta = model.tldr_meta
    start = time.perf_counter()
    inv = invert(model, meta["num_classes"], tuple(meta["input_shape"]), device=device, progress=False, **settings)
    seconds = time.perf_counter() - start
    report = evaluate(
        inv,
        train_set,
        n_per_class=s.eval_per_class,
        classifier=model,
        eval_classifier=judge_model,
        held_out=parts.held_out,
        test=parts.held_out,
        teach_per_class=s.teach_per_class,
        real_pool=parts.train,
        teaching=s.teaching,
        cache=cache,
        device=device,
    )
    return {"seed": settings["seed"], "seconds": seconds, "steps": inv.step, **_overall(report)}, report


def _assemble(
    header: Dict[str, Any],
    done: Sequence[Tuple[Target, Dict[str, Any], Dict[Tuple[str, int], Dict[str, Any]]]],
    variants: Mapping[str, Mapping[str, Any]],
    seeds: Sequence[int],
    skipped: Mapping[str, str],
) -> Dict[str, Any]:
    """The results of the finished targets ``done`` (their stored records), in the suite's order."""
    results: Dict[str, Any] = {**header, "judges": {}, "targets": [], "skipped": dict(skipped), "real_curves": {}}
    for t, record, stored in done:
        results["judges"].setdefault(t.data, record["judge"])
        entry = {**record["entry"], "variants": {}}
        for vname, overrides in variants.items():
            runs = [stored[vname, seed]["run"] for seed in seeds]
            for seed in seeds:
                results["real_curves"][t.data] = stored[vname, seed]["real_curve"]
            mean, spread = _summary(runs)
            entry["variants"][vname] = {"overrides": dict(overrides), "runs": runs, "mean": mean, "std": spread}
        results["targets"].append(entry)
    return results


def _write(out: Path, results: Dict[str, Any], final: bool) -> None:
    """``results.json`` and ``results.md``, atomically. Before the suite ends (``final`` false) a results
    file that holds a target these results lack is kept as it is: an interrupt never shrinks it."""
    path = out / "results.json"
    if not final:
        try:
            held = {e["target"] for e in json.loads(path.read_text())["targets"]}
        except (OSError, ValueError, KeyError, TypeError):
            held = set()
        if held - {e["target"] for e in results["targets"]}:
            return
    _write_json(path, results)
    atomic_write_text(out / "results.md", markdown(results))


def _fmt(v: Optional[float], spread: Optional[float] = None, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    text = f"{v:.{digits}f}"
    return text + (f" ± {spread:.{digits}f}" if spread is not None else "")


COLUMNS = (  # (header, metric, digits)
    ("attack acc", "attack_accuracy", 2),
    ("NN-SSIM train", "nn_ssim_mean", 2),
    ("ctrl: train", "train_control_ssim_mean", 2),
    ("ctrl: held-out", "held_out_ssim_mean", 2),
    ("gap", "leakage_gap", 3),
    ("closer to train", "closer_to_train", 2),
    ("matched SSIM", "matched_ssim_mean", 2),
    ("# matched >= 0.4", "n_train_matched", 1),
    ("same-class SSIM", "same_class_ssim_mean", 2),
    ("target acc", "target_accuracy", 2),
)
TEACH_COLUMNS = (  # what the images teach (tldr_fast.utility): a second table
    ("NN-SSIM train", "nn_ssim_mean", 2),
    ("NN-SSIM contrast-inv.", "nn_ssim_ci_mean", 2),
    ("CAS", "cas", 2),
    ("worth real/class", "worth_real_per_class", 1),
    ("distill acc", "distill_accuracy", 2),
    ("precision", "precision", 2),
    ("recall", "recall", 2),
    ("density", "density", 2),
    ("coverage", "coverage", 2),
    ("feature NN ratio", "feature_nn_ratio", 2),
)


def _table(results: Dict[str, Any], columns: Sequence[Tuple[str, str, int]], seconds: bool) -> List[str]:
    """One row per target and variant (mean ± std over seeds), its references under it."""
    tail = " s/run |" if seconds else ""
    lines = [
        "| target | variant | " + " | ".join(h for h, _, _ in columns) + " |" + tail,
        "|---|---|" + "---|" * (len(columns) + int(seconds)),
    ]
    for e in results["targets"]:
        for vname, v in e["variants"].items():
            cells = [_fmt(v["mean"].get(k), v["std"].get(k), d) for _, k, d in columns]
            time_cell = f" {_fmt(v['mean']['seconds'], digits=0)} |" if seconds else ""
            lines.append(f"| {e['target']} | {vname} | " + " | ".join(cells) + " |" + time_cell)
        for ref in REFERENCES:
            r = e["references"][ref]
            cells = [_fmt(r.get(k), None, d) for _, k, d in columns]
            lines.append(
                f"| ↳ {ref.replace('_', ' ')} | (reference) | " + " | ".join(cells) + " |" + (" |" if seconds else "")
            )
    return lines


def markdown(results: Dict[str, Any]) -> str:
    """The results as Markdown: one table of runs (mean ± std over seeds) with the references under each target."""
    s = results["settings"]
    lines = [
        f"# Leakage benchmark: suite `{results['suite']}`, {results['date']}",
        "",
        f"{len(s['seeds'])} seed(s) {s['seeds']}, {s['eval_per_class']} generated images per class; control: "
        f"{s['held_out_per_class']} held-out images per class (and as many training images); torch "
        f"{results['versions']['torch']}, {results['machine']['device']} ({results['machine']['cpu_threads']} threads).",
        "",
    ]
    for data, j in results["judges"].items():
        lines.append(
            f"Evaluation classifier for {data}: {j['arch']} on {j['n_train']} test-split images, "
            f"held-out accuracy {_fmt(j['held_out_accuracy'], digits=4)}."
        )
    lines += ["", *_table(results, COLUMNS, seconds=True), "", "What the images teach (tldr_fast.utility):", ""]
    lines += _table(results, TEACH_COLUMNS, seconds=False)
    for data, curve in results.get("real_curves", {}).items():
        points = ", ".join(f"{n}/class {a:.2f}" for n, a in curve.items())
        lines.append(f"\nReal curve of {data} (the students' recipe on real training images): {points}.")
    for name, why in results["skipped"].items():
        lines.append(f"\nSkipped {name}: {why}")
    return "\n".join(lines) + "\n"


# The ablation: each variant changes one option of the library's defaults (``--ablation``).
ABLATION: Dict[str, Dict[str, Any]] = {
    "no-moments": {"moments": 0.0},
    "no-bn-stats": {"bn_stats": 0.0},
    "no-geometric": {"shift": 0, "rotate": 0.0, "scale": 0.0},
    "no-mode-seek": {"mode_seek": 0.0},
    "eps-0.2": {"eps": 0.2},
    "class-diversity": {"diversity": "class"},
    "dropout-0.3": {"dropout": 0.3},
    "no-select": {"select": 1},
    # the TLDR paper's method (noise-only perturbations, no image statistics, no selection) at the same budget
    "paper-loss": {
        "moments": 0.0,
        "bn_stats": 0.0,
        "shift": 0,
        "rotate": 0.0,
        "scale": 0.0,
        "mode_seek": 0.0,
        "select": 1,
    },
}
