"""Benchmark the method's reference-only terms, forward + backward: eager reference vs torch.compile of it.

    python benchmarks/benchmark_method_terms.py [--device cuda] [--json out.jsonl] [--quick]

``warp`` (the geometric transforms of the perturbed copies: shift-only, and shift + rotation + scale),
``mode_seek`` (paired images and latents) and ``bn_stats`` (one BatchNorm layer's input, [B, 32, 14, 14]).
These have no fused kernel: each is a handful of PyTorch ops (grid_sample, var_mean, a reduction) that
torch fuses itself; the numbers say what they cost next to the fused loss ops.
"""

import torch

from common import bench_args, measure, report

from tldr_fast import reference as ref


def main() -> None:
    args = bench_args(__doc__.splitlines()[0])
    dev = args.device
    rows = []
    for b in args.sizes:
        for chw in args.shapes:
            x = (torch.randn(b, *chw, device=dev)).tanh().requires_grad_(True)
            gen = torch.Generator(dev).manual_seed(0)
            cases = {
                ("warp", f"shift B={b} {'x'.join(map(str, chw))}"): lambda x=x: ref.warp(x, 2, 0.0, 0.0, -1.0, gen),
                ("warp", f"affine B={b} {'x'.join(map(str, chw))}"): lambda x=x: ref.warp(x, 2, 15.0, 0.1, -1.0, gen),
            }
            z = torch.randn(b, 100, device=dev)
            cases[("mode_seek", f"B={b} {'x'.join(map(str, chw))}")] = lambda x=x, z=z: ref.mode_seek(x, z)
            for (op, size), fn in cases.items():
                for impl, f in (("eager", fn), ("compile", None if args.quick else torch.compile(fn, dynamic=False))):
                    if f is None:
                        continue
                    step = lambda f=f, x=x: torch.autograd.grad(f().sum(), x)
                    rows.append(measure(op, impl, size, step, dev, 2 * x.numel() * x.element_size(), **args.timing))
        a = torch.randn(b, 32, 14, 14, device=dev, requires_grad=True)
        rm, rv = torch.zeros(32, device=dev), torch.ones(32, device=dev)
        fn = lambda a=a: ref.bn_stats(a, rm, rv)
        for impl, f in (("eager", fn), ("compile", None if args.quick else torch.compile(fn, dynamic=False))):
            if f is None:
                continue
            step = lambda f=f, a=a: torch.autograd.grad(f(), a)
            rows.append(measure("bn_stats", impl, f"B={b} 32x14x14", step, dev, 2 * a.numel() * 4, **args.timing))
    report(rows, args.json)


if __name__ == "__main__":
    main()
