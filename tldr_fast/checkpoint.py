"""Atomic, weights-only checkpoints: nothing is lost on a crash and nothing arbitrary is unpickled."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterable, Optional, Union

import torch

FORMAT = "tldr_fast.inversion/1"
PathLike = Union[str, os.PathLike]


def cache_dir(given: Optional[PathLike] = None) -> Path:
    """Where trained classifiers and real curves are kept: ``given``, else ``$TLDR_FAST_CACHE``, else
    ``$XDG_CACHE_HOME/tldr_fast`` (``~/.cache/tldr_fast``)."""
    if given:
        return Path(given)
    if os.environ.get("TLDR_FAST_CACHE"):
        return Path(os.environ["TLDR_FAST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tldr_fast"


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` of ``obj`` to ``path`` through ``atomic_write``."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> None:
    """``write(f)`` into a temporary file in the same folder, fsync, then rename over ``path``: a
    reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed while writing
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_writable(path: PathLike, what: str = "output") -> Path:
    """Fail now, before any work, if ``path`` cannot be written: its folder is created if needed and a
    file is created there and removed again. ``path`` itself is not touched. Returns it as a ``Path``."""
    path = Path(path)
    if str(path) in ("", "."):
        raise ValueError(f"the {what} path is empty")
    if path.is_dir():
        raise IsADirectoryError(f"the {what} path {path} is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(f"cannot write the {what} {path}: {e.strerror or e}") from e
    return path


def save_checkpoint(path: PathLike, state: Dict[str, Any]) -> None:
    """Save an inversion state (plain data and tensors only) atomically."""
    atomic_save({"format": FORMAT, **state}, path)


def load_checkpoint(path: PathLike, fmt: str = FORMAT, kind: str = "inversion") -> Dict[str, Any]:
    """Load a tldr_fast checkpoint of format ``fmt`` (an inversion's, or ``kind``'s) onto the CPU with
    ``weights_only=True``: tensors and plain containers, never code; anything else is a ``ValueError``."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a {kind} checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"no such {kind} checkpoint: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path} is not a tldr_fast {kind} checkpoint that loads safely (weights only; refused: {first})"
        ) from e
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise ValueError(f"{path} is not a tldr_fast {kind} checkpoint (expected format {fmt!r})")
    return state


def require_keys(state: Dict[str, Any], keys: Iterable[str], path: PathLike, kind: str = "inversion") -> None:
    """A ``ValueError`` naming what a loaded checkpoint lacks (a hand-made or truncated file)."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{path} is an incomplete {kind} checkpoint: it lacks {', '.join(missing)}")
