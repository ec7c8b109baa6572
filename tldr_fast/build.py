"""How the C++/CUDA extension is built: its sources and compiler flags, and the build switches.

Shared by ``setup.py`` (which loads this file by path, without importing the package) and the
just-in-time build of ``tldr_fast.extension``; nothing else.

Build switches: ``TLDR_FAST_BUILD_EXT=0`` skips the extension in ``setup.py``; ``TLDR_FAST_BUILD_CUDA=auto|0|1``
(auto: with CUDA when torch has CUDA and nvcc is found); ``TORCH_CUDA_ARCH_LIST`` (default ``"8.0;9.0"``).
"""

from __future__ import annotations

import glob
import os
import re
import sys
from typing import List, Optional

import torch

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
DEFAULT_CUDA_ARCHS = "8.0;9.0"


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
