"""Benchmark image_prior, forward + backward: eager reference, torch.compile(reference), Triton, CUDA.

    python benchmarks/benchmark_image_prior.py [--device cuda] [--json out.jsonl] [--quick]

Images 1x28x28 and 3x32x32, B in {256, 1024, 8192, 65536}; TV and pixel range, and "+moments" rows
with the Moments term too (per-channel mean/std against given training moments: a second pass). GB/s counts the bytes the op must move at
least (images read once, their gradient written once): compare with the printed copy bandwidth (the
goal is >= 70% of it at large B). Sizes labelled "fwd" time the forward call alone: for the fused
backends that is the whole kernel (loss and gradient in one read and one write); for the reference it
is the loss only, and the gradient comes in the backward. fwd+bwd adds autograd's backward, which for
the fused backends scales the saved gradient by the upstream one (a second read and write).
"""

import torch

from common import bench_args, implementations, run



def make_images(b: int, chw, device: str, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(b)
    return (1.2 * torch.randn(b, *chw, generator=g)).tanh().to(device, dtype).requires_grad_(True)


def main() -> None:
    args = bench_args(__doc__.splitlines()[0])
    w = torch.tensor([1e-3, 1.0, 1.0], device=args.device)

    def case(b, chw, backward, with_moments):
        def build(fn):
            x = make_images(b, chw, args.device)
            moments = torch.tensor([[0.13] * chw[0], [0.31] * chw[0]], device=args.device) if with_moments else None
            nbytes = 2 * x.numel() * x.element_size()
            if backward:
                return (lambda: torch.autograd.grad(fn(x, w, -1.0, 1.0, moments)[0], x)), nbytes
            return (lambda: fn(x, w, -1.0, 1.0, moments)), nbytes

        kind = "fwd+bwd" if backward else "fwd"
        return f"{kind} B={b} {'x'.join(map(str, chw))}{' +moments' if with_moments else ''}", build

    cases = [case(b, chw, bwd, m) for chw in args.shapes for b in args.sizes for m in (False, True) for bwd in (False, True)]
    run("image_prior", args, implementations("image_prior", args.device, args.quick), cases)


if __name__ == "__main__":
    main()
