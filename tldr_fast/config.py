"""Configuration of an inversion run: loss weights, their schedules, and every option, validated."""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import math
import operator
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import (
    Any,
    Callable,
    Dict,
    Literal,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

from .backends import NAMES as BACKEND_NAMES
from .checkpoint import drop_unknown
from .ops import LOSS_OPS, SPECS
from .ops.perturb import PERTURBATIONS

# The loss terms of the step, in the order of the per-step term vector and of ``Inversion.history``: the
# declared terms of the fused loss ops (``tldr_fast.ops``), then the step's own terms. ``TERM_SLICES[op]``
# is each op's block of it (the op's own term names, in its order).
OP_TERMS = {
    **{op: SPECS[op].terms for op in LOSS_OPS},
    "bn_stats": ("bn_stats",),
    "mode_seek": ("mode_seek",),
    "kkt": ("kkt",),
    "adversarial": ("adversarial",),
    "colour_line": ("colour_line",),
}
TERMS = tuple(t for terms in OP_TERMS.values() for t in terms)
TERM_SLICES = {op: slice(TERMS.index(t[0]), TERMS.index(t[0]) + len(t)) for op, t in OP_TERMS.items()}


def _bounded(default: Any, rule: str, **bounds: float) -> Any:
    """A field that ``check_field`` keeps within ``bounds`` (``ge``, ``gt``, ``le``, ``lt``: >=, >, <=, <; a
    tuple's each element); ``rule`` completes its error, ``"<name> <rule>, got <value>"``."""
    return field(default=default, metadata={"rule": rule, "bounds": bounds})


@dataclass(frozen=True)
class LossWeights:
    """Weight of each loss term (DESIGN.md §2): ``L = sum_t weight_t * term_t``.

    ``ce``/``kl`` act on the clean images, ``*_pert`` on the perturbed ones; KL equals CE for hot
    conditioning, so the defaults use CE. ``pix`` is inert for the generator's tanh output.
    ``moments`` matches the images' per-channel pixel mean and std to the classifier's normalisation
    (inactive when the classifier's normalisation is unknown); ``bn_stats`` matches the batch statistics
    at the input of each of the classifier's BatchNorm layers to its running statistics (DeepInversion;
    inactive for a classifier without BatchNorm); ``mode_seek`` is the mode-seeking term (Mao et al.
    2019): the inverse of the image distance per latent distance between pairs of the same label;
    ``kkt`` asks the batch's CE descent direction w.r.t. the classifier's parameters to point along
    the parameters (``reference.kkt``: the KKT stationarity of a converged classifier, Haim et al. 2022,
    Buzaglo et al. 2023; a double backward, so not with ``compile`` or ``cuda_graph``);
    ``activation``: DAFL's activation loss (Chen et al. 2019), -mean |phi| of the penultimate features:
    rewards images that excite the classifier's features strongly; on by default (its effect on the
    leakage benchmark: BENCHMARKS.md).
    ``adversarial``: DFAD's adversarial student (Fang et al. 2019): ``-(1/(B K)) sum |t - s|``, the
    negative mean absolute difference between the target's logits ``t`` and those of a small student
    ``s`` (``step.Student``) on the clean images, so the generator seeks images on which the student
    does not yet imitate the target; the student learns to imitate it on each step's images (its own
    Adam; DESIGN.md §2.7). Off (0) by default.
    ``colour_line``: for RGB images, the variance of each image's pixel colours off their principal line
    (``reference.colour_line``): 0 for an image in one ink on one background. A prior for data sets drawn
    that way (the suite's colour MNIST and Fashion-MNIST), not for photographs. Off (0) by default.
    """

    ce: float = 1.0
    kl: float = 0.0
    ce_pert: float = 1.0
    kl_pert: float = 0.0
    grad_norm: float = 0.1
    cos: float = 1.0
    ortho: float = 1e-5  # Ortho acts on raw features: its scale is ||phi||^4, hundreds to thousands
    activation: float = 1.0
    tv: float = 1e-3
    pix: float = 1.0
    moments: float = 1.0
    bn_stats: float = 1.0
    mode_seek: float = 0.05
    kkt: float = 0.0
    adversarial: float = 0.0
    colour_line: float = 0.0


@dataclass(frozen=True)
class Ramp:
    """A linear schedule: ``start`` until ``begin_step``, then linearly to ``end`` at ``end_step``, then
    ``end``. Steps are absolute, so a resumed run follows the same schedule.

    >>> Ramp(0.0, 1.0, 0, 100).at(50)
    0.5
    """

    start: float
    end: float
    begin_step: int = 0
    end_step: int = 1000

    def __post_init__(self):
        for name in ("start", "end"):
            v = getattr(self, name)
            if not (_number(v) and 0 <= v < float("inf")):
                raise ValueError(f"Ramp: {name} is a weight, a finite number >= 0, got {v!r}")
        for name in ("begin_step", "end_step"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"Ramp: {name} must be an int >= 0, got {v!r}")
        if self.end_step <= self.begin_step:
            raise ValueError(f"Ramp: end_step ({self.end_step}) must be after begin_step ({self.begin_step})")

    def at(self, step):
        """The value at ``step`` (an int, or a tensor of steps)."""
        t = (step - self.begin_step) / (self.end_step - self.begin_step)
        t = t.clamp(0.0, 1.0) if hasattr(t, "clamp") else min(max(t, 0.0), 1.0)
        return self.start + (self.end - self.start) * t


Preprocess = Union[None, str, Callable, Tuple[Sequence[float], Sequence[float]], Mapping[str, Sequence[float]]]


@dataclass(frozen=True)
class InversionConfig:
    """Every option of ``invert``; any field can also be passed to ``invert`` as a keyword.

    Args:
        steps: optimisation steps of the generator.
        batch_size: images per step (B); the classifier sees 2B when a perturbed term is on.
        lr, betas: the learning rate and betas of Adam (on the generator only).
        seed: everything random (labels, latents, perturbations) derives from (seed, step).
        device: "auto" (the GPU when there is one), "cpu", "cuda", "cuda:1", ...
        dtype: "float32", or "bfloat16" autocast for the generator and classifier (losses in fp32).
        backend: "auto" (per op, the fastest available), "reference", "torch" (plain PyTorch), "triton" or
            "extension" (the C++/CUDA extension; "cuda" is another name for it); ``tldr_fast.backends``.
        conditioning: "hot" (one-hot, TLDR) or "soft" (softmax of Gaussian logits).
        perturbation: "rademacher", "uniform" or "gaussian" noise for the robustness terms.
        eps: perturbation size as a fraction of the pixel range (the generator's [-1, 1]).
        shift, rotate, scale: geometric robustness: each perturbed copy is also moved by a random
            whole-pixel shift in [-shift, shift] on each axis, rotated by a random angle in
            [-rotate, rotate] degrees and scaled by a random factor in [1 - scale, 1 + scale]
            (uncovered pixels are background, the low end of the pixel range); 0, 0, 0: noise only.
        diversity: the pairs that the diversity terms (Cos, Ortho) act on: "batch" (all pairs of the
            batch, the TLDR paper's form) or "class" (pairs of the same label only).
        paired: draw the batch as pairs of the same label with independent latents (the second half
            repeats the first half's labels); the mode-seeking term needs it (on when its weight is).
        dropout: dropout probability in the generator's up-sampling stages (active while training).
        zoom: Zoom (Plug-In Inversion, Ghiasi et al. 2022): the classifier sees the images at a
            resolution that grows over the run in ``zoom`` equal stages, ``ceil(H (s + 1) / zoom)`` pixels
            in stage ``s`` (area-averaged down, bilinearly back up: ``reference.zoom``), full resolution
            in the last; 0 or 1: off. 4 on 28 x 28 shows 7, 14, 21, then 28 pixels.
        colour_shift, colour_contrast: ColorShift (Plug-In Inversion, Ghiasi et al. 2022) on the
            perturbed copies, after the noise and the geometric transforms: per image and channel
            ``x' = exp(c) x + o`` with ``c ~ U(-colour_contrast, colour_contrast)`` and
            ``o ~ U(-colour_shift, colour_shift)``, in the generator's [-1, 1] pixel units, not clipped
            (``reference.colour_shift``); 0 and 0: off. Needs a perturbed term (``ce_pert`` or ``kl_pert``).
            Plug-In Inversion's quick trial on MNIST: ``colour_shift=0.4, colour_contrast=0.5``.
        output_norm: DAFL's and DFAD's output standardisation: the generator's tanh output goes through a
            per-channel BatchNorm (affine) and a second tanh, so each batch has the same per-channel ink
            (mean and spread) before the squash. Part of the generator's layout (a run is resumed with
            its own).
        scaled_spectrum: Olah et al.'s (2017) 1/f-scaled output: the generator's last convolution is filtered
            by ``irfft2(S * rfft2(x))`` before the tanh, ``S`` the 1/f gains (``generator.spectrum_scale``):
            low frequencies amplified, the power of white noise kept. Part of the generator's function (a
            run is resumed with its own).
        decorrelated_colour: Olah et al.'s (2017) decorrelated colour, for 3-channel images: each output
            pixel's channels ``d`` become ``M d`` before the tanh, ``M`` the square root of natural images'
            colour correlation (``generator.colour_basis``). Part of the generator's function.
        surrogate_relu: ``alpha > 0``: in the backward through the classifier, every ReLU's derivative
            ``1[x > 0]`` becomes ``sigmoid(alpha x)`` (Haim et al. 2022, Buzaglo et al. 2023): units that
            faint images leave off still pass gradient; the forward is unchanged (``reference.surrogate_relu``;
            ``torch.relu``, ``F.relu`` and ``nn.ReLU``, in place or not). 0: off. Not with
            ``grad_norm="full"``, ``kkt`` (they differentiate the classifier's true gradient) or ``compile``.
        select: candidates drawn per kept image when sampling: each image ``Inversion.sample`` returns
            is the one of ``select`` candidates of its class that the target classifies most
            confidently under random perturbations (1: no selection; without the classifier, sampling
            falls back to 1 with a notice). Each kept image costs ``select`` generator passes and
            ``4 * select`` classifier passes: for bulk sampling where that matters, pass ``select=1``.
        grad_norm: "head" (closed form on the final linear layer), "full" (double backward over all
            classifier weights, the paper's definition) or "off".
        weights: a ``LossWeights`` (or a dict of the weights to change).
        schedules: ``{term: Ramp(...)}`` (or a tuple ``(start, end, begin_step, end_step)``)
            overriding that term's constant weight.
        nz, ngf: generator latent size and width.
        preprocess: maps the generator's [-1, 1] output to the classifier's input: None (from the
            classifier's ``tldr_meta`` when it has one, else to [0, 1]), "unit" ([0, 1]),
            "identity" ([-1, 1]), ``(mean, std)`` or ``{"mean": ..., "std": ...}`` (of [0, 1] images),
            or any callable.
        head: name of the classifier's final ``nn.Linear`` (found automatically when None).
        checkpoint_every: save a checkpoint every N steps (0: only at the end).
        checkpoint_minutes: also save a checkpoint whenever this many minutes have passed since the last
            save (default 10; 0: off), so that a long run loses at most that much to a crash or a killed
            machine. Both apply only with a checkpoint path (``invert``'s ``checkpoint=`` or ``resume=``,
            the command line's ``--out``); under torch.distributed rank 0 saves.
        log_every: record the loss terms in ``history`` every N steps.
        eval_per_class: fresh samples per class for the final accuracy/confidence metrics.
        progress: show a progress bar.
        compile: run the generator and the classifier under ``torch.compile`` in the training loop
            (the first steps pay the compilation; measured per step on an H200 at B=1024: 1.3x
            faster with the reference losses, 1.65x with ``backend="extension"`` or ``"triton"``, the
            fastest configuration measured). Not with ``grad_norm="full"``: torch.compile has no
            double backward.
        cuda_graph: replay the loss block (head_loss, feature_loss and image_prior, forward and
            backward) from CUDA graphs captured on the first step, instead of launching its kernels
            from Python every step (measured on an H200 at B=1024: 0-7% per step, where the
            convolutions keep the GPU busy while the host launches the loss ops). Needs a CUDA device;
            not with ``grad_norm="full"`` (its double backward reaches into the classifier, outside
            the captured block).
    """

    steps: int = _bounded(600, "must be positive", ge=1)
    batch_size: int = _bounded(128, "must be at least 2 (the diversity terms compare images)", ge=2)
    lr: float = _bounded(2e-3, "must be a positive finite number", gt=0)
    betas: Tuple[float, float] = _bounded((0.5, 0.999), "must be two numbers in [0, 1)", ge=0, lt=1)
    seed: int = 0
    device: str = field(default="auto", metadata={"rule": "must be a string such as 'auto', 'cpu' or 'cuda'"})
    dtype: Literal["float32", "bfloat16"] = "float32"
    backend: Literal[BACKEND_NAMES] = "auto"  # a Literal of the names of tldr_fast.backends
    conditioning: Literal["hot", "soft"] = "hot"
    perturbation: Literal[PERTURBATIONS] = "rademacher"  # of tldr_fast.ops.perturb
    eps: float = _bounded(0.1, "is a fraction of the pixel range and must be in [0, 1]", ge=0, le=1)
    shift: int = _bounded(2, "is a number of pixels >= 0", ge=0)
    rotate: float = _bounded(15.0, "is a maximum angle in degrees in [0, 180]", ge=0, le=180)
    scale: float = _bounded(0.1, "is a maximum relative change in [0, 1)", ge=0, lt=1)
    diversity: Literal["batch", "class"] = "batch"
    paired: bool = False
    dropout: float = _bounded(0.0, "is a probability in [0, 1)", ge=0, lt=1)
    zoom: int = _bounded(0, "is a number of resolution stages >= 0 (0: off)", ge=0)
    colour_shift: float = _bounded(0.0, "must be a finite number >= 0 (0: off)", ge=0)
    colour_contrast: float = _bounded(0.0, "must be a finite number >= 0 (0: off)", ge=0)
    output_norm: bool = False
    scaled_spectrum: bool = False
    decorrelated_colour: bool = False
    surrogate_relu: float = _bounded(0.0, "must be a finite number >= 0 (0: off)", ge=0)
    select: int = _bounded(4, "must be positive", ge=1)
    grad_norm: Literal["head", "full", "off"] = "head"
    weights: LossWeights = field(default_factory=LossWeights)
    schedules: Mapping[str, Ramp] = field(default_factory=dict)
    nz: int = _bounded(100, "must be positive", ge=1)
    ngf: int = _bounded(32, "must be positive", ge=1)
    preprocess: Preprocess = None
    head: Optional[str] = None
    checkpoint_every: int = _bounded(0, "must be >= 0", ge=0)
    checkpoint_minutes: float = _bounded(10.0, "must be a finite number >= 0", ge=0)
    log_every: int = _bounded(10, "must be positive", ge=1)
    eval_per_class: int = _bounded(64, "must be positive", ge=1)
    progress: bool = True
    compile: bool = False
    cuda_graph: bool = False

    def __post_init__(self):
        if isinstance(self.weights, Mapping):
            object.__setattr__(self, "weights", _with_weights(LossWeights(), self.weights))
        if not isinstance(self.weights, LossWeights):
            raise TypeError(f"weights must be a LossWeights or a dict, got {type(self.weights).__name__}")
        object.__setattr__(self, "betas", tuple(self.betas))
        object.__setattr__(self, "schedules", {k: _ramp(k, v) for k, v in dict(self.schedules).items()})
        object.__setattr__(self, "preprocess", _preprocess(self.preprocess))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first bad option and what it accepts: each field
        against its type and declared range (``check_field``), then the options that exclude each other."""
        for f in fields(self):
            check_field(f.name, getattr(self, f.name))
        if self.colour_shift or self.colour_contrast:
            if not (self.active("ce_pert") or self.active("kl_pert")):
                raise ValueError(
                    "colour_shift and colour_contrast act on the perturbed copies: give ce_pert or kl_pert a weight, "
                    "or set both to 0"
                )
        if self.compile and self.grad_norm == "full":
            raise ValueError(
                "compile=True needs grad_norm='head' or 'off': torch.compile has no double backward, which 'full' needs"
            )
        if self.cuda_graph and self.grad_norm == "full":
            raise ValueError(
                "cuda_graph=True needs grad_norm='head' or 'off': 'full' differentiates through the classifier, outside the captured loss block"
            )
        if (self.compile or self.cuda_graph) and self.active("kkt"):
            raise ValueError(
                "the kkt term needs compile=False and cuda_graph=False: it differentiates through the classifier (double backward)"
            )
        if self.surrogate_relu and (self.param_grads or self.compile):
            raise ValueError(
                "surrogate_relu needs grad_norm='head' or 'off', a zero kkt weight and compile=False: 'full' and kkt "
                "differentiate the classifier's true gradient, and the ReLU substitution is not supported under torch.compile"
            )
        for name, value in asdict(self.weights).items():
            if not (_number(value) and 0 <= value < float("inf")):
                raise ValueError(f"weight {name!r} must be a finite number >= 0, got {value!r}")
        if isinstance(self.preprocess, str) and self.preprocess not in ("unit", "identity"):
            raise ValueError(
                f"preprocess must be None, 'unit', 'identity', (mean, std) or a callable, got {self.preprocess!r}"
            )

    def weight(self, term: str, step):
        """The weight of ``term`` at ``step`` (an int or a tensor of steps), by its schedule if it has one."""
        ramp = self.schedules.get(term)
        return ramp.at(step) if ramp is not None else getattr(self.weights, term, 0.0)

    @property
    def param_grads(self) -> bool:
        """Whether a term differentiates through the classifier's parameters (``grad_norm="full"``, ``kkt``)."""
        return self.grad_norm == "full" or self.active("kkt")

    def active(self, term: str) -> bool:
        """Whether ``term`` has a nonzero weight at some step (inactive terms are not computed). A term that
        ``LossWeights`` does not name (a newly declared op's, before the objective weighs it) is off."""
        ramp = self.schedules.get(term)
        return bool(ramp.start or ramp.end) if ramp is not None else getattr(self.weights, term, 0.0) != 0

    def with_overrides(self, **overrides: Any) -> "InversionConfig":
        """A copy with fields (or single loss weights, e.g. ``tv=1e-3``) replaced; unknown names are
        an error that suggests the closest valid one. ``grad_norm`` names the mode; its weight is set
        with ``weights={"grad_norm": ...}``."""
        field_names = {f.name for f in fields(self)}
        weight_names = {f.name for f in fields(LossWeights)}
        plain = {k: v for k, v in overrides.items() if k in field_names}
        loose = {k: v for k, v in overrides.items() if k in weight_names - field_names}  # grad_norm is the mode
        unknown = set(overrides) - field_names - weight_names
        if unknown:
            name = sorted(unknown)[0]
            hint = difflib.get_close_matches(name, sorted(field_names | weight_names), n=1)
            raise TypeError(f"unknown option {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""))
        weights = plain.pop("weights", self.weights)
        if isinstance(weights, Mapping):
            weights = _with_weights(self.weights, weights)
        return replace(self, weights=_with_weights(weights, loose), **plain)

    def to_dict(self) -> Dict[str, Any]:
        """Plain data (for checkpoints and JSON); a callable preprocess is recorded by name only."""
        d = asdict(self)
        d["schedules"] = {k: asdict(v) for k, v in self.schedules.items()}
        d["betas"] = list(self.betas)
        if callable(self.preprocess):
            d["preprocess"] = f"callable:{getattr(self.preprocess, '__qualname__', 'custom')}"
        elif isinstance(self.preprocess, tuple):
            d["preprocess"] = [list(v) for v in self.preprocess]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], preprocess: Preprocess = None, source: Any = None) -> "InversionConfig":
        """Inverse of ``to_dict``; a callable preprocess must be given again. Fields, loss weights and
        schedules this version does not know (a newer version's) are dropped with a warning; a value of
        the wrong kind is an error naming ``source`` (the checkpoint file it came from) and the field."""
        source = source if source is not None else "the saved config"
        if not isinstance(d, Mapping):
            raise ValueError(f"{source}: the config must be a dict of InversionConfig fields, got a {type(d).__name__}")
        d = drop_unknown(d, [f.name for f in fields(cls)], source, "config ")
        pre = d.get("preprocess")
        if isinstance(pre, str) and pre.startswith("callable:"):
            if preprocess is None:
                raise ValueError(f"this run used a custom preprocess ({pre[9:]}): pass preprocess= again")
            d["preprocess"] = preprocess
        weights, schedules = d.get("weights"), d.get("schedules", {})
        for name, value in (("weights", weights), ("schedules", schedules)):
            if not isinstance(value, Mapping):
                raise ValueError(f"{source}: config field {name!r} must be a dict, got {value!r}")
        weights = drop_unknown(weights, [f.name for f in fields(LossWeights)], source, "config.weights ")
        schedules = drop_unknown(schedules, TERMS, source, "config.schedules ")
        try:
            # a weight the saved config does not name (a term its version lacked) was no part of its objective: 0
            d["weights"] = LossWeights(**{**{f.name: 0.0 for f in fields(LossWeights)}, **weights})
            d["schedules"] = {k: _ramp(k, v) for k, v in schedules.items()}
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: config: {e}") from e


def _with_weights(base: LossWeights, changes: Mapping[str, float]) -> LossWeights:
    names = {f.name for f in fields(LossWeights)}
    for k in changes:
        if k not in names:
            hint = difflib.get_close_matches(k, sorted(names), n=1)
            raise TypeError(
                f"unknown loss weight {k!r}"
                + (f"; did you mean {hint[0]!r}?" if hint else f"; expected one of {sorted(names)}")
            )
    return replace(base, **changes)


def _preprocess(p: Preprocess) -> Preprocess:
    """(mean, std) in any container form -> a tuple of two tuples of floats; other forms unchanged."""
    if isinstance(p, Mapping):
        if set(p) != {"mean", "std"}:
            raise ValueError(f"a preprocess dict needs exactly the keys 'mean' and 'std', got {sorted(p)}")
        p = (p["mean"], p["std"])
    if isinstance(p, (tuple, list)):
        if len(p) != 2:
            raise ValueError(f"preprocess as a sequence must be (mean, std), got {p!r}")
        mean, std = ([float(v)] if isinstance(v, (int, float)) else [float(x) for x in v] for v in p)
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"preprocess (mean, std) need equal lengths and positive std, got {p!r}")
        return (tuple(mean), tuple(std))
    return p


def _ramp(term: str, v: Any) -> Ramp:
    if term not in TERMS:
        raise ValueError(f"schedule for unknown term {term!r}; expected one of {TERMS}")
    if isinstance(v, Ramp):
        return v
    if isinstance(v, Mapping):
        return Ramp(**v)
    if isinstance(v, (tuple, list)) and len(v) in (2, 4):
        return Ramp(*v)
    raise TypeError(f"schedule for {term!r} must be a Ramp, a dict or (start, end[, begin_step, end_step]), got {v!r}")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def _choice(name: str, value: Any, options: Sequence[str]) -> None:
    if value not in options:
        hint = difflib.get_close_matches(str(value), options, n=1)
        raise ValueError(
            f"{name} must be one of {tuple(options)}, got {value!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
        )


_COMPARE = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt}
_TYPE_RULES = {bool: "must be True or False", int: "must be an int", str: "must be a string"}


@functools.lru_cache(maxsize=None)
def field_specs() -> Dict[str, Tuple[Any, str, Dict[str, float]]]:
    """``{field: (type, rule, bounds)}`` of ``InversionConfig``: the resolved annotation (``Optional[X]``,
    ``Literal[...]``, ``Tuple[...]`` included) and what ``_bounded`` declared (else ``""`` and ``{}``)."""
    hints = get_type_hints(InversionConfig)
    return {
        f.name: (hints[f.name], f.metadata.get("rule", ""), f.metadata.get("bounds", {}))
        for f in fields(InversionConfig)
    }


def check_field(name: str, value: Any) -> None:
    """A ``TypeError`` or ``ValueError`` naming ``InversionConfig`` field ``name`` unless ``value`` is of its
    type (an int, a finite number for a float, a bool, a string, one of a ``Literal``'s choices, a tuple of
    them, or None for an ``Optional``) within its bounds. Fields of other types are checked as they are built."""
    declared, rule, bounds = field_specs()[name]
    kind = unwrap_optional(declared)
    if value is None and kind is not declared:
        return
    args = get_args(kind)
    if get_origin(kind) is Literal:
        _choice(name, value, args)
    elif get_origin(kind) is tuple:
        sized = isinstance(value, (tuple, list)) and len(value) == len(args)
        if not (sized and all(_within(k, v, bounds) for k, v in zip(args, value))):
            raise ValueError(f"{name} {rule}, got {value!r}")
    elif kind in _TYPE_RULES and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise TypeError(f"{name} {rule if kind is str and rule else _TYPE_RULES[kind]}, got {value!r}")
    elif kind in (int, float) and not _within(kind, value, bounds):
        raise ValueError(f"{name} {rule or 'must be a finite number'}, got {value!r}")


def unwrap_optional(kind: Any) -> Any:
    """``X`` for the type ``Optional[X]``, else ``kind``."""
    args = get_args(kind)
    if get_origin(kind) is Union and len(args) == 2 and type(None) in args:
        return next(k for k in args if k is not type(None))
    return kind


def _within(kind: type, value: Any, bounds: Mapping[str, float]) -> bool:
    """Whether ``value`` is an int (``kind`` int) or a finite number (float) within ``bounds``."""
    if kind is float and not (_number(value) and math.isfinite(value)):
        return False
    if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
        return False
    return all(_COMPARE[op](value, bound) for op, bound in bounds.items())


def field_docs(obj: Any, section: str = "Args") -> Dict[str, str]:
    """``{name: its text}`` from the ``Args:`` (or other ``section``) of ``obj``'s docstring, one line each;
    an entry ``a, b: text`` documents both names (fields, or options such as ``--out``)."""
    docs: Dict[str, str] = {}
    names: Sequence[str] = ()
    lines = inspect.cleandoc(obj.__doc__ or "").partition(f"\n{section}:\n")[2]
    for line in lines.splitlines():
        entry = re.match(r" {4}([\w-]+(?:, [\w-]+)*): (.*)", line)
        if entry:
            names = entry[1].split(", ")
            docs.update((n, entry[2]) for n in names)
        elif line.startswith(" " * 8):
            docs.update((n, f"{docs[n]} {line.strip()}") for n in names)
        elif line.strip():  # the section ended
            break
    return docs


def parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses (numbers, true/false, lists), else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def read_overrides(path: str) -> Dict[str, Any]:
    """The ``InversionConfig`` fields of a JSON file (``--config``; e.g. as metrics or a checkpoint record
    them), validated by invert; an error names the file."""
    try:
        data = json.loads(Path(path).read_text())
    except ValueError as e:  # not UTF-8, not JSON
        raise ValueError(f"--config {path} is not a JSON file ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object of InversionConfig fields")
    return data


def parse_overrides(pairs: Sequence[str], option: str = "--set") -> Dict[str, Any]:
    """``["tv=1e-3", "diversity=class"]`` -> ``{"tv": 0.001, "diversity": "class"}`` (validated by invert);
    ``option``: the command-line option they came from, named in the error."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{option} expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = parse_value(value.strip())
    return out
