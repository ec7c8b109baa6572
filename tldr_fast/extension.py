"""Loading the C++/CUDA extension (backend ``"extension"``), once per process; nothing else.

The shared library built from ``csrc/`` implements the ops ``torch.ops.tldr_fast.<op>`` declared in
``tldr_fast/ops/`` (C++ kernels for CPU tensors and, when built with CUDA, CUDA kernels; their autograd in
``csrc/autograd.cpp``). This module defines their schemas from the declarations, then loads the library
(whose kernels register against those schemas: a C++ signature that disagrees with its declaration fails
at load time), then registers the declared fake (meta) rules, so the ops trace under ``torch.compile`` and
pass ``torch.library.opcheck``. The Python functions of the backend are in ``tldr_fast.extension_ops``;
the build (sources, flags) is ``tldr_fast.build``.

Where the library comes from: the prebuilt module ``tldr_fast._C`` (built by ``pip install
--no-build-isolation -e .`` or ``python setup.py build_ext --inplace``), else a just-in-time build of
``csrc/`` with ``torch.utils.cpp_extension.load`` (cached under ``$TORCH_EXTENSIONS_DIR``; disable with
``TLDR_FAST_JIT=0``). Any failure becomes a reason string (``unavailable``), which the backend registry
turns into one ``BackendUnavailable`` with the fix; importing this module never builds nor fails. A build
or load of the cache holds an OS lock on its directory (``build_lock``), so torch's own lock file that a
killed build leaves there is recognised as stale and removed instead of waited on for ever.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
import sys
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Dict, Iterator, List, Optional

try:
    import fcntl
except ImportError:  # Windows: no OS lock, so no stale-lock detection
    fcntl = None

import torch

from . import build
from .ops import LOSS_OPS, SPECS

PREBUILT = "tldr_fast._C"
JIT_NAME = "tldr_fast_C"
NAMESPACE = "tldr_fast"
OWNER_FILE = "tldr_fast.lock"  # in the build directory: our OS lock, holding its owner's "pid PID on host HOST"
TORCH_LOCK_FILE = "lock"  # torch.utils.file_baton.FileBaton's, in the build directory

FIX_BUILD = (
    "build it with `pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`) "
    "in a source checkout with a C++ compiler and ninja (and nvcc for CUDA), or use backend='triton'/'torch'"
)


@dataclass
class Library:
    """How the extension was obtained: ``how`` is "prebuilt", "jit" or "missing" (then ``error`` says why)."""

    how: str
    module: Optional[ModuleType] = None
    error: Optional[str] = None


_lock = threading.Lock()
_library: Optional[Library] = None
_schemas: Optional[torch.library.Library] = None  # the tldr_fast namespace, defined from the declarations


def _short(err: BaseException, max_lines: int = 12) -> str:
    """The useful part of an exception: compiler errors, else the last lines."""
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    errors = [ln.strip() for ln in lines if "error" in ln.lower()]
    keep = (errors or lines)[-max_lines:]
    return f"{type(err).__name__}: " + " | ".join(keep)


def define_ops() -> None:
    """Define ``tldr_fast::<op>`` for every declared op the extension implements (once per process,
    before any library registers kernels for them)."""
    global _schemas
    if _schemas is None:
        lib = torch.library.Library(NAMESPACE, "DEF")
        for spec in SPECS.values():
            if spec.extension:
                spec.define(lib)
        _schemas = lib


def open_library(
    prebuilt: str = PREBUILT,
    csrc: str = build.CSRC,
    jit: Optional[bool] = None,
    name: str = JIT_NAME,
    build_directory: Optional[str] = None,
) -> Library:
    """Import the prebuilt module, else build ``csrc`` just in time (unless ``jit`` is False; default: the
    ``TLDR_FAST_JIT`` switch). The ops' schemas are defined first. Never raises: a failure is a
    ``Library("missing", error=...)``."""
    define_ops()
    try:
        return Library("prebuilt", importlib.import_module(prebuilt))
    except (ImportError, OSError, RuntimeError) as e:  # not built, built against another torch, ...
        prebuilt_error = f"{prebuilt} not importable ({e})"
    if jit is None:
        jit = os.environ.get("TLDR_FAST_JIT", "1").strip().lower() not in ("0", "off", "false", "no")
    if not jit:
        return Library("missing", error=f"{prebuilt_error}; the just-in-time build is off (TLDR_FAST_JIT=0)")
    if not os.path.isdir(csrc) or not build.sources(False, csrc):
        return Library("missing", error=f"{prebuilt_error}; no C++ sources at {csrc} to build just in time")
    try:
        from torch.utils import cpp_extension

        with_cuda = build.build_with_cuda()
        sources = build.sources(with_cuda, csrc)
        cflags, nvcc = build.cxx_flags(with_cuda), build.nvcc_flags() if with_cuda else None
        directory = build_directory or cpp_extension._get_build_directory(name, verbose=False)
        os.makedirs(directory, exist_ok=True)
        with build_lock(directory):
            if is_cached(directory, name, csrc, sources, cflags + (nvcc or [])):
                print(f"tldr_fast: loading the cached C++ extension from {directory}", file=sys.stderr)
            else:
                print(
                    f"tldr_fast: building the C++{'/CUDA' if with_cuda else ''} extension just in time in {directory} "
                    "(first use; takes a few minutes, then cached)",
                    file=sys.stderr,
                )
            module = cpp_extension.load(
                name=name,
                sources=sources,
                extra_cflags=cflags,
                extra_cuda_cflags=nvcc,
                build_directory=directory,
                with_cuda=with_cuda,
                is_python_module=True,
                verbose=False,
            )
        return Library("jit", module)
    except Exception as e:  # a failed build is reported by unavailable(), not raised here
        return Library("missing", error=f"{prebuilt_error}; the just-in-time build failed: {_short(e)}")


@contextlib.contextmanager
def build_lock(directory: str) -> Iterator[None]:
    """Exclusive use of the build directory ``directory`` for a build or load: an OS lock (``flock``) on its
    ``tldr_fast.lock``, which records the holder (pid and host) and which the OS releases when the holder
    dies, however it dies. While another live process holds it (a build or load in progress), wait, saying who.
    Holding it, any torch lock file there (``lock``: torch's ``FileBaton``, created by a build and removed at
    its end; a killed build leaves it, and every later load would wait on it for ever) is stale: it is
    removed, with a notice naming it. Without ``fcntl`` (Windows) nothing is locked nor removed."""
    if fcntl is None:
        yield
        return
    path = os.path.join(directory, OWNER_FILE)
    with open(path, "a+") as f:  # closing it releases the lock
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            print(
                f"tldr_fast: waiting for {owner}, which is building or loading the C++ extension in {directory}",
                file=sys.stderr,
            )
            fcntl.flock(f, fcntl.LOCK_EX)
        f.truncate(0)
        f.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        f.flush()
        stale = os.path.join(directory, TORCH_LOCK_FILE)
        if os.path.exists(stale):
            os.remove(stale)
            print(f"tldr_fast: removed the stale lock {stale} (left by a build that was stopped)", file=sys.stderr)
        yield


def is_cached(directory: str, name: str, csrc: str, sources: List[str], flags: List[str]) -> bool:
    """Whether the build of ``name`` in ``directory`` is up to date, so that torch's just-in-time build only
    loads it: its library is newer than every file under ``csrc`` and its ``build.ninja`` names these
    ``sources`` and compiler ``flags``."""
    library = os.path.join(directory, name + (".pyd" if sys.platform == "win32" else ".so"))
    try:
        built = os.path.getmtime(library)
        with open(os.path.join(directory, "build.ninja")) as f:
            words = set(f.read().split())
        newest = max(os.path.getmtime(os.path.join(root, n)) for root, _, names in os.walk(csrc) for n in names)
    except (OSError, ValueError):  # no library or build file yet, or no sources
        return False
    return built >= newest and all(os.path.abspath(w) in words for w in sources) and all(w in words for w in flags)


def _register_fakes() -> None:
    for spec in SPECS.values():
        if spec.extension:
            spec.register_fakes(NAMESPACE)


def load() -> Library:
    """The process's library, loaded (or found missing) on the first call only (later calls take no lock,
    so that ``torch.compile`` traces through them)."""
    global _library
    if _library is not None:
        return _library
    with _lock:
        if _library is None:
            _library = open_library()
            if _library.module is not None:
                _register_fakes()
        return _library


def has_kernel(op: str, device_type: str) -> bool:
    """Whether the loaded library has a kernel of ``op`` for ``device_type`` ("cpu" or "cuda")."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return (
        key is not None
        and _schemas is not None
        and torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", key)
    )


def unavailable(device_type: str) -> Optional[str]:
    """None when the extension can run its loss ops on ``device_type`` ("cpu": the library loaded;
    "cuda": loaded and built with CUDA), else the reason and the fix."""
    lib = load()
    if lib.module is None:
        return f"backend='extension': the C++/CUDA extension is unavailable: {lib.error}. Fix: {FIX_BUILD}"
    if device_type not in ("cpu", "cuda"):
        return f"backend='extension' has kernels for CPU and CUDA tensors, not {device_type!r}"
    if all(has_kernel(op, device_type) for op in LOSS_OPS):
        return None
    if device_type == "cuda":
        why = "this torch has no CUDA" if torch.version.cuda is None else "nvcc not found or TLDR_FAST_BUILD_CUDA=0"
        return (
            f"backend='extension': the extension was built without CUDA kernels ({why}). Fix: rebuild it with "
            "a CUDA torch and nvcc: TLDR_FAST_BUILD_CUDA=1 pip install --no-build-isolation -e ."
        )
    return f"backend='extension': the extension lacks {device_type} kernels; rebuild it. Fix: {FIX_BUILD}"


def info() -> Dict[str, object]:
    """What ``tldr-fast info`` prints: built or not, how, with CUDA or CPU only, the CUDA architectures,
    the ops per device, and the error if any. Loads the library (building it just in time if needed)."""
    lib = load()
    out: Dict[str, object] = {"built": lib.module is not None, "how": lib.how, "error": lib.error}
    if lib.module is not None:
        with_cuda = bool(getattr(lib.module, "with_cuda", 0))
        archs = getattr(lib.module, "cuda_archs", "")
        ops = {op: [dev for dev in ("cpu", "cuda") if has_kernel(op, dev)] for op, s in SPECS.items() if s.extension}
        out.update(
            path=getattr(lib.module, "__file__", None),
            cuda=with_cuda,
            cuda_archs=archs.split("_") if with_cuda and archs else [],
            ops={op: devices for op, devices in ops.items() if devices},
        )
    return out
