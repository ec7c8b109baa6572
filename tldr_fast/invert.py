"""``invert``: train a label-conditioned generator against a frozen classifier (TLDR)."""

from __future__ import annotations

import math
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from time import monotonic
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from . import distributed, samples
from .backends import resolve, resolve_device
from .checkpoint import (
    PathLike,
    check_writable,
    drop_unknown,
    field_error,
    load_checkpoint,
    refuse_overwriting_inputs,
    require_keys,
    save_checkpoint,
)
from .classifier import ClassifierError, FrozenClassifier, fingerprint
from .config import TERMS, InversionConfig, Preprocess
from .generator import ConditionedGenerator, legacy_optimizer_state
from .models import load_classifier
from .progress import progress_bar
from .step import PIXEL_RANGE, Student, TLDRObjective, pixel_eps, step_seed

Tensor = torch.Tensor


@dataclass
class Inversion:
    """A trained inversion: the generator, its config, the loss history and the target's metrics.

    ``metrics`` (on fresh samples, ``config.eval_per_class`` per class): ``accuracy`` - fraction the
    target classifier assigns to the conditioned class; ``confidence`` - its mean probability of
    that class; ``perturbed_accuracy`` - accuracy on perturbed copies (the robustness the TLDR terms
    ask for). Computed by ``invert``; ``None`` for an inversion loaded without its classifier.
    ``classifier``: the fingerprint (``tldr_fast.classifier.fingerprint``) of the classifier it was trained
    against (None for a checkpoint that does not record it); a resumed run checks it.
    """

    generator: ConditionedGenerator
    config: InversionConfig
    num_classes: int
    image_shape: Tuple[int, int, int]
    step: int = 0
    history: Dict[str, List[float]] = field(default_factory=dict)
    metrics: Optional[Dict[str, float]] = None
    target: Optional[FrozenClassifier] = field(default=None, repr=False)
    classifier: Optional[str] = None

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    def labels(self, labels: Union[None, Sequence[int], Tensor] = None, n_per_class: Optional[int] = None) -> Tensor:
        """The label vector ``sample`` uses: ``labels`` as given, or ``n_per_class`` of each class in
        order (class 0 x n, class 1 x n, ...)."""
        return samples.sample_labels(self.num_classes, labels, n_per_class)

    def sample(
        self,
        labels: Union[None, Sequence[int], Tensor] = None,
        n_per_class: Optional[int] = None,
        batch_size: Optional[int] = None,
        seed: Optional[int] = None,
        select: Optional[int] = None,
    ) -> Tensor:
        """Generate images ``[n, C, H, W]`` in [-1, 1] on the CPU, for ``labels`` or ``n_per_class``
        of each class (ordered by class). Generated in batches of ``batch_size`` (default: the
        training batch size), so a million samples never hold more than one batch of activations.
        ``seed`` (default: the inversion's own). ``select`` (default ``config.select``): each image is the
        most robustly classified of that many candidates of its label (``robustness_score``; needs the target
        classifier: without it, the default falls back to no selection with a notice, and an explicit
        ``select > 1`` is an error). Implemented by ``tldr_fast.samples.sample``.

        >>> inv.sample(n_per_class=2).shape  # doctest: +SKIP
        torch.Size([20, 1, 28, 28])
        """
        return samples.sample(self, labels, n_per_class, batch_size, seed, select)

    def sample_batches(
        self,
        labels: Tensor,
        batch_size: Optional[int] = None,
        seed: Optional[int] = None,
        select: Optional[int] = None,
        offset: int = 0,
    ) -> Iterator[Tuple[int, Tensor]]:
        """``sample`` one batch at a time, for writers that stream to disk: ``(position of the batch's
        first image, images [n, C, H, W] in [-1, 1] on the CPU)``. Memory is one batch, whatever the total.
        ``offset``: the first label is image number ``offset`` of a longer sample (a resumed writer
        continues it with exactly the images an uninterrupted one would have written)."""
        return samples.sample_batches(self, labels, batch_size, seed, select, offset)

    def robustness_score(self, images: Tensor, labels: Tensor, seed: int, first: int = 0, draws: int = 4) -> Tensor:
        """The target classifier's mean probability of ``labels`` over ``draws`` random perturbations of
        each image (the noise and geometric transforms of training): ``[N]``; ``sample``'s selection
        criterion (``tldr_fast.samples.robustness_score``). Needs the classifier."""
        return samples.robustness_score(self, images, labels, seed, first, draws)

    def classifier_metrics(self, n_per_class: Optional[int] = None, seed: Optional[int] = None) -> Dict[str, float]:
        """The ``metrics`` that ``invert`` records, on ``n_per_class`` fresh samples per class (default
        ``config.eval_per_class``); needs the classifier."""
        return classifier_metrics(self, n_per_class, seed)

    def state(self, optimizer: Optional[torch.optim.Optimizer] = None, student: Optional[Student] = None) -> dict:
        """The checkpoint's contents: with the generator's ``optimizer`` and the adversarial ``student``
        (its weights and Adam state) of a run in progress, None for either when not given."""
        return {
            "generator": self.generator.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "student": student.state_dict() if student is not None else None,
            "step": self.step,
            "config": self.config.to_dict(),
            "num_classes": self.num_classes,
            "image_shape": list(self.image_shape),
            "history": self.history,
            "metrics": self.metrics,
            "classifier": self.classifier,
        }

    def save(self, path: PathLike) -> None:
        """Save generator, config, step, history and metrics atomically (weights-only format); a
        generator with non-finite weights is an error and nothing is written."""
        _save(path, self)

    @classmethod
    def load(
        cls, path: PathLike, classifier: Optional[nn.Module] = None, device: str = "auto", preprocess: Preprocess = None
    ) -> "Inversion":
        """Load a saved inversion (or checkpoint). With ``classifier`` (its target), ``classifier_metrics`` and
        ``sample``'s selection (``select > 1``) work."""
        state = _load_state(path)
        cfg = InversionConfig.from_dict(state["config"], preprocess, path)
        dev = resolve_device(device)
        shape = tuple(state["image_shape"])
        g = _generator(state["num_classes"], shape, cfg, dev, state["generator"], path)
        target = None
        if classifier is not None:
            target = FrozenClassifier(
                classifier, state["num_classes"], shape, cfg.preprocess, cfg.head, quiet=True, device=dev
            )
        return cls(
            g, cfg, state["num_classes"], shape, state["step"], state["history"], state["metrics"], target,
            state.get("classifier"),
        )  # fmt: skip


STATE_KEYS = ("generator", "optimizer", "step", "config", "num_classes", "image_shape", "history", "metrics")
OPTIONAL_STATE_KEYS = ("format", "student", "classifier")  # not in checkpoints of older versions


class InversionDiverged(RuntimeError):
    """The optimisation produced degenerate images; the message names the likely cause."""


def _load_state(path: PathLike) -> dict:
    """An inversion checkpoint's state, each field checked (errors name the file and the field); fields of a
    newer version are dropped with a warning."""
    state = load_checkpoint(path)
    require_keys(state, STATE_KEYS, path)
    state = drop_unknown(state, STATE_KEYS + OPTIONAL_STATE_KEYS, path)
    positive = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0  # noqa: E731
    checks = {
        "generator": (isinstance(state["generator"], dict), "a dict of tensors (the generator's state_dict)"),
        "optimizer": (state["optimizer"] is None or isinstance(state["optimizer"], dict), "None or a dict"),
        "step": (
            isinstance(state["step"], int) and not isinstance(state["step"], bool) and state["step"] >= 0,
            "an int >= 0",
        ),
        "config": (isinstance(state["config"], dict), "a dict of InversionConfig fields"),
        "num_classes": (positive(state["num_classes"]) and state["num_classes"] >= 2, "an int >= 2"),
        "image_shape": (
            isinstance(state["image_shape"], (list, tuple))
            and len(state["image_shape"]) == 3
            and all(positive(v) for v in state["image_shape"]),
            "[C, H, W] (three positive ints)",
        ),
        "history": (
            isinstance(state["history"], dict) and all(isinstance(v, list) for v in state["history"].values()),
            "a dict of lists",
        ),
        "metrics": (state["metrics"] is None or isinstance(state["metrics"], dict), "None or a dict"),
        "student": (state.get("student") is None or isinstance(state["student"], dict), "None or a dict"),
        "classifier": (state.get("classifier") is None or isinstance(state["classifier"], str), "None or a string"),
    }
    for key, (ok, expected) in checks.items():
        if not ok:
            raise field_error(path, key, expected, state.get(key))
    return state


def _generator(
    num_classes: int,
    shape: Tuple[int, int, int],
    cfg: InversionConfig,
    device: torch.device,
    weights: Optional[dict] = None,
    path: Optional[PathLike] = None,
) -> ConditionedGenerator:
    g = ConditionedGenerator(
        num_classes, shape, cfg.nz, cfg.ngf, cfg.dropout, cfg.output_norm, cfg.scaled_spectrum, cfg.decorrelated_colour
    ).to(device)
    if weights is not None:
        try:
            g.load_state_dict(weights)
        except RuntimeError as e:
            raise ValueError(
                f"{path}: its generator weights do not fit a generator of nz={cfg.nz}, ngf={cfg.ngf}, "
                f"output_norm={cfg.output_norm} ({str(e).splitlines()[0]})"
            ) from e
        if not _finite(g):
            raise ValueError(
                f"{path}: the generator's weights are not finite (NaN or inf): the run that wrote it had diverged"
            )
    return g


def _finite(module: nn.Module) -> bool:
    """Whether every parameter and buffer of ``module`` is finite (one host sync)."""
    flags = [torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def _save(
    path: PathLike,
    inv: "Inversion",
    optimizer: Optional[torch.optim.Optimizer] = None,
    student: Optional[Student] = None,
) -> None:
    """Save ``inv``'s state, never from a non-finite generator (that would replace a good checkpoint)."""
    if not _finite(inv.generator):
        raise FloatingPointError(
            f"the generator's weights became non-finite by step {inv.step}: not saving over {path} (a non-finite loss "
            "term, e.g. an infinite weight, or a learning rate too high?)"
        )
    save_checkpoint(path, inv.state(optimizer, student))


# |x| at or above this is a saturated tanh output (counted in metrics["saturated"])
SATURATED = 0.999


def classifier_metrics(
    inv: Inversion, n_per_class: Optional[int] = None, seed: Optional[int] = None
) -> Dict[str, float]:
    """``Inversion.metrics``, on ``n_per_class`` fresh samples per class (default ``config.eval_per_class``;
    no selection): ``accuracy`` and ``confidence`` of the target classifier, ``perturbed_accuracy`` (on
    ``ops.perturb`` copies), ``saturated`` (mean fraction of pixels at ``|x| >= SATURATED``), ``samples``."""
    if inv.target is None:
        raise ValueError("this inversion has no classifier attached; pass classifier= to Inversion.load")
    cfg = inv.config
    y_all = inv.labels(n_per_class=n_per_class or cfg.eval_per_class)
    seed = cfg.seed + 2_000_000_011 if seed is None else seed
    ops = resolve(cfg.backend, inv.device, quiet=True)
    eps = pixel_eps(cfg)
    hits = conf = pert_hits = saturated = 0.0
    with torch.no_grad():
        for i, (y, x) in enumerate(samples.generate(inv, y_all, cfg.batch_size, seed, select=1)):
            p = torch.softmax(inv.target(x)[0].float(), 1)
            hits += (p.argmax(1) == y).sum().item()
            conf += p.gather(1, y[:, None]).sum().item()
            saturated += (x.abs() >= SATURATED).float().mean((1, 2, 3)).sum().item()
            x_pert = ops.perturb(x, eps, *PIXEL_RANGE, cfg.perturbation, step_seed(seed, i, 2))
            pert_hits += (inv.target(x_pert)[0].argmax(1) == y).sum().item()
    n = len(y_all)
    return {
        "accuracy": hits / n,
        "confidence": conf / n,
        "perturbed_accuracy": pert_hits / n,
        "saturated": saturated / n,
        "samples": n,
    }


def _check_converged(inv: "Inversion") -> None:
    """Degenerate output (almost every pixel saturated and the target at chance) is an error, not a result."""
    m, k = inv.metrics, inv.num_classes
    if m["saturated"] >= 0.99 and m["accuracy"] <= 1 / k + 0.05:
        raise InversionDiverged(
            f"the inversion diverged: {m['saturated']:.0%} of the generated pixels are saturated at -1 or 1 and the target "
            f"classifies the images at chance (accuracy {m['accuracy']:.2f} with {k} classes); lower the learning rate "
            f"(lr={inv.config.lr:g})"
        )


class _Interrupts:
    """SIGINT (Ctrl-C) and SIGTERM deferred to the end of the current step while ``invert`` trains: the
    first asks the loop to stop at a consistent state, which is saved; a second one interrupts at once.
    Only in the main thread (elsewhere signals cannot be handled: an interrupt is immediate)."""

    def __init__(self) -> None:
        self.requested: Optional[str] = None
        self._previous: Dict[int, object] = {}

    def __enter__(self) -> "_Interrupts":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# options that fix the generator's layout or function: a checkpoint is only resumed with its own
ARCHITECTURE = ("nz", "ngf", "output_norm", "scaled_spectrum", "decorrelated_colour")


def _config(
    config: Optional[InversionConfig], state: Optional[dict], overrides: dict, resume: Optional[PathLike]
) -> InversionConfig:
    if config is not None and not isinstance(config, InversionConfig):
        raise TypeError(f"config must be an InversionConfig, got {type(config).__name__}")
    if state is not None and config is None:
        config = InversionConfig.from_dict(state["config"], overrides.get("preprocess"), resume)
    return (config or InversionConfig()).with_overrides(**overrides)


def _check_problem(num_classes: int, image_shape: Sequence[int]) -> Tuple[int, int, int]:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    shape = tuple(image_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape) or min(shape[1:]) < 8:
        raise ValueError(f"image_shape must be (C, H, W) with H, W >= 8, got {image_shape!r}")
    return shape


def invert(
    classifier: nn.Module,
    num_classes: int,
    image_shape: Sequence[int],
    config: Optional[InversionConfig] = None,
    *,
    resume: Optional[PathLike] = None,
    checkpoint: Optional[PathLike] = None,
    allow_other_classifier: bool = False,
    **overrides,
) -> Inversion:
    """Train a generator that produces training-like images of each class of ``classifier``.

    Args:
        classifier: any ``nn.Module`` mapping images to logits ``[B, num_classes]``; its penultimate
            features are the input of its final ``nn.Linear`` (or its second output if it returns
            ``(logits, features)``). It is frozen: eval mode, parameters never updated.
        num_classes: K, the classifier's number of classes.
        image_shape: ``(C, H, W)`` of the classifier's input.
        config: an ``InversionConfig``; ``overrides`` replace any of its fields (or loss weights).
        resume: a checkpoint to continue from (its config, with ``overrides`` on top, e.g. more steps).
            It must have been trained against this classifier (same weights: its recorded fingerprint,
            ``tldr_fast.classifier.fingerprint``), unless ``allow_other_classifier``; a checkpoint that
            records none (an older version's) resumes with a warning.
        checkpoint: where to save checkpoints (every ``checkpoint_every`` steps and ``checkpoint_minutes``
            minutes, at the end, on Ctrl-C or SIGTERM, which stop the run at the end of the current step:
            a second one stops it at once, and under torch.distributed by rank 0 when another rank dies);
            defaults to ``resume``. Checked for writability before training starts. Never written from a
            generator with non-finite weights.

    Raises:
        InversionDiverged: the images came out degenerate (saturated pixels, the target at chance).
        FloatingPointError: a loss term or the generator's weights became non-finite.
        KeyboardInterrupt: after Ctrl-C or SIGTERM, once the state is saved.

    Returns:
        An ``Inversion`` (``.generator``, ``.sample()``, ``.history``, ``.metrics``).

    >>> inv = invert(clf, 10, (1, 28, 28), steps=300, batch_size=128, device="cpu")  # doctest: +SKIP
    >>> images = inv.sample(n_per_class=8)  # [80, 1, 28, 28] in [-1, 1]  # doctest: +SKIP
    """
    main = distributed.is_main()  # under torch.distributed: rank 0 reads, writes and reports
    state, cfg, shape, classifier_id = _restore(
        classifier, num_classes, image_shape, config, resume, allow_other_classifier, overrides, main
    )
    ckpt = checkpoint if checkpoint is not None else resume
    if ckpt is not None and main:
        check_writable(ckpt, "checkpoint")  # before the training, not after it
    inv, opt, objective = _setup(classifier, num_classes, shape, cfg, classifier_id, state, resume, main)
    with inv.target.attached():  # the classifier as invert needs it, and as it was afterwards (also on errors)
        _train(inv, opt, objective, ckpt if main else None, main)
    return inv


def invert_saved(
    overrides: Mapping[str, Any],
    *,
    classifier: str,
    out: str,
    resume: Optional[str] = None,
    allow_other_classifier: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> Inversion:
    """Train a generator that inverts a saved classifier (TLDR).

    Invert a classifier saved by train-classifier: train a label-conditioned generator against it and save
    the inversion (generator, config, history, metrics). --resume continues an interrupted run. Options
    apply in this order: --config, then the options, then --set.

    Args:
        overrides: ``InversionConfig`` fields or loss weights, checked before the classifier is loaded (a
            resumed run checks them against its own)
        classifier: classifier checkpoint from train-classifier
        out: inversion checkpoint to write (.pt)
        resume: continue from this inversion checkpoint (options not given again are the run's own)
        allow_other_classifier: with --resume: continue a run that was trained against another classifier
            than --classifier

    Returns:
        The inversion, saved to ``out`` at the end and on Ctrl-C (resumable, with the optimiser state).
    """
    if not resume:
        InversionConfig().with_overrides(**overrides)
    model = load_classifier(classifier, device)
    meta = model.tldr_meta
    return invert(
        model,
        meta["num_classes"],
        tuple(meta["input_shape"]),
        resume=resume,
        checkpoint=out,
        allow_other_classifier=allow_other_classifier,
        device=device,
        progress=progress,
        **overrides,
    )


def load_inversion(
    path: PathLike, device: str = "cpu", classifier: Optional[nn.Module] = None, classifier_path: Optional[str] = None
) -> Inversion:
    """``Inversion.load(path)`` with ``classifier`` (loaded from ``classifier_path``) as its target; a classifier
    that does not fit the inversion is a ``ClassifierError`` naming both files."""
    try:
        return Inversion.load(path, classifier=classifier, device=device)
    except ClassifierError as e:
        raise ClassifierError(f"--classifier {classifier_path} does not fit --inversion {path}: {e}") from e


def _restore(
    classifier: nn.Module,
    num_classes: int,
    image_shape: Sequence[int],
    config: Optional[InversionConfig],
    resume: Optional[PathLike],
    allow_other_classifier: bool,
    overrides: dict,
    main: bool,
) -> Tuple[Optional[dict], InversionConfig, Tuple[int, int, int], Optional[str]]:
    """``invert``'s arguments checked, and the checkpoint to ``resume`` (read by rank 0, sent to every rank)
    checked against them: ``(its state or None, the config, the image shape, the classifier's fingerprint)``."""
    state = distributed.broadcast_object(_load_state(resume) if resume is not None and main else None)
    cfg = _config(config, state, overrides, resume)
    shape = _check_problem(num_classes, image_shape)
    if not isinstance(allow_other_classifier, bool):
        raise TypeError(f"allow_other_classifier must be True or False, got {allow_other_classifier!r}")
    if state is not None:
        if (state["num_classes"], tuple(state["image_shape"])) != (num_classes, shape):
            raise ValueError(
                f"checkpoint {resume} is for {state['num_classes']} classes of {tuple(state['image_shape'])}, not {num_classes} of {shape}"
            )
        # a key an older run's config lacks had the field's default
        saved = {k: state["config"].get(k, getattr(InversionConfig, k)) for k in ARCHITECTURE}
        changed = [f"{k} ({saved[k]} -> {getattr(cfg, k)})" for k in ARCHITECTURE if saved[k] != getattr(cfg, k)]
        if changed:
            raise ValueError(f"cannot resume {resume} with another generator layout: {', '.join(changed)}")
    classifier_id = fingerprint(classifier) if isinstance(classifier, nn.Module) else None  # else refused in _setup
    if state is not None and classifier_id is not None:
        _check_resumed_classifier(resume, state.get("classifier"), classifier_id, allow_other_classifier, main)
    return state, cfg, shape, classifier_id


def _setup(
    classifier: nn.Module,
    num_classes: int,
    shape: Tuple[int, int, int],
    cfg: InversionConfig,
    classifier_id: Optional[str],
    state: Optional[dict],
    resume: Optional[PathLike],
    main: bool,
) -> Tuple[Inversion, torch.optim.Optimizer, TLDRObjective]:
    """The run: the frozen target, the generator (initial weights from ``cfg.seed``, or the checkpoint's),
    Adam and the objective; with a checkpoint's ``state``, its optimizer, step, history and student."""
    device = resolve_device(cfg.device, quiet=not (cfg.progress and main))
    target = FrozenClassifier(classifier, num_classes, shape, cfg.preprocess, cfg.head, cfg.param_grads, device=device)
    if cfg.grad_norm == "head" and target.head is None:
        raise ClassifierError(
            "grad_norm='head' needs the classifier's final nn.Linear: name it with head='...', or use grad_norm='full' or 'off'"
        )
    ops = resolve(cfg.backend, device, quiet=not (cfg.progress and main))
    torch.manual_seed(cfg.seed)  # the generator's initial weights
    g = _generator(num_classes, shape, cfg, device, state["generator"] if state else None, resume)
    opt = torch.optim.Adam(g.parameters(), lr=cfg.lr, betas=cfg.betas)
    inv = Inversion(g, cfg, num_classes, shape, 0, {t: [] for t in ("step",) + TERMS}, None, target, classifier_id)
    if state is not None:
        if state["optimizer"] is not None:
            opt.load_state_dict(legacy_optimizer_state(g, state["generator"], state["optimizer"]))
            for group in opt.param_groups:  # the lr and betas given to this call apply (and are what it records)
                group["lr"], group["betas"] = cfg.lr, cfg.betas
        inv.step, inv.history = state["step"], state["history"]
    objective = TLDRObjective(g, target, cfg, ops, device)
    if objective.student is not None and state is not None and state.get("student") is not None:
        objective.student.load_state_dict(state["student"])  # else a fresh one: the term is new to this run
    return inv, opt, objective


def _train(
    inv: Inversion, opt: torch.optim.Optimizer, objective: TLDRObjective, ckpt: Optional[PathLike], main: bool
) -> None:
    """``invert``'s loop: train ``inv`` from its step to ``config.steps``, checkpointing to ``ckpt`` (None:
    not this rank's job) every ``checkpoint_every`` steps and ``checkpoint_minutes`` minutes, then its
    metrics; stops (saved) on a deferred signal. On an immediate interrupt, or when another rank dies, the
    last complete step is saved before the error goes on (``_save_interrupted``)."""
    cfg, student = inv.config, objective.student  # student: the adversarial term's, or None
    params = list(inv.generator.parameters())
    bar = progress_bar(
        total=cfg.steps, initial=inv.step, desc="invert", unit="step", disable=not (cfg.progress and main)
    )
    buffers = list(inv.generator.buffers())  # BatchNorm statistics and counts: updated by the forward
    before = [b.clone() for b in buffers]  # their values before the current step
    phase = "between"  # of a step: "between" steps, in its "forward" (and backward), or in its "update"
    stopped = False  # a stop request (on any rank, agreed at logging steps under torch.distributed)
    saved_at = monotonic()  # of the last save (or the start)
    with _Interrupts() as stop:
        try:
            while inv.step < cfg.steps and not stopped:
                phase = "forward"
                torch._foreach_copy_(before, buffers)
                loss, terms = objective(inv.step)
                opt.zero_grad(set_to_none=True)
                loss.backward(inputs=params)  # only the generator's parameters accumulate gradients
                phase = "update"
                opt.step()
                objective.learn()  # the adversarial student's step on this step's images
                inv.step += 1
                phase = "between"
                bar.update()
                stopped = _log_and_agree(inv, objective, terms, bar, stop)
                if ckpt is not None and _checkpoint_due(cfg, inv.step, saved_at):
                    _save(ckpt, inv, opt, student)
                    saved_at = monotonic()
            if not stopped:
                inv.metrics = classifier_metrics(inv)
                _check_converged(inv)
            if ckpt is not None:  # the final state, or the state at the interrupt: consistent either way
                _save(ckpt, inv, opt, student)
        except BaseException as err:
            _save_interrupted(err, inv, opt, objective, ckpt, phase, buffers, before)
            raise
        finally:
            bar.close()
        if stopped or stop.requested is not None:
            _stopped(stop.requested or "stopped by another rank", inv.step, ckpt, main)


def _log_and_agree(inv: Inversion, objective: TLDRObjective, terms: Tensor, bar, stop: "_Interrupts") -> bool:
    """After a step: its terms to ``history`` at logging steps; whether to stop, agreed by every rank (at
    logging steps under torch.distributed, so every rank stops after the same step)."""
    cfg, shard = inv.config, objective.shard
    logged = inv.step % cfg.log_every == 0 or inv.step == cfg.steps
    if logged:
        _log(inv, objective.global_terms(terms), bar)
    return (logged or shard.world == 1) and shard.any(stop.requested is not None, objective.device)


def _checkpoint_due(cfg: InversionConfig, step: int, saved_at: float) -> bool:
    """Whether ``step`` is a checkpoint step, or ``checkpoint_minutes`` have passed since ``saved_at``."""
    return bool(
        (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
        or (cfg.checkpoint_minutes and monotonic() - saved_at >= 60 * cfg.checkpoint_minutes)
    )


def _save_interrupted(
    err: BaseException,
    inv: Inversion,
    opt: torch.optim.Optimizer,
    objective: TLDRObjective,
    ckpt: Optional[PathLike],
    phase: str,
    buffers: List[Tensor],
    before: List[Tensor],
) -> None:
    """On an immediate interrupt (a second Ctrl-C, or one raised by the classifier's code) or a dead peer
    rank (a collective failed: this rank's generator and optimizer are still the last complete step's, as
    every rank holds the same), save the last complete step to ``ckpt``, unless the error came during the
    optimizer update (``phase``); BatchNorm ``buffers`` go back to their values ``before`` an unfinished step."""
    interrupted = isinstance(err, KeyboardInterrupt)
    peer = objective.shard.world > 1 and isinstance(err, Exception) and distributed.collective_failed(err)
    if not (interrupted or peer) or ckpt is None or phase == "update":
        return
    if phase == "forward":
        torch._foreach_copy_(buffers, before)
    _save(ckpt, inv, opt, objective.student)
    why = "interrupted" if interrupted else "another rank stopped (a collective failed)"
    print(
        f"\ntldr_fast: {why} at step {inv.step}; saved step {inv.step} to {ckpt}, resume with "
        f"invert(..., resume={str(ckpt)!r}) or --resume",
        file=sys.stderr,
    )


def _stopped(reason: str, step: int, ckpt: Optional[PathLike], main: bool) -> None:
    """A run stopped by a deferred signal (``reason``) ends in ``KeyboardInterrupt``, after saying where it was
    saved (rank 0)."""
    where = (
        f"; saved to {ckpt}, resume with invert(..., resume={str(ckpt)!r})"
        if ckpt is not None
        else " (no checkpoint= to save to)"
    )
    if main:
        print(f"\ntldr_fast: {reason} at step {step}{where}", file=sys.stderr)
    raise KeyboardInterrupt(reason)


def _check_resumed_classifier(
    resume: PathLike, recorded: Optional[str], given: str, allow_other: bool, say: bool
) -> None:
    """Refuse to resume a run against another classifier than the one it was trained against (every rank
    decides alike); ``say``: print the warning about a checkpoint that records none."""
    if recorded is None and say:
        print(
            f"tldr_fast: warning: {resume} does not record which classifier it was trained against (written by an "
            "older tldr_fast): resuming without checking that it is this one",
            file=sys.stderr,
        )
    elif recorded is not None and recorded != given and not allow_other:
        raise ValueError(
            f"{resume} was trained against another classifier (fingerprint {recorded}; this one's is {given}): resume "
            "it with the classifier it was trained against, or pass allow_other_classifier=True "
            "(--allow-other-classifier) to continue against this one"
        )


def _log(inv: Inversion, terms: Tensor, bar) -> None:
    values = terms.detach().float().cpu().tolist()
    bad = [t for t, v in zip(TERMS, values) if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(
            f"loss terms {bad} became non-finite at step {inv.step} (NaN/inf logits from the classifier, or a learning "
            "rate too high?)"
        )
    inv.history["step"].append(inv.step)
    for t, v in zip(TERMS, values):
        inv.history.setdefault(t, []).append(v)  # setdefault: a checkpoint from before a term existed
    shown = dict(zip(TERMS, values))
    bar.set_postfix(
        ce=f"{shown['ce']:.3f}", ce_pert=f"{shown['ce_pert']:.3f}", cos=f"{shown['cos']:.2f}", refresh=False
    )


def sample_saved(
    *,
    inversion: str,
    n_per_class: int = 10,
    out: str,
    shard_size: Optional[int] = None,
    batch_size: Optional[int] = None,
    select: Optional[int] = None,
    classifier: Optional[str] = None,
    seed: Optional[int] = None,
    device: str = "cpu",
    progress: bool = True,
) -> Tuple[int, Path]:
    """Write N generated images per class to an .npz or a folder of PNGs.

    Sample an inversion: --out ending in .npz writes uint8 images [N, C, H, W] and labels; with --shard-size
    it writes them in shards beside it plus an index (large samples; needed for an .npz under torchrun); any
    other --out is a folder with one sub-folder of PNGs per class.

    Args:
        inversion: inversion checkpoint from invert
        n_per_class: images per class
        out: .npz file or folder (a folder or a sharded .npz resumes an interrupted sample)
        shard_size: with an .npz --out such as s.npz: shards of N images, s-00000-of-000NN.npz, and their
            index s-index.json (the same files for any number of torchrun ranks, each writing its shards;
            resumable; read back with tldr_fast.samples.load_sample)
        batch_size: images generated at a time (default: the inversion's batch size); the images do not
            depend on it
        select: keep the most robustly classified of N candidates per image (needs --classifier; default:
            the inversion's select, or 1 without --classifier)
        classifier: the target classifier checkpoint (scores the candidates of --select)
        seed: sampling seed (default: the inversion's own)

    Returns:
        The number of images and what ``load_sample`` reads; every argument is checked first, and ``out`` is
        never one of the inputs.
    """
    path = Path(out)
    if not out.strip():
        raise ValueError("--out is empty: give an .npz file or a folder")
    if select is not None and select > 1 and not classifier:
        raise ValueError(f"--select {select} needs --classifier (the target classifier scores the candidates)")
    if path.suffix.lower() == ".npz":  # a sharded sample's shards are named after its index
        written = [path.with_name(path.stem + samples.INDEX)] if shard_size else [path]
    else:
        written = [path, path / samples.MANIFEST]
    refuse_overwriting_inputs("--out", out, written, {"--inversion": inversion, "--classifier": classifier})
    target = load_classifier(classifier, device) if classifier else None
    inv = load_inversion(inversion, device, target, classifier)
    labels = inv.labels(n_per_class=n_per_class)
    return len(labels), samples.write_samples(inv, path, labels, batch_size, seed, select, progress, shard_size)
