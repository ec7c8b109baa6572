"""Does a target classifier carry the KKT signature of its training set? (the premise of the ``kkt`` term)

For each cached leakage-benchmark target, the cosine between the classifier's parameters ``theta`` and
the CE descent direction ``-grad_theta sum_i CE(x_i, y_i)`` over (a) its training images and (b) as many
held-out test images of the same classes: ``1 - reference.kkt``. A classifier trained long enough on CE
aligns ``theta`` with its training set's descent direction, not with that of unseen images.

    python benchmarks/kkt_signature.py --cache ~/.cache/tldr_fast [--per-class 10]

Needs the targets cached by ``tldr-fast leakage`` (it trains none itself).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tldr_fast import reference
from tldr_fast.classifier import make_preprocess
from tldr_fast.data import load_dataset, subset
from tldr_fast.leakage import cache_dir
from tldr_fast.models import load_classifier


def cosine(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """``cos(theta, -grad_theta sum CE)`` over ``images`` in [0, 1]: ``1 - reference.kkt``."""
    params = [p.requires_grad_(True) for p in model.parameters()]
    logits = model(make_preprocess(None, model, True)(images * 2 - 1))  # [N, K]
    return 1.0 - float(reference.kkt(logits, labels, params).detach())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", default=None, help="the leakage benchmark's cache (default: its default)")
    p.add_argument("--per-class", type=int, default=10, help="images per class of each set (at most the target's own)")
    args = p.parse_args()
    print("| target | training images | held-out images |\n|---|---|---|")
    for path in sorted(Path(cache_dir(args.cache)).glob("leakage-v*.pt")):
        if "-judge-" in path.name:
            continue
        model = load_classifier(path, "cpu")
        meta = model.tldr_meta
        train = load_dataset(meta["train_source"]).select_source(meta["train_indices"])
        n = min(args.per_class, len(train) // meta["num_classes"])
        train = subset(train, n, seed=1)
        held = subset(load_dataset(meta["train_source"].replace(":train", ":test")), n, seed=5)
        print(
            f"| {path.stem} | {cosine(model, train.images, train.labels):.3f} | {cosine(model, held.images, held.labels):.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
