"""SSIM at training-set scale: the ``[N, M]`` SSIM matrix, its top-k per row, and per-class blocks.

SSIM is scikit-image's ``structural_similarity`` with its defaults (7x7 uniform window, K1 = 0.01,
K2 = 0.03, sample covariance, ``data_range`` 1 for images in [0, 1]), averaged over the valid window
positions and the channels. ``tldr_fast.reference.pairwise_ssim`` defines it (declared in
``tldr_fast/ops/pairwise_ssim.py``). The "extension", "triton" and "torch" implementations agree with
scikit-image to 1e-4 (~1e-7 measured); the fp32 reference computes ``E[ab] - E[a]E[b]``, which cancels
in flat bright regions (errors up to ~2e-4 there).

Implementations (``backend=``, from the one backend registry ``tldr_fast.backends``), all computing the
same ``[n, m]`` block of the matrix:

* ``"extension"``: the C++/CUDA extension's op ``torch.ops.tldr_fast.pairwise_ssim``
  (``csrc/*/pairwise_ssim*``): a CPU kernel vectorised over pairs, and a CUDA kernel;
* ``"triton"``: ``tldr_fast.kernels.pairwise_ssim``, tiled tensor-core matrix products (GPU; each
  fp32 operand as fp16 hi + lo halves, three products: fp32-accurate at fp16 tensor-core speed);
* ``"torch"``: ``tldr_fast.torch_ops.pairwise_ssim``, plain PyTorch organised as batched matrix products;
* ``"reference"``: the batched oracle (materialises ``[n, m, C, H, W]``; for tests and benchmarks).

``"auto"`` takes the first available of the op's declared order. The drivers split any ``N x M`` into
blocks sized from ``budget_mb``, so nothing runs out of memory; :func:`nearest_ssim` streams the top-k
per row without storing ``N x M``.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm

from . import torch_ops
from .backends import BackendUnavailable, resolve, resolve_device
from .distributed import bounds
from .progress import progress_bar

Tensor = torch.Tensor
ArrayLike = Union[Tensor, np.ndarray]
SsimOp = Callable[[Tensor, Tensor, float], Tensor]

WIN = torch_ops.WIN
NPIX = torch_ops.NPIX


# --- inputs ----------------------------------------------------------------------------------------


def _images(x: ArrayLike) -> Tensor:
    """``[N, C, H, W]`` (or ``[N, H, W]``) uint8 or float images as a tensor, checked, not converted."""
    t = torch.as_tensor(x)
    if t.dim() == 3:
        t = t[:, None]
    if t.dim() != 4:
        raise ValueError(f"expected images [N, C, H, W] or [N, H, W], got shape {tuple(t.shape)}")
    if t.shape[-1] < WIN or t.shape[-2] < WIN:
        raise ValueError(f"SSIM uses a 7x7 window: images must be at least 7x7, got {tuple(t.shape[-2:])}")
    if t.dtype != torch.uint8 and not t.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {t.dtype}")
    return t


def as_unit_images(x: ArrayLike) -> Tensor:
    """``[N, C, H, W]`` (or ``[N, H, W]``) images as a float tensor in [0, 1]: uint8 is divided by 255
    (to fp32), floats are returned as they are; anything else is a clear error."""
    t = _images(x)
    return t.float().div_(255) if t.dtype == torch.uint8 else t


def _to_device(x: Tensor, device: torch.device) -> Tensor:
    """A block of images on the compute device (uint8 travels as uint8, then becomes fp32 / 255)."""
    x = x.to(device, non_blocking=True)
    return x.float().div_(255) if x.dtype == torch.uint8 else x


def _pair(a: ArrayLike, b: ArrayLike) -> Tuple[Tensor, Tensor]:
    a, b = _images(a), _images(b)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"a and b must have the same [C, H, W], got {tuple(a.shape[1:])} and {tuple(b.shape[1:])}")
    return a, b


# --- choosing an implementation ----------------------------------------------------------------------


def implementation(backend: str = "auto", device: Optional[Union[str, torch.device]] = None) -> Tuple[str, SsimOp]:
    """``(name, op)``: the ``pairwise_ssim`` that ``backend`` means on ``device`` (default: the GPU when
    there is one), from the backend registry (``tldr_fast.backends``); ``"auto"`` takes the first available
    of the op's declared order. A named backend without the op for the device is ``BackendUnavailable``."""
    device = resolve_device("auto" if device is None else str(device), quiet=True)
    ops = resolve(backend, device, fallback=False)
    if not hasattr(ops, "pairwise_ssim"):
        raise BackendUnavailable(f"backend {backend!r} has no pairwise_ssim kernel for {device.type} tensors")
    return ops.chosen["pairwise_ssim"], ops.pairwise_ssim


# --- blocks ------------------------------------------------------------------------------------------


def _footprint(name: str, device: torch.device, c: int, h: int, w: int) -> Tuple[int, int, int]:
    """Working memory of one block, in bytes: ``(fixed, per image, per pair)`` (upper estimates)."""
    pos = c * (h - WIN + 1) * (w - WIN + 1)
    if name == "reference":  # products, window sums and formula temporaries of [n, m, C, H, W]
        return 0, 8 * c * h * w, 24 * c * h * w
    if name == "torch":  # unfolded, centred and permuted windows; the [chunk, n, m] temporaries
        return 16 * torch_ops.TORCH_CHUNK.get(device.type, torch_ops.TORCH_CHUNK["cuda"]), 12 * NPIX * pos, 16
    return 0, 24 * (c * h * w + 2 * pos), 16  # fp64 copies, pixel-major copies, window statistics


def _block_shape(name: str, device: torch.device, a: Tensor, b: Tensor, budget_mb: float) -> Tuple[int, int]:
    """``(bn, bm)``: rows of ``a`` and of ``b`` per block; the whole of ``a`` when it fits."""
    fixed, per_image, per_pair = _footprint(name, device, *a.shape[1:])
    avail = max(budget_mb * 2**20 - fixed, 0)
    n, m = max(1, a.shape[0]), max(1, b.shape[0])
    bn = n
    while True:
        bm = int((avail - bn * per_image) // (per_image + bn * per_pair))
        if bm >= min(m, 256) or bn == 1:
            return bn, max(1, min(m, bm))
        bn = (bn + 1) // 2


def _blocks(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def _progress(bar: Optional[tqdm], progress: bool, pairs: int, desc: str) -> Tuple[tqdm, bool]:
    """``(the bar to advance by the pairs compared, whether it is this call's own to close)``: ``bar``, a
    stage's bar shared by several calls, or a bar of this call's ``pairs`` (shown if ``progress``)."""
    if bar is not None:
        return bar, False
    return progress_bar(total=pairs, desc=desc, unit="pair", unit_scale=True, disable=not progress), True


# --- drivers -----------------------------------------------------------------------------------------


def pairwise_ssim(
    a: ArrayLike,
    b: ArrayLike,
    data_range: float = 1.0,
    backend: str = "auto",
    device: Optional[Union[str, torch.device]] = None,
    budget_mb: float = 512,
    progress: bool = False,
    out_device: Optional[Union[str, torch.device]] = "cpu",
    bar: Optional[tqdm] = None,
) -> Tensor:
    """The ``[N, M]`` fp32 SSIM matrix of images ``a`` against images ``b``.

    Args:
        a: ``[N, C, H, W]`` or ``[N, H, W]``, uint8 (divided by 255) or float in ``[0, data_range]``;
            a tensor on any device or a numpy array.
        b: ``[M, C, H, W]`` or ``[M, H, W]``, the same channels and size as ``a``.
        backend: "auto", "extension", "triton", "torch" or "reference" (see the module docstring).
        device: where to compute; default the GPU when there is one. Blocks move there one at a time.
        budget_mb: working memory of one block on ``device``.
        progress: show a progress bar of the image pairs compared (updated per block).
        out_device: where the matrix is returned; None: ``device``.
        bar: a progress bar to advance by the pairs compared instead (``progress`` is then ignored): one bar
            for a stage of several calls, such as ``tldr_fast.evaluate``'s.

    >>> x = torch.rand(3, 1, 16, 16)
    >>> torch.allclose(pairwise_ssim(x, x, backend="torch").diagonal(), torch.ones(3))
    True
    """
    a, b = _pair(a, b)
    device = resolve_device("auto" if device is None else str(device), quiet=True)
    name, op = implementation(backend, device)
    bn, bm = _block_shape(name, device, a, b, budget_mb)
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.float32, device=out_device or device)
    bar, own = _progress(bar, progress, a.shape[0] * b.shape[0], "SSIM")
    for j in _blocks(b.shape[0], bm):
        bj = _to_device(b[j], device)
        for i in _blocks(a.shape[0], bn):
            out[i, j] = op(_to_device(a[i], device), bj, data_range)
            bar.update((i.stop - i.start) * (j.stop - j.start))
    if own:
        bar.close()
    return out


def nearest_ssim(
    a: ArrayLike,
    b: ArrayLike,
    k: int = 1,
    data_range: float = 1.0,
    backend: str = "auto",
    device: Optional[Union[str, torch.device]] = None,
    budget_mb: float = 512,
    progress: bool = False,
    bar: Optional[tqdm] = None,
) -> Tuple[Tensor, Tensor]:
    """The ``k`` most similar images of ``b`` for each image of ``a``: ``(values [N, k], indices [N, k])``
    (fp32 and int64, on the CPU), by descending SSIM; the top-k is merged block by block, so ``N x M``
    is never stored. ``k`` is capped at ``M``. Arguments as :func:`pairwise_ssim`."""
    a, b = _pair(a, b)
    device = resolve_device("auto" if device is None else str(device), quiet=True)
    name, op = implementation(backend, device)
    k = min(k, b.shape[0])
    bn, bm = _block_shape(name, device, a, b, budget_mb)
    vals = torch.full((a.shape[0], k), -float("inf"), device=device)
    idx = torch.zeros((a.shape[0], k), dtype=torch.long, device=device)
    bar, own = _progress(bar, progress, a.shape[0] * b.shape[0], "SSIM top-k")
    for j in _blocks(b.shape[0], bm):
        bj = _to_device(b[j], device)
        cols = torch.arange(j.start, j.stop, device=device)
        for i in _blocks(a.shape[0], bn):
            s = op(_to_device(a[i], device), bj, data_range).float()  # [n, m]
            top = torch.cat([vals[i], s], 1).topk(k, dim=1)
            idx[i] = torch.cat([idx[i], cols.expand(s.shape[0], -1)], 1).gather(1, top.indices)
            vals[i] = top.values
            bar.update(s.shape[0] * s.shape[1])
    if own:
        bar.close()
    return vals.cpu(), idx.cpu()


def classwise_ssim(
    gen: ArrayLike,
    gen_labels: ArrayLike,
    ref: ArrayLike,
    ref_labels: ArrayLike,
    classes: Optional[Sequence[int]] = None,
    part: Tuple[int, int] = (0, 1),
    **kwargs,
) -> Dict[int, Tensor]:
    """Per class ``c``, the SSIM matrix ``[n_c, m_c]`` of the generated images of class c against the
    reference (training) images of class c: rows in the order of ``(gen_labels == c).nonzero()``,
    columns in the order of ``(ref_labels == c).nonzero()``.

    Args:
        gen, ref: images as for :func:`pairwise_ssim`; gen_labels ``[N]``, ref_labels ``[M]`` integers.
        classes: the classes to compute (default: every class of ``gen_labels``).
        part: ``(i, n)``: only the i-th of n contiguous parts of each class's columns
            (``distributed.bounds``; a rank's share of a sharded audit); ``(0, 1)``: all of them.
        **kwargs: passed to :func:`pairwise_ssim` (backend, device, budget_mb, ...).
    """
    gen, ref = _pair(gen, ref)
    gl, rl = torch.as_tensor(gen_labels).cpu(), torch.as_tensor(ref_labels).cpu()
    if gl.shape != (gen.shape[0],) or rl.shape != (ref.shape[0],):
        raise ValueError(f"labels must be [N] and [M], got {tuple(gl.shape)} and {tuple(rl.shape)}")
    if classes is None:
        classes = gl.unique().tolist()
    out = {}
    for c in classes:
        gi, ri = (gl == c).nonzero().flatten(), (rl == c).nonzero().flatten()
        ri = ri[slice(*bounds(len(ri), *part))]
        if len(ri):
            out[int(c)] = pairwise_ssim(gen[gi.to(gen.device)], ref[ri.to(ref.device)], **kwargs)
        else:  # a part with no columns of this class
            out[int(c)] = torch.empty(len(gi), 0)
    return out
