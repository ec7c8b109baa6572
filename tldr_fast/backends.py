"""One dispatch over the three implementations of every op.

``torch``  - ``tldr_fast.reference``: plain PyTorch, runs everywhere, the oracle of every test.
``triton`` - ``tldr_fast.kernels`` (the folder ``kernels/``): fused Triton kernels, CUDA tensors (or
             any tensor under ``TRITON_INTERPRET=1``, which is how CI tests them).
``cuda``   - ``tldr_fast.extension``: the C++/CUDA extension built from ``csrc/``; its ops run on CUDA
             tensors and, with C++ kernels, on CPU tensors.
``auto``   - the fastest one available for the device, announced once on stderr.

Every backend offers the ops named in ``OPS`` with the reference's signatures. An op a backend lacks
is taken from the next one in ``_FALLBACK``.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Dict, Optional

import torch

OPS = ("head_loss", "feature_loss", "image_prior", "perturb", "pairwise_ssim")
BACKENDS = ("torch", "triton", "cuda")
_FALLBACK = {"cuda": "triton", "triton": "torch"}
_announced: set = set()


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why and what to do."""


@dataclass(frozen=True)
class Backend:
    """The ops of one backend for one device type: ``backend.head_loss(...)`` etc."""

    name: str
    device_type: str
    ops: Dict[str, Callable] = field(repr=False)

    def __getattr__(self, op: str) -> Callable:
        try:
            return self.ops[op]
        except KeyError:
            raise AttributeError(op) from None


_cpu_noticed = False


def resolve_device(name: str, quiet: bool = False) -> torch.device:
    """``"auto"`` is the GPU when there is one, else the CPU (with a one-line notice, once, unless
    ``quiet``); a named CUDA device without a GPU is a clear error."""
    global _cpu_noticed
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if not (_cpu_noticed or quiet):
            _cpu_noticed = True
            print("tldr_fast: no GPU found, running on the CPU", file=sys.stderr)
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from e
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r} (tldr_fast runs on CPUs and CUDA GPUs)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} but torch sees no CUDA GPU; use device='cpu' or 'auto'")
    return device


def _triton_module(device_type: str) -> ModuleType:
    if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendUnavailable(
            "backend='triton' runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1, for tests); "
            f"device type is {device_type!r}: use backend='torch' or 'auto'"
        )
    try:
        return importlib.import_module("tldr_fast.kernels")
    except ImportError as e:
        raise BackendUnavailable(f"backend='triton' needs the triton package ({e}); pip install triton") from e


def _cuda_module(device_type: str) -> ModuleType:
    from . import extension

    extension.require(device_type)  # raises BackendUnavailable with the reason
    return extension


def _module(name: str, device_type: str) -> ModuleType:
    if name == "torch":
        return importlib.import_module("tldr_fast.reference")
    if name == "triton":
        return _triton_module(device_type)
    if name == "cuda":
        return _cuda_module(device_type)
    raise BackendUnavailable(f"unknown backend {name!r}; expected 'auto' or one of {BACKENDS}")


def _build(name: str, device_type: str, fallback: bool) -> Backend:
    chain = [name]
    while fallback and chain[-1] in _FALLBACK:
        chain.append(_FALLBACK[chain[-1]])
    ops: Dict[str, Callable] = {}
    for i, b in enumerate(chain):
        try:
            mod = _module(b, device_type)
        except BackendUnavailable:
            if i == 0:
                raise
            continue
        for op in OPS:
            if op not in ops and hasattr(mod, op):
                ops[op] = getattr(mod, op)
    return Backend(name, device_type, ops)


def available(device_type: str) -> Dict[str, str]:
    """``{backend: "ok" or the reason it is unavailable}`` for a device type ("cpu" or "cuda")."""
    out = {}
    for b in BACKENDS:
        try:
            _module(b, device_type)
            out[b] = "ok"
        except BackendUnavailable as e:
            out[b] = str(e)
    return out


def _auto(device_type: str) -> str:
    order = ("cuda", "triton", "torch") if device_type == "cuda" else ("cuda", "torch")
    for b in order:
        try:
            _module(b, device_type)
            return b
        except BackendUnavailable:
            continue
    return "torch"


def resolve(name: str, device: "torch.device | str", quiet: bool = False, fallback: bool = True) -> Backend:
    """The backend called ``name`` ("auto", "torch", "triton" or "cuda") for tensors on ``device``.

    ``auto`` prints one line on stderr, once per device type, naming its pick. With
    ``fallback=False`` the backend holds only its own ops (the tests use this, so that a missing
    kernel cannot pass silently on another backend's op).

    >>> resolve("torch", "cpu").name
    'torch'
    """
    device_type = torch.device(device).type
    if name == "auto":
        picked = _auto(device_type)
        if not quiet and device_type not in _announced:
            _announced.add(device_type)
            notes = {
                ("cuda", "cpu"): " (no GPU: the C++ extension's CPU kernels)",
                ("torch", "cpu"): " (no GPU and no built extension: the PyTorch reference)",
            }
            note = notes.get((picked, device_type), "")
            print(f"tldr_fast: backend 'auto' -> {picked!r} on {device_type}{note}", file=sys.stderr)
        name = picked
    return _build(name, device_type, fallback)


def get_op(op: str, backend: "Backend | str" = "auto", device: Optional["torch.device | str"] = None) -> Callable:
    """A single op of a backend, for callers that need just one (e.g. the SSIM driver)."""
    if isinstance(backend, str):
        backend = resolve(backend, device or "cpu")
    return getattr(backend, op)
