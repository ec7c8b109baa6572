"""The C++/CUDA extension (backend ``"cuda"``): loading, build configuration, and the Python face of its ops.

The shared library built from ``csrc/`` registers the ops ``torch.ops.tldr_fast.{head_loss, feature_loss,
image_prior}`` (and ``pairwise_ssim`` where ``csrc/*/pairwise_ssim*`` is compiled in), with C++ kernels for CPU
tensors and, when built with CUDA, CUDA kernels. Each loss op returns ``(loss, terms, grad_<input>...)``:
the gradients of ``loss`` come out of the forward, so autograd's backward only scales them by the upstream
gradient (in C++, ``csrc/autograd.cpp``), and ``torch.library.register_fake`` below gives every op a shape
rule, so the ops work under ``torch.compile`` and ``torch.library.opcheck``.

Loading happens on first use, once per process: the prebuilt module ``tldr_fast._C`` (built by ``pip
install --no-build-isolation -e .`` or ``python setup.py build_ext --inplace``), else a just-in-time build
of ``csrc/`` with ``torch.utils.cpp_extension.load`` (cached under ``$TORCH_EXTENSIONS_DIR``; disable with
``TLDR_FAST_JIT=0``). Any failure becomes one ``BackendUnavailable`` with the reason and the fix; importing
this module never builds nor fails.

Build switches (read by ``setup.py`` and by the JIT build): ``TLDR_FAST_BUILD_EXT=0`` skips the extension in
``setup.py``; ``TLDR_FAST_BUILD_CUDA=auto|0|1`` (auto: with CUDA when torch has CUDA and nvcc is found);
``TORCH_CUDA_ARCH_LIST`` (default ``"8.0;9.0"``).
"""

from __future__ import annotations

import glob
import importlib
import os
import re
import sys
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Dict, List, Optional, Tuple

import torch

Tensor = torch.Tensor

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
PREBUILT = "tldr_fast._C"
JIT_NAME = "tldr_fast_C"
DEFAULT_CUDA_ARCHS = "8.0;9.0"
LOSS_OPS = ("head_loss", "feature_loss", "image_prior")

_FIX_BUILD = (
    "build it with `pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`) "
    "in a source checkout with a C++ compiler and ninja (and nvcc for CUDA), or use backend='triton'/'torch'"
)


# --- build configuration: shared by setup.py (which loads this file by path) and the JIT build -----------


def build_with_cuda() -> bool:
    """Whether to compile the CUDA kernels: ``TLDR_FAST_BUILD_CUDA`` = ``auto`` (default: when torch has
    CUDA and nvcc is found), ``1`` (required: an error otherwise) or ``0``."""
    from torch.utils.cpp_extension import CUDA_HOME

    mode = os.environ.get("TLDR_FAST_BUILD_CUDA", "auto").strip().lower()
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if mode in ("0", "off", "false", "no"):
        return False
    if mode in ("1", "on", "true", "yes"):
        if not possible:
            raise RuntimeError(
                "TLDR_FAST_BUILD_CUDA=1 but "
                + ("this torch has no CUDA" if torch.version.cuda is None else "nvcc was not found (set CUDA_HOME)")
            )
        return True
    if mode != "auto":
        raise ValueError(f"TLDR_FAST_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    return possible


def cuda_archs() -> List[str]:
    """Target architectures, e.g. ``["8.0", "9.0"]`` (``TORCH_CUDA_ARCH_LIST``, default sm_80 and sm_90)."""
    spec = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS
    archs = [a for a in spec.replace(" ", ";").split(";") if a]
    bad = [a for a in archs if not re.fullmatch(r"\d+\.\d+a?(\+PTX)?", a)]
    if bad:
        raise ValueError(f"TORCH_CUDA_ARCH_LIST: expected entries such as 8.0, 9.0a or 9.0+PTX, got {bad}")
    return archs


def sources(with_cuda: bool, csrc: str = CSRC) -> List[str]:
    """The extension's translation units: ``csrc/*.cpp`` (the library) and ``csrc/cpu/*.cpp`` (the CPU
    kernels), plus ``csrc/cuda/*.cu`` with CUDA. An op's CPU and CUDA files share its name, so they live
    in separate folders (their object files would collide in one)."""
    files = sorted(glob.glob(os.path.join(csrc, "*.cpp"))) + sorted(glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    if with_cuda:
        files += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
    return files


def cxx_flags(with_cuda: bool) -> List[str]:
    """Host compiler flags. OpenMP makes ``at::parallel_for`` parallel (torch's own OpenMP runtime, already
    loaded, serves it; Apple's clang has none: serial there); the build facts reach ``info()`` as macros."""
    archs = "_".join(cuda_archs()) if with_cuda else ""
    facts = [f"-DTLDR_FAST_WITH_CUDA={int(with_cuda)}", f"-DTLDR_FAST_CUDA_ARCHS={archs}"]
    if sys.platform == "win32":
        return ["/O2", "/openmp", *facts]
    return ["-O3", "-g0", *([] if sys.platform == "darwin" else ["-fopenmp"]), *facts]


def nvcc_flags(archs: Optional[List[str]] = None) -> List[str]:
    """nvcc flags: -O3 and one ``-gencode`` per architecture (``X.Y`` or ``X.Y+PTX``); no fast-math, so
    that exp/log keep full fp32 accuracy."""
    flags = ["-O3"]
    for arch in archs if archs is not None else cuda_archs():
        num = arch.split("+")[0].replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


# --- loading, once per process --------------------------------------------------------------------------


@dataclass
class Library:
    """How the extension was obtained: ``how`` is "prebuilt", "jit" or "missing" (then ``error`` says why)."""

    how: str
    module: Optional[ModuleType] = None
    error: Optional[str] = None


_lock = threading.Lock()
_library: Optional[Library] = None
_ready = False  # the library is loaded and its Python-side registrations are done


def _short(err: BaseException, max_lines: int = 12) -> str:
    """The useful part of an exception: compiler errors, else the last lines."""
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    errors = [ln.strip() for ln in lines if "error" in ln.lower()]
    keep = (errors or lines)[-max_lines:]
    return f"{type(err).__name__}: " + " | ".join(keep)


def open_library(
    prebuilt: str = PREBUILT,
    csrc: str = CSRC,
    jit: Optional[bool] = None,
    name: str = JIT_NAME,
    build_directory: Optional[str] = None,
) -> Library:
    """Import the prebuilt module, else build ``csrc`` just in time (unless ``jit`` is False; default: the
    ``TLDR_FAST_JIT`` switch). Never raises: a failure is a ``Library("missing", error=...)``."""
    try:
        return Library("prebuilt", importlib.import_module(prebuilt))
    except (ImportError, OSError, RuntimeError) as e:  # not built, built against another torch, ...
        prebuilt_error = f"{prebuilt} not importable ({e})"
    if jit is None:
        jit = os.environ.get("TLDR_FAST_JIT", "1").strip().lower() not in ("0", "off", "false", "no")
    if not jit:
        return Library("missing", error=f"{prebuilt_error}; the just-in-time build is off (TLDR_FAST_JIT=0)")
    if not os.path.isdir(csrc) or not sources(False, csrc):
        return Library("missing", error=f"{prebuilt_error}; no C++ sources at {csrc} to build just in time")
    try:
        from torch.utils import cpp_extension

        with_cuda = build_with_cuda()
        print(
            f"tldr_fast: building the C++{'/CUDA' if with_cuda else ''} extension just in time "
            "(first use; takes a few minutes, then cached)",
            file=sys.stderr,
        )
        module = cpp_extension.load(
            name=name,
            sources=sources(with_cuda, csrc),
            extra_cflags=cxx_flags(with_cuda),
            extra_cuda_cflags=nvcc_flags() if with_cuda else None,
            build_directory=build_directory,
            with_cuda=with_cuda,
            is_python_module=True,
            verbose=False,
        )
        return Library("jit", module)
    except Exception as e:  # a failed build is reported by require(), not raised here
        return Library("missing", error=f"{prebuilt_error}; the just-in-time build failed: {_short(e)}")


def _load() -> Library:
    """The process's library, loaded (or found missing) on the first call only."""
    global _library, _ready
    with _lock:
        if _library is None:
            _library = open_library()
            if _library.module is not None:
                _register()
                _ready = True
        return _library


def _has_kernel(op: str, device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"tldr_fast::{op}", key)


def require(device_type: str) -> None:
    """Raise ``tldr_fast.backends.BackendUnavailable`` (reason and fix) unless the extension can run its
    loss ops on ``device_type`` ("cpu": the library loaded; "cuda": loaded and built with CUDA)."""
    from .backends import BackendUnavailable

    lib = _load()
    if lib.module is None:
        raise BackendUnavailable(
            f"backend='cuda': the C++/CUDA extension is unavailable: {lib.error}. Fix: {_FIX_BUILD}"
        )
    if device_type not in ("cpu", "cuda"):
        raise BackendUnavailable(f"backend='cuda' has kernels for CPU and CUDA tensors, not {device_type!r}")
    if not all(_has_kernel(op, device_type) for op in LOSS_OPS):
        if device_type == "cuda":
            why = "this torch has no CUDA" if torch.version.cuda is None else "nvcc not found or TLDR_FAST_BUILD_CUDA=0"
            raise BackendUnavailable(
                f"backend='cuda': the extension was built without CUDA kernels ({why}). Fix: rebuild it with a "
                "CUDA torch and nvcc: TLDR_FAST_BUILD_CUDA=1 pip install --no-build-isolation -e ."
            )
        raise BackendUnavailable(
            f"backend='cuda': the extension lacks {device_type} kernels; rebuild it. Fix: {_FIX_BUILD}"
        )


def info() -> Dict[str, object]:
    """What ``tldr-fast info`` prints: built or not, how, with CUDA or CPU only, the CUDA architectures,
    the ops per device, and the error if any. Loads the library (building it just in time if needed)."""
    lib = _load()
    out: Dict[str, object] = {"built": lib.module is not None, "how": lib.how, "error": lib.error}
    if lib.module is not None:
        with_cuda = bool(getattr(lib.module, "with_cuda", 0))
        archs = getattr(lib.module, "cuda_archs", "")
        out.update(
            path=getattr(lib.module, "__file__", None),
            cuda=with_cuda,
            cuda_archs=archs.split("_") if with_cuda and archs else [],
            ops={
                op: [dev for dev in ("cpu", "cuda") if _has_kernel(op, dev)]
                for op in (*LOSS_OPS, "pairwise_ssim")
                if _has_op(op)
            },
        )
    return out


def _has_op(op: str) -> bool:
    return hasattr(torch.ops.tldr_fast, op)


def _ensure() -> None:
    if not _ready:
        require("cpu")


# --- the ops, with the reference's signatures ------------------------------------------------------------


def head_loss(
    logits: Tensor,
    target: Tensor,
    labels: Tensor,
    features: Optional[Tensor],
    weights: Tensor,
    head_bias: bool = True,
) -> Tuple[Tensor, Tensor]:
    """``tldr_fast.reference.head_loss`` in one fused kernel: ``(loss [], terms [5])``."""
    if not _ready:
        _ensure()
    loss, terms, _, _ = torch.ops.tldr_fast.head_loss(logits, target, labels, features, weights, head_bias)
    return loss, terms


def feature_loss(features: Tensor, weights: Tensor, labels: Optional[Tensor] = None, num_classes: int = 0) -> Tuple[Tensor, Tensor]:
    """``tldr_fast.reference.feature_loss`` by the closed forms: ``(loss [], terms [2])``; with ``labels``
    over same-label pairs."""
    if not _ready:
        _ensure()
    loss, terms, _ = torch.ops.tldr_fast.feature_loss(features, weights, labels, int(num_classes))
    return loss, terms


def image_prior(
    images: Tensor, weights: Tensor, lo: float = -1.0, hi: float = 1.0, moments: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """``tldr_fast.reference.image_prior`` in one pass (two with ``moments``): ``(loss [], terms [3])``."""
    if not _ready:
        _ensure()
    loss, terms, _ = torch.ops.tldr_fast.image_prior(images, weights, float(lo), float(hi), moments)
    return loss, terms


def _pairwise_ssim(a: Tensor, b: Tensor, data_range: float = 1.0) -> Tensor:
    """``tldr_fast.reference.pairwise_ssim``: the ``[N, M]`` SSIM matrix."""
    return torch.ops.tldr_fast.pairwise_ssim(a, b, float(data_range))


def __getattr__(name: str):
    # pairwise_ssim exists only where the loaded library has the op (csrc/*/pairwise_ssim* compiled in);
    # otherwise the backend dispatch takes it from the next backend.
    if name == "pairwise_ssim" and _load().module is not None and _has_op("pairwise_ssim"):
        return _pairwise_ssim
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- fake-tensor rules ----------------------------------------------------------------------


def _acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _fake_head_loss(logits, target, labels, features, weights, head_bias):
    acc = _acc_dtype(logits.dtype, *(() if features is None else (features.dtype,)))
    grad_features = logits.new_empty((0,)) if features is None else features.new_empty(features.shape)
    grad_logits = logits.new_empty(logits.shape)
    return logits.new_empty((), dtype=acc), logits.new_empty((5,), dtype=acc), grad_logits, grad_features


def _fake_feature_loss(features, weights, labels, num_classes):
    acc = _acc_dtype(features.dtype)
    return features.new_empty((), dtype=acc), features.new_empty((2,), dtype=acc), features.new_empty(features.shape)


def _fake_image_prior(images, weights, lo, hi, moments):
    acc = _acc_dtype(images.dtype)
    return images.new_empty((), dtype=acc), images.new_empty((3,), dtype=acc), images.new_empty(images.shape)


def _fake_pairwise_ssim(a, b, data_range):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=_acc_dtype(a.dtype, b.dtype))


def _register() -> None:
    """The fake (meta) rules of every op the loaded library defines (once, right after loading); their
    autograd is in C++ (csrc/autograd.cpp)."""
    torch.library.register_fake("tldr_fast::head_loss")(_fake_head_loss)
    torch.library.register_fake("tldr_fast::feature_loss")(_fake_feature_loss)
    torch.library.register_fake("tldr_fast::image_prior")(_fake_image_prior)
    if _has_op("pairwise_ssim"):
        torch.library.register_fake("tldr_fast::pairwise_ssim")(_fake_pairwise_ssim)
