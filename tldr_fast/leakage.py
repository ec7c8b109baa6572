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
per target (``grids/<target>.png``, seed 0's images beside their nearest training images).

    tldr-fast leakage --suite quick            # CI smoke test, < 3 minutes on 2 CPU cores
    tldr-fast leakage                          # the default suite (< 45 minutes on 2 CPU cores)
    tldr-fast leakage --suite colour           # coloured MNIST and Fashion-MNIST, plain and BN CNNs
    tldr-fast leakage --suite full             # every target (hours on a CPU; for a GPU)
    tldr-fast leakage --variant class:diversity=class --variant no-bn:bn_stats=0   # an ablation
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from . import models
from .checkpoint import atomic_write_text, cache_dir
from .data import DataUnavailable, ImageDataset, load_dataset, subset
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
    def parse(cls, name: str) -> "Target":
        """``"mnist-plain_cnn-1000"`` -> ``Target("mnist", 1000, "plain_cnn")``."""
        data, arch, n = name.rsplit("-", 2)
        return cls(data, n if n == "all" else int(n), arch)


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


# the target architectures: every one of tldr_fast.models.ARCHS but the evaluation classifier's (LeNet)
ARCHS = tuple(a for a in models.ARCHS if a != "lenet")
COLOUR_DATA = ("colour-mnist", "colour-fashion-mnist")
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
    # what fits in 45 minutes on a 2-core CPU: the goal targets at 1,000 per class, the
    # memorising regime at 10 per class, an MLP and Fashion-MNIST
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


def split(data: str, suite: Suite, seed: int = 12345) -> Split:
    """The seeded, per-class split of ``data``'s test split (see the module docstring)."""
    test = load_dataset(f"{data}:test")
    held = subset(test, suite.held_out_per_class, seed=seed)
    rest = _without(test, held)
    real = subset(rest, suite.real_per_class, seed=seed + 1)
    judge = _without(rest, real)
    if suite.judge_max_per_class is not None:
        judge = subset(judge, suite.judge_max_per_class, seed=seed + 2)
    return Split(load_dataset(f"{data}:train"), held, real, judge)


def _without(ds: ImageDataset, part: ImageDataset) -> ImageDataset:
    keep = ~torch.isin(ds.indices, part.indices)
    return ds.select(torch.nonzero(keep).view(-1))


def _cached(path: Path, train: Callable[[], nn.Module], device: str, say: Callable[[str], None]) -> nn.Module:
    if path.is_file():
        try:
            return load_classifier(path, device)
        except ValueError as e:  # saved by another version: train again
            say(f"retraining {path.name} ({e})")
    model = train()
    save_classifier(model, path)
    return model


def judge(data: str, parts: Split, suite: Suite, cache: Path, device: str, say: Callable[[str], None]) -> nn.Module:
    """The evaluation classifier of ``data`` (trained once, then loaded from ``cache``)."""
    n = len(parts.judge)
    path = cache / f"leakage-v{CACHE_VERSION}-judge-{data}-lenet-{n}-e{suite.judge_epochs}.pt"

    def train() -> nn.Module:
        say(f"training the evaluation classifier (lenet) on {n} {data} test-split images")
        return train_classifier(
            parts.judge, "lenet", epochs=suite.judge_epochs, augment=2, device=device, test=parts.held_out
        )

    return _cached(path, train, device, say)


def target(t: Target, parts: Split, suite: Suite, cache: Path, device: str, say: Callable[[str], None]) -> nn.Module:
    """The classifier of target ``t`` (trained once, then loaded from ``cache``)."""
    epochs = dict(suite.target_epochs)[t.n_per_class]
    path = cache / f"leakage-v{CACHE_VERSION}-{t.name}-e{epochs}.pt"

    def train() -> nn.Module:
        train_set = subset(parts.train, t.n_per_class, seed=0)
        say(f"training target {t.name} on {len(train_set)} images ({epochs} epochs)")
        batch = 64 if len(train_set) <= 20_000 else 128
        return train_classifier(train_set, t.arch, epochs=epochs, batch_size=batch, device=device, test=parts.held_out)

    return _cached(path, train, device, say)


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
) -> Dict[str, Any]:
    """Run the benchmark; write ``results.json``, ``results.md`` and ``grids/`` into ``out``; return the results.

    Args:
        suite: "quick", "default", "full" or a ``Suite``.
        variants: ``{name: invert overrides}``, each measured on every target (default: ``{"defaults": {}}``,
            the library's defaults). Overrides are ``invert`` keywords, e.g. ``{"diversity": "class"}``.
        targets: target names (``Target.name``) to keep from the suite, e.g. ``["mnist-cnn-1000"]``.
        seeds: replace the suite's seeds.
        cache: where trained classifiers are kept (``cache_dir``).
        device: where everything runs.
    """
    from . import __version__, invert

    s = SUITES[suite] if isinstance(suite, str) else suite
    suite_name = suite if isinstance(suite, str) else "custom"
    chosen = list(s.targets)
    if targets is not None:
        known = {t.name: t for t in s.targets}
        chosen = [known[n] if n in known else Target.parse(n) for n in targets]
    seeds = tuple(s.seeds if seeds is None else seeds)
    variants = dict(variants or {"defaults": {}})
    out = Path(out)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    cache_path = cache_dir(cache)
    cache_path.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Any] = {
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
        "judges": {},
        "targets": [],
        "skipped": {},
    }
    splits: Dict[str, Split] = {}
    judges: Dict[str, nn.Module] = {}
    real_curves: Dict[str, Dict[str, float]] = results.setdefault("real_curves", {})
    bar = progress_bar(total=len(chosen) * len(seeds) * len(variants), desc="leakage", unit="run", disable=not progress)
    for t in chosen:
        try:
            if t.data not in splits:
                splits[t.data] = split(t.data, s)
                judges[t.data] = judge(t.data, splits[t.data], s, cache_path, device, say)
                meta = judges[t.data].tldr_meta
                results["judges"][t.data] = {
                    "arch": meta["arch"],
                    "n_train": len(splits[t.data].judge),
                    "held_out_accuracy": meta["test_accuracy"],
                }
        except DataUnavailable as e:
            results["skipped"][t.name] = str(e)
            say(f"skipping {t.name}: {e}")
            bar.update(len(seeds) * len(variants))
            continue
        parts = splits[t.data]
        model = target(t, parts, s, cache_path, device, say)
        train_set = _training_set(model)
        meta = model.tldr_meta
        entry = {
            "target": t.name,
            "data": t.data,
            "arch": t.arch,
            "n_per_class": t.n_per_class,
            "n_train": len(train_set),
            "train_accuracy": meta["train_accuracy"],
            "held_out_accuracy": meta["test_accuracy"],
            "references": references(model, judges[t.data], train_set, parts, s, device),
            "variants": {},
        }
        for vname, overrides in variants.items():
            runs = []
            for seed in seeds:
                bar.set_postfix(target=t.name, variant=vname, seed=seed, refresh=False)
                settings = {**dict(s.invert), **dict(overrides), "seed": seed}
                start = time.perf_counter()
                inv = invert(
                    model, meta["num_classes"], tuple(meta["input_shape"]), device=device, progress=False, **settings
                )
                seconds = time.perf_counter() - start
                report = evaluate(
                    inv,
                    train_set,
                    n_per_class=s.eval_per_class,
                    classifier=model,
                    eval_classifier=judges[t.data],
                    held_out=parts.held_out,
                    test=parts.held_out,
                    teach_per_class=s.teach_per_class,
                    real_pool=parts.train,
                    teaching=s.teaching,
                    cache=cache_path,
                    device=device,
                )
                real_curves[t.data] = report.utility["real_curve"]
                runs.append({"seed": seed, "seconds": seconds, "steps": inv.step, **_overall(report)})
                if seed == seeds[0]:
                    report.save_grid(out / "grids" / f"{t.name}--{vname}.png", per_class=8)
                bar.update()
            mean, spread = _summary(runs)
            entry["variants"][vname] = {"overrides": dict(overrides), "runs": runs, "mean": mean, "std": spread}
        results["targets"].append(entry)
        _write(out, results)  # after every target: an interrupted suite keeps what it measured
    bar.close()
    _write(out, results)
    return results


def _write(out: Path, results: Dict[str, Any]) -> None:
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, allow_nan=False) + "\n")
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
