"""Audit a classifier: does it give its training images away?

``audit`` inverts the classifier with the library's defaults, samples the inversion (with selection),
and measures the generated images against the training set **and** an equally large set of unseen
images of the same classes (the control), then writes ``report.html``, ``report.json`` and ``grids/``.

    tldr-fast audit --classifier clf.pt --train mnist --held-out mnist:test --out audit/

The held-out images are split, per class and seeded, into **real unseen images** (the null: what an
image that was never trained on scores) and the **control** they are all compared against. Per class,
``m = min(n_train, n_control)`` training and control images are drawn (``evaluate.control_parts``: the
same draws for the generated and the real images), and for every image:

* ``to_train`` / ``to_held``: its nearest-neighbour SSIM to the ``m`` training and the ``m`` control
  images of its class;
* ``closer_to_train``: the probability, over every equally likely draw of ``m`` training and ``m`` control images
  of its class, that its most similar drawn training image is more similar than its most similar drawn
  control image (``evaluate.closer_probability``, exact: no draw's luck in it); with ``m`` equal to both sets'
  sizes it is 1 when ``to_train > to_held`` and 0 otherwise;
* with an evaluation classifier, the same nearest-neighbour distances in its penultimate features;
* its partner in the one-to-one (Hungarian) matching of the class's images to the ``m`` training
  images and, separately, to the ``m`` control images: a **match** when the partner's SSIM >= ``tau``.

The statistics of the verdict:

* **closer-to-train effect**: the mean ``closer_to_train`` of the generated images (the fraction closer to train)
  minus the same mean for real unseen images (the null: a real unseen image is closer to either set by chance); a
  percentile bootstrap interval (generated and real images resampled separately) and a one-sided
  permutation p-value (labels "generated"/"real" permuted: how often chance gives an effect this large);
* **excess matches**: training images matched at SSIM >= ``tau`` minus control images matched by the
  same images; its interval bootstraps the generated images' match indicators (the matching fixed);
* the **verdict**: leakage when the effect's interval lies above 0, "no measurable leakage at this
  budget" when it includes 0, and "closer to unseen images" when it lies below 0.

Every stage is kept in the output folder and reused by a rerun with the same arguments: the
inversion's checkpoint (an interrupted inversion resumes), the sample (``cache/samples-KEY.npz``) and
the measurements (``cache/stats-KEY.json``), each keyed by a digest of what decides it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import atomic_write_text, check_folder, check_writable, json_digest
from .classifier import fingerprint
from .config import InversionConfig
from .data import SPLIT_DATA, ImageDataset, content_digest, load_dataset
from .evaluate import ControlPart, control_parts, evaluate, match_one_to_one
from .models import check_classifier, predict_logits
from .progress import progress_bar
from .utility import nn_feature_distance

Tensor = torch.Tensor
PathLike = Union[str, os.PathLike]
DataArg = Union[None, str, os.PathLike, ImageDataset]

N_PER_CLASS = 100  # generated images per class that are measured
REAL_PER_CLASS = 300  # real unseen images per class of the null (at most half of each held-out class)
RESAMPLES = 2000  # bootstrap resamples and permutations
CONFIDENCE = 0.95
FORMAT = {"inversion": 1, "sample": 1, "statistics": 2}  # in each stage's cache key: bump when it computes anew


@dataclass
class AuditResult:
    """What ``audit`` returns: the one-line ``verdict``, every number (``report``, as in ``report.json``),
    the ``inversion`` and the output folder ``out``."""

    verdict: str
    report: Dict[str, Any]
    inversion: Any
    out: Path


# --- the inputs ---------------------------------------------------------------------------------------


def image_hashes(ds: ImageDataset) -> List[str]:
    """The SHA-256 of each image's bytes (float32 ``[C, H, W]``): equal images, equal hashes."""
    x = ds.images.contiguous().numpy()
    return [hashlib.sha256(x[i].tobytes()).hexdigest() for i in range(len(x))]


def _digest(obj: Any) -> str:
    """A stage's key in ``out``'s file names: ``json_digest``, shortened."""
    return json_digest(obj)[:16]


def _load(data: DataArg, what: str) -> ImageDataset:
    if isinstance(data, ImageDataset):
        return data
    try:
        return load_dataset(data)
    except ValueError as e:  # an unknown name, a malformed file: say which argument it was
        raise ValueError(f"{what} {data}: {e}") from e


def recorded_training_set(classifier: nn.Module) -> ImageDataset:
    """The training subset a classifier of this library records (``tldr_meta``: source and indices)."""
    meta = getattr(classifier, "tldr_meta", None) or {}
    if "train_source" not in meta or "train_indices" not in meta:
        raise ValueError("the classifier records no training set: give its training data (train=, --train)")
    return load_dataset(meta["train_source"]).select_source(meta["train_indices"])


def default_held_out(train: ImageDataset) -> str:
    """The test split of ``train``'s source, for a source that has one (``"mnist:train"`` -> ``"mnist:test"``)."""
    base = train.source.rsplit(":", 1)[0] if train.source.endswith((":train", ":test")) else train.source
    if base not in SPLIT_DATA or train.source.endswith(":test"):
        raise ValueError(
            f"no held-out set given and the training data's source {train.source!r} has no test split to use: give "
            "held-out images of the same classes that the classifier never saw (held_out=, --held-out)"
        )
    return f"{base}:test"


def check_inputs(train: ImageDataset, held: ImageDataset, allow_overlap: bool = False) -> Tuple[ImageDataset, int]:
    """Refuse training and held-out sets that cannot be compared: other classes, other image shapes, a
    class of the training set without held-out images, or held-out images that are also training images
    (by hash; with ``allow_overlap`` they are left out of the held-out set instead). Returns the held-out
    set to use and the number of overlapping images."""
    if list(train.class_names) != list(held.class_names):
        raise ValueError(
            f"the training set ({train.source}) has classes {train.class_names}, the held-out set ({held.source}) "
            f"{held.class_names}: give held-out images of the same classes"
        )
    if train.image_shape != held.image_shape:
        raise ValueError(
            f"the training images ({train.source}) are {train.image_shape}, the held-out images ({held.source}) "
            f"{held.image_shape}: give held-out images of the same shape"
        )
    counts = held.class_counts()
    missing = [train.class_names[c] for c, n in enumerate(train.class_counts()) if n and counts[c] < 2]
    if missing:
        raise ValueError(
            f"the held-out set ({held.source}) has fewer than 2 images of class(es) {missing} of the training set: "
            "it needs real unseen images and control images of every class"
        )
    seen = set(image_hashes(train))
    overlap = [i for i, h in enumerate(image_hashes(held)) if h in seen]
    if overlap and not allow_overlap:
        raise ValueError(
            f"{len(overlap)} of the {len(held)} held-out images ({held.source}) are also training images "
            f"({train.source}): a held-out set must be unseen; give another, or allow_overlap (--allow-overlap) to "
            "leave those images out of it"
        )
    if overlap:
        held = held.select(sorted(set(range(len(held))) - set(overlap)))
    return held, len(overlap)


def split_unseen(held: ImageDataset, n_per_class: int, seed: int = 0) -> Tuple[ImageDataset, ImageDataset]:
    """``(real, control)``: per class, ``min(n_per_class, n_c // 2)`` random held-out images (the real unseen
    images of the null) and the rest (the control every image is compared against); seeded."""
    gen = torch.Generator().manual_seed(seed)
    real = []
    for c, count in enumerate(held.class_counts()):
        members = torch.nonzero(held.labels == c).view(-1)
        real.append(members[torch.randperm(count, generator=gen)[: min(n_per_class, count // 2)]])
    chosen = torch.cat(real).sort().values
    rest = torch.ones(len(held), dtype=torch.bool)
    rest[chosen] = False
    return held.select(chosen), held.select(torch.nonzero(rest).view(-1))


# --- the statistics -----------------------------------------------------------------------------------


def similarities(
    x01: Tensor,
    labels: Tensor,
    train: ImageDataset,
    control: ImageDataset,
    *,
    tau: float = 0.4,
    seed: int = 0,
    eval_classifier: Optional[nn.Module] = None,
    parts: Optional[Dict[int, ControlPart]] = None,
    **ssim: Any,
) -> Dict[str, np.ndarray]:
    """Per image of ``x01`` ``[N, C, H, W]`` in [0, 1] (module docstring): ``to_train``, ``to_held`` (NaN
    for a class without images), ``train_nn``/``held_nn`` (positions in ``train``/``control``, -1 if none),
    ``train_match``/``held_match`` (matched at SSIM >= ``tau``) and, with ``eval_classifier``,
    ``feature_to_train``/``feature_to_held``. ``parts``: the control of these images with this ``seed``,
    when ``evaluate`` already computed it (``EvaluationReport.control``); ``ssim``: arguments of
    ``tldr_fast.ssim.pairwise_ssim``."""
    n = len(labels)
    out = {
        k: np.full(n, np.nan) for k in ("to_train", "to_held", "closer_to_train", "feature_to_train", "feature_to_held")
    }
    out.update({k: np.full(n, -1, dtype=np.int64) for k in ("train_nn", "held_nn")})
    out.update({k: np.zeros(n, dtype=bool) for k in ("train_match", "held_match")})
    if parts is None:
        parts = control_parts(x01, labels, train, control, seed, **ssim)
    for p in parts.values():
        g = p.gen_pos.numpy()
        for side, sims, pos in (("train", p.to_train, p.train_pos), ("held", p.to_held, p.held_pos)):
            best, arg = sims.max(dim=1)
            out[f"to_{side}"][g] = best.numpy()
            out[f"{side}_nn"][g] = pos[arg].numpy()
            _, score = match_one_to_one(sims.double().numpy())
            out[f"{side}_match"][g] = np.nan_to_num(score, nan=-1.0) >= tau
        out["closer_to_train"][g] = p.closer.numpy()
    if eval_classifier is not None and parts:
        feats = predict_logits(eval_classifier, x01, features=True)
        for side, ds, key in (("train", train, "train_pos"), ("held", control, "held_pos")):
            pos = torch.cat([getattr(p, key) for p in parts.values()])
            ref = predict_logits(eval_classifier, ds.images[pos], features=True)
            out[f"feature_to_{side}"] = nn_feature_distance(feats, labels, ref, ds.labels[pos]).numpy()
    return out


def closer(sims: Dict[str, np.ndarray]) -> np.ndarray:
    """Each measured image's ``closer_to_train`` probability (``evaluate.closer_probability``; images of a
    class that lacks training or control images left out)."""
    c = sims["closer_to_train"]
    return c[~np.isnan(c)]


def _interval(draws: np.ndarray, confidence: float) -> List[float]:
    tail = (1 - confidence) / 2
    return [float(v) for v in np.quantile(draws, [tail, 1 - tail])]


def closer_to_train_effect(
    generated: np.ndarray,
    real: np.ndarray,
    seed: int = 0,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
) -> Dict[str, Any]:
    """The mean of the ``generated`` images' closer-to-train probabilities (or booleans) minus the same mean
    of the ``real`` unseen images': ``effect``, its percentile bootstrap ``interval`` and the one-sided permutation
    ``p_value`` ``(1 + #{permuted effect >= effect}) / (1 + resamples)``."""
    g, r = np.asarray(generated, dtype=float), np.asarray(real, dtype=float)
    if not len(g) or not len(r):
        raise ValueError(f"need generated and real images to compare, got {len(g)} and {len(r)}")
    rng = np.random.default_rng(seed)
    effect = float(g.mean() - r.mean())
    boot = g[rng.integers(0, len(g), (resamples, len(g)))].mean(1) - r[
        rng.integers(0, len(r), (resamples, len(r)))
    ].mean(1)
    pooled = np.concatenate([g, r])
    perm = pooled[np.argsort(rng.random((resamples, len(pooled))), axis=1)]
    null = perm[:, : len(g)].mean(1) - perm[:, len(g) :].mean(1)
    return {
        "generated": float(g.mean()),
        "null": float(r.mean()),
        "effect": effect,
        "interval": _interval(boot, confidence),
        "p_value": float((1 + np.sum(null >= effect - 1e-12)) / (1 + resamples)),
        "n_generated": len(g),
        "n_real": len(r),
        "confidence": confidence,
        "resamples": resamples,
    }


def excess_matches(
    train_match: np.ndarray,
    held_match: np.ndarray,
    seed: int = 0,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
) -> Dict[str, Any]:
    """Training images matched at SSIM >= tau minus control images matched by the same images (each image's
    match indicators ``train_match``, ``held_match``), with a bootstrap ``interval`` over the images."""
    d = np.asarray(train_match, dtype=float) - np.asarray(held_match, dtype=float)
    rng = np.random.default_rng(seed + 1)
    boot = d[rng.integers(0, len(d), (resamples, len(d)))].sum(1) if len(d) else np.zeros(1)
    return {
        "train_matched": int(np.sum(train_match)),
        "held_out_matched": int(np.sum(held_match)),
        "excess": float(d.sum()),
        "interval": _interval(boot, confidence),
        "confidence": confidence,
    }


def verdict(effect: Dict[str, Any], excess: Dict[str, Any], tau: float) -> Tuple[str, str]:
    """``(kind, sentence)``: kind ``"leakage"``, ``"no measurable leakage"`` or ``"closer to unseen images"``
    from where the closer-to-train effect's interval lies; the sentence states the effect and interval."""
    lo, hi = effect["interval"]
    pct = round(100 * effect["confidence"])
    numbers = (
        f"the generated images are closer to a training image than to an unseen one {100 * effect['generated']:.0f}% "
        f"of the time, real unseen images {100 * effect['null']:.0f}% (difference {effect['effect']:+.2f}, {pct}% "
        f"interval [{lo:+.2f}, {hi:+.2f}], p = {effect['p_value']:.3g}); excess training images matched at SSIM >= "
        f"{tau:g}: {excess['excess']:+.0f} [{excess['interval'][0]:+.0f}, {excess['interval'][1]:+.0f}]"
    )
    if lo > 0:
        return "leakage", f"Leakage: {numbers}. The classifier gives its training images away at this budget."
    if hi < 0:
        return "closer to unseen images", (
            f"No leakage found: {numbers}. The generated images resemble unseen images more than training images."
        )
    return "no measurable leakage", f"No measurable leakage at this budget: {numbers}."


def statistics(
    generated: Tensor,
    labels: Tensor,
    train: ImageDataset,
    real: ImageDataset,
    control: ImageDataset,
    *,
    tau: float = 0.4,
    seed: int = 0,
    eval_classifier: Optional[nn.Module] = None,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    progress: bool = False,
    generated_parts: Optional[Dict[int, ControlPart]] = None,
    **ssim: Any,
) -> Dict[str, Any]:
    """The measurements of generated images ``[N, C, H, W]`` in [0, 1] and of the ``real`` unseen images
    against ``train`` and ``control`` (module docstring): per image (``generated``, ``real``: lists as
    ``similarities``), ``closer_to_train`` (``closer_to_train_effect``), ``excess_matches`` (and the same for
    the real images, ``real_excess_matches``), ``features`` and ``verdict``/``verdict_kind``; ``progress``: a bar
    over the images measured; ``generated_parts``: the generated images' control, when already computed."""
    common = dict(tau=tau, seed=seed, eval_classifier=eval_classifier, **ssim)
    bar = progress_bar(total=len(labels) + len(real), desc="audit: similarities", unit="img", disable=not progress)
    gen = similarities(generated, labels, train, control, parts=generated_parts, **common)
    bar.update(len(labels))
    ref = similarities(real.images, real.labels, train, control, **common)
    bar.update(len(real))
    bar.close()
    effect = closer_to_train_effect(closer(gen), closer(ref), seed, resamples, confidence)
    excess = excess_matches(gen["train_match"], gen["held_match"], seed, resamples, confidence)
    kind, sentence = verdict(effect, excess, tau)
    out: Dict[str, Any] = {
        "verdict": sentence,
        "verdict_kind": kind,
        "closer_to_train": effect,
        "excess_matches": excess,
        "real_excess_matches": excess_matches(ref["train_match"], ref["held_match"], seed, resamples, confidence),
        "features": None,
    }
    if eval_classifier is not None:
        out["features"] = {
            f"{name}_closer_to_train": float(np.nanmean(s["feature_to_train"] < s["feature_to_held"]))
            for name, s in (("generated", gen), ("real", ref))
        }
    out["generated"] = {k: _plain(v) for k, v in gen.items()}
    out["real"] = {k: _plain(v) for k, v in ref.items()}
    return out


def peak_rss_mb() -> Optional[float]:
    """This process's peak resident memory so far in MB (None where the platform does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (1e6 if sys.platform == "darwin" else 1e3), 1)


def _plain(a: np.ndarray) -> List[Any]:
    if a.dtype == bool or a.dtype.kind == "i":
        return a.tolist()
    return [None if np.isnan(v) else float(v) for v in a]


# --- the pipeline -------------------------------------------------------------------------------------


def _invert_stage(
    classifier: nn.Module,
    train: ImageDataset,
    out: Path,
    overrides: Dict[str, Any],
    device: str,
    progress: bool,
    say: Callable[[str], None],
    restart: bool,
) -> Tuple[Any, str]:
    """The inversion (resumed from ``out/inversion.pt`` when it is this audit's) and its key."""
    from . import invert

    ckpt, state_file = out / "inversion.pt", out / "audit-state.json"
    saved = {k: v for k, v in overrides.items() if k not in ("checkpoint_every", "checkpoint_minutes")}
    key = _digest([FORMAT["inversion"], fingerprint(classifier), train.num_classes, train.image_shape, saved])
    if ckpt.is_file():
        try:
            held = json.loads(state_file.read_text()).get("inversion")
        except (OSError, ValueError, AttributeError):
            held = None
        if held != key and restart:
            say(f"replacing {ckpt}: it is the inversion of another audit (another classifier or inversion options)")
            ckpt.unlink()
        elif held != key:
            raise ValueError(
                f"out {out} holds {ckpt} from another audit (another classifier or inversion options): give another "
                f"output folder, or remove {ckpt} to start this one there"
            )
        else:
            say(f"continuing the inversion in {ckpt}")
    atomic_write_text(state_file, json.dumps({"inversion": key}) + "\n")
    inv = invert(
        classifier,
        train.num_classes,
        tuple(train.image_shape),
        resume=ckpt if ckpt.is_file() else None,
        checkpoint=ckpt,
        device=device,
        progress=progress,
        **overrides,
    )
    return inv, key


def _sample_stage(
    inv: Any, out: Path, n_per_class: int, select: Optional[int], progress: bool, say: Callable[[str], None]
) -> Tuple[Tensor, Tensor, str, int]:
    """The sample ``(images [N, C, H, W] in [0, 1], labels [N])``, read from the cache when it holds it, its
    key and its candidates per image."""
    from .samples import fingerprint as generator_fingerprint
    from .samples import load_sample, resolve_select, sample_seed, write_samples

    labels = inv.labels(n_per_class=n_per_class)
    select = resolve_select(inv, select)
    key = _digest([FORMAT["sample"], generator_fingerprint(inv), n_per_class, sample_seed(inv), select])
    path = out / "cache" / f"samples-{key}.npz"
    if path.is_file():
        say(f"reusing the sample {path}")
    else:
        write_samples(inv, path, labels, select=select, progress=progress)
    x, y = load_sample(path)
    return torch.from_numpy(x).float() / 255, torch.from_numpy(y), key, select


def audit(
    classifier: nn.Module,
    train: DataArg = None,
    held_out: DataArg = None,
    out: PathLike = "audit",
    *,
    eval_classifier: Optional[nn.Module] = None,
    n_per_class: int = N_PER_CLASS,
    real_per_class: Optional[int] = None,
    tau: float = 0.4,
    seed: int = 0,
    select: Optional[int] = None,
    allow_overlap: bool = False,
    restart: bool = False,
    resamples: int = RESAMPLES,
    backend: str = "auto",
    device: str = "cpu",
    progress: bool = True,
    say: Callable[[str], None] = lambda msg: print(f"tldr_fast: {msg}", file=sys.stderr),
    describe: Optional[Dict[str, Any]] = None,
    **overrides: Any,
) -> AuditResult:
    """Audit ``classifier``: invert it, sample, measure against the training and the held-out images, and
    write ``report.html``, ``report.json`` and ``grids/`` into ``out`` (module docstring).

    Args:
        classifier: the classifier (logits of ``(x01 - mean) / std`` per its ``tldr_meta``, else of [0, 1]
            images, as ``tldr_fast.evaluate``).
        train: its training images: an ``ImageDataset`` or anything ``load_dataset`` reads (default: the
            training subset the classifier records).
        held_out: images of the same classes it never saw (same forms; default: the test split of the
            training data's source, for a source that has one).
        out: the output folder; a rerun with the same arguments reuses what is done there.
        eval_classifier: an independent classifier: adds the attack accuracy and feature-space distances.
        n_per_class: generated images per class that are measured.
        real_per_class: real unseen images per class taken from ``held_out`` for the null (default
            ``REAL_PER_CLASS``; at most half of each class, the rest is the control).
        tau: the SSIM threshold of a match.
        seed: the seed of the inversion, the sample, the splits and the statistics.
        select: candidates per generated image (default: the inversion's, ``InversionConfig.select``).
        allow_overlap: leave held-out images that are also training images out instead of refusing.
        restart: replace an inversion in ``out`` that another audit left (other classifier or options)
            instead of refusing.
        resamples: bootstrap resamples and permutations.
        backend, device: of the inversion and the SSIM computation; progress: progress bars.
        say: where notices go; describe: settings to record in the report (e.g. the classifier's file).
        overrides: ``InversionConfig`` fields or loss weights, as for ``tldr_fast.invert``.

    Raises:
        ValueError, ClassifierError, NotADirectoryError, PermissionError: bad input (named), before any work.
    """
    from ._version import __version__

    started = time.perf_counter()
    for name, value in (
        ("n_per_class", n_per_class),
        ("real_per_class", real_per_class or 1),
        ("resamples", resamples),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not 0 <= tau <= 1:
        raise ValueError(f"tau must be an SSIM threshold in [0, 1], got {tau!r}")
    out = check_folder(Path(out), "out")
    check_writable(out / "report.json", "out folder")
    InversionConfig().with_overrides(**{**overrides, "seed": seed, "backend": backend})  # every option checked now
    train_ds = recorded_training_set(classifier) if train is None else _load(train, "train")
    if held_out is None:
        held_out = default_held_out(train_ds)
        say(f"no held-out set given: using {held_out}, the test split of the training data's source")
    held_ds = _load(held_out, "held_out")
    held_ds, n_overlap = check_inputs(train_ds, held_ds, allow_overlap)
    if n_overlap:
        say(f"left {n_overlap} held-out images that are also training images out of the held-out set")
    check_classifier(classifier, train_ds.num_classes, train_ds.image_shape, "classifier")
    if eval_classifier is not None:
        check_classifier(eval_classifier, train_ds.num_classes, train_ds.image_shape, "eval_classifier")
    n_real = real_per_class or REAL_PER_CLASS

    inv, inv_key = _invert_stage(
        classifier, train_ds, out, {**overrides, "seed": seed, "backend": backend}, device, progress, say, restart
    )
    x01, labels, sample_key, select = _sample_stage(inv, out, n_per_class, select, progress, say)
    judge_id = fingerprint(eval_classifier) if eval_classifier is not None else None
    stats_key = _digest(
        [FORMAT["statistics"], sample_key, content_digest(train_ds), content_digest(held_ds), judge_id, n_real, tau, seed,
         resamples]
    )  # fmt: skip
    stats_path = out / "cache" / f"stats-{stats_key}.json"
    real, control = split_unseen(held_ds, n_real, seed)
    ssim = dict(backend=backend, device=device)
    report_obj = evaluate(
        x01, train_ds, labels, value_range=(0.0, 1.0), tau=tau, classifier=classifier,
        eval_classifier=eval_classifier, held_out=control, control_seed=seed, **ssim,
    )  # fmt: skip
    if stats_path.is_file():
        say(f"reusing the measurements {stats_path}")
        stats = json.loads(stats_path.read_text())
    else:
        stats = statistics(
            x01, labels, train_ds, real, control, tau=tau, seed=seed, eval_classifier=eval_classifier,
            resamples=resamples, progress=progress, generated_parts=report_obj.control, **ssim,
        )  # fmt: skip
        atomic_write_text(stats_path, json.dumps(stats, allow_nan=False) + "\n")
    evaluation = report_obj.to_dict()
    report = {
        "verdict": stats["verdict"],
        "verdict_kind": stats["verdict_kind"],
        "settings": {
            **(describe or {}),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "classifier": {
                "arch": (getattr(classifier, "tldr_meta", None) or {}).get("arch", type(classifier).__name__),
                "fingerprint": fingerprint(classifier),
            },
            "eval_classifier": judge_id,
            "train": {"source": train_ds.source, "n": len(train_ds)},
            "held_out": {"source": held_ds.source, "n": len(held_ds), "overlap_left_out": n_overlap},
            "real_unseen": len(real),
            "control": len(control),
            "generated": len(labels),
            "n_per_class": n_per_class,
            "inversion": {"steps": inv.step, "batch_size": inv.config.batch_size, "select": select},
            "overrides": dict(overrides),
            "tau": tau,
            "seed": seed,
            "versions": {"tldr_fast": __version__, "torch": torch.__version__, "python": platform.python_version()},
            "device": device,
            "wall_seconds": round(time.perf_counter() - started, 1),  # this call, up to the report
            "peak_rss_mb": peak_rss_mb(),
            "keys": {"inversion": inv_key, "sample": sample_key, "statistics": stats_key},
        },
        **{k: v for k, v in stats.items() if k not in ("verdict", "verdict_kind")},
        "evaluation": {k: evaluation[k] for k in ("definitions", "overall", "per_class")},
    }
    from .report import write_report

    write_report(out, report, report_obj, x01, labels, train_ds, control, progress)
    return AuditResult(report["verdict"], report, inv, out)


def audit_saved(
    *,
    classifier: str,
    out: str,
    train: Optional[str] = None,
    held_out: Optional[str] = None,
    eval_classifier: Optional[str] = None,
    weights: Optional[str] = None,
    preprocess: Optional[str] = None,
    n_per_class: int = N_PER_CLASS,
    real_per_class: Optional[int] = None,
    tau: float = 0.4,
    allow_overlap: bool = False,
    overrides: Optional[Dict[str, Any]] = None,
    device: str = "cpu",
    progress: bool = True,
    say: Callable[[str], None] = lambda msg: print(f"tldr_fast: {msg}", file=sys.stderr),
) -> AuditResult:
    """Does a classifier give its training images away? Invert, sample, measure, write a report.

    Invert the classifier with the library's defaults, sample with selection, compare the generated images
    with its training images and, as the control, with as many held-out images, against real unseen images
    as the null; write report.html (self-contained), report.json and grids/ into the output folder. A rerun
    with the same arguments reuses what is done there; an interrupted one continues.

    Args:
        classifier: the classifier: a checkpoint from train-classifier, a TorchScript file (its forward returning
            (logits, features); with --grad-norm full or off, as its head cannot be found), or module:factory (a
            function that builds it) with --weights
        out: folder for report.html, report.json, grids/ and the stages' files
        train: its training images, a data set as load_dataset reads it (default: the subset the checkpoint
            records)
        held_out: images of the same classes it never saw (default: the test split of the training data's
            source, e.g. mnist:test)
        eval_classifier: an independent classifier checkpoint: attack accuracy, feature-space distances
        weights: the state dict of a module:factory classifier
        preprocess: a TorchScript or module:factory classifier's input: unit ([0, 1] images), identity ([-1, 1])
            or MEAN,STD (per channel M1:M2:M3,S1:S2:S3) of the [0, 1] images (default: unit)
        n_per_class: generated images per class measured
        real_per_class: real unseen images per class taken from the held-out set for the null (default: 300,
            at most half of each class)
        tau: SSIM threshold of a match
        allow_overlap: leave held-out images that are also training images out, instead of refusing
        overrides: InversionConfig fields and loss weights (seed and backend among them)
    """
    from .checkpoint import refuse_overwriting_inputs
    from .models import load_model

    inputs = {"--classifier": classifier, "--train": train, "--held-out": held_out, "--weights": weights}
    refuse_overwriting_inputs("--out", out, [Path(out) / "report.json"], inputs)
    options = dict(overrides or {})
    model = load_model(classifier, device, weights, preprocess)
    judge = load_model(eval_classifier, device) if eval_classifier else None
    return audit(
        model, train, held_out, out, eval_classifier=judge, n_per_class=n_per_class,
        real_per_class=real_per_class, tau=tau, allow_overlap=allow_overlap, seed=options.pop("seed", 0),
        backend=options.pop("backend", "auto"), device=device, progress=progress, say=say,
        describe={"classifier_file": classifier}, **options,
    )  # fmt: skip
