"""One registry of the implementations of every op, and one dispatch over them (loss ops and SSIM alike).

``reference`` - ``tldr_fast.reference``: the PyTorch definitions, the oracle of every test.
``torch``     - ``tldr_fast.torch_ops``: plain PyTorch in its fastest form (the reference's code for the
                loss ops and ``perturb``; ``pairwise_ssim`` as batched matrix products). Runs everywhere.
``triton``    - ``tldr_fast.kernels`` (the folder ``kernels/``): fused Triton kernels, CUDA tensors (or
                any tensor under ``TRITON_INTERPRET=1``, which is how CI tests them).
``extension`` - ``tldr_fast.extension_ops``: the C++/CUDA extension built from ``csrc/``, with C++ kernels
                for CPU tensors and, when built with CUDA, CUDA kernels. ``"cuda"`` is accepted as
                another name for it (older configs and checkpoints use it).
``auto``      - per op, the first available of the op's declared order (``tldr_fast.ops``: ``spec.auto``),
                announced once per device type on stderr.

Every backend offers the ops of ``tldr_fast.ops.OPS`` with the reference's signatures and checks their
arguments against the ops' declarations. An op a backend lacks (or has no kernel for on the device) is
taken from the next one in its ``fallback`` chain (extension -> triton -> torch -> reference), unless
``fallback=False``.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from .errors import BackendUnavailable
from .ops import OPS, SPECS


@dataclass(frozen=True)
class Implementation:
    """A backend: the module that holds its ops, what it is, and where a missing op comes from."""

    module: str
    about: str
    fallback: Optional[str]


REGISTRY: Dict[str, Implementation] = {
    "reference": Implementation("tldr_fast.reference", "the PyTorch reference", None),
    "torch": Implementation("tldr_fast.torch_ops", "plain PyTorch", "reference"),
    "triton": Implementation("tldr_fast.kernels", "the Triton kernels", "torch"),
    "extension": Implementation("tldr_fast.extension_ops", "the C++/CUDA extension", "triton"),
}
BACKENDS: Tuple[str, ...] = tuple(REGISTRY)
ALIASES = {"cuda": "extension"}  # another accepted name (in older configs) -> the backend's name
NAMES: Tuple[str, ...] = ("auto", *BACKENDS, *ALIASES)  # what backend= accepts
__all__ = [
    "ALIASES",
    "BACKENDS",
    "NAMES",
    "REGISTRY",
    "Backend",
    "BackendUnavailable",
    "available",
    "resolve",
    "resolve_device",
]

_announced: set = set()


@dataclass(frozen=True)
class Backend:
    """The ops of one backend for one device type: ``backend.head_loss(...)`` etc.; ``chosen[op]`` names
    the implementation each op came from (its own, a fallback's, or per op under "auto")."""

    name: str
    device_type: str
    ops: Dict[str, Callable] = field(repr=False)
    chosen: Dict[str, str] = field(default_factory=dict)

    def __getattr__(self, op: str) -> Callable:
        try:
            return self.ops[op]
        except KeyError:
            raise AttributeError(op) from None


_cpu_noticed = False


def resolve_device(name: str, quiet: bool = False) -> torch.device:
    """``"auto"`` is the GPU when there is one, else the CPU (with a one-line notice, once, unless
    ``quiet``); a named CUDA device that is not there is a ``BackendUnavailable`` error."""
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
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r} (tldr_fast runs on CPUs and CUDA GPUs)"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable(f"device={name!r} but torch sees no CUDA GPU; use device='cpu' or 'auto'")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise BackendUnavailable(
            f"device={name!r} but torch sees {torch.cuda.device_count()} CUDA GPU(s), numbered from 0; use 'cuda' or 'auto'"
        )
    return device


def canonical(name: str) -> str:
    """A backend name with its alias resolved ("cuda" -> "extension"); an unknown name is an error."""
    name = ALIASES.get(name, name)
    if name != "auto" and name not in REGISTRY:
        raise BackendUnavailable(f"unknown backend {name!r}; expected 'auto' or one of {BACKENDS}")
    return name


def _module(name: str, device_type: str) -> ModuleType:
    """The module of backend ``name`` for ``device_type``, or BackendUnavailable saying why not."""
    if name == "triton" and device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendUnavailable(
            "backend='triton' runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1, for tests); "
            f"device type is {device_type!r}: use backend='torch' or 'auto'"
        )
    if name == "extension":
        from . import extension

        reason = extension.unavailable(device_type)
        if reason is not None:
            raise BackendUnavailable(reason)
    try:
        return importlib.import_module(REGISTRY[name].module)
    except ImportError as e:
        raise BackendUnavailable(f"backend={name!r} needs a missing package ({e}); pip install triton") from e


def _op(name: str, op: str, module: ModuleType, device_type: str) -> Optional[Callable]:
    """Backend ``name``'s ``op`` for ``device_type`` tensors, or None where it has none."""
    if name == "extension":
        from . import extension

        if not (SPECS[op].extension and extension.has_kernel(op, device_type)):
            return None
    return getattr(module, op, None)


def _first(order: Tuple[str, ...], op: str, device_type: str) -> Tuple[str, Callable]:
    """The first backend of ``order`` that has ``op`` for ``device_type``, and the op."""
    for name in order:
        try:
            fn = _op(name, op, _module(name, device_type), device_type)
        except BackendUnavailable:
            continue
        if fn is not None:
            return name, fn
    raise BackendUnavailable(f"no backend of {order} has {op} for {device_type} tensors")


def _chain(name: str) -> Tuple[str, ...]:
    chain = [name]
    while REGISTRY[chain[-1]].fallback is not None:
        chain.append(REGISTRY[chain[-1]].fallback)
    return tuple(chain)


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


def resolve(name: str, device: "torch.device | str", quiet: bool = False, fallback: bool = True) -> Backend:
    """The backend called ``name`` ("auto", "reference", "torch", "triton" or "extension") for tensors on
    ``device``.

    ``auto`` takes each op from the first available backend of the op's declared order and prints one
    line on stderr, once per device type, naming the picks. A named backend that cannot run here is a
    ``BackendUnavailable`` with the reason and the fix. With ``fallback=False`` the backend holds only its
    own ops (the tests use this, so that a missing kernel cannot pass silently on another backend's op).

    >>> resolve("torch", "cpu").name
    'torch'
    """
    device_type = torch.device(device).type
    name = canonical(name)
    ops: Dict[str, Callable] = {}
    chosen: Dict[str, str] = {}
    if name == "auto":
        for op in OPS:
            chosen[op], ops[op] = _first(SPECS[op].auto.get(device_type, ("torch",)), op, device_type)
        if not quiet and device_type not in _announced:
            _announced.add(device_type)
            picks: Dict[str, list] = {}
            for op, b in chosen.items():
                picks.setdefault(b, []).append(op)
            said = "; ".join(f"{b!r} ({REGISTRY[b].about}): {', '.join(o)}" for b, o in picks.items())
            print(f"tldr_fast: backend 'auto' on {device_type} -> {said}", file=sys.stderr)
        return Backend(chosen["head_loss"], device_type, ops, chosen)
    module = _module(name, device_type)  # raises with the reason when the named backend cannot run here
    for op in OPS:
        fn = _op(name, op, module, device_type)
        if fn is not None:
            chosen[op], ops[op] = name, fn
        elif fallback:
            try:
                chosen[op], ops[op] = _first(_chain(name)[1:], op, device_type)
            except BackendUnavailable:
                pass
    return Backend(name, device_type, ops, chosen)


def info() -> Dict[str, Any]:
    """Versions, devices, and the availability of every backend on cpu and cuda (``tldr-fast info``)."""
    from . import __version__, extension

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
