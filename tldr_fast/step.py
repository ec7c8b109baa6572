"""The TLDR objective of one optimisation step (DESIGN.md §2), over whichever backend's ops."""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch

from . import distributed, reference
from .backends import Backend
from .classifier import FrozenClassifier
from .config import TERM_SLICES, TERMS, InversionConfig
from .generator import ConditionedGenerator, sample_conditions
from .models import LeNet
from .ops.feature_loss import TERMS as FEATURE_TERMS

Tensor = torch.Tensor
PIXEL_RANGE = (-1.0, 1.0)  # the generator's tanh output
STUDENT_LR = 1e-3  # Adam of the adversarial student (betas 0.9, 0.999)
STUDENT_STREAM = -1  # step_seed(seed, 0, STUDENT_STREAM) seeds the student's initial weights (no step's stream)


def pixel_eps(cfg: InversionConfig) -> float:
    """The perturbation size in pixel units: ``cfg.eps`` is a fraction of the generator's pixel range."""
    return cfg.eps * (PIXEL_RANGE[1] - PIXEL_RANGE[0])


def warp_mode(cfg: InversionConfig) -> str:
    """The resampling of the random transforms: "nearest" for whole-pixel shifts alone (exact moves)."""
    return "nearest" if cfg.rotate == cfg.scale == 0 else "bilinear"


def random_theta(
    images: Tensor, cfg: InversionConfig, generator: torch.Generator, shard: Optional[distributed.Shard] = None
) -> Tensor:
    """``[len(images), 2, 3]`` random transforms of ``cfg.shift/rotate/scale`` for ``images``, drawn from
    ``generator``. With ``shard``, ``images`` are its rows of a global batch: the transforms of the whole
    batch are drawn, and its rows kept."""
    n = len(images) if shard is None else shard.total
    theta = reference.warp_theta(n, images.shape[-2:], cfg.shift, cfg.rotate, cfg.scale, generator, images.device)
    return theta if shard is None else shard.take(theta)


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """The seed of everything random in ``step``: a run is a function of (seed, step), so a resumed run
    draws exactly what an uninterrupted one would."""
    return (seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2**62)


class Student:
    """DFAD's adversarial student (Fang et al. 2019): a half-width LeNet (``models.LeNet``: width 16,
    128 features, no dropout) of the target's input shape and classes, with its own Adam (lr
    ``STUDENT_LR``); its initial weights are a function of the run's seed alone.

    ``disagreement(inputs, teacher)`` is ``reference.disagreement(teacher, student(inputs))`` on a step's
    clean images as the target sees them (differentiable w.r.t. ``inputs``; the generator's loss does
    not update the student) and keeps the batch; ``learn()`` then takes one Adam step of the student on
    that batch, detached, towards the target's logits ``teacher``. With ``shard`` of several ranks every
    rank holds the same student: its loss is this rank's share ``b / total`` of the global batch's
    mean and the gradients are summed over ranks, so every rank takes the step of the global batch.
    """

    def __init__(self, num_classes: int, image_shape, seed: int, device: torch.device, shard: distributed.Shard):
        with torch.random.fork_rng(devices=[]):  # the global random state is left as it was
            torch.manual_seed(step_seed(seed, 0, STUDENT_STREAM))
            model = LeNet(list(image_shape), num_classes, width=16, feature_dim=128, dropout=0.0)
        self.model = model.to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=STUDENT_LR)
        self.shard = shard
        self._batch = None  # (inputs, teacher logits) of the last disagreement, detached

    def disagreement(self, inputs: Tensor, teacher: Tensor) -> Tensor:
        """The mean absolute difference of the student's logits on ``inputs`` ``[b, C, H, W]`` (the target's
        input) from ``teacher`` ``[b, K]`` (the target's logits on them): a differentiable scalar."""
        self._batch = (inputs.detach(), teacher.detach())
        return reference.disagreement(teacher, self.model(inputs))

    def learn(self) -> None:
        """One Adam step of the student on the batch of the last ``disagreement`` (none without one)."""
        if self._batch is None:
            return
        (inputs, teacher), self._batch = self._batch, None
        params = list(self.model.parameters())
        share = len(inputs) / self.shard.total  # of the global batch's mean
        grads = torch.autograd.grad(reference.disagreement(teacher, self.model(inputs)) * share, params)
        distributed.sum_over_ranks(grads)
        for p, grad in zip(params, grads):
            p.grad = grad
        self.optimizer.step()

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


class TLDRObjective:
    """``objective(step) -> (loss, terms [len(TERMS)])`` for a generator against a frozen classifier.

    The clean images and their perturbed copies (noise, then the random geometric transforms of
    ``cfg.shift/rotate/scale``, then ``cfg.colour_shift/colour_contrast``'s ColorShift), both seen at the
    resolution of ``cfg.zoom``'s stage, go through the classifier in ONE forward of 2B (with
    ``cfg.surrogate_relu``, its ReLUs' backward is the sigmoid surrogate), which also yields the
    BatchNorm-statistics term of the clean rows. With the ``adversarial`` term, ``self.student`` (a
    ``Student``) sees the clean rows as the target did, and ``learn()``, called after the generator's
    update, takes its step on them. Terms are in ``config.TERMS`` order; an op none of whose
    terms is active (zero weight at every step, or nothing to act on: ``moments`` without a known
    normalisation, ``bn_stats`` without BatchNorm layers) is not run and its terms read 0; a fused op that
    runs reports every term it computes, weighted 0 or not. ``loss`` is differentiable w.r.t. the
    generator's parameters.

    Under ``torch.distributed`` (world size > 1; DESIGN.md section 5.1) ``cfg.batch_size`` is the global
    batch: this rank draws the whole batch's randomness and keeps its rows (``self.shard``), the
    generator is data-parallel (global BatchNorm, DDP), ``cos``/``ortho``/``activation``, the head
    ``grad_norm``, ``moments``, ``bn_stats`` and ``mode_seek`` are exact global-batch terms from all-reduced sums
    (``distributed.feature_loss`` and the like: ``self.shared``) and every other term is weighted by
    ``self.scale`` so that the mean of the ranks' losses is the global objective (``global_terms`` gives the
    global values).
    """

    def __init__(
        self,
        generator: ConditionedGenerator,
        target: FrozenClassifier,
        cfg: InversionConfig,
        ops: Backend,
        device: torch.device,
    ):
        self.g, self.target, self.cfg, self.ops, self.device = generator, target, cfg, ops, device
        self.robust = cfg.active("ce_pert") or cfg.active("kl_pert")
        self.feature_terms_on = any(cfg.active(t) for t in FEATURE_TERMS)  # feature_loss runs, with all its weights
        self.moments = target.moments if cfg.active("moments") else None  # [2, C] or None
        self.prior = cfg.active("tv") or cfg.active("pix") or self.moments is not None
        self.bn_stats = cfg.active("bn_stats") and bool(target.batchnorms)
        self.mode_seek = cfg.active("mode_seek")
        self.colour_line = cfg.active("colour_line")
        if self.colour_line and generator.image_shape[0] != 3:
            raise ValueError(
                f"colour_line needs RGB images (3 channels), the classifier takes {generator.image_shape[0]}"
            )
        self.paired = cfg.paired or self.mode_seek
        self.warp = bool(cfg.shift or cfg.rotate or cfg.scale)
        self.colour = bool(cfg.colour_shift or cfg.colour_contrast)
        self.eps = pixel_eps(cfg)
        self.shard = distributed.Shard.of(cfg.batch_size, device, self.paired)  # this rank's rows
        # with several ranks, the terms every rank computes whole from all-reduced sums (section 5.1)
        head_grad_norm = ("grad_norm",) if cfg.grad_norm == "head" else ()
        self.shared = FEATURE_TERMS + ("moments", "bn_stats", "mode_seek") + head_grad_norm
        self.scale = self.shard.term_scale(TERMS, ("pix",), self.shared, device)  # [len(TERMS)]
        if cfg.cuda_graph and self.shard.world > 1:
            raise ValueError("cuda_graph=True does not work under torch.distributed (collectives in the loss block)")
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
        # cfg.compile: compiled callables for the loop; the modules themselves stay as they are
        net = distributed.data_parallel(generator, device) if self.shard.world > 1 else generator
        self.generate = torch.compile(net) if cfg.compile else net
        self.classifier = target.compiled() if cfg.compile else None
        self._weights = torch.empty(0, len(TERMS), device=device)
        self._zeros = torch.zeros(len(TERMS), device=device)  # the terms of inactive ops (no allocation per step)
        self._gen = torch.Generator(device)  # reseeded every step: a step's draws are a function of (seed, step)
        if cfg.param_grads:
            self.params = list(target.classifier.parameters())  # all require grad while attached
        if cfg.cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device, got {device}")
        self._graphed = None  # cfg.cuda_graph: the loss block as CUDA graphs, captured on the first step
        self.student = (
            Student(generator.num_classes, generator.image_shape, cfg.seed, device, self.shard)
            if cfg.active("adversarial")
            else None
        )

    def weights(self, step: int) -> Tensor:
        """The weight of each term at ``step``: a row of a table kept on the device (no per-step copy)."""
        if step >= len(self._weights):
            s = torch.arange(max(self.cfg.steps, step + 1), dtype=torch.float64)
            cols = [torch.as_tensor(self.cfg.weight(t, s), dtype=torch.float64).expand_as(s) for t in TERMS]
            self._weights = torch.stack(cols, 1).float().to(self.device)
        return self._weights[step]

    def __call__(self, step: int):
        # the classifier attached (hooks, eval mode, frozen flags) for the step, differentiated terms included;
        # a no-op inside invert, which holds it attached for the whole run
        with self.target.attached():
            return self._step(step)

    def _step(self, step: int):
        cfg, shard = self.cfg, self.shard
        self._gen.manual_seed(step_seed(cfg.seed, step))
        drawn = sample_conditions(
            cfg.batch_size, self.g.num_classes, self.g.nz, cfg.conditioning, self._gen, self.device, self.paired
        )
        z, c, y = (shard.take(t) for t in drawn)  # this rank's rows: [b, nz], [b, K], [b]
        b = len(y)
        w = self.weights(step) if shard.world == 1 else self.weights(step) * self.scale
        with self.autocast:
            x = self.generate(z, c, y)  # [B, C, H, W] in [-1, 1]
            batch = x
            if self.robust:
                noise_seed = step_seed(cfg.seed, step, 1)
                theta = random_theta(x, cfg, self._gen, shard) if self.warp else None  # [b, 2, 3]
                args = (x, self.eps, *PIXEL_RANGE, cfg.perturbation, noise_seed)
                if shard.world == 1:  # noise, clip and warp in one op
                    x_pert = self.ops.perturb(*args, theta, warp_mode(cfg))
                else:  # the reference's noise of the whole batch, this rank's rows
                    x_pert = distributed.perturb(*args, shard, theta, warp_mode(cfg))
                if self.colour:  # drawn for the whole batch, after the warp, from the step's generator
                    channels = x.shape[1]
                    shifts = reference.colour_draws(
                        shard.total, channels, cfg.colour_contrast, cfg.colour_shift, self._gen, self.device
                    )
                    x_pert = reference.colour_shift(x_pert, shard.take(shifts))
                batch = torch.cat([x, x_pert])  # one forward of 2B
            size = reference.zoom_size(cfg.zoom, step, cfg.steps, tuple(x.shape[-2:]))
            if size is not None:  # Zoom: the classifier sees the batch at a lower resolution
                batch = reference.zoom(batch, size)
            bn_op = (
                self.ops.bn_stats if shard.world == 1 else functools.partial(distributed.bn_stats, total=shard.total)
            )
            relus = reference.surrogate_relu(cfg.surrogate_relu) if cfg.surrogate_relu else contextlib.nullcontext()
            with relus:  # the graph of this forward keeps the surrogate ReLU derivative for loss.backward
                logits, feats, bn = self.target.forward_bn_stats(
                    batch, b if self.bn_stats else 0, self.classifier, bn_op
                )
        feats = feats[:b]  # clean images' features: [B, D]
        loss, terms = self.loss_block(logits, feats, x, c, y, w)
        extra = {}
        if self.bn_stats:
            extra["bn_stats"] = bn
        if shard.world > 1:  # the global batch's values from all-reduced sums (one process: in the fused ops)
            if cfg.grad_norm == "head":
                head_bias = self.target.head_bias
                extra["grad_norm"] = distributed.head_grad_norm(logits[:b], c, feats, shard.total, head_bias)
            if self.moments is not None:
                extra["moments"] = distributed.moments(x, self.moments, *PIXEL_RANGE, shard.total)
        if self.mode_seek:
            extra["mode_seek"] = self.ops.mode_seek(x, z) if shard.world == 1 else distributed.mode_seek(x, z)
        if cfg.grad_norm == "full":
            extra["grad_norm"] = reference.grad_norm_full(logits[:b], c, self.params)
        if cfg.active("kkt"):
            extra["kkt"] = reference.kkt(logits[:b], y, self.params)
        if self.colour_line:
            extra["colour_line"] = self.ops.colour_line(x)
        if self.student is not None:  # outside the surrogate: only the target's ReLUs have it
            with self.autocast:  # the student sees the clean rows as the target did (zoomed, preprocessed)
                extra["adversarial"] = -self.student.disagreement(self.target.preprocess(batch[:b]), logits[:b])
        if extra:
            terms = terms.clone()
            for name, value in extra.items():
                i = TERMS.index(name)
                loss = loss + w[i] * value
                terms[i] = value.detach().float()
        return loss, terms

    def learn(self) -> None:
        """The adversarial student's step on the clean images of the last call (nothing without the term)."""
        if self.student is not None:
            with self.autocast:
                self.student.learn()

    def global_terms(self, terms: Tensor) -> Tensor:
        """The terms of the global batch from this rank's ``terms`` (a collective: every rank calls it;
        ``terms`` itself in one process). Exact for ``pix``, the means of per-image values and the terms of
        ``self.shared``; the others (the full grad-norm, ``kkt``) are the mean of the ranks' values weighted by
        their rows."""
        return terms if self.shard.world == 1 else self.shard.mean_of_ranks(terms * self.scale)

    def loss_block(self, logits: Tensor, feats: Tensor, x: Tensor, c: Tensor, y: Tensor, w: Tensor):
        """``(loss, terms [len(TERMS)])`` of the fused loss ops (the head grad-norm term only with
        ``grad_norm="head"``; the bn_stats, mode_seek and kkt entries 0); from CUDA graphs with
        ``cfg.cuda_graph``. ``logits`` [N, K] (N = B or 2B), ``feats`` [B, D], ``x`` [B, C, H, W],
        ``c`` [B, K], ``y`` [B], ``w`` [len(TERMS)]."""
        if not self.cfg.cuda_graph:
            return self._loss_block(logits, feats, x, c, y, w)
        if self._graphed is None:
            # make_graphed_callables warms up on copies of these inputs (autotuning, lazy init), then
            # captures one forward and one backward graph; later calls copy the inputs in and replay
            sample = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in (logits, feats, x, c, y, w))
            self._graphed = torch.cuda.make_graphed_callables(self._loss_block, sample, allow_unused_input=True)
        loss, terms = self._graphed(logits, feats, x, c, y, w)
        return loss, terms.clone()  # the graph's output buffer is rewritten by the next replay

    def _loss_block(self, logits: Tensor, feats: Tensor, x: Tensor, c: Tensor, y: Tensor, w: Tensor):
        cfg, zeros, single = self.cfg, self._zeros, self.shard.world == 1
        head_feats = feats if cfg.grad_norm == "head" and single else None  # several ranks: in __call__
        head = TERM_SLICES["head_loss"]
        loss, head_terms = self.ops.head_loss(logits, c, y, head_feats, w[head], self.target.head_bias)
        parts = [head_terms]
        feature, prior = TERM_SLICES["feature_loss"], TERM_SLICES["image_prior"]
        if self.feature_terms_on:
            labels = y if cfg.diversity == "class" else None
            if single:
                l_f, feat_terms = self.ops.feature_loss(feats, w[feature], labels, self.g.num_classes)
            else:  # exact over the global batch, from all-reduced sums
                l_f, feat_terms = distributed.feature_loss(
                    feats, w[feature], self.shard.total, labels, self.g.num_classes
                )
            loss = loss + l_f
        parts.append(feat_terms if self.feature_terms_on else zeros[feature])
        if self.prior:
            moments = self.moments if single else None  # several ranks: in __call__
            l_p, prior_terms = self.ops.image_prior(x, w[prior], *PIXEL_RANGE, moments)
            loss = loss + l_p
        parts.append(prior_terms if self.prior else zeros[prior])
        parts.append(zeros[prior.stop :])  # bn_stats, mode_seek, kkt: added by __call__
        return loss, torch.cat(parts)
