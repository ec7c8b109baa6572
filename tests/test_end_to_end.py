"""The whole method on real data: a small CNN trained on 1,000 MNIST images, then inverted on the CPU."""

import time

import torch

from tldr_fast import invert
from tldr_fast.data import load_mnist, subset
from tldr_fast.models import train_classifier


def test_mnist_inversion_is_classified_as_its_conditioned_class():
    train = subset(load_mnist("train"), 100, seed=0)  # 1,000 images, 100 per class
    clf = train_classifier(train, "cnn", epochs=10, seed=0, device="cpu")
    assert clf.tldr_meta["train_accuracy"] > 0.97
    t0 = time.perf_counter()
    inv = invert(
        clf, 10, (1, 28, 28), steps=200, batch_size=32, ngf=32, device="cpu", backend="torch", progress=False, seed=0
    )
    seconds = time.perf_counter() - t0
    assert inv.metrics["accuracy"] >= 0.95, inv.metrics
    assert inv.metrics["samples"] == 10 * inv.config.eval_per_class
    # the losses went down: the classifier got confident on the generated images
    assert inv.history["ce"][-1] < 0.5 * inv.history["ce"][0]
    images = inv.sample(n_per_class=4)
    assert images.shape == (40, 1, 28, 28) and torch.isfinite(images).all()
    assert seconds < 120, f"200 CPU steps took {seconds:.0f} s"
