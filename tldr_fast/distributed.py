"""Running under ``torch.distributed`` (``torchrun``; NCCL on GPUs, gloo on CPUs): DESIGN.md section 5.1.

* ``Shard``: the rows of a global batch that this rank computes, and its part of each loss term.
* ``all_reduce_sum``: an autograd-aware sum over ranks (its backward sums the gradients over ranks).
  Convention: the process group's objective is the **mean of the ranks' losses** (what DDP's gradient
  average differentiates), so a rank's loss holds its own terms scaled by ``Shard.term_scale`` and the
  whole of each term that every rank computes from all-reduced statistics.
* ``GlobalBatchNorm``: BatchNorm over the global batch (``nn.SyncBatchNorm`` needs a GPU; this works
  with gloo on the CPU too), and ``data_parallel`` (it, then DDP) for the generator.
* ``sum_over_ranks``: gradients summed over ranks in place (the adversarial student's).
* ``feature_loss``: the cosine, orthogonality and activation terms of the global batch from all-reduced sums;
  ``head_grad_norm``, ``moments``, ``bn_stats`` and ``mode_seek`` the same for those terms.
* ``process_group``: the command line's process group under ``torchrun``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import reference
from .ops.image_prior import MOMENT_VAR_EPS

Tensor = torch.Tensor
TIMEOUT_S = 300  # default bound on a collective (TLDR_FAST_DIST_TIMEOUT): a hung rank stops the others


def world() -> Tuple[int, int]:
    """``(rank, world size)`` of the initialised default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes files, logs and progress bars (rank 0, or no process group)."""
    return world()[0] == 0


def bounds(n: int, rank: int, size: int) -> Tuple[int, int]:
    """``[lo, hi)``: rank ``rank``'s contiguous part of ``n`` items split as evenly as possible."""
    return n * rank // size, n * (rank + 1) // size


@dataclass(frozen=True)
class Shard:
    """This rank's rows of a global batch of ``total`` rows: ``index`` ``[b]`` (global row numbers).

    A contiguous slice, or with ``paired`` the same slice of both halves (rows ``i`` and ``i + total//2``
    share a condition: the pairs stay on one rank, first halves first, as ``reference.mode_seek`` reads
    them); an unpaired last row of an odd batch goes to the last rank.
    """

    rank: int
    world: int
    total: int
    index: Tensor  # [b] int64, on the device

    @classmethod
    def of(cls, total: int, device, paired: bool = False) -> "Shard":
        rank, size = world()
        if total < size * (2 if paired else 1):
            raise ValueError(
                f"the global batch ({total}) must give every one of the {size} ranks at least "
                f"{'one pair of rows' if paired else 'one row'}"
            )
        if paired:
            h = total // 2
            lo, hi = bounds(h, rank, size)
            rows = [torch.arange(lo, hi), torch.arange(h + lo, h + hi)]
            if total % 2 and rank == size - 1:
                rows.append(torch.tensor([total - 1]))
            index = torch.cat(rows)
        else:
            index = torch.arange(*bounds(total, rank, size))
        return cls(rank, size, total, index.to(device))

    def take(self, t: Tensor) -> Tensor:
        """This rank's rows of ``t`` (``[total, ...]``)."""
        return t if self.world == 1 else t.index_select(0, self.index)

    def term_scale(self, terms: Tuple[str, ...], sums: Tuple[str, ...], shared: Tuple[str, ...], device) -> Tensor:
        """``[len(terms)]``: the factor of each term in this rank's loss, so that the mean of the ranks'
        losses is the global objective. A term that every rank computes whole (``shared``) counts once
        (1); a sum over the batch (``sums``) is the sum of the ranks' sums (``world``); any other term is
        a mean over the batch, the global mean weighs each rank's mean by its rows (``world * b / total``;
        exact for means of per-image values, a weighted mean of per-rank values for the rest)."""
        b = len(self.index)
        scale = [1.0 if t in shared else float(self.world) if t in sums else self.world * b / self.total for t in terms]
        return torch.tensor(scale, device=device)

    def mean_of_ranks(self, t: Tensor) -> Tensor:
        """The mean over ranks of ``t`` (every rank gets it; no gradient)."""
        if self.world == 1:
            return t
        t = t.detach().clone()
        dist.all_reduce(t)
        return t / self.world

    def any(self, flag: bool, device) -> bool:
        """Whether ``flag`` is true on any rank (every rank gets the same answer)."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def all_reduce_sum(t: Tensor) -> Tensor:
    """The sum of ``t`` over ranks, differentiable: the backward sums the incoming gradients over ranks
    (``torch.distributed.nn.functional.all_reduce``), so the gradient of a rank's input is that of the
    sum of every rank's loss."""
    return _AllReduceSum.apply(t)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def sum_over_ranks(tensors: Sequence[Tensor]) -> None:
    """Replace each of ``tensors`` by its sum over ranks, in place (one all-reduce of them flattened
    together; no autograd). Nothing to do in one process."""
    if world()[1] == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def feature_loss(
    features: Tensor, weights: Tensor, total: int, labels: Optional[Tensor] = None, num_classes: int = 0
) -> Tuple[Tensor, Tensor]:
    """``reference.feature_loss`` of the global batch (``total`` rows over all ranks), from this rank's
    ``features`` ``[b, D]`` (and ``labels`` ``[b]``): exact, the same value on every rank.

    All pairs: one all-reduce of ``[S = sum u_i (D), Phi^T Phi (D x D), ||Phi||_F^2, sum |phi|]``. Same-label
    pairs: ``[S_k (K x D), n_k (K), Phi_k^T Phi_k (K x D x D), ||Phi||_F^2, sum |phi|]`` (``sum_{y_i = y_j}
    (phi_i . phi_j)^2 = sum_k ||Phi_k^T Phi_k||_F^2``); Act is ``-sum |phi|`` over ``total * D``.
    Communication does not grow with the batch. Gradients flow through the all-reduce: a rank's backward
    of the returned loss is ``world`` times the global term's gradient w.r.t. its rows (the mean of the
    ranks' losses is the global term).
    """
    phi = features.double() if features.dtype == torch.float64 else features.float()
    b, d = phi.shape
    u = phi / phi.norm(dim=1, keepdim=True).clamp_min(reference.NORM_EPS)
    norms = torch.stack([phi.square().sum(), phi.abs().sum()])  # [2]: ||Phi||_F^2, sum |phi|
    if labels is None:
        parts = [u.sum(0), (phi.t() @ phi).flatten(), norms]  # [D], [D*D], [2]
    else:
        onehot = F.one_hot(labels, num_classes).to(phi.dtype)  # [b, K]
        gram = (onehot[:, :, None] * phi[:, None, :]).flatten(1).t() @ phi  # [K*D, D]: Phi_k^T Phi_k
        parts = [(onehot.t() @ u).flatten(), onehot.sum(0), gram.flatten(), norms]  # [K*D], [K], [K*D*D], [2]
    sums = all_reduce_sum(torch.cat(parts)).split([p.numel() for p in parts])
    n = total
    if labels is None:
        s, gram, (sq, l1) = sums
        cos = (s.square().sum() - n) / (n * (n - 1))
    else:
        s, counts, gram, (sq, l1) = sums
        cos = (s.square().sum() - n) / (counts * (counts - 1)).sum().clamp_min(1)
    ortho = (gram.square().sum() - 2 * sq + n) / (n * n if labels is None else counts.square().sum())
    act = -l1 / (n * d)
    terms = torch.stack([cos, ortho, act])
    return (weights.to(terms.dtype) * terms).sum(), terms.detach()


def head_grad_norm(logits: Tensor, condition: Tensor, features: Tensor, total: int, head_bias: bool) -> Tensor:
    """The head grad-norm term of ``reference.head_loss`` for the global batch (``total`` rows over all
    ranks), from this rank's clean ``logits`` ``[b, K]``, ``condition`` ``[b, K]`` and ``features`` ``[b, D]``:
    ``sqrt(||E^T Phi||^2 + ||sum_i e_i||^2) / total`` (the bias part with ``head_bias``), ``E = P - C``, from one
    all-reduce of ``E^T Phi`` and ``sum_i e_i`` (``K*D + K`` numbers). Exact and the same on every rank;
    differentiable (through the all-reduce, as ``feature_loss``)."""
    logp = F.log_softmax(reference._acc(logits), dim=1)
    e = logp.exp() - condition.to(logp.dtype)  # [b, K]
    parts = [(e.t() @ features.to(logp.dtype)).flatten()] + ([e.sum(0)] if head_bias else [])  # [K*D], [K]
    return all_reduce_sum(torch.cat(parts)).square().sum().sqrt() / total


def _channel_moments(x: Tensor, shift: Tensor, count: int) -> Tuple[Tensor, Tensor]:
    """``(mean - shift, population variance)`` ``[C]`` of each channel of ``x`` ``[b, C, ...]`` over every
    rank's rows and every other dimension (``count`` values per channel in all), from one all-reduce of the
    per-channel sums of ``x - shift`` and of their squares (``2C`` numbers). The shift (a value near the
    mean: the statistics the term compares with) keeps the variance's ``E[d^2] - E[d]^2`` from cancelling."""
    dims = [0, *range(2, x.dim())]
    d = x - shift.to(x.dtype).view(1, -1, *[1] * (x.dim() - 2))
    s1, s2 = (all_reduce_sum(torch.cat([d.sum(dims), d.square().sum(dims)])) / count).chunk(2)
    return s1, s2 - s1.square()


def moments(images: Tensor, moments: Tensor, lo: float, hi: float, total: int) -> Tensor:
    """The ``moments`` term of ``reference.image_prior`` for the global batch (``total`` images over all
    ranks) from this rank's ``images`` ``[b, C, H, W]`` and the classifier's ``moments`` ``[2, C]`` (mean,
    std): one all-reduce of ``2C`` numbers. Exact up to rounding, the same on every rank; differentiable."""
    x01 = (reference._acc(images) - lo) / (hi - lo)
    mu, sigma = moments.to(x01.dtype)
    offset, var = _channel_moments(x01, mu, total * x01[0, 0].numel())  # offset = mean - mu
    std = var.clamp_min(MOMENT_VAR_EPS).sqrt()
    return ((offset.square() + (std - sigma).square()) / sigma.square()).mean()


def bn_stats(activations: Tensor, running_mean: Tensor, running_var: Tensor, total: int) -> Tensor:
    """``reference.bn_stats`` of one BatchNorm layer's input for the global batch (``total`` rows over all
    ranks) from this rank's ``activations`` ``[b, C, ...]``: one all-reduce of ``2C`` numbers per layer. Exact
    up to rounding, the same on every rank; differentiable."""
    x = reference._acc(activations)
    offset, var = _channel_moments(x, running_mean, total * x[0, 0].numel())  # offset = mean - running_mean
    return offset.norm() + (var - running_var.to(x.dtype)).norm()


def mode_seek(images: Tensor, latents: Tensor) -> Tensor:
    """``reference.mode_seek`` of the global batch from this rank's rows of a paired batch (``Shard`` with
    ``paired``: its first-half rows, then their partners, then perhaps the unpaired last row): the sum of its
    pairs' ratios ``d_x / d_z`` and their number, all-reduced (2 numbers). Exact, the same on every rank."""
    ratios = reference.mode_seek_ratios(images, latents)  # [b // 2]
    total, pairs = all_reduce_sum(torch.stack([ratios.sum(), ratios.new_tensor(float(len(ratios)))]))
    return 1.0 / (total / pairs + 1e-5)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (1d or 2d) whose training-mode statistics are those of the global batch over all ranks
    (two autograd-aware all-reduces: the per-channel sums and counts, then the sums of squared
    deviations). Without a process group of several ranks, or in eval mode, it is ``nn.BatchNorm``.
    Same parameters, buffers and ``state_dict`` as the BatchNorm it replaces."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in (2, 3, 4, 5):
            raise ValueError(f"expected a 2D to 5D input, got {x.dim()}D")

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or world()[1] == 1:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]  # all but the channels
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        stats = all_reduce_sum(torch.cat([xf.sum(dims), xf.new_full((1,), xf.numel() / xf.shape[1])]))  # [C + 1]
        count = stats[-1].detach()
        mean = stats[:-1] / count  # [C]
        xc = xf - mean.view(shape)
        var = all_reduce_sum(xc.square().sum(dims)) / count  # [C]: population variance
        y = xc * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), f)
                self.running_var.lerp_((var.detach() * count / (count - 1).clamp_min(1)).to(self.running_var.dtype), f)
        return y.to(x.dtype)


def global_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm layer replaced (in place) by a ``GlobalBatchNorm`` holding the same
    parameter and buffer tensors (an optimizer built on ``module.parameters()`` before still updates them)."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            new = GlobalBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats, device="meta"
            )
            for key, value in [*child.named_parameters(recurse=False), *child.named_buffers(recurse=False)]:
                setattr(new, key, value)
            setattr(module, name, new.train(child.training))
        else:
            global_batchnorm(child)
    return module


def data_parallel(generator: nn.Module, device: torch.device) -> nn.Module:
    """The generator for data-parallel training: its BatchNorm layers made global (in place), then
    wrapped in DDP (gradients averaged over ranks; buffers are identical on every rank already)."""
    global_batchnorm(generator)
    ids = [device] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(generator, device_ids=ids, forward_sync_buffers=False)


def barrier() -> None:
    """Wait for every rank (nothing without a process group of several ranks)."""
    if world()[1] > 1:
        dist.barrier()


def gather_object(obj) -> Optional[list]:
    """Every rank's ``obj`` on rank 0 (a list in rank order; None on the other ranks; ``[obj]`` alone)."""
    rank, size = world()
    if size == 1:
        return [obj]
    out = [None] * size if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj):
    """``obj`` of rank 0 on every rank (e.g. a checkpoint read once, also on nodes without the file)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[str]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) and without a process group yet: start
    one (NCCL for CUDA devices, gloo otherwise; collectives time out after ``TLDR_FAST_DIST_TIMEOUT``
    seconds, default 300, so a hung or dead rank stops the others) and yield this rank's device
    (``cuda:LOCAL_RANK`` on GPUs); destroyed at the end. Otherwise yields ``device`` unchanged."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield device
        return
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    timeout = datetime.timedelta(seconds=float(os.environ.get("TLDR_FAST_DIST_TIMEOUT", TIMEOUT_S)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def rank_label() -> str:
    """`` (rank r of n)`` under ``torchrun`` with several ranks, else empty: for error messages."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return f" (rank {os.environ.get('RANK', '?')} of {size})" if size > 1 else ""


def collective_failed(err: BaseException) -> bool:
    """Whether ``err`` is the failure of a collective (another rank died, hung or raised)."""
    return isinstance(err, dist.DistError) or "gloo" in str(err).lower() or "nccl" in str(err).lower()


def failure_hint(err: BaseException) -> str:
    """For an error of a collective (another rank died, hung or raised): a sentence saying so, else empty."""
    if collective_failed(err):
        return " (a collective failed: another rank stopped - killed, out of memory or an error: see its log)"
    return ""


def perturb(
    images: Tensor,
    eps: float,
    lo: float,
    hi: float,
    kind: str,
    seed: int,
    shard: Shard,
    theta: Optional[Tensor] = None,
    mode: str = "bilinear",
) -> Tensor:
    """``reference.perturb`` of the global batch, this rank's rows: the noise of all ``shard.total`` images
    is drawn from ``seed`` and sliced, so N ranks perturb exactly as one process with the reference;
    ``theta`` ``[b, 2, 3]``: this rank's rows' transforms."""
    gen = torch.Generator(images.device).manual_seed(int(seed))
    x = images.double() if images.dtype == torch.float64 else images.float()
    noise = shard.take(reference.perturb_noise((shard.total, *images.shape[1:]), kind, gen, images.device, x.dtype))
    y = (x + eps * noise).clamp(lo, hi).to(images.dtype)
    return y if theta is None else reference.warp(y, theta, lo, mode)
