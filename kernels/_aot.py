"""Compile every kernel launch of the ops for a GPU target without a GPU (a CI check for Hopper).

    python -m tldr_fast.kernels._aot [op ...] [--arch 90]

runs each op on small CPU tensors with the real (not interpreted) Triton kernels, replacing the launch by
an ahead-of-time compilation (Triton front end, LLVM, ptxas) of exactly that kernel variant for
``cuda:<arch>`` (twice: float arguments as fp32, as Triton's launcher types them, and as fp64, as
Inductor does under ``torch.compile``), and prints one line per distinct variant: registers, stack
(spill) bytes, shared memory. It exits
non-zero if any variant fails to compile. Needs ``TRITON_INTERPRET`` unset and Triton's NVIDIA backend;
no GPU and no driver.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from tldr_fast import kernels

_DTYPES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64", torch.int32: "i32"}


def _arg_type(v, float_type: str = "fp32") -> str:
    if isinstance(v, torch.Tensor):
        return "*" + _DTYPES[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -(2**31) <= v < 2**31 else "i64"
    if isinstance(v, float):
        return float_type
    raise TypeError(f"unsupported kernel argument {v!r}")


def _resource_usage(cubin: bytes) -> str:
    """Registers and stack-frame bytes per thread (where ptxas puts spilled registers), from cuobjdump's
    resource usage."""
    import re
    import tempfile

    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    return f"regs={regs.group(1) if regs else '?'} stack_bytes={stack.group(1) if stack else '?'}"


class _Compiler:
    """Stands in for ``torch.library.wrap_triton``: ``wrap(kernel)[grid](*args, **kw)`` compiles."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.seen: Dict[str, str] = {}
        self.failed: List[str] = []

    def __call__(self, kernel):
        return _Launcher(self, kernel)

    def compile(self, kernel, args, kwargs) -> None:
        import triton
        from triton.compiler import ASTSource

        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        bound = dict(zip(kernel.arg_names, args), **kwargs)
        signature, fp64_signature, constexprs, attrs = {}, {}, {}, {}
        for i, p in enumerate(kernel.params):
            v = bound[p.name]
            if p.is_constexpr:
                signature[p.name] = fp64_signature[p.name] = "constexpr"
                constexprs[p.name] = v
                continue
            signature[p.name] = _arg_type(v)
            fp64_signature[p.name] = _arg_type(v, "fp64")
            # the specialisation the runtime applies: 16-byte aligned pointers, ints divisible by 16
            aligned = v.data_ptr() % 16 == 0 if isinstance(v, torch.Tensor) else type(v) is int and v % 16 == 0
            if aligned and p.name not in kernel.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        key = f"{kernel.__name__}{sorted(signature.items())}{sorted(constexprs.items())}{sorted(attrs)}{options}"
        if key in self.seen:
            return
        what = f"{kernel.__name__}[{', '.join(f'{k}={v}' for k, v in {**constexprs, **options}.items())}]"
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=self.target, options=options)
            if fp64_signature != signature:
                # Inductor types Python floats as fp64 when it compiles a user kernel under torch.compile
                triton.compile(ASTSource(kernel, fp64_signature, constexprs, attrs), target=self.target, options=options)
            md = compiled.metadata
            self.seen[key] = f"ok  {_resource_usage(compiled.asm['cubin'])} smem={md.shared} warps={md.num_warps}  {what}"
        except Exception as e:  # report every failure, not just the first
            self.seen[key] = f"FAILED  {what}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
            self.failed.append(what)
        print(self.seen[key], flush=True)


class _Launcher:
    def __init__(self, compiler: _Compiler, kernel):
        self.compiler, self.kernel = compiler, kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.compiler.compile(self.kernel, args, kwargs)


def compiled_ops() -> Tuple[str, ...]:
    """The ops this checker compiles: those whose Triton module (``kernels/<op>.py``) defines
    ``compile_cases(dtype)``, representative calls that launch every kernel variant (constexpr branch)."""
    return tuple(op for op in kernels.__all__ if hasattr(importlib.import_module(f"{__package__}.{op}"), "compile_cases"))


def _cases(op: str) -> Iterator[Callable[[], object]]:
    """The calls of ``op``'s ``compile_cases``, for fp32 and bf16 inputs."""
    if op not in compiled_ops():
        raise ValueError(f"unknown op {op!r}: expected one of {compiled_ops()} (the ops whose kernels/<op>.py has compile_cases)")
    module = importlib.import_module(f"{__package__}.{op}")
    for dtype in (torch.float32, torch.bfloat16):
        yield from module.compile_cases(dtype)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ops", nargs="*", help=f"default: every op with compile_cases, {' '.join(compiled_ops())}")
    p.add_argument("--arch", type=int, default=90)
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter has no compiler to check")
    os.environ.pop("TLDR_FAST_POISON", None)  # CPU NaN fills of big buffers are just slow here
    compiler = _Compiler(a.arch)
    torch.library.wrap_triton = compiler  # what kernels._utils.launch calls
    # size grids as for an H100 (132 SMs): split paths included
    importlib.import_module(f"{__package__}._gram").num_sms = lambda device: 132
    for op in a.ops or compiled_ops():
        for case in _cases(op):
            case()
    print(f"{len(compiler.seen)} kernel variants, {len(compiler.failed)} failed")
    return 1 if compiler.failed else 0


def compile_check(*ops: str, arch: int = 90, timeout: float = 900) -> Optional[Tuple[bool, str]]:
    """Run this checker in a fresh process (the interpreter may be on in the caller's):
    ``(all compiled, output)``, or None when Triton has no NVIDIA backend/ptxas here."""
    try:
        from triton import knobs

        if not os.path.exists(knobs.nvidia.ptxas.path):
            return None
    except Exception:
        return None
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TLDR_FAST_POISON")}
    cmd = [sys.executable, "-m", __name__, *ops, "--arch", str(arch)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return r.returncode == 0, r.stdout + r.stderr


if __name__ == "__main__":
    sys.exit(main())
