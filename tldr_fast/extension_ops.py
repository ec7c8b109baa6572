"""The ops of backend ``"extension"`` (the C++/CUDA extension, ``csrc/``), with the reference's signatures.

One function per declared op the extension implements (``spec.extension``), made from its declaration
(``tldr_fast/ops/<op>.py``) by ``wrap``: it checks the arguments with ``spec.check``, as every backend does,
converts the scalar arguments to the schema's types and calls ``torch.ops.tldr_fast.<op>``. Of the fused
form's outputs it returns what the reference returns: ``(loss, terms)`` of a loss op's ``(loss, terms,
grad_<input>...)`` (the gradients come out of the forward; ``csrc/autograd.cpp`` scales them in the
backward), ``value`` of a value op's ``(value, saved...)``, and an op's only output as it is. The library
is loaded by ``tldr_fast.extension`` on first use.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from . import extension, reference
from .errors import BackendUnavailable
from .ops import SPECS, OpSpec

_SCALAR_TYPES: Dict[str, Callable[[Any], Any]] = {"bool": bool, "int": int, "float": float}


def _ops():
    """``torch.ops.tldr_fast``, the library loaded (on first use), or BackendUnavailable with the reason."""
    if extension.load().module is None:
        raise BackendUnavailable(extension.unavailable("cpu"))
    return torch.ops.tldr_fast


def _schema_parts(schema: str) -> Tuple[Tuple[str, ...], int]:
    """The argument types of a declared schema ("(Tensor x, float lo) -> (Tensor a, Tensor b)") and its
    number of outputs."""
    arguments, outputs = schema.split("->")
    types = tuple(a.split()[0] for a in arguments.strip().strip("()").split(","))
    return types, len(outputs.split(","))


def wrap(spec: OpSpec) -> Callable:
    """The extension backend's function of ``spec``'s op: the signature and docs of
    ``tldr_fast.reference.<op>``, the check of ``spec``, the kernel ``torch.ops.tldr_fast.<op>``."""
    name, check = spec.name, spec.check
    like = getattr(reference, name)
    signature = inspect.signature(like)
    defaults = tuple(p.default for p in signature.parameters.values())
    required = sum(d is inspect.Parameter.empty for d in defaults)
    types, n_outputs = _schema_parts(spec.schema)
    if len(types) != len(defaults):
        raise TypeError(f"{name}: the schema has {len(types)} arguments, tldr_fast.reference.{name} {len(defaults)}")
    casts = tuple((i, _SCALAR_TYPES[t]) for i, t in enumerate(types) if t in _SCALAR_TYPES)
    pick: Optional[int] = None if n_outputs == 1 else (2 if spec.terms else 1)  # outputs returned, None: the one

    def op(*args: Any, **kwargs: Any) -> Any:
        if kwargs or len(args) < required:
            bound = signature.bind(*args, **kwargs)  # a TypeError names a missing or unknown argument
            bound.apply_defaults()
            args = bound.args
        elif len(args) < len(defaults):
            args = args + defaults[len(args) :]
        check(*args)
        args = list(args)
        for i, cast in casts:
            args[i] = cast(args[i])
        out = getattr(_ops(), name)(*args)
        return out if pick is None else (out[0] if pick == 1 else out[:pick])

    op.__name__ = op.__qualname__ = name
    op.__module__ = __name__
    op.__signature__ = signature
    op.__annotations__ = dict(like.__annotations__)
    op.__doc__ = f"``tldr_fast.reference.{name}`` on the extension's kernels (C++ on CPU, CUDA on CUDA tensors)."
    return op


globals().update({name: wrap(spec) for name, spec in SPECS.items() if spec.extension})
__all__ = [name for name, spec in SPECS.items() if spec.extension]
