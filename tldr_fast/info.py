"""What this installation has and can run: versions, devices, backends, the extension (``tldr-fast info``)."""

from __future__ import annotations

import sys
from typing import Any, Dict

import torch

from . import extension
from ._version import __version__
from .backends import available


def info() -> Dict[str, Any]:
    """Versions, devices, and the availability of every backend on cpu and cuda (``tldr-fast info``)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError as e:
        triton_version = f"not installed ({e})"
    devices = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    return {
        "tldr_fast": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cuda_devices": devices,
        "cpu_threads": torch.get_num_threads(),
        "backends": {"cpu": available("cpu"), "cuda": available("cuda")},
        "extension": extension.info(),
    }


def info_text(facts: Dict[str, Any], indent: str = "") -> str:
    """``info()``'s facts as ``key: value`` lines, the entries of a nested dict indented under its key."""
    lines = []
    for key, value in facts.items():
        if isinstance(value, dict):
            lines += [f"{indent}{key}:", *filter(None, [info_text(value, indent + "  ")])]
        else:
            lines.append(f"{indent}{key}: {value}")
    return "\n".join(lines)
