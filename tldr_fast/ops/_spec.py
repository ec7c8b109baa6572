"""What every op declaration holds (``OpSpec``), the argument checks they share, and the autograd rule
of the fused loss ops.

An op is declared once, in ``tldr_fast/ops/<op>.py``: its ``torch.library`` schema, its term names (loss
ops), its input check, its fake (meta) rule, the autograd rule of its fused form, and the order in which
``backend="auto"`` tries the implementations. Every implementation registers against that declaration:

* ``tldr_fast.reference`` (the oracle) and ``tldr_fast.torch_ops`` call ``spec.check`` first;
* ``kernels/<op>.py`` (Triton) registers ``tldr_triton::<op>`` with ``spec.schema`` and ``spec.autograd()``
  (and ``spec.fake`` under the interpreter), and calls ``spec.check``;
* the extension (``csrc/``) implements ``tldr_fast::<op>``, whose schema and fake rule
  ``tldr_fast.extension`` defines from the declaration before it loads the library; its wrappers
  (``tldr_fast.extension_ops``) call ``spec.check``. Its autograd is the same rule written in C++
  (``csrc/autograd.cpp``: a Python rule would cost 100-300 us of host time per call).

So every backend rejects a bad argument with the same ``ValueError`` and the same message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional, Tuple

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class OpSpec:
    """The declaration of one op (see the module doc).

    ``auto`` maps a device type ("cpu", "cuda") to the backends ``backend="auto"`` tries, in order; a
    device type missing from it uses ``("torch",)``. ``files`` names the op's implementations, tests and
    benchmark (paths from the repository root), the only list of them: ``tests/test_ops.py::
    test_every_op_is_complete`` checks that each exists and is registered, and that no op file is left out.
    """

    name: str
    position: int  # its place in OPS and of its terms in the per-step term vector: a new op takes the next
    schema: str  # the torch.library schema after the op's name: "(Tensor x, ...) -> (...)"
    check: Callable[..., None]  # the public arguments -> None, or ValueError
    fake: Callable[..., Any]  # the op's outputs as empty tensors of the right shape and dtype
    auto: Mapping[str, Tuple[str, ...]]
    files: Tuple[str, ...] = ()
    terms: Tuple[str, ...] = ()  # loss ops: names of the entries of ``terms``, in order
    grad_inputs: Tuple[int, ...] = ()  # loss ops: the arguments whose gradients outputs 2, 3, ... are
    weights_arg: Optional[int] = None  # loss ops: the position of ``weights``
    extension: bool = True  # the C++/CUDA extension defines ``tldr_fast::<name>``
    # helper ops of the fused form (e.g. a backward pass): (name, schema, fake rule), defined beside it
    helpers: Tuple[Tuple[str, str, Callable[..., Any]], ...] = ()

    def qualname(self, namespace: str) -> str:
        return f"{namespace}::{self.name}"

    def define(self, library: "torch.library.Library") -> None:
        """Define the op and its helper ops in ``library`` (a ``torch.library.Library(ns, "DEF"/"FRAGMENT")``)."""
        library.define(self.name + self.schema)
        for name, schema, _ in self.helpers:
            library.define(name + schema)

    def register_fakes(self, namespace: str) -> None:
        """Register the fake rules of the op and its helper ops in ``namespace``."""
        torch.library.register_fake(self.qualname(namespace))(self.fake)
        for name, _, fake in self.helpers:
            torch.library.register_fake(f"{namespace}::{name}")(fake)

    def autograd(self) -> Tuple[Callable, Callable]:
        """``(setup_context, backward)`` of the fused form of a loss op, for ``register_autograd``.

        The fused op returns ``(loss, terms, grad_<x>...)``: its kernels wrote ``d loss / d x`` (already
        weighted) in the forward. So ``d loss / d x`` is the saved gradient and ``d loss / d weights`` is
        ``terms``, each scaled by the upstream gradient of ``loss``; ``terms`` and the gradients are
        outputs without a gradient of their own."""
        grad_inputs, weights_index = self.grad_inputs, self.weights_arg
        if weights_index is None:
            raise TypeError(f"{self.name} is not a fused loss op")

        def setup_context(ctx, inputs, output) -> None:
            ctx.mark_non_differentiable(*output[1:])
            ctx.set_materialize_grads(False)  # no zero tensors for the outputs without a gradient
            ctx.n_inputs = len(inputs)
            ctx.present = tuple(inputs[i] is not None for i in grad_inputs)
            ctx.weights_dtype = inputs[weights_index].dtype
            ctx.save_for_backward(*output[1:])

        def backward(ctx, grad_loss, *_):
            terms, *grads = ctx.saved_tensors
            out: List[Optional[Tensor]] = [None] * ctx.n_inputs
            if grad_loss is None:  # the loss does not reach the output being differentiated
                return tuple(out)
            for i, g, present in zip(grad_inputs, grads, ctx.present):
                if present and ctx.needs_input_grad[i]:
                    out[i] = grad_loss * g
            if ctx.needs_input_grad[weights_index]:
                out[weights_index] = (grad_loss * terms).to(ctx.weights_dtype)
            return tuple(out)

        return setup_context, backward

    @staticmethod
    def value_autograd(backward_op: Callable[..., Tensor]) -> Tuple[Callable, Callable]:
        """``(setup_context, backward)`` of a value op's fused form (``bn_stats``, ``mode_seek``): the op
        returns ``(value, saved...)``; the gradient of its first argument is
        ``backward_op(grad_value, x, saved...)`` (one elementwise pass), the other arguments get none and the
        saved outputs carry no gradient."""

        def setup_context(ctx, inputs, output) -> None:
            ctx.mark_non_differentiable(*output[1:])
            ctx.set_materialize_grads(False)  # no zero tensors for the outputs without a gradient
            ctx.n_inputs = len(inputs)
            ctx.save_for_backward(inputs[0], *output[1:])

        def backward(ctx, grad_value, *_):
            out: List[Optional[Tensor]] = [None] * ctx.n_inputs
            if grad_value is not None and ctx.needs_input_grad[0]:
                out[0] = backward_op(grad_value, *ctx.saved_tensors)
            return tuple(out)

        return setup_context, backward


# --- the checks the declarations share ------------------------------------------------------------


def fail(op: str, message: str) -> None:
    raise ValueError(f"{op}: {message}")


def shape(t: Tensor) -> Tuple[int, ...]:
    return tuple(t.shape)


def tensor(op: str, name: str, t: Any) -> Tensor:
    if not isinstance(t, Tensor):
        fail(op, f"{name} must be a tensor, got {type(t).__name__}")
    return t


def floating(op: str, name: str, t: Any) -> Tensor:
    t = tensor(op, name, t)
    if not t.dtype.is_floating_point:
        fail(op, f"{name} must be a floating-point tensor, got {t.dtype}")
    return t


def integer(op: str, name: str, t: Any) -> Tensor:
    t = tensor(op, name, t)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        fail(op, f"{name} must be an integer tensor, got {t.dtype}")
    return t


def same_device(op: str, first: str, **tensors: Optional[Tensor]) -> None:
    """Every tensor on the device of the one named ``first`` (a kernel given another device's memory crashes)."""
    device = tensors[first].device
    if all(t is None or t.device == device for t in tensors.values()):
        return
    name, t = next((n, t) for n, t in tensors.items() if t is not None and t.device != device)
    fail(op, f"{name} must be on {device} like {first}, got {t.device}")


def weights(op: str, w: Any, n: int) -> None:
    floating(op, "weights", w)
    if shape(w) != (n,):
        fail(op, f"weights must have shape [{n}], got {list(w.shape)}")


def values_readable(t: Tensor) -> bool:
    """Whether the values of ``t`` may be checked: where that costs no host sync, i.e. a CPU tensor, outside
    ``torch.compile`` (a traced graph cannot branch on values). On a GPU reading them would stall the
    stream every step; the library's own inputs are valid by construction."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def labels_in_range(op: str, labels: Tensor, k: int) -> None:
    """Labels in ``[0, k)``, checked where ``values_readable``."""
    if labels.numel() and values_readable(labels):
        lo, hi = (v.item() for v in torch.aminmax(labels))
        if lo < 0 or hi >= k:
            fail(op, f"labels must lie in [0, {k}), got values in [{lo}, {hi}]")


def finite(op: str, name: str, t: Tensor) -> None:
    """Every value of ``t`` finite, checked where ``values_readable``."""
    if values_readable(t) and not bool(torch.isfinite(t).all()):
        fail(op, f"{name} must be finite, got non-finite values")


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the loss ops' outputs: fp64 with an fp64 input, else fp32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32
