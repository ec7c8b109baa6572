"""Benchmark perturb: eager reference, torch.compile(reference), Triton, CUDA; forward alone and
forward + backward.

    python benchmarks/benchmark_perturb.py [--device cuda] [--json out.jsonl] [--quick]

Rademacher noise (the default) on images 1x28x28 and 3x32x32, B in {256, 1024, 8192, 65536}. GB/s
counts the bytes the op must move at least: forward, images read and output written; forward +
backward, also the upstream gradient read and the images' gradient written. Compare with the printed
copy bandwidth (the goal is >= 70% of it at large B).
"""

import torch

from benchmark_image_prior import make_images
from common import Row, bench_args, copy_bandwidth, implementations, measure, report

EPS, KIND = 0.1, "rademacher"


def main() -> None:
    args = bench_args(__doc__.splitlines()[0])
    rows = []
    for name, fn, note in implementations("perturb", args.device, args.quick):
        for chw in args.shapes:
            for b in args.sizes:
                for passes in ("fwd", "fwd+bwd"):
                    size = f"B={b} {'x'.join(map(str, chw))} {passes}"
                    if fn is None:
                        rows.append(Row("perturb", name, size, None, note=note))
                        continue
                    x = make_images(b, chw, args.device)
                    up = torch.ones_like(x)
                    nbytes = x.numel() * x.element_size() * (2 if passes == "fwd" else 4)

                    def step(backward=passes != "fwd"):
                        with torch.set_grad_enabled(backward):
                            y = fn(x, EPS, -1.0, 1.0, KIND, 1234)
                        return torch.autograd.grad(y, x, up) if backward else y

                    rows.append(measure("perturb", name, size, step, args.device, nbytes, **args.timing))
    bw = copy_bandwidth(args.device)
    print(f"device copy bandwidth: {f'{bw:.0f} GB/s' if bw else 'n/a'}")
    report(rows, args.json)


if __name__ == "__main__":
    main()
