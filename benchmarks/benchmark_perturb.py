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
from common import bench_args, implementations, run

EPS, KIND = 0.1, "rademacher"


def main() -> None:
    args = bench_args(__doc__.splitlines()[0])

    def case(b, chw, backward):
        def build(fn):
            x = make_images(b, chw, args.device)
            up = torch.ones_like(x)

            def step():
                with torch.set_grad_enabled(backward):
                    y = fn(x, EPS, -1.0, 1.0, KIND, 1234)
                return torch.autograd.grad(y, x, up) if backward else y

            return step, x.numel() * x.element_size() * (4 if backward else 2)

        return f"B={b} {'x'.join(map(str, chw))} {'fwd+bwd' if backward else 'fwd'}", build

    cases = [case(b, chw, bwd) for chw in args.shapes for b in args.sizes for bwd in (False, True)]
    run("perturb", args, implementations("perturb", args.device, args.quick), cases)


if __name__ == "__main__":
    main()
