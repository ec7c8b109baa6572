"""The TLDR objective of one optimisation step (DESIGN.md §2), over whichever backend's ops."""

from __future__ import annotations

import torch

from . import reference
from .backends import Backend
from .classifier import FrozenClassifier
from .config import TERM_SLICES, TERMS, InversionConfig
from .generator import ConditionedGenerator, sample_conditions

Tensor = torch.Tensor
PIXEL_RANGE = (-1.0, 1.0)  # the generator's tanh output


def pixel_eps(cfg: InversionConfig) -> float:
    """The perturbation size in pixel units: ``cfg.eps`` is a fraction of the generator's pixel range."""
    return cfg.eps * (PIXEL_RANGE[1] - PIXEL_RANGE[0])


def random_warp(images: Tensor, cfg: InversionConfig, generator: torch.Generator) -> Tensor:
    """``images`` under random transforms of ``cfg.shift/rotate/scale`` drawn from ``generator``
    (uncovered pixels: background, the low end of the pixel range)."""
    theta = reference.warp_theta(len(images), images.shape[-2:], cfg.shift, cfg.rotate, cfg.scale, generator, images.device)
    return reference.warp(images, theta, PIXEL_RANGE[0], "nearest" if cfg.rotate == cfg.scale == 0 else "bilinear")


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """The seed of everything random in ``step``: a run is a function of (seed, step), so a resumed run
    draws exactly what an uninterrupted one would."""
    return (seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2**62)


class TLDRObjective:
    """``objective(step) -> (loss, terms [len(TERMS)])`` for a generator against a frozen classifier.

    The clean images and their perturbed copies (noise, then the random geometric transforms of
    ``cfg.shift/rotate/scale``) go through the classifier in ONE forward of 2B, which also yields the
    BatchNorm-statistics term of the clean rows. Terms are in ``config.TERMS`` order; inactive terms
    (zero weight at every step, or nothing to act on: ``moments`` without a known normalisation,
    ``bn_stats`` without BatchNorm layers) are not computed and read 0. ``loss`` is differentiable
    w.r.t. the generator's parameters.
    """

    def __init__(self, generator: ConditionedGenerator, target: FrozenClassifier, cfg: InversionConfig, ops: Backend, device: torch.device):
        self.g, self.target, self.cfg, self.ops, self.device = generator, target, cfg, ops, device
        self.robust = cfg.active("ce_pert") or cfg.active("kl_pert")
        self.diverse = cfg.active("cos") or cfg.active("ortho")
        self.moments = target.moments if cfg.active("moments") else None  # [2, C] or None
        self.prior = cfg.active("tv") or cfg.active("pix") or self.moments is not None
        self.bn_stats = cfg.active("bn_stats") and bool(target.batchnorms)
        self.mode_seek = cfg.active("mode_seek")
        self.paired = cfg.paired or self.mode_seek
        self.warp = bool(cfg.shift or cfg.rotate or cfg.scale)
        self.eps = pixel_eps(cfg)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
        # cfg.compile: compiled callables for the loop; the modules themselves stay as they are
        self.generate = torch.compile(generator) if cfg.compile else generator
        self.classifier = target.compiled() if cfg.compile else None
        self._weights = torch.empty(0, len(TERMS), device=device)
        self._zeros = torch.zeros(len(TERMS), device=device)  # the terms of inactive ops (no allocation per step)
        self._gen = torch.Generator(device)  # reseeded every step: a step's draws are a function of (seed, step)
        if cfg.param_grads:
            self.params = [p for p in target.classifier.parameters() if p.requires_grad]
        if cfg.cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device, got {device}")
        self._graphed = None  # cfg.cuda_graph: the loss block as CUDA graphs, captured on the first step

    def weights(self, step: int) -> Tensor:
        """The weight of each term at ``step``: a row of a table kept on the device (no per-step copy)."""
        if step >= len(self._weights):
            s = torch.arange(max(self.cfg.steps, step + 1), dtype=torch.float64)
            cols = [torch.as_tensor(self.cfg.weight(t, s), dtype=torch.float64).expand_as(s) for t in TERMS]
            self._weights = torch.stack(cols, 1).float().to(self.device)
        return self._weights[step]

    def __call__(self, step: int):
        cfg, b = self.cfg, self.cfg.batch_size
        self._gen.manual_seed(step_seed(cfg.seed, step))
        z, c, y = sample_conditions(b, self.g.num_classes, self.g.nz, cfg.conditioning, self._gen, self.device, self.paired)
        w = self.weights(step)
        with self.autocast:
            x = self.generate(z, c, y)  # [B, C, H, W] in [-1, 1]
            batch = x
            if self.robust:
                x_pert = self.ops.perturb(x, self.eps, *PIXEL_RANGE, cfg.perturbation, step_seed(cfg.seed, step, 1))
                if self.warp:
                    x_pert = random_warp(x_pert, cfg, self._gen)
                batch = torch.cat([x, x_pert])  # one forward of 2B
            logits, feats, bn = self.target.forward_bn_stats(batch, b if self.bn_stats else 0, self.classifier)
        feats = feats[:b]  # clean images' features: [B, D]
        loss, terms = self.loss_block(logits, feats, x, c, y, w)
        extra = {}
        if self.bn_stats:
            extra["bn_stats"] = bn
        if self.mode_seek:
            extra["mode_seek"] = reference.mode_seek(x, z)
        if cfg.grad_norm == "full":
            extra["grad_norm"] = reference.grad_norm_full(logits[:b], c, self.params)
        if cfg.active("kkt"):
            extra["kkt"] = reference.kkt(logits[:b], y, self.params)
        if extra:
            terms = terms.clone()
            for name, value in extra.items():
                i = TERMS.index(name)
                loss = loss + w[i] * value
                terms[i] = value.detach().float()
        return loss, terms

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
        cfg, zeros = self.cfg, self._zeros
        head_feats = feats if cfg.grad_norm == "head" else None
        head = TERM_SLICES["head_loss"]
        loss, head_terms = self.ops.head_loss(logits, c, y, head_feats, w[head], self.target.head_bias)
        parts = [head_terms]
        feature, prior = TERM_SLICES["feature_loss"], TERM_SLICES["image_prior"]
        if self.diverse:
            labels = y if cfg.diversity == "class" else None
            l_f, feat_terms = self.ops.feature_loss(feats, w[feature], labels, self.g.num_classes)
            loss = loss + l_f
        parts.append(feat_terms if self.diverse else zeros[feature])
        if self.prior:
            l_p, prior_terms = self.ops.image_prior(x, w[prior], *PIXEL_RANGE, self.moments)
            loss = loss + l_p
        parts.append(prior_terms if self.prior else zeros[prior])
        parts.append(zeros[prior.stop :])  # bn_stats, mode_seek, kkt: added by __call__
        return loss, torch.cat(parts)
