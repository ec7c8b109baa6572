"""Host-side helpers shared by the Triton ops: environment, buffer allocation, op registration, sizing.

* ``INTERPRET``: kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors, tests).
* ``empty``: output/scratch buffers; NaN-filled when ``TLDR_FAST_POISON=1`` so that an element a
  kernel forgets to write shows up in tests.
* Every kernel casts its float arguments to fp32 on entry: Inductor passes Python floats as fp64, which
  would turn fp32 arithmetic (and loop-carried sums) into fp64 under ``torch.compile`` (``_aot`` checks
  every kernel variant with fp64 floats).
* ``triton_op`` / ``launch``: every op is a ``torch.library`` op, ``tldr_triton::<op>`` with the schema
  of its declaration (``tldr_fast/ops/<op>.py``), so that a loss using it traces under
  ``torch.compile(fullgraph=True)``. On GPUs that is ``torch.library.triton_op`` with
  ``wrap_triton`` launches (Inductor sees and schedules the kernels). The interpreter cannot run on
  fake tensors, so under ``TRITON_INTERPRET=1`` the same function is registered as an opaque
  ``custom_op`` with the declared fake rule: that keeps ``opcheck`` and CPU ``torch.compile`` tests
  meaningful for the schema, fake shapes and autograd.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Sequence

import torch

from tldr_fast.ops import OpSpec

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Precision of the loss kernels' tl.dot, whose operands are always fp32 (bf16/fp16 inputs are converted
# first: see _gram.py). "ieee" (fp32 FMAs) stays within the tests' 2e-5 of the reference. "tf32x3" (three TF32 tensor-core products) would
# be several times faster for the large-B feature Gram, but with it emulated in the interpreter the
# fp32 feature_loss tests fail now and then (Ortho and its gradient cancel terms of size ~B).
FP32_DOT = "ieee"

# Columns of the partial-sums buffers: every op's T <= 5 terms, padded to a power of two; and the rows
# of such a buffer that _reduce._sum_partials sums per step.
TERMS_PAD = 8
BLOCK_ROWS = 256


def _patch_interpreter_index() -> None:
    """Triton 3.6's interpreter turns a scalar into ``int`` with ``int(ndarray)``, which numpy >= 2
    rejects for the 1-element arrays it uses, so ``for i in range(0, n, BLOCK)`` with a runtime ``n``
    fails. Replace that one conversion (interpreter only; compiled kernels are not affected)."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_tldr_fast", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._tldr_fast = True
    interpreter._patch_lang_tensor = patched


if INTERPRET:
    _patch_interpreter_index()


def empty(shape: Sequence[int], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A buffer the kernels fully overwrite: NaN-filled under ``TLDR_FAST_POISON=1``, else uninitialised."""
    if os.environ.get("TLDR_FAST_POISON") == "1":
        return torch.full(tuple(shape), float("nan"), device=device, dtype=dtype)
    return torch.empty(tuple(shape), device=device, dtype=dtype)


def _is_fake(args) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(a, FakeTensor) for a in args)


def launch(kernel, grid: Sequence[int], *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, through ``wrap_triton`` whenever torch may be tracing.

    Eager calls on plain CUDA tensors launch the kernel directly: ``wrap_triton``'s higher-order-op
    dispatch costs tens of microseconds per launch, which is most of a loss op's time at B = 1024.
    Under the interpreter with fake tensors (the fake implementation of the op) nothing runs."""
    values = list(args) + list(kwargs.values())
    if INTERPRET and _is_fake(values):
        return
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not torch.compiler.is_compiling() and all(type(t) is torch.Tensor and t.is_cuda for t in tensors):
        kernel[tuple(grid)](*args, **kwargs)
    else:
        torch.library.wrap_triton(kernel)[tuple(grid)](*args, **kwargs)


NAMESPACE = "tldr_triton"


def triton_op(spec: "OpSpec | str") -> Callable:
    """Register ``fn`` as the functional op ``tldr_triton::<op>`` (no argument is mutated) of a declared op
    (its schema and fake rule), or, given a name, of a helper op with the schema of ``fn``'s annotations
    (whose fake implementation is ``fn`` itself, the launches skipped); see the module doc."""
    name, schema = (f"{NAMESPACE}::{spec}", None) if isinstance(spec, str) else (spec.qualname(NAMESPACE), spec.schema)

    def register(fn: Callable):
        if not INTERPRET:
            return torch.library.triton_op(name, fn, mutates_args=(), schema=schema)
        op = torch.library.custom_op(name, fn, mutates_args=(), schema=schema)
        op.register_fake(fn if isinstance(spec, str) else spec.fake)
        return op

    return register


# Host-side sizing on the launch path: plain Python (triton.cdiv and triton.next_power_of_2 are
# constexpr-function objects, ~10x slower to call).
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def block(n: int, lo: int = 16, hi: int = 64) -> int:
    """A power-of-two block covering ``n`` when it can, clamped to [lo, hi] (tl.dot needs >= 16)."""
    return max(lo, min(hi, next_pow2(n)))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the device; a small stand-in under the interpreter, so that tests
    exercise the persistent loops and split reductions with few programs."""
    if device.type != "cuda":
        return 2
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def compute_dtype(t: torch.Tensor) -> torch.Tensor:
    """Kernels read fp32, bf16 and fp16; anything else (fp64) is computed in fp32 (autograd casts the
    gradient back to the caller's dtype)."""
    return t if t.dtype in (torch.float32, torch.bfloat16, torch.float16) else t.float()


def weights_fp32(w: torch.Tensor) -> torch.Tensor:
    """The loss weights (checked by the op's declaration) as a contiguous fp32 vector (the kernels read
    them from device memory: no host sync, so schedules may change them between steps)."""
    return w.to(torch.float32).contiguous()
