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
import os
import subprocess
import sys
from functools import partial
from typing import Dict, List, Optional, Tuple

import torch

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


def _cases(op: str):
    """Representative calls of each op: the dtypes and shapes that select every constexpr branch."""
    import torch.nn.functional as F

    from tldr_fast import kernels

    for dtype in (torch.float32, torch.bfloat16):
        if op == "head_loss":
            w = torch.ones(5)
            for b, k, d, variants in ((1024, 10, 256, "full"), (4099, 1000, 512, "gn"), (65536, 10, 256, "gn")):
                labels = torch.zeros(b, dtype=torch.int64)
                condition = F.one_hot(labels, k).to(dtype)
                feats = torch.zeros(b, d, dtype=dtype)
                z2 = torch.zeros(2 * b, k, dtype=dtype)
                yield partial(kernels.head_loss, z2, condition, labels, feats, w, True)
                if variants == "full":
                    yield partial(kernels.head_loss, z2[:b], condition, labels, feats, w, False)
                    yield partial(kernels.head_loss, z2, condition, labels, None, w, True)
        elif op == "feature_loss":
            for b, d in ((1024, 256), (65536, 256), (300, 4096)):
                yield partial(kernels.feature_loss, torch.ones(b, d, dtype=dtype), torch.ones(3))
            labels = torch.zeros(1024, dtype=torch.int64)
            yield partial(kernels.feature_loss, torch.ones(1024, 256, dtype=dtype), torch.ones(3), labels, 10)
        elif op == "image_prior":
            for shape in ((1024, 1, 28, 28), (4, 3, 224, 300)):
                yield partial(kernels.image_prior, torch.zeros(shape, dtype=dtype), torch.ones(3), -1.0, 1.0)
                moments = torch.ones(2, shape[1])
                yield partial(kernels.image_prior, torch.zeros(shape, dtype=dtype), torch.ones(3), -1.0, 1.0, moments)
        elif op == "perturb":
            x = torch.zeros(64, 3, 32, 32, dtype=dtype, requires_grad=True)
            theta = torch.eye(2, 3).repeat(64, 1, 1)  # [B, 2, 3]

            def forward_backward(x: torch.Tensor, kind: str, *warp) -> None:
                kernels.perturb(x, 0.1, -1.0, 1.0, kind, 1, *warp).sum().backward()

            for kind in ("rademacher", "uniform", "gaussian"):
                for warp in ((), (theta, "bilinear"), (theta, "nearest")):
                    yield partial(forward_backward, x, kind, *warp)
        elif op == "bn_stats":

            def value_backward(x: torch.Tensor) -> None:
                c = x.shape[1]
                kernels.bn_stats(x, torch.zeros(c), torch.ones(c)).backward()

            # [N, C] (channels contiguous, several samples per tile; one sample: M = 1), odd and large
            # spatial sizes, one channel
            shapes = ((1024, 256), (33, 20), (1, 5), (64, 512, 7, 7), (8, 64, 56, 56), (4, 12, 31), (2, 1, 28, 28))
            for shape in shapes:
                yield partial(value_backward, torch.zeros(shape, dtype=dtype, requires_grad=True))
        elif op == "mode_seek":

            def seek_backward(x: torch.Tensor) -> None:
                kernels.mode_seek(x, torch.ones(x.shape[0], 100)).backward()

            # even and odd B; one pair per program (P >= 1024) and several split programs per pair
            # (few pairs, large images); several pairs per tile (small P)
            shapes = ((1024, 1, 28, 28), (4097, 3, 32, 32), (2, 3, 224, 224), (33, 50))
            for shape in shapes:
                yield partial(seek_backward, torch.zeros(shape, dtype=dtype, requires_grad=True))
        else:
            raise ValueError(f"unknown op {op!r}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ops", nargs="*", default=["head_loss", "feature_loss", "image_prior", "perturb", "bn_stats", "mode_seek"])
    p.add_argument("--arch", type=int, default=90)
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter has no compiler to check")
    os.environ.pop("TLDR_FAST_POISON", None)  # CPU NaN fills of big buffers are just slow here
    compiler = _Compiler(a.arch)
    torch.library.wrap_triton = compiler  # what kernels._utils.launch calls
    import importlib

    # size grids as for an H100 (132 SMs): split paths included
    importlib.import_module(f"{__package__}._gram").num_sms = lambda device: 132
    for op in a.ops:
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
