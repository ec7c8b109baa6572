"""Atomic, weights-only checkpoints: nothing is lost on a crash and nothing arbitrary is unpickled."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .errors import NoSpaceLeft


def json_digest(obj: Any) -> str:
    """A SHA-256 (hex) of ``obj`` as canonical JSON (values JSON cannot hold by their ``repr``): the key of
    a stored result, from everything that decides it."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=repr).encode()).hexdigest()


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


def atomic_save(obj: Any, path: PathLike, what: str = "file") -> None:
    """``torch.save`` of ``obj`` to ``path`` through ``atomic_write``."""
    atomic_write(path, lambda f: torch.save(obj, f), what)


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None], what: str = "file") -> None:
    """``write(f)`` into a temporary file in the same folder, fsync, then rename over ``path``: a
    reader sees the old file or the new one, never half of one. Temporary files that a process killed
    while writing ``path`` left are removed first. A full disk is a ``NoSpaceLeft`` naming ``path``
    (``what`` it is: "checkpoint", ...), with the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, re.escape(path.name))
    atomic_write_many([(path, write)], what)


def atomic_write_text(path: PathLike, text: str, what: str = "file") -> None:
    """``path`` holding ``text`` (UTF-8), written through ``atomic_write``."""
    data = text.encode()
    atomic_write(path, lambda f: f.write(data), what)


def atomic_write_many(files: Iterable[Tuple[PathLike, Callable[[BinaryIO], None]]], what: str = "file") -> None:
    """``atomic_write`` of many files (e.g. a batch of PNGs), cheaper: up to ``GROUP`` temporary files are
    written, then fsynced together (one journal commit instead of one per file), then renamed into place.
    On any error every temporary file of the group is removed (earlier groups are in place); stale
    temporary files are not looked for (``remove_stale_temps``, once per folder, does that)."""
    umask = os.umask(0)
    os.umask(umask)
    files = list(files)
    for start in range(0, len(files), GROUP):
        _write_group([(Path(p), w) for p, w in files[start : start + GROUP]], 0o666 & ~umask, what)


GROUP = 64  # files open at once in atomic_write_many: far below any limit on open files


def _write_group(files: List[Tuple[Path, Callable[[BinaryIO], None]]], mode: int, what: str) -> None:
    temps: List[Tuple[Path, str, BinaryIO]] = []  # (destination, temporary file, its handle)
    current = files[0][0]  # the file being written, named by a full-disk error
    try:
        for current, write in files:
            current.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{current.name}.", suffix=".tmp", dir=current.parent)
            f = os.fdopen(fd, "wb")
            temps.append((current, tmp, f))
            write(f)
            f.flush()
        for current, _, f in temps:  # noqa: B007 - `current` is named if the fsync fails
            os.fsync(f.fileno())
            f.close()
        for current, tmp, _ in temps:
            os.chmod(tmp, mode)  # mkstemp makes 0600; give the file the permissions open() would
            os.replace(tmp, current)
    except BaseException as e:
        for _, tmp, f in temps:
            with contextlib.suppress(OSError):  # flushing what a full disk refused fails again
                f.close()
            if os.path.exists(tmp):
                os.unlink(tmp)
        if _no_space(e):
            kept = f"the previous {what} is intact" if current.exists() else "no partial file was left"
            message = f"no space left on device while writing {current}; {kept} (free some space and run again)"
            raise NoSpaceLeft(errno.ENOSPC, message, str(current)) from e
        raise


def _no_space(e: Optional[BaseException]) -> bool:
    """Whether ``e`` or an error it arose from is a full disk or quota (torch's zip writer reports one
    as ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``, from the OSError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def remove_stale_temps(folder: PathLike, names: str) -> None:
    """Remove the temporary files that a process killed while writing into ``folder`` left behind: those
    of the library's own pattern, ``.<name>.<random or pid>.tmp`` (or ``.<name>.tmp``), for a file name
    matching the regular expression ``names``. Nothing else is touched."""
    pattern = re.compile(rf"\.(?:{names})(?:\.[A-Za-z0-9_]+)?\.tmp")
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return
    for entry in entries:
        if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            Path(entry.path).unlink(missing_ok=True)


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


def _file_in_the_way(folders: Iterable[Path]) -> Optional[Path]:
    """The first of ``folders`` (the nearest first) that exists, if it is not a folder."""
    for folder in folders:
        if folder.exists():
            return None if folder.is_dir() else folder
    return None


def check_parent(path: PathLike, what: str = "output") -> None:
    """A ``NotADirectoryError`` when a file stands where a folder above ``path`` should be (writing
    ``notes.txt/x.pt``); nothing is created."""
    blocker = _file_in_the_way(Path(path).parents)
    if blocker is not None:
        raise NotADirectoryError(f"cannot write the {what} {path}: {blocker} is a file, not a folder")


def check_folder(path: PathLike, what: str) -> Path:
    """``path`` as a ``Path`` if it is, or can be created as, a folder; a ``NotADirectoryError`` naming
    ``what`` if it or a folder above it is a file. Nothing is created."""
    path = Path(path)
    blocker = _file_in_the_way((path, *path.parents))
    if blocker is not None:
        raise NotADirectoryError(f"{what} {path}: {blocker} is a file, not a folder; give a folder")
    return path


def refuse_overwriting_inputs(
    option: str, value: str, files: Sequence[Path], inputs: Mapping[str, Optional[str]]
) -> None:
    """Refuse, before any work, to write any of ``files`` (what ``option value`` writes) where it is one of
    the command's ``inputs`` (``{option: value}``; a data set given as ``PATH:test`` is its ``PATH``): the
    same file by its resolved path, through a symbolic or hard link included. Writing it would destroy the input."""
    for in_option, given in inputs.items():
        if not given:
            continue
        source = Path(given.rsplit(":", 1)[0] if given.endswith((":train", ":test")) else given)
        for file in files:
            if _same_file(file, source):
                what = "is" if file == Path(value) else f"would write {file}, which is"
                raise ValueError(
                    f"{option} {value} {what} the same file as {in_option} {given}: writing it would destroy that "
                    f"input; give another {option}"
                )


def _same_file(a: Path, b: Path) -> bool:
    """Whether paths ``a`` and ``b`` name one file (resolved, so also through links; existing or not)."""
    try:
        if os.path.samefile(a, b):
            return True
    except OSError:  # one of them does not exist (yet)
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def output_folder(path: str, files: Sequence[str] = (), inputs: Optional[Mapping[str, Optional[str]]] = None) -> Path:
    """``path`` (a command's ``--out``) as a folder for its outputs, checked for writability now; none of
    the ``files`` it will hold may be one of the command's ``inputs`` (``refuse_overwriting_inputs``)."""
    if not path.strip():
        raise ValueError("--out is empty: give a folder")
    out = Path(path)
    refuse_overwriting_inputs("--out", path, [out / f for f in files], inputs or {})
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a folder")
    check_writable(out / "metrics.json", "--out folder")
    return out


def save_checkpoint(path: PathLike, state: Dict[str, Any]) -> None:
    """Save an inversion state (plain data and tensors only) atomically."""
    atomic_save({"format": FORMAT, **state}, path, "checkpoint")


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
