"""``invert``: train a label-conditioned generator against a frozen classifier (TLDR)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .backends import resolve, resolve_device
from .checkpoint import PathLike, load_checkpoint, save_checkpoint
from .classifier import ClassifierError, FrozenClassifier
from .config import TERMS, InversionConfig, Preprocess
from .generator import ConditionedGenerator
from .progress import progress_bar
from . import reference
from .step import PIXEL_RANGE, TLDRObjective, pixel_eps, step_seed

Tensor = torch.Tensor




@dataclass
class Inversion:
    """A trained inversion: the generator, its config, the loss history and the target's metrics.

    ``metrics`` (on fresh samples, ``config.eval_per_class`` per class): ``accuracy`` - fraction the
    target classifier assigns to the conditioned class; ``confidence`` - its mean probability of
    that class; ``perturbed_accuracy`` - accuracy on perturbed copies (the robustness the TLDR terms
    ask for). Computed by ``invert``; ``None`` for an inversion loaded without its classifier.
    """

    generator: ConditionedGenerator
    config: InversionConfig
    num_classes: int
    image_shape: Tuple[int, int, int]
    step: int = 0
    history: Dict[str, List[float]] = field(default_factory=dict)
    metrics: Optional[Dict[str, float]] = None
    target: Optional[FrozenClassifier] = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    def _batches(self, labels: Tensor, batch_size: int, seed: int, select: int = 1) -> Iterator[Tuple[Tensor, Tensor]]:
        """``(labels, images)`` on the generator's device, one batch at a time, generator in eval mode;
        with ``select > 1`` each image is the best of ``select`` candidates (``robustness_score``)."""
        g, was_training = self.generator, self.generator.training
        rng = torch.Generator(self.device).manual_seed(seed)
        g.eval()
        try:
            with torch.no_grad():
                for i in range(0, len(labels), batch_size):
                    y = labels[i : i + batch_size].to(self.device)
                    yc = y.repeat_interleave(select)  # [n * select]: the candidates of each image together
                    z = torch.randn(len(yc), g.nz, generator=rng, device=self.device)
                    x = g(z, torch.nn.functional.one_hot(yc, self.num_classes).float(), yc)
                    if select > 1:
                        best = self.robustness_score(x, yc, rng).view(len(y), select).argmax(1)  # [n]
                        x = x.view(len(y), select, *x.shape[1:])[torch.arange(len(y), device=x.device), best]
                    yield y, x
        finally:
            g.train(was_training)

    def robustness_score(self, images: Tensor, labels: Tensor, generator: torch.Generator, draws: int = 4) -> Tensor:
        """The target classifier's mean probability of ``labels`` over ``draws`` random perturbations of
        each image (the noise and geometric transforms of training): ``[N]``. Needs the classifier."""
        if self.target is None:
            raise ValueError("selecting samples needs the target classifier; pass classifier= to Inversion.load")
        cfg, eps = self.config, pixel_eps(self.config)
        score = torch.zeros(len(labels), device=images.device)
        for _ in range(draws):
            noise = reference.perturb_noise(images.shape, cfg.perturbation, generator, images.device, images.dtype)
            x = (images + eps * noise).clamp(*PIXEL_RANGE)
            x = reference.warp(x, cfg.shift, cfg.rotate, cfg.scale, PIXEL_RANGE[0], generator)
            p = torch.softmax(self.target(x)[0].float(), 1)
            score += p.gather(1, labels[:, None]).view(-1) / draws
        return score

    def labels(self, labels: Union[None, Sequence[int], Tensor] = None, n_per_class: Optional[int] = None) -> Tensor:
        """The label vector ``sample`` uses: ``labels`` as given, or ``n_per_class`` of each class in
        order (class 0 x n, class 1 x n, ...)."""
        if (labels is None) == (n_per_class is None):
            raise ValueError("give exactly one of labels= or n_per_class=")
        if labels is None:
            return torch.arange(self.num_classes).repeat_interleave(int(n_per_class))
        y = torch.as_tensor(labels, dtype=torch.long).flatten()
        if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes - 1}]")
        return y

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
        ``select`` (default ``config.select``): each image is the most robustly classified of that
        many candidates of its label (``robustness_score``; needs the target classifier).

        >>> inv.sample(n_per_class=2).shape  # doctest: +SKIP
        torch.Size([20, 1, 28, 28])
        """
        y = self.labels(labels, n_per_class)
        out = torch.empty(len(y), *self.image_shape)
        bs = batch_size or self.config.batch_size
        seed = self.config.seed + 1_000_000_007 if seed is None else seed
        select = self.config.select if select is None else select
        if isinstance(select, bool) or not isinstance(select, int) or select < 1:
            raise ValueError(f"select must be a positive int, got {select!r}")
        for i, (_, x) in enumerate(self._batches(y, bs, seed, select)):
            out[i * bs : i * bs + len(x)] = x.float().cpu()
        return out

    def classifier_metrics(self, n_per_class: Optional[int] = None, seed: Optional[int] = None) -> Dict[str, float]:
        """Accuracy, confidence and perturbed accuracy of the target classifier on fresh samples."""
        if self.target is None:
            raise ValueError("this inversion has no classifier attached; pass classifier= to Inversion.load")
        cfg = self.config
        y_all = self.labels(n_per_class=n_per_class or cfg.eval_per_class)
        seed = cfg.seed + 2_000_000_011 if seed is None else seed
        ops = resolve(cfg.backend, self.device, quiet=True)
        eps = pixel_eps(cfg)
        hits = conf = pert_hits = 0.0
        with torch.no_grad():
            for i, (y, x) in enumerate(self._batches(y_all, cfg.batch_size, seed)):
                p = torch.softmax(self.target(x)[0].float(), 1)
                hits += (p.argmax(1) == y).sum().item()
                conf += p.gather(1, y[:, None]).sum().item()
                x_pert = ops.perturb(x, eps, *PIXEL_RANGE, cfg.perturbation, step_seed(seed, i, 2))
                pert_hits += (self.target(x_pert)[0].argmax(1) == y).sum().item()
        n = len(y_all)
        return {"accuracy": hits / n, "confidence": conf / n, "perturbed_accuracy": pert_hits / n, "samples": n}

    def state(self, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
        return {
            "generator": self.generator.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "step": self.step,
            "config": self.config.to_dict(),
            "num_classes": self.num_classes,
            "image_shape": list(self.image_shape),
            "history": self.history,
            "metrics": self.metrics,
        }

    def save(self, path: PathLike) -> None:
        """Save generator, config, step, history and metrics atomically (weights-only format)."""
        save_checkpoint(path, self.state())

    @classmethod
    def load(cls, path: PathLike, classifier: Optional[nn.Module] = None, device: str = "auto", preprocess: Preprocess = None) -> "Inversion":
        """Load a saved inversion (or checkpoint). With ``classifier``, ``classifier_metrics`` works again."""
        state = load_checkpoint(path)
        cfg = InversionConfig.from_dict(state["config"], preprocess)
        dev = resolve_device(device)
        shape = tuple(state["image_shape"])
        g = ConditionedGenerator(state["num_classes"], shape, cfg.nz, cfg.ngf, cfg.dropout).to(dev)
        g.load_state_dict(state["generator"])
        target = None
        if classifier is not None:
            target = FrozenClassifier(classifier, state["num_classes"], shape, cfg.preprocess, cfg.head, quiet=True, device=dev)
        return cls(g, cfg, state["num_classes"], shape, state["step"], state["history"], state["metrics"], target)


def _config(config: Optional[InversionConfig], state: Optional[dict], overrides: dict) -> InversionConfig:
    if config is not None and not isinstance(config, InversionConfig):
        raise TypeError(f"config must be an InversionConfig, got {type(config).__name__}")
    if state is not None and config is None:
        config = InversionConfig.from_dict(state["config"], overrides.get("preprocess"))
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
        checkpoint: where to save checkpoints (every ``checkpoint_every`` steps, at the end, and on
            Ctrl-C); defaults to ``resume``.

    Returns:
        An ``Inversion`` (``.generator``, ``.sample()``, ``.history``, ``.metrics``).

    >>> inv = invert(clf, 10, (1, 28, 28), steps=300, batch_size=128, device="cpu")  # doctest: +SKIP
    >>> images = inv.sample(n_per_class=8)  # [80, 1, 28, 28] in [-1, 1]  # doctest: +SKIP
    """
    state = load_checkpoint(resume) if resume is not None else None
    cfg = _config(config, state, overrides)
    shape = _check_problem(num_classes, image_shape)
    if state is not None and (state["num_classes"], tuple(state["image_shape"])) != (num_classes, shape):
        raise ValueError(f"checkpoint {resume} is for {state['num_classes']} classes of {tuple(state['image_shape'])}, not {num_classes} of {shape}")
    device = resolve_device(cfg.device)
    target = FrozenClassifier(classifier, num_classes, shape, cfg.preprocess, cfg.head, cfg.grad_norm == "full", device=device)
    if cfg.grad_norm == "head" and target.head is None:
        raise ClassifierError("grad_norm='head' needs the classifier's final nn.Linear: name it with head='...', or use grad_norm='full' or 'off'")
    ops = resolve(cfg.backend, device)
    torch.manual_seed(cfg.seed)  # the generator's initial weights
    g = ConditionedGenerator(num_classes, shape, cfg.nz, cfg.ngf, cfg.dropout).to(device)
    opt = torch.optim.Adam(g.parameters(), lr=cfg.lr, betas=cfg.betas)
    inv = Inversion(g, cfg, num_classes, shape, 0, {t: [] for t in ("step",) + TERMS}, None, target)
    if state is not None:
        g.load_state_dict(state["generator"])
        if state["optimizer"] is not None:
            opt.load_state_dict(state["optimizer"])
        inv.step, inv.history = state["step"], state["history"]
    objective = TLDRObjective(g, target, cfg, ops, device)
    ckpt = checkpoint if checkpoint is not None else resume
    params = list(g.parameters())
    bar = progress_bar(total=cfg.steps, initial=inv.step, desc="invert", unit="step", disable=not cfg.progress)
    updating = False
    try:
        while inv.step < cfg.steps:
            loss, terms = objective(inv.step)
            opt.zero_grad(set_to_none=True)
            loss.backward(inputs=params)  # only the generator's parameters accumulate gradients
            updating = True
            opt.step()
            inv.step += 1
            updating = False
            bar.update()
            if inv.step % cfg.log_every == 0 or inv.step == cfg.steps:
                _log(inv, terms, bar)
            if ckpt is not None and cfg.checkpoint_every and inv.step % cfg.checkpoint_every == 0:
                save_checkpoint(ckpt, inv.state(opt))
    except KeyboardInterrupt:
        if ckpt is not None and not updating:  # between updates the state is consistent: keep it
            save_checkpoint(ckpt, inv.state(opt))
            print(f"\ntldr_fast: interrupted at step {inv.step}; resume with invert(..., resume={str(ckpt)!r})", file=sys.stderr)
        raise
    finally:
        bar.close()
    inv.metrics = inv.classifier_metrics()
    if ckpt is not None:
        save_checkpoint(ckpt, inv.state(opt))
    return inv


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
        inv.history[t].append(v)
    shown = dict(zip(TERMS, values))
    bar.set_postfix(ce=f"{shown['ce']:.3f}", ce_pert=f"{shown['ce_pert']:.3f}", cos=f"{shown['cos']:.2f}", refresh=False)
