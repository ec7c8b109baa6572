"""Writing samples of an inversion to disk, one batch at a time: memory stays one batch for any count.

* ``.npz`` (any case): ``images`` uint8 ``[N, C, H, W]`` and ``labels`` int64 ``[N]``, streamed into the
  zip member by member and renamed into place when complete (an interrupted write leaves no file).
* ``.npz`` with ``shard_size=S``: the same, in shards of S images (the last may be smaller) beside it,
  ``<stem>-00000-of-000NN.npz`` (each also holding ``sample``, the id of the sample it belongs to), and
  ``<stem>-index.json`` recording the sample and its shards in order. Each shard is written atomically;
  writing the same sample again resumes it (complete shards are kept); a different sample (another
  inversion, seed, selection, count or shard size) replaces the previous shards. ``load_sample`` and
  ``iter_sample`` read either form back.
* any other path: a folder with one sub-folder of PNGs per class (``tldr_fast.grid.save_image_folder``'s
  layout), each file written atomically, and ``samples.json`` recording what the folder holds. Writing
  the same sample again resumes it: images already on disk are kept and not regenerated. A different
  sample (another inversion, seed, selection or count) replaces the folder's previous PNGs. ``load_sample``
  reads it back, class by class.

Under ``torch.distributed`` (``torchrun ... -m tldr_fast sample``) a folder is written by all ranks: batch
``j`` by rank ``j mod world``, each writing its own PNGs (disjoint files); rank 0 writes the manifest
first. Shards likewise: shard ``j`` by rank ``j mod world``, the index by rank 0 first. Either way the
files are those a single process writes (byte for byte), and resume the same way with any number of
ranks. A single ``.npz`` is one file, written by a single process only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image

from . import distributed
from .checkpoint import check_parent
from .data import _pil_to_array, read_npz
from .grid import to_pil
from .progress import progress_bar

Tensor = torch.Tensor
PathLike = Union[str, os.PathLike]
MANIFEST = "samples.json"
INDEX = "-index.json"  # a sharded sample's index: <stem>-index.json beside its shards


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
    batch_size,
    seed,
    select,
    bar,
    offset: int = 0,
    extra: Optional[Dict[str, np.ndarray]] = None,
) -> None:
    """One ``.npz`` of ``labels``' images (image ``offset`` of the sample first) and ``extra`` arrays,
    written to a temp file and renamed into place (reproducible bytes: the zip entries carry no time)."""
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a folder; an .npz output must be a file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            with zf.open("images.npy", "w", force_zip64=True) as f:
                header = {"descr": "|u1", "fortran_order": False, "shape": (len(labels), *inv.image_shape)}
                np.lib.format.write_array_header_2_0(f, header)
                for _, x in inv.sample_batches(labels, batch_size, seed, select, offset=offset):
                    f.write(np.ascontiguousarray(_uint8(x)).tobytes())
                    bar.update(len(x))
            arrays = {"labels": labels.numpy().astype(np.int64), **(extra or {})}
            for key, value in arrays.items():
                with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, value)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_shards(inv, out: Path, labels: Tensor, batch_size, seed, select, shard_size: int, bar) -> Path:
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
    if rank == 0:  # before any rank writes: stale temp files go, and another sample's shards (ours only)
        out.parent.mkdir(parents=True, exist_ok=True)
        same = _read(path) == index
        name = re.escape(out.stem) + r"-\d{5,}-of-\d{5,}" + re.escape(out.suffix)
        temp, shard = re.compile(rf"\.(?:{name}|{re.escape(path.name)})\.\d+\.tmp"), re.compile(name)
        for old in out.parent.iterdir():
            if temp.fullmatch(old.name) or (not same and shard.fullmatch(old.name)):
                old.unlink()
        if not same:
            _write_text(path, json.dumps(index, indent=2) + "\n")
    mine = shards[rank::world]  # shard j by rank j mod world
    bar.total = sum(s["count"] for s in mine)
    distributed.barrier()  # the index is this sample's before any rank writes
    for s in mine:
        file, start, stop = out.parent / s["file"], s["start"], s["start"] + s["count"]
        if _sample_of(file) == sample:  # written by an earlier, interrupted run of this sample
            bar.update(s["count"])
            continue
        _write_npz(
            inv,
            file,
            labels[start:stop],
            batch_size,
            manifest["seed"],
            manifest["select"],
            bar,
            offset=start,
            extra={"sample": np.array(sample)},
        )
    distributed.barrier()  # the whole sample is on disk when any rank returns
    return path


def iter_sample(path: PathLike) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """``(images uint8 [n, C, H, W], labels int64 [n])`` of a sample that ``write_samples`` wrote: an
    ``.npz`` (one pair), a sharded sample's index (one pair per shard, in order: memory one shard), or a
    folder of PNGs (one pair, class by class: class 0's images in order, then class 1's, ...)."""
    path = Path(path)
    if path.is_dir():
        yield _read_folder(path)
        return
    if not path.is_file():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.suffix.lower() == ".npz":
        arrays = read_npz(path)
        images, labels = arrays.get("images"), arrays.get("labels")
        if (
            images is None
            or labels is None
            or images.dtype != np.uint8
            or images.ndim != 4
            or labels.shape != images.shape[:1]
            or not np.issubdtype(labels.dtype, np.integer)
        ):
            found = {k: f"{v.dtype} {list(v.shape)}" for k, v in arrays.items()}
            raise ValueError(
                f"{path}: not a sample as write_samples writes it (images uint8 [N, C, H, W], labels [N]); found {found}"
            )
        yield images, labels
        return
    index = _read(path)
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list) or "sample" not in index:
        raise ValueError(
            f"{path}: neither an .npz nor the index of a sharded sample (<stem>{INDEX}, from write_samples with shard_size)"
        )
    for s in index["shards"]:
        file = path.parent / s["file"]
        found = _sample_of(file)
        if found is None:
            raise FileNotFoundError(
                f"{file} is missing or unreadable: the sample is incomplete (write the same sample again to complete it)"
            )
        if found != index["sample"]:
            raise ValueError(
                f"{file} is a shard of another sample than {path} (another inversion, seed, selection, count or shard size)"
            )
        with np.load(file, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
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


def _sample_of(shard: Path) -> Optional[str]:
    """The id of the sample that the shard file ``shard`` belongs to; None for a missing or unreadable one."""
    try:
        with np.load(shard, allow_pickle=False) as z:
            return str(z["sample"].item())
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def _manifest(inv: Any, labels: Tensor, seed: Optional[int], select: Optional[int]) -> Dict[str, Any]:
    """What identifies a sample on disk: the inversion, the seed and selection (defaults resolved), the labels."""
    return {
        "inversion": fingerprint(inv),
        "seed": inv.sample_seed(seed),
        "select": inv.resolve_select(select),
        "labels": hashlib.sha256(labels.numpy().astype(np.int64).tobytes()).hexdigest()[:16],
        "count": len(labels),
    }


def _write_text(path: Path, text: str) -> None:
    """``path`` holding ``text``, replaced atomically (a temp file renamed into place)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_folder(inv, out: Path, labels: Tensor, batch_size, seed, select, bar) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file; a PNG sample is written into a folder")
    out.mkdir(parents=True, exist_ok=True)
    k = inv.num_classes
    digits = len(str(k - 1))
    counts = [0] * k
    paths: List[Path] = []
    for c in labels.tolist():
        paths.append(out / f"{c:0{digits}d}" / f"{counts[c]:05d}.png")
        counts[c] += 1
    manifest = _manifest(inv, labels, seed, select)
    seed, select = manifest["seed"], manifest["select"]
    mf = out / MANIFEST
    rank, world = distributed.world()
    same = mf.is_file() and _read(mf) == manifest
    if not same and rank == 0:  # another sample was here: remove its images (ours only), then record this one
        for old in out.glob("*/*.png"):
            if old.parent.name.isdigit() and old.stem.isdigit():
                old.unlink()
        _write_text(mf, json.dumps(manifest, indent=2) + "\n")
    bs = inv.config.batch_size if batch_size is None else batch_size
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    bar.total = sum(len(paths[s : s + bs]) for s in range(rank * bs, len(labels), world * bs))  # this rank's images
    distributed.barrier()  # the folder is ready for this sample before any rank writes
    for start in range(rank * bs, len(labels), world * bs):  # this rank's batches
        todo = paths[start : start + bs]
        if all(p.is_file() for p in todo):  # written by an earlier, interrupted run of this sample
            bar.update(len(todo))
            continue
        for _, x in inv.sample_batches(labels[start : start + bs], len(todo), seed, select, offset=start):
            for p, img in zip(todo, x):
                p.parent.mkdir(exist_ok=True)
                tmp = p.with_name(f".{p.name}.tmp")
                to_pil(((img + 1) / 2).clamp(0, 1)).save(tmp, format="PNG")
                os.replace(tmp, p)
            bar.update(len(todo))
    distributed.barrier()  # the whole sample is on disk when any rank returns


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
