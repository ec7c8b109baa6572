"""How much of the training set an inversion reconstructs: SSIM matching, attack accuracy, confidence.

``evaluate`` compares generated images with the training images **of the same class** (DESIGN.md
section 6.1):

* ``nn_ssim``: for each generated image, the SSIM of its nearest neighbour (the most similar training
  image of its class).
* one-to-one matching: per class, the Hungarian assignment (``scipy.optimize.linear_sum_assignment``,
  maximising total SSIM) of generated images to distinct training images; ``matched_ssim`` is each
  generated image's partner's SSIM. When a class has more generated than training images, the
  surplus generated images stay unmatched.
* ``reconstructed_nn`` = fraction of generated images with ``nn_ssim >= tau``;
  ``reconstructed_matched`` = fraction of generated images whose matched partner has SSIM ``>= tau``
  (unmatched ones count as not reconstructed). As the matching is one-to-one, the latter counts
  distinct training images: it cannot be inflated by many near-copies of one training image.
* ``attack_accuracy``: fraction of generated images that an independent evaluation classifier
  assigns to the conditioned class (when one is given).
* ``target_accuracy`` / ``target_confidence``: the target classifier's accuracy on the generated
  images and its mean probability of the conditioned class (when it is known).
* ``same_class_ssim`` (the collapse detector): for each generated image, the SSIM of the most similar
  *other* generated image of its class. Real MNIST digits, 20 per class: ~0.58; a collapsed generator: 0.9+.
* The control (with ``held_out=``, images of the same classes that the target never saw): per class,
  ``m = min(n_train, n_held_out)`` training images and ``m`` held-out images drawn at random (seeded),
  and each generated image's nearest-neighbour SSIM to either: ``train_control_ssim`` and
  ``held_out_ssim``. ``leakage_gap`` = their mean difference; ``closer_to_train`` = the fraction of
  generated images nearer to the training images, each image counted by its exact probability over every
  draw of the ``m`` and ``m`` images (``closer_probability``: the expected fraction, without the luck of
  one draw). A generated image is training-like, rather than
  class-typical, only if it is closer to the training set than to unseen data of its class: a high
  ``nn_ssim`` alone proves only "looks like the class" (a real unseen MNIST digit scores ~0.77, and an
  all-black image ~0.49, against the 60k MNIST training images).

* ``nn_ssim_ci`` (contrast-invariant NN-SSIM): ``nn_ssim`` of each generated image min-max rescaled
  to [0, 1] first; a blank image scores 0 (a dark background cannot lift it).
* What the images teach (``tldr_fast.utility``; with ``test=``, real held-out images): ``cas``, the
  test accuracy of a fresh classifier trained on ``teach_per_class`` generated images per class (a
  sample of their own, from an ``Inversion``) with their conditioned labels, beside ``real_curve``
  (the same recipe on 1, 3, 10, 100 real images per class) and ``worth_real_per_class`` read off it;
  ``distill_accuracy``, the same student trained on the target's soft outputs. With ``eval_classifier=``, in its penultimate features: ``precision``,
  ``recall``, ``density``, ``coverage`` (Naeem et al. 2020, k = 3, per class) against the training
  images, and ``feature_nn_ratio`` against real unseen images (``held_out``, else ``test``).

SSIM is scikit-image's (``tldr_fast.ssim``), on images in [0, 1].

Under ``torch.distributed`` (``torchrun ... -m tldr_fast evaluate``) each rank computes the SSIM of every
generated image against its contiguous part of each class's training images; rank 0 gathers the
matrices, finds the nearest neighbours and the matching and returns the report (equal to one process's);
the other ranks return None.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from scipy.optimize import linear_sum_assignment

from . import distributed
from .checkpoint import atomic_write_text, cache_dir, output_folder
from .data import ImageDataset, check_finite, load_dataset, load_npz
from .grid import save_pair_grid
from .invert import load_inversion
from .models import check_classifier, load_classifier, predict_logits, training_set
from .progress import progress_bar
from .samples import load_sample
from .ssim import classwise_ssim, pairwise_ssim
from .utility import Teaching, classwise_prdc, minmax_rescale, nn_feature_distance, real_curve, student_accuracy, worth

Tensor = torch.Tensor
PathLike = Union[str, os.PathLike]

DEFINITIONS = {
    "nn_ssim": "SSIM between a generated image and the most similar training image of its class",
    "matched_ssim": "SSIM between a generated image and its partner in the per-class one-to-one (Hungarian, max total SSIM) "
    "matching of generated to training images; null when unmatched (more generated than training images)",
    "reconstructed_nn": "fraction of generated images with nn_ssim >= tau",
    "reconstructed_matched": "fraction of generated images whose matched partner has SSIM >= tau (unmatched count as not); "
    "counts distinct training images",
    "attack_accuracy": "fraction of generated images the independent evaluation classifier assigns to the conditioned class",
    "target_accuracy": "fraction of generated images the target classifier assigns to the conditioned class",
    "target_confidence": "mean probability the target classifier gives the conditioned class",
    "n_train_matched": "number of distinct training images matched one-to-one to a generated image at SSIM >= tau",
    "same_class_ssim": "SSIM between a generated image and the most similar other generated image of its class (collapse: ~1)",
    "train_control_ssim": "nearest-neighbour SSIM to m random training images of the class, m = min(n_train, n_held_out) of the class",
    "held_out_ssim": "nearest-neighbour SSIM to m random held-out images of the class (never seen by the target)",
    "leakage_gap": "mean of train_control_ssim - held_out_ssim: > 0 when generated images are nearer the training set than unseen data",
    "closer_to_train": "mean over generated images of the probability, over every draw of m training and m held-out images of its class, that its nearest drawn training image is nearer than its nearest drawn held-out one",
    "nn_ssim_ci": "nn_ssim of the generated image min-max rescaled to [0, 1] (contrast-invariant); 0 for a blank image",
    "cas": "Classification Accuracy Score: real held-out test accuracy of a fresh classifier (utility.Teaching) trained on "
    "teach_images generated images with their conditioned labels",
    "real_curve": "the same recipe trained on n real training images per class (mean over draws): {n: test accuracy}",
    "worth_real_per_class": "real images per class that teach as much as the generated ones (cas read off real_curve; "
    "capped at its largest n)",
    "distill_accuracy": "real held-out test accuracy of the same student trained on the generated images against the "
    "target's soft outputs (T^2 KL, T = 4): data-free distillation",
    "precision": "Naeem et al. 2020, k = 3, in the evaluation classifier's penultimate features, per class with as many "
    "training as generated images, mean over classes: fraction of generated inside some real k-NN ball (fidelity)",
    "recall": "as precision: fraction of real images inside some generated k-NN ball (diversity)",
    "density": "as precision: mean number of real k-NN balls holding a generated image, over k (1 for real data)",
    "coverage": "as precision: fraction of real images whose k-NN ball holds a generated image (diversity)",
    "feature_nn_ratio": "mean feature distance of a generated image to the nearest training image of its class, over "
    "the same for real unseen images (1: as near as unseen data, < 1 nearer, > 1 farther)",
    "ssim": "scikit-image structural_similarity defaults (7x7 uniform window, K1=0.01, K2=0.03, data_range=1), images in [0, 1]",
}


def match_one_to_one(similarity: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The one-to-one matching of rows to columns with the largest total similarity.

    Returns ``(partner [n], score [n])``: the column matched to each row (-1 where a row stays
    unmatched because there are fewer columns than rows) and its similarity (NaN when unmatched).
    """
    n = similarity.shape[0]
    partner, score = np.full(n, -1, dtype=np.int64), np.full(n, np.nan)
    if similarity.size:
        rows, cols = linear_sum_assignment(similarity, maximize=True)
        partner[rows], score[rows] = cols, similarity[rows, cols]
    return partner, score


@dataclass
class EvaluationReport:
    """The result of ``evaluate``: per generated image, and summaries per class and overall.

    Per image (``[N]`` tensors, in the order of ``labels``): ``nn_ssim``, ``nn_index`` (position of the
    nearest training image in the training ``ImageDataset``, -1 if its class has none), ``matched_ssim``
    (NaN when unmatched), ``matched_index`` (-1 when unmatched); when the classifiers are known,
    ``target_prob`` and ``target_pred`` (the target's probability of the conditioned class, and its
    predicted class) and ``eval_pred`` (the evaluation classifier's predicted class).
    """

    tau: float
    class_names: List[str]
    labels: Tensor
    generated: Tensor  # [N, C, H, W] in [0, 1]
    nearest: Tensor  # [N, C, H, W] in [0, 1]: each generated image's nearest training image (zeros if none)
    nn_ssim: Tensor
    nn_index: Tensor
    matched_ssim: Tensor
    matched_index: Tensor
    train: ImageDataset
    same_class_ssim: Tensor
    target_prob: Optional[Tensor] = None
    target_pred: Optional[Tensor] = None
    eval_pred: Optional[Tensor] = None
    train_control_ssim: Optional[Tensor] = None  # [N], with held_out
    held_out_ssim: Optional[Tensor] = None  # [N], with held_out
    closer_to_train: Optional[Tensor] = None  # [N] float64, with held_out: the probability over the draws
    nn_ssim_ci: Optional[Tensor] = None  # [N]: contrast-invariant nn_ssim
    control: Optional[Dict[int, "ControlPart"]] = None  # the control's draws and SSIM matrices, with held_out
    utility: Optional[Dict[str, Any]] = None  # what the images teach (tldr_fast.utility), overall

    def _stats(self, sel: Tensor) -> Dict[str, Any]:
        n = int(sel.sum())
        y, nn_s, m_s = self.labels[sel], self.nn_ssim[sel], self.matched_ssim[sel]
        found = nn_s[~torch.isnan(nn_s)]  # classes without training images have no neighbour

        def mean(t: Tensor) -> Optional[float]:
            t = t[~torch.isnan(t)]
            return float(t.double().mean()) if len(t) else None

        def hit_rate(pred: Optional[Tensor]) -> Optional[float]:
            return mean((pred[sel] == y).double()) if pred is not None else None

        control = {}
        if self.held_out_ssim is not None:
            t, h = self.train_control_ssim[sel], self.held_out_ssim[sel]
            ok = ~(torch.isnan(t) | torch.isnan(h))
            control = {
                "train_control_ssim_mean": mean(t),
                "held_out_ssim_mean": mean(h),
                "leakage_gap": mean((t - h)[ok]),
                "closer_to_train": mean(self.closer_to_train[sel]),
            }
        return {
            "n_generated": n,
            "nn_ssim_mean": mean(nn_s),
            "nn_ssim_median": float(found.median()) if len(found) else None,
            "nn_ssim_max": float(found.max()) if len(found) else None,
            "nn_ssim_ci_mean": mean(self.nn_ssim_ci[sel]) if self.nn_ssim_ci is not None else None,
            "matched_ssim_mean": mean(m_s),
            "reconstructed_nn": float((nn_s >= self.tau).sum()) / n if n else None,
            "reconstructed_matched": float((m_s >= self.tau).sum()) / n if n else None,
            "n_train_matched": int((m_s >= self.tau).sum()),
            "same_class_ssim_mean": mean(self.same_class_ssim[sel]),
            **control,
            "attack_accuracy": hit_rate(self.eval_pred),
            "target_accuracy": hit_rate(self.target_pred),
            "target_confidence": mean(self.target_prob[sel]) if self.target_prob is not None else None,
        }

    def to_dict(self) -> Dict[str, Any]:
        """Plain data: settings, definitions, overall and per-class metrics, and every image's match."""
        counts = self.train.class_counts()
        per_class = []
        for c in torch.unique(self.labels).tolist():
            per_class.append(
                {"class": c, "name": self.class_names[c], "n_train": counts[c], **self._stats(self.labels == c)}
            )
        src = self.train.indices
        images = []
        for i in range(len(self.labels)):
            nn_i, m_i = int(self.nn_index[i]), int(self.matched_index[i])
            images.append(
                {
                    "label": int(self.labels[i]),
                    "nn_ssim": _num(self.nn_ssim[i]),
                    "nn_ssim_ci": _num(self.nn_ssim_ci[i]) if self.nn_ssim_ci is not None else None,
                    "nn_train_index": nn_i if nn_i >= 0 else None,
                    "nn_source_index": int(src[nn_i]) if nn_i >= 0 else None,
                    "matched_ssim": _num(self.matched_ssim[i]),
                    "matched_train_index": m_i if m_i >= 0 else None,
                    "matched_source_index": int(src[m_i]) if m_i >= 0 else None,
                    "same_class_ssim": _num(self.same_class_ssim[i]),
                    "train_control_ssim": _num(self.train_control_ssim[i])
                    if self.train_control_ssim is not None
                    else None,
                    "held_out_ssim": _num(self.held_out_ssim[i]) if self.held_out_ssim is not None else None,
                    "closer_to_train": _num(self.closer_to_train[i]) if self.closer_to_train is not None else None,
                    "target_prob": _num(self.target_prob[i]) if self.target_prob is not None else None,
                    "eval_prediction": int(self.eval_pred[i]) if self.eval_pred is not None else None,
                }
            )
        return {
            "tau": self.tau,
            "definitions": DEFINITIONS,
            "num_generated": len(self.labels),
            "num_train": len(self.train),
            "train_source": self.train.source,
            "image_shape": list(self.generated.shape[1:]),
            "class_names": list(self.class_names),
            "overall": {**self._stats(torch.ones_like(self.labels, dtype=torch.bool)), **(self.utility or {})},
            "per_class": per_class,
            "images": images,
        }

    def to_json(self, indent: Optional[int] = 2) -> str:
        """``to_dict`` as JSON text (NaN written as null)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def save_json(self, path: PathLike, extra: Optional[Dict[str, Any]] = None) -> None:
        """Write ``to_dict()`` (with the entries of ``extra`` added, e.g. run settings) as JSON to ``path``,
        atomically (``tldr_fast.checkpoint.atomic_write``: a failed write leaves the previous file)."""
        atomic_write_text(path, json.dumps({**self.to_dict(), **(extra or {})}, indent=2, allow_nan=False) + "\n")

    def save_grid(self, path: PathLike, per_class: int = 8) -> Tuple[int, int]:
        """A PNG of each class's ``per_class`` most similar generated images beside their nearest
        training images, SSIM under each pair (``tldr_fast.grid.pair_grid``); returns its size."""
        return save_pair_grid(
            path, self.generated, self.nearest, self.labels, self.nn_ssim, self.class_names, per_class
        )

    def summary(self) -> str:
        """A few lines for people: the overall numbers, then one line per class."""
        d = self.to_dict()
        o = d["overall"]
        pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        num = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        lines = [
            f"{len(self.labels)} generated images ({len(torch.unique(self.labels))} classes) vs {len(self.train)} training "
            f"images ({self.train.source})",
            f"nearest-neighbour SSIM (same class): mean {num(o['nn_ssim_mean'])}, median {num(o['nn_ssim_median'])}, "
            f"max {num(o['nn_ssim_max'])}",
            f"reconstructed (SSIM >= {self.tau:g}): {pct(o['reconstructed_nn'])} by nearest neighbour, "
            f"{pct(o['reconstructed_matched'])} by one-to-one matching (mean matched SSIM {num(o['matched_ssim_mean'])})",
            f"attack accuracy (evaluation classifier): {pct(o['attack_accuracy'])}; target classifier: accuracy "
            f"{pct(o['target_accuracy'])}, confidence {num(o['target_confidence'])}",
            f"same-class diversity (SSIM to the nearest other generated image of the class; real digits ~0.58, "
            f"collapse ~1): {num(o['same_class_ssim_mean'])}",
        ]
        if o.get("nn_ssim_ci_mean") is not None:
            lines.append(
                f"contrast-invariant NN-SSIM (each image min-max rescaled; blank 0): {num(o['nn_ssim_ci_mean'])}"
            )
        if o.get("cas") is not None:
            curve = ", ".join(f"{n}/class {a:.3f}" for n, a in o["real_curve"].items())
            lines.append(
                f"what they teach: a fresh classifier trained on {o['teach_images']} of them scores {num(o['cas'])} on real "
                f"held-out images (real images: {curve or 'none'}): worth {num(o['worth_real_per_class'])} real images per class"
                + (
                    f"; distilled from the target: {num(o['distill_accuracy'])}"
                    if o.get("distill_accuracy") is not None
                    else ""
                )
            )
        if o.get("precision") is not None:
            lines.append(
                f"features (evaluation classifier, k=3): precision {num(o['precision'])}, recall {num(o['recall'])}, "
                f"density {num(o['density'])}, coverage {num(o['coverage'])}"
                + (
                    f"; nearest-training distance {num(o['feature_nn_ratio'])}x real unseen images'"
                    if o.get("feature_nn_ratio") is not None
                    else ""
                )
            )
        if "leakage_gap" in o:
            lines.append(
                f"control: nearest-neighbour SSIM to training images {num(o['train_control_ssim_mean'])} vs to as many "
                f"held-out images {num(o['held_out_ssim_mean'])}: gap {num(o['leakage_gap'])}, "
                f"{pct(o['closer_to_train'])} of the images closer to the training set"
            )
        lines.append(
            f"{'class':>12} {'n':>5} {'nn ssim':>8} {'rec nn':>7} {'rec 1:1':>7} {'attack':>7} {'conf':>6} {'same':>6} {'gap':>7}"
        )
        for c in d["per_class"]:
            lines.append(
                f"{str(c['name'])[:12]:>12} {c['n_generated']:>5} {num(c['nn_ssim_mean']):>8} {pct(c['reconstructed_nn']):>7} "
                f"{pct(c['reconstructed_matched']):>7} {pct(c['attack_accuracy']):>7} {num(c['target_confidence']):>6} "
                f"{num(c['same_class_ssim_mean']):>6} {num(c.get('leakage_gap')):>7}"
            )
        return "\n".join(lines)


def same_class_ssim(x01: Tensor, labels: Tensor, **ssim: Any) -> Tensor:
    """For each image, the SSIM of the most similar *other* image of its label: ``[N]`` (NaN for an
    image alone in its class). ``ssim``: arguments of ``tldr_fast.ssim.pairwise_ssim``."""
    out = torch.full((len(labels),), math.nan)
    for c, s in classwise_ssim(x01, labels, x01, labels, **ssim).items():
        if s.shape[0] > 1:
            s.fill_diagonal_(-math.inf)
            out[torch.nonzero(labels == c).view(-1)] = s.max(dim=1).values
    return out


@dataclass
class ControlPart:
    """One class of the control: the generated images ``gen_pos`` of the class, the ``m`` training images
    ``train_pos`` and ``m`` held-out images ``held_pos`` drawn for it (positions in their data sets), and
    the SSIM of each generated image to each: ``to_train`` and ``to_held`` ``[n_c, m]``; ``closer`` ``[n_c]``:
    each image's probability of being closer to train over every draw of ``m`` (``closer_probability``)."""

    gen_pos: Tensor
    train_pos: Tensor
    held_pos: Tensor
    to_train: Tensor
    to_held: Tensor
    closer: Tensor


def closer_probability(to_train: np.ndarray, to_held: np.ndarray, m: int) -> np.ndarray:
    """``[n]``: per row (an image; ``to_train`` ``[n, N]`` and ``to_held`` ``[n, M]`` its similarities to the
    N training and M control images of its class), the probability that the most similar of ``m`` training
    images drawn at random is more similar than the most similar of ``m`` control images drawn at random
    (independent draws without replacement, ``m <= min(N, M)``).

    With H the control draw's maximum and T the training draw's, and a row's control similarities sorted
    h_(1) <= ... <= h_(M): P(H <= h_(j)) = C(j, m) / C(M, m) (all m drawn among the j smallest), so
    P(H = h_(j)) = [C(j, m) - C(j-1, m)] / C(M, m); and P(T > x) = 1 - C(#{t <= x}, m) / C(N, m). Hence
    P(T > H) = sum_j P(H = h_(j)) P(T > h_(j)); with m = N = M it is 1 when max t > max h, else 0."""
    # to_train: [n, N], to_held: [n, M]
    n, big_n = to_train.shape
    big_m = to_held.shape[1]
    if not 1 <= m <= min(big_n, big_m):
        raise ValueError(f"m must be in [1, min(N, M)] = [1, {min(big_n, big_m)}], got {m}")
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, max(big_n, big_m) + 1)))])

    def ratio(a: np.ndarray, total: int) -> np.ndarray:  # C(a, m) / C(total, m), 0 where a < m
        ok = a >= m
        safe = np.where(ok, a, m)
        value = np.exp(log_fact[safe] - log_fact[safe - m] - log_fact[total] + log_fact[total - m])
        return np.where(ok, value, 0.0)

    p_h = np.diff(ratio(np.arange(big_m + 1), big_m))  # [M]: P(H = h_(j))
    # #{t <= h_(j)} per row at once: rows offset by 3 apart (similarities lie in [-1, 1]) and searched together
    offset = 3.0 * np.arange(n)[:, None]
    t = (np.sort(to_train, axis=1) + offset).ravel()
    below = np.searchsorted(t, (np.sort(to_held, axis=1) + offset).ravel(), side="right").reshape(n, big_m)
    below -= big_n * np.arange(n)[:, None]  # [n, M]
    return (1.0 - ratio(below, big_n)) @ p_h


def control_parts(
    x01: Tensor,
    labels: Tensor,
    train: ImageDataset,
    held: ImageDataset,
    seed: int = 0,
    sims: Optional[Dict[int, Tensor]] = None,
    **ssim: Any,
) -> Dict[int, ControlPart]:
    """The control of ``evaluate(held_out=...)``, per class of ``labels`` that both sets have: ``m =
    min(n_train, n_held)`` random training and held-out images of the class (seeded by ``seed``, the same
    draws whatever ``x01`` is) and the SSIM matrices to them. ``sims``: the SSIM matrices to all training
    images of each class, when already computed (their columns are reused); ``ssim``: arguments of
    ``tldr_fast.ssim.pairwise_ssim``."""
    gen = torch.Generator().manual_seed(seed)
    parts = {}
    for c in torch.unique(labels).tolist():
        train_all = torch.nonzero(train.labels == c).view(-1)
        held_all = torch.nonzero(held.labels == c).view(-1)
        m = min(len(train_all), len(held_all))
        if m == 0:
            continue
        gen_pos = torch.nonzero(labels == c).view(-1)
        t_cols = torch.randperm(len(train_all), generator=gen)[:m]
        h_cols = torch.randperm(len(held_all), generator=gen)[:m]
        # every training and held-out image of the class: [n_c, n_train_c] and [n_c, n_held_c]
        train_full = sims[c] if sims is not None else pairwise_ssim(x01[gen_pos], train.images[train_all], **ssim)
        held_full = pairwise_ssim(x01[gen_pos], held.images[held_all], **ssim)
        closer = closer_probability(train_full.double().numpy(), held_full.double().numpy(), m)
        parts[c] = ControlPart(
            gen_pos, train_all[t_cols], held_all[h_cols], train_full[:, t_cols], held_full[:, h_cols],
            torch.from_numpy(closer),
        )  # fmt: skip
    return parts


def _control(parts: Dict[int, ControlPart], n: int) -> Dict[str, Tensor]:
    """``train_control_ssim``, ``held_out_ssim`` and ``closer_to_train`` ``[n]``: per class, the nearest-neighbour
    SSIM to the control's ``m`` training and ``m`` held-out images, and the probability over every such draw
    of being closer to train; NaN where a class has none of either."""
    t_out, h_out = torch.full((n,), math.nan), torch.full((n,), math.nan)
    c_out = torch.full((n,), math.nan, dtype=torch.float64)
    for part in parts.values():
        t_out[part.gen_pos] = part.to_train.max(dim=1).values
        h_out[part.gen_pos] = part.to_held.max(dim=1).values
        c_out[part.gen_pos] = part.closer
    return {"train_control_ssim": t_out, "held_out_ssim": h_out, "closer_to_train": c_out}


def _classwise(
    x01: Tensor, labels: Tensor, train: ImageDataset, classes: List[int], ssim: Dict[str, Any]
) -> Optional[Dict[int, Tensor]]:
    """``classwise_ssim`` of the generated against the training images of each class in ``classes``.
    Under ``torch.distributed`` each rank computes a contiguous part of each class's training columns
    and rank 0 gathers the whole matrices; the other ranks get None."""
    rank, world = distributed.world()
    sims = classwise_ssim(x01, labels, train.images, train.labels, classes, part=(rank, world), **ssim)
    if world == 1:
        return sims
    gathered = distributed.gather_object({c: s.cpu() for c, s in sims.items()})  # [world] on rank 0
    return None if gathered is None else {c: torch.cat([g[c] for g in gathered], 1) for c in classes}


def _ssim_pairs(labels: Tensor, classes: List[int], train: ImageDataset, held: Optional[ImageDataset]) -> int:
    """The image pairs ``evaluate`` compares by SSIM on this rank, the total of its progress bar: per class,
    the generated images against this rank's part of the class's training images (as they are and
    contrast-inverted, ``_classwise``), against each other (``same_class_ssim``) and, on rank 0, against
    every held-out image of the class (``control_parts``: the closer-to-train probability needs them all)."""
    rank, world = distributed.world()
    n = {c: int((labels == c).sum()) for c in torch.unique(labels).tolist()}
    pairs = sum(v * v for v in n.values())
    for c in classes:
        m = int((train.labels == c).sum())
        pairs += 2 * n[c] * len(range(*distributed.bounds(m, rank, world)))
        if held is not None and rank == 0:
            pairs += n[c] * int((held.labels == c).sum())
    return pairs


def _num(v: Tensor) -> Optional[float]:
    x = float(v)
    return None if math.isnan(x) else x


def _as_train(train: Union[ImageDataset, Tuple[Any, Any]], num_classes: int, name: str) -> ImageDataset:
    """``train`` (the argument ``name``) as an ``ImageDataset``."""
    if isinstance(train, ImageDataset):
        return train
    if not (isinstance(train, (tuple, list)) and len(train) == 2):
        raise TypeError(f"{name} must be an ImageDataset or a tuple (images [M, C, H, W] in [0, 1], labels [M])")
    images, labels = torch.as_tensor(train[0]), torch.as_tensor(train[1]).long()
    images = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    k = max(num_classes, int(labels.max()) + 1 if len(labels) else 0)
    return ImageDataset(images, labels, [str(i) for i in range(k)], torch.arange(len(labels)), name)  # checks finite


def _logits_fn(classifier: Optional[nn.Module], inversion: Any) -> Optional[Callable[[Tensor], Tensor]]:
    """Logits of images in [0, 1] under ``classifier`` (normalised by its ``tldr_meta``), or under the
    inversion's own frozen target (with the inversion's exact preprocessing) when no classifier is given."""
    if classifier is not None:
        return lambda x01: predict_logits(classifier, x01)
    target = getattr(inversion, "target", None)
    if target is None:
        return None
    device = next(target.parameters()).device

    def run(x01: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat([target((x * 2 - 1).to(device))[0].float().cpu() for x in x01.split(1024)])

    return run


def evaluate(
    generated: Union[Tensor, Any],
    train: Union[ImageDataset, Tuple[Any, Any]],
    labels: Optional[Tensor] = None,
    *,
    n_per_class: int = 10,
    value_range: Tuple[float, float] = (-1.0, 1.0),
    tau: float = 0.4,
    classifier: Optional[nn.Module] = None,
    eval_classifier: Optional[nn.Module] = None,
    class_names: Optional[Sequence[str]] = None,
    held_out: Union[None, ImageDataset, Tuple[Any, Any]] = None,
    control_seed: int = 0,
    test: Union[None, ImageDataset, Tuple[Any, Any]] = None,
    teach_per_class: int = 100,
    real_pool: Optional[ImageDataset] = None,
    teaching: Optional[Teaching] = None,
    cache: Optional[PathLike] = None,
    backend: str = "auto",
    device: Optional[str] = None,
    progress: bool = False,
) -> Optional[EvaluationReport]:
    """Evaluate generated images against the training set (definitions in the module docstring).
    Under ``torch.distributed`` the SSIM matrices are computed by all ranks and the report by rank 0:
    the other ranks return None.

    Args:
        generated: images ``[N, C, H, W]`` with ``labels``, or an ``Inversion`` (anything with
            ``.sample(n_per_class=...)`` and ``.num_classes``), sampled ``n_per_class`` per class.
        train: the training set: an ``ImageDataset`` or ``(images [M, C, H, W] in [0, 1] or uint8,
            labels [M])``.
        labels: ``[N]`` conditioned class of each generated image (tensors only).
        n_per_class: images per class sampled from an ``Inversion``.
        value_range: the range of ``generated`` pixels: ``(-1, 1)`` for an inversion's output (default),
            ``(0, 1)`` for images already in [0, 1]; mapped linearly to [0, 1] and clipped.
        tau: the SSIM threshold of "reconstructed".
        classifier: the target classifier (logits of ``(x01 - mean) / std`` per its ``tldr_meta``;
            [0, 1] images if it has none). Default: the ``Inversion``'s own target, if it has one.
        eval_classifier: an independent classifier for the attack accuracy (same input convention).
        class_names: default: the training set's.
        held_out: images of the same classes the target never saw (same forms as ``train``): adds the
            control, ``train_control_ssim`` against ``held_out_ssim`` at equal sizes per class.
        control_seed: seed of the control's random equal-size subsets, of the students and of the
            feature metrics' subsets.
        test: real held-out images (same forms as ``train``, never seen by the target) on which the
            students are tested: adds ``cas``, ``real_curve``, ``worth_real_per_class`` and, when the
            target is known, ``distill_accuracy`` (two students of ``teaching``'s recipe, and the real
            curve's once per data set: about 15 s each on 2 CPU cores).
        teach_per_class: generated images per class that the students learn from, sampled from an
            ``Inversion`` (an image tensor is used whole). The feature metrics measure the evaluated
            images (``n_per_class`` of an ``Inversion``), as every other metric does.
        real_pool: the real images of the real curve (default: ``train``); sizes larger than its
            smallest class are left out.
        teaching: the students' recipe and the real curve's sizes (default: ``tldr_fast.utility.Teaching()``).
        cache: folder that keeps the real curve (default: ``tldr_fast.checkpoint.cache_dir()``).
        backend, device: of the SSIM computation (``tldr_fast.ssim.classwise_ssim``).
        progress: progress bars: one over all the SSIM comparisons, one over the students trained.
    """
    inversion = None
    if isinstance(generated, Tensor):
        if labels is None:
            raise ValueError("labels= (the conditioned class of each generated image) is required with an image tensor")
        images = generated
    elif hasattr(generated, "sample") and hasattr(generated, "labels"):
        if labels is not None:
            raise ValueError("labels= is only for image tensors: an Inversion is sampled n_per_class per class")
        inversion = generated
        labels = inversion.labels(n_per_class=n_per_class)
        images = inversion.sample(labels=labels)
        value_range = (-1.0, 1.0)
    else:
        raise TypeError(
            f"generated must be an image tensor [N, C, H, W] or an Inversion, got {type(generated).__name__}"
        )
    labels = torch.as_tensor(labels).long().cpu()
    if images.dim() != 4 or labels.shape != (images.shape[0],):
        raise ValueError(
            f"expected images [N, C, H, W] and labels [N], got {tuple(images.shape)} and {tuple(labels.shape)}"
        )
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    if not 0 <= tau <= 1:
        raise ValueError(f"tau must be an SSIM threshold in [0, 1], got {tau}")
    if isinstance(teach_per_class, bool) or not isinstance(teach_per_class, int) or teach_per_class < 1:
        raise ValueError(f"teach_per_class must be a positive int, got {teach_per_class!r}")
    check_finite(images.detach(), "generated images")
    x01 = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp_(0, 1)
    k = getattr(inversion, "num_classes", None) or int(labels.max()) + 1
    train = _as_train(train, k, "train")
    if list(x01.shape[1:]) != train.image_shape:
        raise ValueError(f"generated images are {list(x01.shape[1:])}, training images {train.image_shape}")
    if int(labels.max()) >= train.num_classes:
        raise ValueError(f"labels go up to {int(labels.max())} but the training set has {train.num_classes} classes")
    data_classes = inversion.num_classes if inversion is not None else train.num_classes
    for name, model in (("classifier", classifier), ("eval_classifier", eval_classifier)):
        if model is not None:
            check_classifier(model, data_classes, x01.shape[1:], name)
    names = list(class_names) if class_names is not None else list(train.class_names)

    n = len(labels)
    nn_ssim, matched_ssim = torch.full((n,), math.nan), torch.full((n,), math.nan)
    nn_index, matched_index = torch.full((n,), -1, dtype=torch.long), torch.full((n,), -1, dtype=torch.long)
    nearest = torch.zeros_like(x01)
    present = set(train.labels.tolist())
    classes = [c for c in torch.unique(labels).tolist() if c in present]  # a class without training images has no match
    held = None
    if held_out is not None:
        held = _as_train(held_out, k, "held_out")
        if held.image_shape != train.image_shape:
            raise ValueError(f"held-out images are {held.image_shape}, training images {train.image_shape}")
    bar = progress_bar(  # one bar for every SSIM comparison of the evaluation
        total=_ssim_pairs(labels, classes, train, held),
        desc="SSIM",
        unit="pair",
        unit_scale=True,
        disable=not (progress and distributed.is_main()),
    )
    ssim = dict(backend=backend, device=device, bar=bar)
    sims = _classwise(x01, labels, train, classes, ssim)
    x_ci, blank = minmax_rescale(x01)
    sims_ci = _classwise(x_ci, labels, train, classes, ssim)
    if sims is None:  # another rank: rank 0 has its columns and makes the report
        bar.close()
        return None
    same = same_class_ssim(x01, labels, **ssim)
    parts = None if held is None else control_parts(x01, labels, train, held, control_seed, sims, **ssim)
    control = {} if parts is None else _control(parts, n)
    bar.close()
    nn_ssim_ci = torch.full((n,), math.nan)
    for c, s in sims_ci.items():
        nn_ssim_ci[labels == c] = s.max(dim=1).values
    nn_ssim_ci[blank & ~torch.isnan(nn_ssim_ci)] = 0.0
    for c, s in sims.items():  # s: [n_c, m_c], rows and columns in the order of nonzero()
        gen_pos = torch.nonzero(labels == c).view(-1)
        train_pos = torch.nonzero(train.labels == c).view(-1)
        best, arg = s.max(dim=1)
        nn_ssim[gen_pos], nn_index[gen_pos] = best, train_pos[arg]
        nearest[gen_pos] = train.images[train_pos[arg]]
        partner, score = match_one_to_one(s.double().numpy())
        matched = torch.from_numpy(partner >= 0)
        matched_ssim[gen_pos] = torch.from_numpy(score).float()
        matched_index[gen_pos[matched]] = train_pos[torch.from_numpy(partner[partner >= 0])]
    report = EvaluationReport(
        tau, names, labels, x01, nearest, nn_ssim, nn_index, matched_ssim, matched_index, train, same, **control
    )
    report.nn_ssim_ci, report.control = nn_ssim_ci, parts
    target = _logits_fn(classifier, inversion)
    if target is not None:
        p = torch.softmax(target(x01), dim=1)
        report.target_prob, report.target_pred = p.gather(1, labels[:, None]).view(-1), p.argmax(1)
    if eval_classifier is not None:
        report.eval_pred = predict_logits(eval_classifier, x01).argmax(1)
    if test is not None or eval_classifier is not None:
        test_ds = None if test is None else _as_train(test, k, "test")
        if test_ds is not None and test_ds.image_shape != train.image_shape:
            raise ValueError(f"test images are {test_ds.image_shape}, training images {train.image_shape}")
        x_t, y_t = x01, labels
        if inversion is not None and test_ds is not None:  # the students' own, larger sample
            y_t = inversion.labels(n_per_class=teach_per_class)
            x_t = ((inversion.sample(labels=y_t).float().cpu() + 1) / 2).clamp_(0, 1)
        unseen = held if held is not None else test_ds
        report.utility = _utility(
            x01, labels, x_t, y_t.long().cpu(), k, names, train, test_ds, unseen, target, eval_classifier,
            real_pool, teaching or Teaching(), cache, control_seed, device, progress,
        )  # fmt: skip
    return report


EVALUATION_FILES = ("metrics.json", "grid.png", "summary.txt")  # what evaluate_saved and the demo write into out


def load_generated(path: str) -> Tuple[Tensor, Tensor]:
    """Generated images ``[N, C, H, W]`` in [0, 1] and their labels from an ``.npz`` (uint8, or floats in
    [0, 1]), a sharded sample's index or a folder of PNGs, as ``tldr-fast sample`` writes them."""
    if Path(path).suffix.lower() == ".npz":
        gen = load_npz(path)
        return gen.images, gen.labels
    x, y = load_sample(path)  # uint8 [N, C, H, W], int64 [N]
    return torch.from_numpy(x).float() / 255, torch.from_numpy(y)


def evaluate_saved(
    *,
    inversion: Optional[str] = None,
    images: Optional[str] = None,
    classifier: Optional[str] = None,
    eval_classifier: Optional[str] = None,
    data: Optional[str] = None,
    test_data: Optional[str] = None,
    cache_dir: Optional[str] = None,
    backend: str = "auto",
    out: str,
    n_per_class: int = 10,
    tau: float = 0.4,
    grid_per_class: int = 8,
    teach_per_class: int = 100,
    student_steps: Optional[int] = None,
    device: str = "cpu",
    progress: bool = True,
    say: Callable[[str], None] = lambda msg: None,
) -> Optional[EvaluationReport]:
    """Measure how much of the training set an inversion reconstructs.

    Compare generated images with the training images of their class by SSIM (nearest neighbour and
    one-to-one Hungarian matching), and report attack accuracy and target confidence. Writes metrics.json,
    grid.png and summary.txt into --out. The training set is the one recorded in --classifier unless --data
    is given.

    Args:
        inversion: inversion checkpoint (sampled --n-per-class per class)
        images: generated images: an .npz with images (uint8, or floats in [0, 1]) and labels, a sharded
            sample's -index.json, or a folder of PNGs, as `sample` writes them
        classifier: the target classifier checkpoint (its training subset, confidence)
        eval_classifier: an independent classifier checkpoint for the attack accuracy
        data: training set to compare with instead of the classifier's
        test_data: real images the target never saw, e.g. mnist:test: adds what the generated images teach
            (CAS, worth in real images per class, distillation accuracy), the students tested on them
        cache_dir: where the real curve of --test-data is kept (default: $TLDR_FAST_CACHE or
            ~/.cache/tldr_fast)
        backend: SSIM kernels ('cuda' = 'extension')
        out: folder for metrics.json, grid.png, summary.txt
        n_per_class: generated images per class to evaluate
        tau: SSIM threshold of 'reconstructed'
        grid_per_class: pairs per class in grid.png
        teach_per_class: generated images per class that the students of CAS and distillation learn from
        student_steps: Adam steps of each student, also on the real curve (default: tldr_fast.utility.Teaching's,
            400)
        say: where the summary goes

    Returns:
        The report (None on the ranks but 0 under torchrun), once ``write_evaluation`` wrote it; every file
        is checked before any work.
    """
    inputs = {
        "--inversion": inversion,
        "--images": images,
        "--classifier": classifier,
        "--eval-classifier": eval_classifier,
        "--data": data,
        "--test-data": test_data,
    }
    folder = output_folder(out, EVALUATION_FILES, inputs)
    target = load_classifier(classifier, device) if classifier else None
    judge = load_classifier(eval_classifier, device) if eval_classifier else None
    train = load_dataset(data) if data else training_set(target)
    test = load_dataset(test_data) if test_data else None
    common = dict(
        tau=tau,
        classifier=target,
        eval_classifier=judge,
        test=test,
        teach_per_class=teach_per_class,
        teaching=Teaching.with_steps(student_steps),
        cache=cache_dir,
        backend=backend,
        device=device,
        progress=progress,
    )
    if inversion:
        source = load_inversion(inversion, device, target, classifier)
        given = [("--eval-classifier", eval_classifier, judge)]
        classes, shape = source.num_classes, source.image_shape
        common["n_per_class"] = n_per_class
    else:
        source, labels = load_generated(images)
        given = [("--classifier", classifier, target), ("--eval-classifier", eval_classifier, judge)]
        classes, shape = train.num_classes, source.shape[1:]
        common.update(labels=labels, value_range=(0.0, 1.0))
    for option, path, model in given:  # each against the evaluated images, before any work; the error names the file
        if model is not None:
            check_classifier(model, classes, shape, f"{option} {path}")
    report = evaluate(source, train, **common)
    if report is not None:  # under torchrun: rank 0's
        generated_from = {"inversion": inversion} if inversion else {"images": images}
        write_evaluation(report, folder, grid_per_class, {"generated_from": generated_from}, say=say)
    return report


def write_evaluation(
    report: EvaluationReport,
    out: Path,
    grid_per_class: int = 8,
    extra: Optional[Dict[str, Any]] = None,
    header: Sequence[str] = (),
    say: Callable[[str], None] = lambda msg: None,
) -> None:
    """Write ``metrics.json`` (with ``extra``), ``grid.png`` (``grid_per_class`` pairs per class) and
    ``summary.txt`` (``header`` lines, then the report's summary) into the folder ``out``; ``say`` the
    summary and the files written."""
    report.save_json(out / "metrics.json", extra)
    report.save_grid(out / "grid.png", per_class=grid_per_class)
    summary = "\n".join([*header, report.summary()])
    atomic_write_text(out / "summary.txt", summary + "\n")
    say(summary)
    say(f"wrote {out / 'metrics.json'}, {out / 'grid.png'}, {out / 'summary.txt'}")


def _utility(
    x01: Tensor,
    labels: Tensor,
    x_teach: Tensor,
    y_teach: Tensor,
    k: int,
    names: List[str],
    train: ImageDataset,
    test: Optional[ImageDataset],
    unseen: Optional[ImageDataset],
    target: Optional[Callable[[Tensor], Tensor]],
    eval_classifier: Optional[nn.Module],
    real_pool: Optional[ImageDataset],
    teaching: Teaching,
    cache: Optional[PathLike],
    seed: int,
    device: Optional[str],
    progress: bool,
) -> Dict[str, Any]:
    """The ``tldr_fast.utility`` metrics, overall: the students learn from ``x_teach`` ``[T, C, H, W]``
    (``y_teach`` ``[T]``), the feature metrics measure the evaluated images ``x01`` ``[N, C, H, W]``."""
    out: Dict[str, Any] = {"teach_images": len(y_teach) if test is not None else None}
    if test is not None:
        dev = str(device) if device else "auto"
        pool = real_pool if real_pool is not None else train
        # one bar for the stage: the students of CAS and distillation, and the real curve's unless cached
        bar = progress_bar(
            total=1 + (target is not None),
            desc="teach",
            unit="student",
            disable=not (progress and distributed.is_main()),
        )
        with bar:
            curve = real_curve(pool, test, teaching, device=dev, cache=cache_dir(cache), bar=bar)
            student = dict(class_names=names, recipe=teaching, seed=seed, device=dev)
            cas = student_accuracy(x_teach, y_teach, test, **student)
            bar.update(1)
            out.update(cas=cas, real_curve=curve, worth_real_per_class=worth(cas, curve, 1 / k) if curve else None)
            distill = None if target is None else student_accuracy(x_teach, y_teach, test, teacher=target, **student)
            bar.update(target is not None)
        out["distill_accuracy"] = distill
    if eval_classifier is not None:
        feats = predict_logits(eval_classifier, x01, features=True)  # [N, D]
        train_feats = predict_logits(eval_classifier, train.images, features=True)
        out.update(classwise_prdc(train_feats, train.labels, feats, labels, k=3, seed=seed))
        if unseen is not None:
            near = nn_feature_distance(feats, labels, train_feats, train.labels)
            ref = nn_feature_distance(
                predict_logits(eval_classifier, unseen.images, features=True), unseen.labels, train_feats, train.labels
            )
            near, ref = near[~torch.isnan(near)], ref[~torch.isnan(ref)]
            ok = len(near) and len(ref) and float(ref.mean()) > 0
            out["feature_nn_ratio"] = float(near.mean() / ref.mean()) if ok else None
    return out
