"""Sampling an inversion, and writing its samples to disk one batch at a time (memory stays one batch).

Sampling (``sample``, ``sample_batches``; ``Inversion.sample`` calls them): the generator in eval mode,
image ``i`` (counting from ``offset``) has candidates ``i*select .. i*select + select - 1``, each with its
own latent drawn by ``indexed_draws``, so the images do not depend on the batch size. With ``select > 1``
the kept candidate is the one with the highest ``robustness_score``.

Writing (``write_samples``):

* ``.npz`` (any case): ``images`` uint8 ``[N, C, H, W]`` and ``labels`` int64 ``[N]``, streamed into the
  zip member by member and renamed into place when complete (an interrupted write leaves no file).
* ``.npz`` with ``shard_size=S``: the same, in shards of S images (the last may be smaller) beside it,
  ``<stem>-00000-of-000NN.npz`` (each also holding ``sample``, the id of the sample it belongs to), and
  ``<stem>-index.json`` recording the sample and its shards in order, with each shard's sha256 once the
  sample is complete. Each shard is written atomically; writing the same sample again resumes it
  (intact shards are kept, a damaged one is written again and said so); a different sample (another
  inversion, seed, selection, count or shard size) replaces the previous shards. ``load_sample`` and
  ``iter_sample`` read either form back, checking the index's entries and each shard's checksum.
* any other path: a folder with one sub-folder of PNGs per class (``tldr_fast.grid.save_image_folder``'s
  layout), written atomically a batch at a time, and ``samples.json`` recording what the folder holds. Writing
  the same sample again resumes it: images already on disk are kept and not regenerated. A different
  sample (another inversion, seed, selection or count) replaces the folder's previous PNGs. ``load_sample``
  reads it back, class by class.

Under ``torch.distributed`` (``torchrun ... -m tldr_fast sample``) a folder is written by all ranks: batch
``j`` by rank ``j mod world``, each writing its own PNGs (disjoint files); rank 0 writes the manifest
first. Shards likewise: shard ``j`` by rank ``j mod world``, the index by rank 0 first. Either way the
files are those a single process writes (byte for byte), and resume the same way with any number of
ranks. A single ``.npz`` is one file, written by a single process only.

Every argument is checked before any file is touched. Temporary files that a killed writer left beside
the output (the library's own ``.<name>.<id>.tmp`` only) are removed by the next write; on any error,
a full disk included, the write's own temporary files are removed.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import re
import sys
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from . import distributed, reference
from .checkpoint import (
    atomic_write,
    atomic_write_many,
    atomic_write_text,
    check_parent,
    remove_stale_temps,
)
from .data import _pil_to_array
from .grid import to_pil
from .progress import progress_bar
from .step import PIXEL_RANGE, pixel_eps, step_seed, warp_mode

if TYPE_CHECKING:
    from .invert import Inversion

Tensor = torch.Tensor
PathLike = Union[str, os.PathLike]
MANIFEST = "samples.json"
INDEX = "-index.json"  # a sharded sample's index: <stem>-index.json beside its shards
SAMPLE_BLOCK = 64  # sampling draws its randomness in blocks of this many consecutive indices


# --- sampling ----------------------------------------------------------------------------------------


def sample_labels(
    num_classes: int, labels: Union[None, Sequence[int], Tensor] = None, n_per_class: Optional[int] = None
) -> Tensor:
    """The label vector ``sample`` uses (on the CPU): ``labels`` as given, checked to be class indices in
    ``[0, num_classes)``, or ``n_per_class`` of each class in order (class 0 x n, class 1 x n, ...)."""
    if (labels is None) == (n_per_class is None):
        raise ValueError("give exactly one of labels= or n_per_class=")
    if labels is None:
        if isinstance(n_per_class, bool) or not isinstance(n_per_class, int) or n_per_class < 1:
            raise ValueError(f"n_per_class must be a positive int, got {n_per_class!r}")
        return torch.arange(num_classes).repeat_interleave(n_per_class)
    if isinstance(labels, Tensor):
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integers, got a {labels.dtype} tensor")
        y = labels.long()
    else:
        values = list(labels)
        integral = lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)  # noqa: E731
        if not all(integral(v) for v in values):
            bad = next(v for v in values if not integral(v))
            raise ValueError(f"labels must be a flat sequence of class indices (ints), got {bad!r}")
        y = torch.tensor([int(v) for v in values], dtype=torch.long)
    if y.dim() != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {tuple(y.shape)}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}]")
    return y.cpu()


def resolve_batch_size(inv: "Inversion", batch_size: Optional[int] = None) -> int:
    """The images per batch that sampling with ``batch_size`` generates: ``batch_size`` itself (a
    positive int), or the inversion's own for None."""
    bs = inv.config.batch_size if batch_size is None else batch_size
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return bs


def sample_seed(inv: "Inversion", seed: Optional[int] = None) -> int:
    """The seed sampling with ``seed`` uses: ``seed`` itself (an int), or the inversion's own for None."""
    if seed is None:
        return inv.config.seed + 1_000_000_007
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return seed


def resolve_select(inv: "Inversion", select: Optional[int] = None) -> int:
    """The candidates per image that sampling with ``select`` uses: ``select`` itself (a positive
    int), or for None ``config.select``, which falls back to 1 with a one-line notice when the
    target classifier that scores the candidates is not attached."""
    if select is None:
        select = inv.config.select
        if select > 1 and inv.target is None:  # the default asks for what is missing: say so, do not fail
            print(
                f"tldr_fast: sampling without selection (this inversion's select={select} needs its target "
                "classifier: Inversion.load(..., classifier=) or --classifier)",
                file=sys.stderr,
            )
            return 1
    if isinstance(select, bool) or not isinstance(select, int) or select < 1:
        raise ValueError(f"select must be a positive int, got {select!r}")
    return select


def indexed_draws(seed: int, stream: int, start: int, stop: int, draw, device) -> Tensor:
    """Rows ``start .. stop-1`` of an endless sequence of random draws in which row ``i`` is a function
    of ``(seed, stream, i)`` only: ``draw(generator, k)`` makes ``k`` rows, and the sequence is drawn in
    blocks of ``SAMPLE_BLOCK`` rows, each block from its own seed (a generator on ``device``)."""
    parts = []
    for block in range(start // SAMPLE_BLOCK, (stop - 1) // SAMPLE_BLOCK + 1):
        base = block * SAMPLE_BLOCK
        gen = torch.Generator(device).manual_seed(step_seed(seed, block, 3 + stream))
        rows = draw(gen, SAMPLE_BLOCK)
        parts.append(rows[max(start, base) - base : min(stop, base + SAMPLE_BLOCK) - base])
    return torch.cat(parts)


def generate(
    inv: "Inversion", labels: Tensor, batch_size: int, seed: int, select: int = 1, offset: int = 0
) -> Iterator[Tuple[Tensor, Tensor]]:
    """``(labels, images)`` on the generator's device, ``batch_size`` images at a time, generator in
    eval mode; with ``select > 1`` each image is the best of ``select`` candidates (``robustness_score``).
    Candidate ``c`` (image ``c // select``, counting from image ``offset``) has its own latent, a
    function of ``(seed, c)`` alone, so the images do not depend on ``batch_size``."""
    g, was_training = inv.generator, inv.generator.training
    dev = inv.device
    g.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(labels), batch_size):
                y = labels[start : start + batch_size].to(dev)
                yc = y.repeat_interleave(select)  # [n * select]: the candidates of each image together
                first = (offset + start) * select
                z = indexed_draws(
                    seed, 0, first, first + len(yc), lambda gen, k: torch.randn(k, g.nz, generator=gen, device=dev), dev
                )
                x = g(z, torch.nn.functional.one_hot(yc, inv.num_classes).float(), yc)
                if select > 1:
                    best = robustness_score(inv, x, yc, seed, first).view(len(y), select).argmax(1)  # [n]
                    x = x.view(len(y), select, *x.shape[1:])[torch.arange(len(y), device=dev), best]
                yield y, x
    finally:
        g.train(was_training)


def robustness_score(
    inv: "Inversion", images: Tensor, labels: Tensor, seed: int, first: int = 0, draws: int = 4
) -> Tensor:
    """The target classifier's mean probability of ``labels`` over ``draws`` random perturbations of
    each image (the noise and geometric transforms of training): ``[N]``. Image ``i``'s perturbations
    are a function of ``(seed, first + i)``. Needs the inversion's classifier."""
    if inv.target is None:
        raise ValueError(
            "selecting samples needs the target classifier: pass classifier= to Inversion.load (on the command "
            "line: --classifier), or select=1"
        )
    cfg, eps, dev = inv.config, pixel_eps(inv.config), images.device
    n, shape = len(labels), images.shape[1:]
    score = torch.zeros(n, device=dev)
    for r in range(draws):
        noise = indexed_draws(
            seed,
            1 + 2 * r,
            first,
            first + n,
            lambda gen, k: reference.perturb_noise((k, *shape), cfg.perturbation, gen, dev, images.dtype),
            dev,
        )
        theta = indexed_draws(
            seed,
            2 + 2 * r,
            first,
            first + n,
            lambda gen, k: reference.warp_theta(k, shape[-2:], cfg.shift, cfg.rotate, cfg.scale, gen, dev),
            dev,
        )
        x = reference.warp((images + eps * noise).clamp(*PIXEL_RANGE), theta, PIXEL_RANGE[0], warp_mode(cfg))
        p = torch.softmax(inv.target(x)[0].float(), 1)
        score += p.gather(1, labels[:, None]).view(-1) / draws
    return score


def sample_batches(
    inv: "Inversion",
    labels: Tensor,
    batch_size: Optional[int] = None,
    seed: Optional[int] = None,
    select: Optional[int] = None,
    offset: int = 0,
) -> Iterator[Tuple[int, Tensor]]:
    """``Inversion.sample_batches``: ``(position of the batch's first image, images [n, C, H, W] in
    [-1, 1] on the CPU)``, one batch at a time."""
    bs, seed, select = resolve_batch_size(inv, batch_size), sample_seed(inv, seed), resolve_select(inv, select)
    for start, (_, x) in zip(range(0, len(labels), bs), generate(inv, labels, bs, seed, select, offset)):
        yield start, x.float().cpu()


def sample(
    inv: "Inversion",
    labels: Union[None, Sequence[int], Tensor] = None,
    n_per_class: Optional[int] = None,
    batch_size: Optional[int] = None,
    seed: Optional[int] = None,
    select: Optional[int] = None,
) -> Tensor:
    """``Inversion.sample``: images ``[n, C, H, W]`` in [-1, 1] on the CPU."""
    y = sample_labels(inv.num_classes, labels, n_per_class)
    out = torch.empty(len(y), *inv.image_shape)
    for start, x in sample_batches(inv, y, batch_size, seed, select):
        out[start : start + len(x)] = x
    return out


# --- writing -----------------------------------------------------------------------------------------


def _uint8(x: Tensor) -> np.ndarray:
    return ((x + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()  # [-1, 1] -> 0..255


def fingerprint(inv: Any) -> str:
    """A hash of the generator's weights: which inversion a sample folder came from."""
    h = hashlib.sha256()
    for name, t in sorted(inv.generator.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def write_samples(
    inv: Any,
    out: PathLike,
    labels: Tensor,
    batch_size: Optional[int] = None,
    seed: Optional[int] = None,
    select: Optional[int] = None,
    progress: bool = False,
    shard_size: Optional[int] = None,
) -> Path:
    """Write ``inv``'s images for ``labels`` to ``out`` (``.npz`` or a folder), one batch in memory at a time.
    ``shard_size`` (``.npz`` only; needed under ``torchrun``): shards of that many images and their index.
    Returns what ``load_sample`` reads: ``out``, or the index of a sharded sample."""
    out = Path(out)
    if str(out) in ("", "."):
        raise ValueError("the output path is empty: give an .npz file or a folder")
    check_parent(out)
    npz = out.suffix.lower() == ".npz"
    if shard_size is not None:
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
        if not npz:
            raise ValueError(
                f"{out}: shard_size applies to an .npz output (a PNG folder is one file per image already)"
            )
    rank, world = distributed.world()
    if world > 1 and npz and shard_size is None:
        raise ValueError(
            f"{out}: a single .npz is written by one process; under torchrun give a shard size "
            "(--shard-size N: each rank writes its shards) or a folder (each rank writes its PNGs)"
        )
    labels = sample_labels(inv.num_classes, labels)  # every argument checked before any file is touched
    batch_size, seed, select = resolve_batch_size(inv, batch_size), sample_seed(inv, seed), resolve_select(inv, select)
    if npz and shard_size is None and out.is_dir():
        raise IsADirectoryError(f"{out} is a folder; an .npz output must be a file name")
    if not npz and out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file; a PNG sample is written into a folder")
    bar = progress_bar(total=len(labels), desc="sample", unit="img", disable=not (progress and rank == 0))
    try:
        if shard_size is not None:
            out = _write_shards(inv, out, labels, batch_size, seed, select, shard_size, bar)
        elif npz:
            _write_npz(inv, out, labels, batch_size, seed, select, bar)
        else:
            _write_folder(inv, out, labels, batch_size, seed, select, bar)
    finally:
        bar.close()
    return out


def _write_npz(
    inv,
    out: Path,
    labels: Tensor,
    batch_size: int,
    seed: int,
    select: int,
    bar,
    offset: int = 0,
    extra: Optional[Dict[str, np.ndarray]] = None,
) -> None:
    """One ``.npz`` of ``labels``' images (image ``offset`` of the sample first) and ``extra`` arrays,
    written through ``atomic_write`` (reproducible bytes: the zip entries carry no time)."""

    def write(f: BinaryIO) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            with zf.open("images.npy", "w", force_zip64=True) as member:
                header = {"descr": "|u1", "fortran_order": False, "shape": (len(labels), *inv.image_shape)}
                np.lib.format.write_array_header_2_0(member, header)
                for _, x in sample_batches(inv, labels, batch_size, seed, select, offset=offset):
                    member.write(np.ascontiguousarray(_uint8(x)).tobytes())
                    bar.update(len(x))
            arrays = {"labels": labels.numpy().astype(np.int64), **(extra or {})}
            for key, value in arrays.items():
                with zf.open(f"{key}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, value)

    atomic_write(out, write, "sample")


def _write_shards(
    inv, out: Path, labels: Tensor, batch_size: int, seed: int, select: int, shard_size: int, bar
) -> Path:
    """Shards of ``shard_size`` images beside ``out`` and their index (returned); this rank's shards only."""
    n = len(labels)
    manifest = {**_manifest(inv, labels, seed, select), "shard_size": shard_size, "image_shape": list(inv.image_shape)}
    sample = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    count = -(-n // shard_size)
    digits = max(5, len(str(count)))
    shards = [
        {
            "file": f"{out.stem}-{i:0{digits}d}-of-{count:0{digits}d}{out.suffix}",
            "start": start,
            "count": min(shard_size, n - start),
        }
        for i, start in enumerate(range(0, n, shard_size))
    ]
    index = {**manifest, "sample": sample, "shards": shards}
    path = out.with_name(out.stem + INDEX)
    rank, world = distributed.world()
    name = re.escape(out.stem) + r"-\d{5,}-of-\d{5,}" + re.escape(out.suffix)
    if rank == 0:  # before any rank writes: stale temp files go, and another sample's shards (ours only)
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out.parent, f"{name}|{re.escape(path.name)}")
        if _without_checksums(_read(path)) != index:
            shard = re.compile(name)
            for old in out.parent.iterdir():
                if shard.fullmatch(old.name):
                    old.unlink()
            _write_json(path, index)
    distributed.barrier()  # the index is this sample's before any rank writes
    recorded = _checksums(_read(path))  # of the shards of a completed run of this sample
    mine = shards[rank::world]  # shard j by rank j mod world
    bar.total = sum(s["count"] for s in mine)
    for s in mine:
        file, start, stop = out.parent / s["file"], s["start"], s["start"] + s["count"]
        if file.exists():  # written by an earlier, interrupted run of this sample: kept when intact
            problem = _shard_problem(file, sample, recorded.get(s["file"]))
            if problem is None:
                bar.update(s["count"])
                continue
            print(f"tldr_fast: {file} {problem}: writing it again", file=sys.stderr)
        _write_npz(
            inv,
            file,
            labels[start:stop],
            batch_size,
            seed,
            select,
            bar,
            offset=start,
            extra={"sample": np.array(sample)},
        )
    distributed.barrier()  # every shard is on disk before rank 0 records their checksums
    if rank == 0:
        complete = {**index, "shards": [{**s, "sha256": _sha256(out.parent / s["file"])} for s in shards]}
        if _read(path) != complete:
            _write_json(path, complete)
    distributed.barrier()  # the whole sample and its index are on disk when any rank returns
    return path


def iter_sample(path: PathLike) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """``(images uint8 [n, C, H, W], labels int64 [n])`` of a sample that ``write_samples`` wrote: an
    ``.npz`` (one pair), a sharded sample's index (one pair per shard, in order: memory one shard), or a
    folder of PNGs (one pair, class by class: class 0's images in order, then class 1's, ...). A sharded
    sample's index entries must be contiguous and add up to its count, and each shard must be of this sample
    with the checksum the index records; anything else is an error naming the file."""
    path = Path(path)
    if path.is_dir():
        yield _read_folder(path)
        return
    if not path.is_file():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.suffix.lower() == ".npz":
        yield _load_npz(path)
        return
    index = _read(path)
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list) or "sample" not in index:
        raise ValueError(
            f"{path}: neither an .npz nor the index of a sharded sample (<stem>{INDEX}, from write_samples with shard_size)"
        )
    _check_entries(path, index)
    for s in index["shards"]:
        file = path.parent / s["file"]
        if not file.exists():
            raise FileNotFoundError(
                f"{file} is missing: the sample is incomplete (write the same sample again to complete it)"
            )
        problem = _shard_problem(file, index["sample"], s.get("sha256"))
        if problem is not None:
            raise ValueError(f"{file} {problem} (a shard of {path}; write the same sample again to rewrite it)")
        images, labels = _load_npz(file)
        if len(images) != s["count"] or len(labels) != s["count"]:
            raise ValueError(f"{file} holds {len(labels)} images, but {path} records {s['count']} for it")
        yield images, labels


def load_sample(path: PathLike) -> Tuple[np.ndarray, np.ndarray]:
    """All of a sample's ``(images uint8 [N, C, H, W], labels int64 [N])``: an ``.npz``, a sharded
    sample's index (its shards concatenated in order), as ``write_samples`` returns its path, or a PNG
    sample folder (class by class)."""
    parts = list(iter_sample(path))
    if not parts:  # a sharded sample of no images
        return np.zeros((0, *_read(Path(path))["image_shape"]), np.uint8), np.zeros(0, np.int64)
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def _read_folder(folder: Path) -> Tuple[np.ndarray, np.ndarray]:
    """The images and labels of a PNG sample folder (``_write_folder``'s layout), checked against its manifest."""
    manifest = _read(folder / MANIFEST)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("count"), int):
        raise ValueError(
            f"{folder} is a folder without a readable {MANIFEST}: not a sample folder that write_samples (tldr-fast "
            "sample) wrote; give an .npz, a sharded sample's index or such a folder"
        )
    files = sorted(
        (int(d.name), f)
        for d in folder.iterdir()
        if d.is_dir() and d.name.isdigit()
        for f in d.glob("*.png")
        if f.stem.isdigit()
    )
    if len(files) != manifest["count"]:
        raise ValueError(
            f"{folder} holds {len(files)} of the {manifest['count']} images its {MANIFEST} records: the sample is "
            "incomplete (write the same sample again to complete it)"
        )
    images = []
    for _, f in files:
        try:
            with Image.open(f) as im:
                images.append(_pil_to_array(im))
        except (OSError, ValueError) as e:
            raise ValueError(f"{f} is not a readable PNG ({e}): write the same sample again to replace it") from e
    if len({a.shape for a in images}) > 1:
        raise ValueError(
            f"{folder}: its images are not all of one shape, found {sorted({a.shape for a in images})[:2]}"
        )
    shape = images[0].shape if images else (0, 0, 0)
    return np.stack(images) if images else np.zeros((0, *shape), np.uint8), np.array([c for c, _ in files], np.int64)


def _check_entries(path: Path, index: Dict[str, Any]) -> None:
    """The shard entries of the index ``path`` cover images 0 to its ``count`` in order, once each."""
    expected = 0
    for i, s in enumerate(index["shards"]):
        fields = isinstance(s, dict) and isinstance(s.get("file"), str)
        fields = fields and all(isinstance(s.get(k), int) and not isinstance(s[k], bool) for k in ("start", "count"))
        if not fields or s["count"] < 0:
            raise ValueError(f"{path}: shard entry {i} ({s!r}) needs a file name, a start and a count")
        if s["start"] != expected:
            raise ValueError(
                f"{path}: shard entry {i} ({s['file']}) starts at image {s['start']}, but the entries before it end "
                f"at {expected}: an entry is missing, repeated or out of order (write the sample again)"
            )
        expected += s["count"]
    if expected != index.get("count"):
        raise ValueError(
            f"{path}: the shard entries hold {expected} images, but the index's count is {index.get('count')!r}: "
            "an entry is missing or repeated (write the sample again)"
        )


UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)  # what a damaged .npz raises


def _load_npz(file: Path) -> Tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of a sample ``.npz``; a damaged, foreign or misshapen file is an error naming it."""
    try:
        with np.load(file, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
    except UNREADABLE as e:
        raise ValueError(f"{file} is not a readable sample .npz ({type(e).__name__}: {e}); write it again") from e
    if (
        images.dtype != np.uint8
        or images.ndim != 4
        or labels.shape != images.shape[:1]
        or labels.dtype.kind not in "iu"
    ):
        raise ValueError(
            f"{file}: not a sample as write_samples writes it (images uint8 [N, C, H, W], labels [N]); found images "
            f"{images.dtype} {list(images.shape)}, labels {labels.dtype} {list(labels.shape)}"
        )
    return images, labels


def _shard_problem(file: Path, sample: str, digest: Optional[str]) -> Optional[str]:
    """What is wrong with the existing shard ``file`` of ``sample`` whose index records the sha256
    ``digest`` (None: not recorded, so every member's CRC is checked instead); None when nothing."""
    found = _sample_of(file)
    if found is None:
        return "is not a readable shard .npz (damaged, or not written by write_samples)"
    if found != sample:
        return "is a shard of another sample (another inversion, seed, selection, count or shard size)"
    if digest is not None:
        return None if _sha256(file) == digest else "does not match the sha256 in the index (damaged or changed)"
    try:
        with zipfile.ZipFile(file) as zf:
            bad = zf.testzip()
    except UNREADABLE:
        bad = "?"
    return None if bad is None else "fails its CRC check (damaged)"


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sample_of(shard: Path) -> Optional[str]:
    """The id of the sample that the shard file ``shard`` belongs to; None for a missing or unreadable one."""
    try:
        with np.load(shard, allow_pickle=False) as z:
            return str(z["sample"].item())
    except UNREADABLE:
        return None


def _without_checksums(index: Any) -> Any:
    """A sharded sample's index without the shards' checksums: what identifies the sample and its shards."""
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        return index
    shards = [{k: v for k, v in s.items() if k != "sha256"} if isinstance(s, dict) else s for s in index["shards"]]
    return {**index, "shards": shards}


def _checksums(index: Any) -> Dict[str, str]:
    """``{shard file: sha256}`` recorded in a sharded sample's index."""
    shards = index.get("shards") if isinstance(index, dict) else None
    return {
        s["file"]: s["sha256"]
        for s in shards or []
        if isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("sha256"), str)
    }


def _manifest(inv: Any, labels: Tensor, seed: int, select: int) -> Dict[str, Any]:
    """What identifies a sample on disk: the inversion, the seed and selection (resolved), the labels."""
    return {
        "inversion": fingerprint(inv),
        "seed": seed,
        "select": select,
        "labels": hashlib.sha256(labels.numpy().astype(np.int64).tobytes()).hexdigest()[:16],
        "count": len(labels),
    }


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _png(img: Tensor) -> Callable[[BinaryIO], None]:
    """A writer of ``img`` (``[C, H, W]`` in [-1, 1]) as a PNG, for ``atomic_write_many``."""
    pil = to_pil(((img + 1) / 2).clamp(0, 1))
    return lambda f: pil.save(f, format="PNG")


def _write_folder(inv, out: Path, labels: Tensor, batch_size: int, seed: int, select: int, bar) -> None:
    out.mkdir(parents=True, exist_ok=True)
    k = inv.num_classes
    digits = len(str(k - 1))
    counts = [0] * k
    paths: List[Path] = []
    for c in labels.tolist():
        paths.append(out / f"{c:0{digits}d}" / f"{counts[c]:05d}.png")
        counts[c] += 1
    manifest = _manifest(inv, labels, seed, select)
    mf = out / MANIFEST
    rank, world = distributed.world()
    if rank == 0:  # before any rank writes: stale temp files go, and another sample's images (ours only)
        for folder in out.iterdir():
            if folder.is_dir() and folder.name.isdigit():
                remove_stale_temps(folder, r"\d+\.png")
        if _read(mf) != manifest:
            for old in out.glob("*/*.png"):
                if old.parent.name.isdigit() and old.stem.isdigit():
                    old.unlink()
            _write_json(mf, manifest)
    bs = batch_size
    bar.total = sum(len(paths[s : s + bs]) for s in range(rank * bs, len(labels), world * bs))  # this rank's images
    distributed.barrier()  # the folder is ready for this sample before any rank writes
    for start in range(rank * bs, len(labels), world * bs):  # this rank's batches
        todo = paths[start : start + bs]
        if all(p.is_file() for p in todo):  # written by an earlier, interrupted run of this sample
            bar.update(len(todo))
            continue
        for _, x in sample_batches(inv, labels[start : start + bs], len(todo), seed, select, offset=start):
            atomic_write_many([(p, _png(img)) for p, img in zip(todo, x)], "image")
            bar.update(len(todo))
    distributed.barrier()  # the whole sample is on disk when any rank returns


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
