"""Atomic, weights-only checkpoints: nothing is lost on a crash and nothing arbitrary is unpickled."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterable, Mapping, Optional, Union

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
    check_parent(path, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(f"cannot write the {what} {path}: {e.strerror or e}") from e
    return path


def check_parent(path: PathLike, what: str = "output") -> None:
    """A ``NotADirectoryError`` when a file stands where a folder above ``path`` should be (writing
    ``notes.txt/x.pt``); nothing is created."""
    for parent in Path(path).parents:  # the nearest first
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"cannot write the {what} {path}: {parent} is a file, not a folder")
            return


def save_checkpoint(path: PathLike, state: Dict[str, Any]) -> None:
    """Save an inversion state (plain data and tensors only) atomically."""
    atomic_save({"format": FORMAT, **state}, path)


def load_checkpoint(path: PathLike, fmt: str = FORMAT, kind: str = "inversion") -> Dict[str, Any]:
    """Load a tldr_fast checkpoint of format ``fmt`` (an inversion's, or ``kind``'s) onto the CPU with
    ``weights_only=True``: tensors and plain containers, never code; anything else is a ``ValueError``."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a checkpoint file ({kind})")
    if not path.is_file():
        raise FileNotFoundError(f"no such {kind} checkpoint: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path} is not a valid tldr_fast {kind} checkpoint: it does not load as tensors and plain data "
            f"(read weights only; {_load_error(e)})"
        ) from e
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise ValueError(f"{path} is not a tldr_fast {kind} checkpoint (expected format {fmt!r})")
    return state


def _load_error(e: Exception) -> str:
    """What ``torch.load`` found wrong, without its advice to load with ``weights_only=False`` (which
    would run whatever code the file holds)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    found = [line for line in lines if line.startswith("WeightsUnpickler error:")]  # e.g. an unsupported global
    if found:
        return found[0].replace("WeightsUnpickler error: ", "refused: ")
    if lines and "weights_only" not in lines[0]:
        return f"{type(e).__name__}: {lines[0]}"
    return f"{type(e).__name__}: not a file torch.save wrote, or a damaged one"


def drop_unknown(data: Mapping[str, Any], known: Iterable[str], path: PathLike, where: str = "") -> Dict[str, Any]:
    """``data`` without the fields this version does not know (written by a newer tldr_fast, or by hand),
    with one warning on stderr that names them, ``where`` they are and the file."""
    known = set(known)
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        print(
            f"tldr_fast: warning: {path}: ignoring {where}field(s) this version does not know: {', '.join(unknown)} "
            "(written by a newer tldr_fast?)",
            file=sys.stderr,
        )
    return {k: v for k, v in data.items() if k in known}


def field_error(path: PathLike, field: str, expected: str, value: Any, kind: str = "inversion") -> ValueError:
    """The ``ValueError`` of a checkpoint field that holds the wrong kind of value (a hand-edited file)."""
    shown = repr(value) if len(repr(value)) <= 40 else f"a {type(value).__name__}"
    return ValueError(f"{path}: the {kind} checkpoint's field {field!r} must be {expected}, got {shown}")


def require_keys(state: Dict[str, Any], keys: Iterable[str], path: PathLike, kind: str = "inversion") -> None:
    """A ``ValueError`` naming what a loaded checkpoint lacks (a hand-made or truncated file)."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{path} is an incomplete {kind} checkpoint: it lacks {', '.join(missing)}")
