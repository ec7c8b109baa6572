"""The TLDR objective of one optimisation step (DESIGN.md §2), over whichever backend's ops."""

from __future__ import annotations

import torch

from . import reference
from .backends import Backend
from .classifier import FrozenClassifier
from .config import TERMS, InversionConfig
from .generator import ConditionedGenerator, sample_conditions

Tensor = torch.Tensor
PIXEL_RANGE = (-1.0, 1.0)  # the generator's tanh output


def pixel_eps(cfg: InversionConfig) -> float:
    """The perturbation size in pixel units: ``cfg.eps`` is a fraction of the generator's pixel range."""
    return cfg.eps * (PIXEL_RANGE[1] - PIXEL_RANGE[0])


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """The seed of everything random in ``step``: a run is a function of (seed, step), so a resumed run
    draws exactly what an uninterrupted one would."""
    return (seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2**62)


class TLDRObjective:
    """``objective(step) -> (loss, terms [9])`` for a generator against a frozen classifier.

    The clean images and their perturbed copies go through the classifier in ONE forward of 2B.
    Terms are in ``config.TERMS`` order; inactive terms (zero weight at every step) are not computed
    and read 0. ``loss`` is differentiable w.r.t. the generator's parameters.
    """

    def __init__(self, generator: ConditionedGenerator, target: FrozenClassifier, cfg: InversionConfig, ops: Backend, device: torch.device):
        self.g, self.target, self.cfg, self.ops, self.device = generator, target, cfg, ops, device
        self.robust = cfg.active("ce_pert") or cfg.active("kl_pert")
        self.diverse = cfg.active("cos") or cfg.active("ortho")
        self.prior = cfg.active("tv") or cfg.active("pix")
        self.eps = pixel_eps(cfg)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
        # cfg.compile: compiled callables for the loop; the modules themselves stay as they are
        self.generate = torch.compile(generator) if cfg.compile else generator
        self.classify = target.compiled() if cfg.compile else target
        self._weights = torch.empty(0, len(TERMS), device=device)
        self._zeros = torch.zeros(2, device=device)  # the terms of an inactive op (no allocation per step)
        self._gen = torch.Generator(device)  # reseeded every step: a step's draws are a function of (seed, step)
        if cfg.grad_norm == "full":
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
        z, c, y = sample_conditions(b, self.g.num_classes, self.g.nz, cfg.conditioning, self._gen, self.device)
        w = self.weights(step)
        with self.autocast:
            x = self.generate(z, c, y)  # [B, C, H, W] in [-1, 1]
            if self.robust:
                x_pert = self.ops.perturb(x, self.eps, *PIXEL_RANGE, cfg.perturbation, step_seed(cfg.seed, step, 1))
                logits, feats = self.classify(torch.cat([x, x_pert]))  # one forward of 2B
            else:
                logits, feats = self.classify(x)
        feats = feats[:b]  # clean images' features: [B, D]
        loss, terms = self.loss_block(logits, feats, x, c, y, w)
        if cfg.grad_norm == "full":
            gn = reference.grad_norm_full(logits[:b], c, self.params)
            loss = loss + w[4] * gn
            terms = torch.cat([terms[:4], gn.detach().float().view(1), terms[5:]])
        return loss, terms

    def loss_block(self, logits: Tensor, feats: Tensor, x: Tensor, c: Tensor, y: Tensor, w: Tensor):
        """``(loss, terms [9])`` of the fused loss ops (the head grad-norm term only with
        ``grad_norm="head"``); from CUDA graphs with ``cfg.cuda_graph``. ``logits`` [N, K] (N = B or 2B),
        ``feats`` [B, D], ``x`` [B, C, H, W], ``c`` [B, K], ``y`` [B], ``w`` [9]."""
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
        head_feats = feats if self.cfg.grad_norm == "head" else None
        loss, head_terms = self.ops.head_loss(logits, c, y, head_feats, w[0:5], self.target.head_bias)
        feat_terms = prior_terms = self._zeros
        if self.diverse:
            l_f, feat_terms = self.ops.feature_loss(feats, w[5:7])
            loss = loss + l_f
        if self.prior:
            l_p, prior_terms = self.ops.image_prior(x, w[7:9], *PIXEL_RANGE)
            loss = loss + l_p
        return loss, torch.cat([head_terms, feat_terms, prior_terms])
