"""Writing samples of an inversion to disk, one batch at a time: memory stays one batch for any count.

* ``.npz`` (any case): ``images`` uint8 ``[N, C, H, W]`` and ``labels`` int64 ``[N]``, streamed into the
  zip member by member and renamed into place when complete (an interrupted write leaves no file).
* any other path: a folder with one sub-folder of PNGs per class (``tldr_fast.grid.save_image_folder``'s
  layout), each file written atomically, and ``samples.json`` recording what the folder holds. Writing
  the same sample again resumes it: images already on disk are kept and not regenerated. A different
  sample (another inversion, seed, selection or count) replaces the folder's previous PNGs.

Under ``torch.distributed`` (``torchrun ... -m tldr_fast sample``) the folder is written by all ranks: batch
``j`` by rank ``j mod world``, each writing its own PNGs (disjoint files); rank 0 writes the manifest
first. The folder equals the one a single process writes, and resumes the same way. An ``.npz`` is one
file, written by a single process only.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Union

import numpy as np
import torch

from . import distributed
from .grid import to_pil
from .progress import progress_bar

Tensor = torch.Tensor
PathLike = Union[str, os.PathLike]
MANIFEST = "samples.json"


def _uint8(x: Tensor) -> np.ndarray:
    return ((x + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()  # [-1, 1] -> 0..255


def fingerprint(inv: Any) -> str:
    """A hash of the generator's weights: which inversion a sample folder came from."""
    h = hashlib.sha256()
    for name, t in sorted(inv.generator.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def write_samples(inv: Any, out: PathLike, labels: Tensor, batch_size: int = None, seed: int = None, select: int = None,
                  progress: bool = False) -> Path:
    """Write ``inv``'s images for ``labels`` to ``out`` (``.npz`` or a folder), one batch in memory at a time."""
    out = Path(out)
    if str(out) in ("", "."):
        raise ValueError("the output path is empty: give an .npz file or a folder")
    rank, world = distributed.world()
    if world > 1 and out.suffix.lower() == ".npz":
        raise ValueError(f"{out}: an .npz is written by one process; under torchrun give a folder (each rank writes its PNGs)")
    bar = progress_bar(total=len(labels), desc="sample", unit="img", disable=not (progress and rank == 0))
    try:
        if out.suffix.lower() == ".npz":
            _write_npz(inv, out, labels, batch_size, seed, select, bar)
        else:
            _write_folder(inv, out, labels, batch_size, seed, select, bar)
    finally:
        bar.close()
    return out


def _write_npz(inv, out: Path, labels: Tensor, batch_size, seed, select, bar) -> None:
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a folder; an .npz output must be a file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            with zf.open("images.npy", "w", force_zip64=True) as f:
                header = {"descr": "|u1", "fortran_order": False, "shape": (len(labels), *inv.image_shape)}
                np.lib.format.write_array_header_2_0(f, header)
                for _, x in inv.sample_batches(labels, batch_size, seed, select):
                    f.write(np.ascontiguousarray(_uint8(x)).tobytes())
                    bar.update(len(x))
            with zf.open("labels.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, labels.numpy().astype(np.int64))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


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
    seed = inv.config.seed + 1_000_000_007 if seed is None else seed
    select = inv.resolve_select(select)
    manifest: Dict[str, Any] = {
        "inversion": fingerprint(inv), "seed": seed, "select": select,
        "labels": hashlib.sha256(labels.numpy().astype(np.int64).tobytes()).hexdigest()[:16], "count": len(labels),
    }
    mf = out / MANIFEST
    rank, world = distributed.world()
    same = mf.is_file() and _read(mf) == manifest
    if not same and rank == 0:  # another sample was here: remove its images (ours only), then record this one
        for old in out.glob("*/*.png"):
            if old.parent.name.isdigit() and old.stem.isdigit():
                old.unlink()
        mf.write_text(json.dumps(manifest, indent=2) + "\n")
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
