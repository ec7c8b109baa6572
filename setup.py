"""Build script: the Python package, plus the optional C++/CUDA extension ``tldr_fast._C`` from csrc/.

The project metadata lives in pyproject.toml; this file only adds the extension:

* a ``CUDAExtension`` (CPU and CUDA kernels) when torch has CUDA and nvcc is found, else a ``CppExtension``
  (CPU kernels only); ``TLDR_FAST_BUILD_CUDA=auto|0|1`` overrides, ``TORCH_CUDA_ARCH_LIST`` picks the GPU
  architectures (default "8.0;9.0"), ``TLDR_FAST_BUILD_EXT=0`` skips the extension;
* built with ninja from ``csrc/*.cpp`` and ``csrc/cpu/*.cpp`` (and ``csrc/cuda/*.cu`` with CUDA).

The extension needs torch at build time, so install with ``pip install --no-build-isolation -e .`` (an
isolated build environment has no torch). If the extension cannot be built, the pure-Python package is
installed anyway, with one warning; ``tldr_fast.extension`` then builds it just in time on first use.
"""

import importlib.util
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def warn(message: str) -> None:
    print(f"\nWARNING (tldr_fast): {message}\n", file=sys.stderr)


def build_config():
    """tldr_fast/build.py, loaded by path (not through the package): the one place that knows the
    extension's sources and flags, shared with the just-in-time build."""
    name = "_tldr_fast_build_config"
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tldr_fast", "build.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def extension():
    """``(ext_modules, cmdclass)`` for the extension, or ``([], {})`` with a warning when it cannot be built."""
    if os.environ.get("TLDR_FAST_BUILD_EXT", "1").strip().lower() in ("0", "off", "false", "no"):
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as e:
        warn(
            f"torch is not importable in the build environment ({e}): installing without the C++/CUDA "
            "extension. Use `pip install --no-build-isolation -e .` to build it, or let it build just in "
            "time on first use of backend='extension'."
        )
        return [], {}
    cfg = build_config()
    try:
        with_cuda = cfg.build_with_cuda()
        args = {"cxx": cfg.cxx_flags(with_cuda)}
        if with_cuda:
            args["nvcc"] = cfg.nvcc_flags()
    except (RuntimeError, ValueError) as e:  # TLDR_FAST_BUILD_CUDA=1 without CUDA, a bad arch list
        warn(f"{e}: installing without the C++/CUDA extension.")
        return [], {}

    class BuildExtensionOrWarn(BuildExtension):
        """A failed compile leaves the pure-Python package installable: one warning, no ``_C``."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # compiler missing, compile error, ...
                last = [ln for ln in str(e).splitlines() if ln.strip()][-1:] or [type(e).__name__]
                warn(
                    f"building the C++/CUDA extension failed ({last[0]}): installing without it. "
                    "tldr_fast.extension will try a just-in-time build on first use (TLDR_FAST_JIT=0 disables it)."
                )

    ext_class = CUDAExtension if with_cuda else CppExtension
    srcs = [os.path.relpath(s, ROOT) for s in cfg.sources(with_cuda, os.path.join(ROOT, "csrc"))]
    ext = ext_class("tldr_fast._C", srcs, extra_compile_args=args)
    return [ext], {"build_ext": BuildExtensionOrWarn.with_options(use_ninja=True)}


ext_modules, cmdclass = extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
