"""SSIM at training-set scale: the chunked driver over the ``pairwise_ssim`` op of each backend.

``pairwise_ssim`` returns the full ``[N, M]`` matrix, computed block by block so that any N x M fits
in memory; ``nearest_ssim`` streams the top-k per row without ever storing ``N x M``. SSIM is
scikit-image's ``structural_similarity`` with its defaults (7x7 uniform window, K1=0.01, K2=0.03,
sample covariance, ``data_range`` 1), averaged over channels.
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from .backends import resolve

ArrayLike = Union[torch.Tensor, np.ndarray]


def as_unit_images(x: ArrayLike) -> torch.Tensor:
    """``[N, C, H, W]`` (or ``[N, H, W]``) images as a tensor in [0, 1]: uint8 is divided by 255,
    floats are taken as they are; anything else is a clear error."""
    t = torch.as_tensor(x)
    if t.dim() == 3:
        t = t[:, None]
    if t.dim() != 4:
        raise ValueError(f"expected images [N, C, H, W] or [N, H, W], got shape {tuple(t.shape)}")
    if t.shape[-1] < 7 or t.shape[-2] < 7:
        raise ValueError(f"SSIM uses a 7x7 window: images must be at least 7x7, got {tuple(t.shape[-2:])}")
    if t.dtype == torch.uint8:
        return t
    if not t.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {t.dtype}")
    return t


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _blocks(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def _block_sizes(a: torch.Tensor, b: torch.Tensor, device: str, budget_mb: float) -> Tuple[int, int]:
    """Block shape whose working set (the reference materialises ``[n, m, C, H, W]``) fits the budget."""
    per_pair = a[0].numel() * 4 * 3  # products + window sums, fp32
    pairs = max(1, int(budget_mb * 2**20 / per_pair))
    m = min(b.shape[0], 4096 if device.startswith("cuda") else 1024)
    n = max(1, min(a.shape[0], pairs // m))
    return n, m


def _prepare(x: ArrayLike, device: str) -> torch.Tensor:
    t = as_unit_images(x).to(device)
    return t.float() / 255 if t.dtype == torch.uint8 else t


def pairwise_ssim(
    a: ArrayLike,
    b: ArrayLike,
    data_range: float = 1.0,
    backend: str = "auto",
    device: Optional[str] = None,
    budget_mb: float = 512,
    progress: bool = False,
) -> torch.Tensor:
    """The ``[N, M]`` SSIM matrix of images ``a`` against images ``b`` (fp32, on the CPU).

    Args:
        a: ``[N, C, H, W]`` or ``[N, H, W]``, uint8 (divided by 255) or float in ``[0, data_range]``.
        b: ``[M, C, H, W]`` or ``[M, H, W]``, same channels and size as ``a``.
        backend: "auto", "torch", "triton" or "cuda" (see ``tldr_fast.backends``).
        device: where to compute; default the GPU when there is one.
        budget_mb: working memory per block.

    >>> x = torch.rand(3, 1, 16, 16)
    >>> pairwise_ssim(x, x).diagonal()
    tensor([1., 1., 1.])
    """
    device = device or _default_device()
    a, b = _prepare(a, device), _prepare(b, device)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"a and b must have the same [C, H, W], got {tuple(a.shape[1:])} and {tuple(b.shape[1:])}")
    op = resolve(backend, device, quiet=True).pairwise_ssim
    bn, bm = _block_sizes(a, b, device, budget_mb)
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.float32)
    blocks = [(i, j) for i in _blocks(a.shape[0], bn) for j in _blocks(b.shape[0], bm)]
    for i, j in tqdm(blocks, desc="SSIM", disable=not progress, unit="block"):
        out[i, j] = op(a[i], b[j], data_range).float().cpu()
    return out


def nearest_ssim(
    a: ArrayLike,
    b: ArrayLike,
    k: int = 1,
    data_range: float = 1.0,
    backend: str = "auto",
    device: Optional[str] = None,
    budget_mb: float = 512,
    progress: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most similar images of ``b`` for each image of ``a``: ``(values [N, k], indices [N, k])``,
    by descending SSIM, streamed over blocks of ``b`` so that ``N x M`` is never stored."""
    device = device or _default_device()
    a, b = _prepare(a, device), _prepare(b, device)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"a and b must have the same [C, H, W], got {tuple(a.shape[1:])} and {tuple(b.shape[1:])}")
    k = min(k, b.shape[0])
    op = resolve(backend, device, quiet=True).pairwise_ssim
    bn, bm = _block_sizes(a, b, device, budget_mb)
    vals = torch.full((a.shape[0], k), -float("inf"), device=device)
    idx = torch.zeros((a.shape[0], k), dtype=torch.long, device=device)
    blocks = [(i, j) for i in _blocks(a.shape[0], bn) for j in _blocks(b.shape[0], bm)]
    for i, j in tqdm(blocks, desc="SSIM top-k", disable=not progress, unit="block"):
        s = op(a[i], b[j], data_range).float()  # [n, m]
        cand_v = torch.cat([vals[i], s], 1)
        cand_i = torch.cat([idx[i], torch.arange(j.start, j.stop, device=device).expand(s.shape[0], -1)], 1)
        top = cand_v.topk(k, dim=1)
        vals[i], idx[i] = top.values, cand_i.gather(1, top.indices)
    return vals.cpu(), idx.cpu()
