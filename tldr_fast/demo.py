"""The demo (``tldr-fast demo``): the whole pipeline on 1,000 MNIST images, in a few minutes on a CPU.

Train (or reuse from the cache) a small CNN and the leakage benchmark's independent evaluation classifier,
audit it (``tldr_fast.audit``: invert, sample, the leakage verdict and report.html), and evaluate the
generated images against its training images and held-out ones.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable, Dict, Mapping, Optional

from . import leakage
from .audit import audit
from .checkpoint import output_folder
from .config import InversionConfig
from .data import load_dataset, subset
from .evaluate import EVALUATION_FILES, EvaluationReport, evaluate, write_evaluation
from .models import (
    EPOCHS,
    TRAIN_PER_CLASS,
    accuracies,
    load_classifier,
    save_classifier,
    train_classifier,
    training_set,
)
from .utility import Teaching


def metrics_line(metrics: Optional[Dict[str, float]]) -> str:
    """An inversion's metrics in one line, e.g. ``"accuracy 0.950, confidence 0.870"``."""
    if not metrics:
        return "no metrics"
    return ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))


def run(
    invert_options: Mapping[str, Any],
    backend: str = "auto",
    *,
    out: str = "tldr-demo",
    cache_dir: Optional[str] = None,
    train_per_class: int = TRAIN_PER_CLASS,
    epochs: int = EPOCHS,
    judge_train_per_class: Optional[int] = None,
    judge_epochs: Optional[int] = None,
    n_per_class: int = 10,
    tau: float = 0.4,
    grid_per_class: int = 8,
    teach_per_class: int = 100,
    student_steps: Optional[int] = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    say: Callable[[str], None] = print,
    show: Callable[[str], None] = print,
) -> EvaluationReport:
    """The whole pipeline on 1,000 MNIST images, in a few minutes on a CPU.

    Train (or reuse from --cache-dir) a small CNN on 1,000 MNIST training images and an independent
    evaluation classifier on other MNIST images, audit the CNN with the library's defaults (invert it, then
    the leakage verdict against held-out MNIST images: report.html, report.json, grids/), evaluate the
    generated images against the 1,000 training images and, as the control, as many held-out images, and
    write metrics.json, grid.png, classifier.pt, inversion.pt and summary.txt into --out.

    Args:
        invert_options: ``invert`` keywords, checked before any work (``seed``, ``device`` and ``progress``
            are this function's)
        backend: kernels of the inversion and of SSIM
        out: output folder
        cache_dir: where the trained classifier is cached (default: $TLDR_FAST_CACHE or ~/.cache/tldr_fast)
        train_per_class: MNIST training images per class
        epochs: classifier training epochs
        judge_train_per_class: training images per class of the evaluation classifier (default: the
            leakage benchmark's, ~560)
        judge_epochs: its training epochs (default: the leakage benchmark's)
        say: where progress messages go
        show: where the summary goes

    Returns:
        The evaluation report.

    See also:
        evaluate_saved: the evaluation's options, n_per_class, tau, grid_per_class, teach_per_class and
            student_steps.
    """
    cache = leakage.cache_dir(cache_dir)
    InversionConfig().with_overrides(**invert_options)  # every option checked before any work
    teaching = Teaching.with_steps(student_steps, draws=1)  # the real curve from one draw: a demo's budget
    start = time.perf_counter()
    cached = cache / f"demo-cnn-mnist-{train_per_class}pc-{epochs}ep-seed{seed}.pt"
    files = (*EVALUATION_FILES, "classifier.pt", "inversion.pt", "report.html", "report.json")
    folder = output_folder(out, files, {"--cache-dir (its cached classifier)": str(cached)})
    classifier = None
    if cached.is_file():
        try:
            classifier = load_classifier(cached, device)
            say(f"reusing the classifier cached at {cached}")
            train = training_set(classifier)
        except ValueError as e:  # e.g. saved by another version: train a new one in its place
            say(f"not reusing the cached classifier ({e}); training a new one")
    # the leakage benchmark's split of the MNIST test split: held-out control images, and the independent
    # evaluation classifier's training images (it is trained once and cached with the benchmark's)
    suite = leakage.SUITES["default"]
    suite = replace(
        suite,
        judge_max_per_class=judge_train_per_class or suite.judge_max_per_class,
        judge_epochs=judge_epochs or suite.judge_epochs,
    )
    parts = leakage.split("mnist", suite)
    if classifier is None:
        train = subset(load_dataset("mnist"), train_per_class, seed=seed)
        say(f"training a cnn on {len(train)} images of {train.source}")
        classifier = train_classifier(
            train, "cnn", epochs=epochs, batch_size=64, lr=3e-3, seed=seed, device=device, progress=progress,
            test=parts.held_out,
        )  # fmt: skip
        save_classifier(classifier, cached)
    judge = leakage.judge("mnist", parts, suite, cache, device, say)
    save_classifier(classifier, folder / "classifier.pt")
    say(
        f"classifier: {accuracies(classifier.tldr_meta)}; evaluation classifier (lenet on {len(parts.judge)} other "
        f"MNIST images): held-out accuracy {judge.tldr_meta['test_accuracy']:.3f}"
    )
    meta = classifier.tldr_meta
    options = {k: v for k, v in invert_options.items() if k not in ("backend", "seed")}
    audited = audit(  # inverts into inversion.pt (saved at the end and on Ctrl-C); report.html, report.json, grids/
        classifier, train, parts.held_out, folder, eval_classifier=judge, seed=seed, backend=backend,
        device=device, progress=progress, say=say, describe={"classifier_file": str(folder / "classifier.pt")},
        restart=True, **options,
    )  # fmt: skip
    inv = audited.inversion
    say(f"inversion: target classifier {metrics_line(inv.metrics)}")
    say(f"audit: {audited.verdict}")
    report = evaluate(
        inv,
        train,
        n_per_class=n_per_class,
        tau=tau,
        classifier=classifier,
        eval_classifier=judge,
        held_out=parts.held_out,
        test=parts.held_out,
        teach_per_class=teach_per_class,
        real_pool=load_dataset("mnist"),
        teaching=teaching,
        cache=cache,
        backend=backend,
        device=device,
        progress=progress,
    )
    seconds = round(time.perf_counter() - start, 1)
    header = [
        f"demo: CNN on {len(train)} MNIST images ({accuracies(meta)}), inverted in {inv.step} steps "
        f"of {inv.config.batch_size} images; {seconds} s in all",
    ]
    record = {
        "classifier": meta["arch"],
        "train_accuracy": meta["train_accuracy"],
        "test_accuracy": meta["test_accuracy"],
        "eval_classifier": judge.tldr_meta["arch"],
        "eval_classifier_accuracy": judge.tldr_meta["test_accuracy"],
        "held_out_images": len(parts.held_out),
        "audit": audited.verdict,
        "inversion_steps": inv.step,
        "inversion_batch_size": inv.config.batch_size,
        "inversion_metrics": inv.metrics,
        "seconds": seconds,
    }
    write_evaluation(report, folder, grid_per_class, {"demo": record}, header, say=show)
    return report
