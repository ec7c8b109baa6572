"""What generated images are worth as data: metrics that a dark background cannot fool (DESIGN.md §6.1).

SSIM to the nearest training image rewards a black background (an all-black image scores ~0.49 on
MNIST). These metrics ask what the images *are* for a classifier instead:

* **Classification Accuracy Score** (CAS, Ravuri & Vinyals 2019): a fresh classifier (the
  ``Teaching`` recipe: a LeNet, a fixed number of Adam steps whatever the data size) trained on the
  generated images with their conditioned labels, tested on real held-out images. Beside it the
  **real curve**: the same recipe on 1, 3, 10 and 100 real training images per class (each the mean
  over ``draws`` random draws), and :func:`worth`, the number of real images per class that teach as
  much.
* **Distillation accuracy** (as DAFL, Chen et al. 2019, and DFAD, Fang et al. 2019, report): the same
  student trained on the generated images against the target's soft outputs (``T^2 KL`` at T = 4).
* **Precision, recall, density, coverage** (Naeem et al. 2020, k = 3) of the generated images'
  penultimate features (of an evaluation classifier) against real training images', per class with as
  many real as generated images, averaged over the classes: :func:`prdc`, :func:`classwise_prdc`.
* **Feature nearest-neighbour ratio**: the mean distance from a generated image's features to the
  nearest training image of its class, over the same for real unseen images (1: as near as unseen
  data; < 1 nearer, as memorised images are; > 1 farther).
* **Contrast-invariant NN-SSIM** (computed in ``tldr_fast.evaluate``): each generated image min-max
  rescaled to [0, 1] first (as Haim et al. 2022 score reconstructions); a blank image scores 0.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from .checkpoint import atomic_write_text
from .data import ImageDataset, content_digest, subset

Tensor = torch.Tensor

CURVE_VERSION = 1  # part of the real curve's cache key: bump when the recipe's code changes


@dataclass(frozen=True)
class Teaching:
    """The recipe of the students of CAS, distillation and the real curve: one for every data size
    (``steps`` Adam steps of ``batch_size`` images, one-cycle ``lr``, no augmentation), and the real
    curve's sizes (images per class) and random draws per size."""

    arch: str = "lenet"
    steps: int = 400
    batch_size: int = 64
    lr: float = 3e-3
    temperature: float = 4.0  # of distillation
    real_sizes: Tuple[int, ...] = (1, 3, 10, 100)
    draws: int = 3

    @classmethod
    def with_steps(cls, steps: Optional[int] = None, **changes: Any) -> "Teaching":
        """The recipe with ``steps`` Adam steps per student when given (else the default's) and ``changes``."""
        return cls(**{**({"steps": steps} if steps else {}), **changes})


def student_accuracy(
    images01: Tensor,
    labels: Tensor,
    test: ImageDataset,
    *,
    class_names: Sequence[str],
    recipe: Teaching = Teaching(),
    teacher: Optional[Callable[[Tensor], Tensor]] = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
) -> float:
    """Test accuracy on ``test`` of a fresh student (``recipe``) trained on ``images01`` ``[N, C, H, W]`` in
    [0, 1] with ``labels`` ``[N]`` (CAS), or against ``teacher``'s logits (distillation)."""
    from .models import train_classifier

    n = len(labels)
    if n < 2:
        raise ValueError(f"a student needs at least 2 training images, got {n}")
    ds = ImageDataset(images01.float().cpu(), labels.long().cpu(), list(class_names), torch.arange(n), "generated")
    epochs = math.ceil(recipe.steps / math.ceil(n / recipe.batch_size))
    model = train_classifier(
        ds,
        recipe.arch,
        epochs=epochs,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        seed=seed,
        device=device,
        test=test,
        teacher=teacher,
        temperature=recipe.temperature,
        progress=progress,
    )
    return float(model.tldr_meta["test_accuracy"])


def real_curve(
    pool: ImageDataset,
    test: ImageDataset,
    recipe: Teaching = Teaching(),
    device: str = "cpu",
    cache: Optional[Path] = None,
    progress: bool = False,
    bar: Optional[Any] = None,
) -> Dict[str, float]:
    """``{str(n): accuracy}``: a student (``recipe``) trained on ``n`` real images per class of ``pool``
    for each of ``recipe.real_sizes`` (a class-balanced draw, seeds ``0..draws-1``; the mean over
    draws), tested on ``test``. Sizes larger than ``pool``'s smallest class are left out. Kept as JSON
    in ``cache`` (a folder), keyed by both data sets' contents and the recipe. ``bar``: a progress bar of the
    caller's stage, advanced by one per student trained here (its total grown by their number), instead of
    one bar per student."""
    present = [c for c in pool.class_counts() if c > 0]
    sizes = sorted(n for n in set(int(s) for s in recipe.real_sizes) if 1 <= n <= min(present))
    key = json.dumps([CURVE_VERSION, asdict(recipe), sizes, content_digest(pool, test)], sort_keys=True)
    path = None
    if cache is not None:
        path = Path(cache) / f"real-curve-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
        if path.is_file():
            try:
                stored = json.loads(path.read_text())
                if stored.get("key") == key:
                    return stored["curve"]
            except (ValueError, KeyError):
                pass  # unreadable: compute it again
    curve = {}
    if bar is not None:
        bar.total = (bar.total or 0) + len(sizes) * recipe.draws
        bar.refresh()
    for n in sizes:
        accs = []
        for d in range(recipe.draws):
            part = subset(pool, n, seed=d)
            accs.append(
                student_accuracy(
                    part.images,
                    part.labels,
                    test,
                    class_names=pool.class_names,
                    recipe=recipe,
                    seed=d,
                    device=device,
                    progress=progress and bar is None,
                )
            )
            if bar is not None:
                bar.update(1)
        curve[str(n)] = sum(accs) / len(accs)
    if path is not None:
        atomic_write_text(path, json.dumps({"key": key, "curve": curve}, indent=2) + "\n")
    return curve


def worth(accuracy: float, curve: Dict[str, float], chance: float) -> float:
    """Real images per class that teach as much as ``accuracy``: the smallest ``k`` at which the real
    curve reaches it, the curve read as straight lines from ``(0, chance)`` to its first size and in
    ``log k`` between sizes. 0 at or below chance; the largest size when the curve never reaches it.

    >>> worth(0.55, {"1": 0.4, "10": 0.7}, chance=0.1)
    3.1622776601683795
    """
    points = sorted((int(n), a) for n, a in curve.items())
    if not points or accuracy <= chance:
        return 0.0
    n0, a0 = 0, chance
    for n1, a1 in points:
        if a1 >= accuracy:
            t = (accuracy - a0) / (a1 - a0)  # a0 < accuracy <= a1
            if n0 == 0:
                return t * n1
            return math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0)))
        n0, a0 = n1, a1
    return float(points[-1][0])


def _kth_radius(x: Tensor, k: int) -> Tensor:
    """``[N]``: distance from each row of ``x`` ``[N, D]`` to its k-th nearest other row."""
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # the 1st is the row itself (0)


def prdc(real: Tensor, fake: Tensor, k: int = 3) -> Dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al. 2020) of ``fake`` ``[M, D]`` against
    ``real`` ``[N, D]``, with ``r_i`` the distance from real ``i`` to its k-th nearest real neighbour
    and ``s_j`` the same among the fakes:

    * precision = mean_j [exists i: |y_j - x_i| <= r_i]
    * recall = mean_i [exists j: |x_i - y_j| <= s_j]
    * density = (1 / k M) sum_j #{i: |y_j - x_i| <= r_i}
    * coverage = mean_i [min_j |x_i - y_j| <= r_i]
    """
    if real.shape[0] <= k or fake.shape[0] <= k:
        raise ValueError(f"prdc needs more than k={k} real and fake points, got {real.shape[0]} and {fake.shape[0]}")
    real, fake = real.double(), fake.double()
    r, s = _kth_radius(real, k), _kth_radius(fake, k)  # [N], [M]
    d = torch.cdist(real, fake)  # [N, M]
    inside = d <= r[:, None]  # fake j inside real i's ball
    return {
        "precision": float(inside.any(0).double().mean()),
        "recall": float((d <= s[None, :]).any(1).double().mean()),
        "density": float(inside.sum().double() / (k * fake.shape[0])),
        "coverage": float((d.min(1).values <= r).double().mean()),
    }


def classwise_prdc(
    real: Tensor, real_labels: Tensor, fake: Tensor, fake_labels: Tensor, k: int = 3, seed: int = 0
) -> Dict[str, Optional[float]]:
    """:func:`prdc` per class, with as many real points as the class has fakes (a seeded random subset
    when it has more, as Naeem et al. compare equal sizes), averaged over the classes that have more
    than ``k`` of both; None when no class does."""
    gen = torch.Generator().manual_seed(seed)
    per_class = []
    for c in torch.unique(fake_labels).tolist():
        f = fake[fake_labels == c]
        rows = torch.nonzero(real_labels == c).view(-1)
        rows = rows[torch.randperm(len(rows), generator=gen)[: len(f)]]
        if len(rows) > k and len(f) > k:
            per_class.append(prdc(real[rows], f, k))
    keys = ("precision", "recall", "density", "coverage")
    if not per_class:
        return dict.fromkeys(keys)
    return {m: sum(p[m] for p in per_class) / len(per_class) for m in keys}


def nn_feature_distance(query: Tensor, query_labels: Tensor, ref: Tensor, ref_labels: Tensor) -> Tensor:
    """``[N]``: the distance from each query row to the nearest ``ref`` row of its class (NaN if none)."""
    out = torch.full((len(query_labels),), math.nan, dtype=torch.float64)
    for c in torch.unique(query_labels).tolist():
        q, r = query_labels == c, ref_labels == c
        if r.any():
            out[q] = torch.cdist(query[q].double(), ref[r].double()).min(1).values
    return out


def minmax_rescale(x01: Tensor, eps: float = 1e-6) -> Tuple[Tensor, Tensor]:
    """Each image of ``x01`` ``[N, C, H, W]`` stretched to span [0, 1] (over all its pixels and
    channels), and ``blank`` ``[N]`` (bool): images whose range is below ``eps`` (they stay as they are)."""
    flat = x01.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    blank = (hi - lo) < eps
    scale = torch.where(blank, torch.ones_like(hi), hi - lo)
    out = (x01 - lo.view(-1, 1, 1, 1)) / scale.view(-1, 1, 1, 1)
    return torch.where(blank.view(-1, 1, 1, 1), x01, out), blank
