"""Benchmark the whole TLDR loss block as in one training step, forward + backward: head_loss (clean and
perturbed logits, head grad-norm) + feature_loss + image_prior, and perturb of the images.

    python benchmarks/benchmark_loss_block.py [--device cuda] [--json out.jsonl] [--quick]

Rows: the eager reference, torch.compile of the reference block (on a GPU also with
mode="reduce-overhead", torch's own CUDA graphs), the Triton ops eager and under
torch.compile(fullgraph=True), and the CUDA extension; B in {256, 1024, 8192, 65536}, images 1x28x28
and 3x32x32, K = 10, D = 256. The perturbed images' gradient (what the classifier would send back) is a
fixed tensor. GB/s counts every input read once and every gradient and output written once. Goals on
the GPU at B = 1024: >= 10x eager, >= 3x torch.compile.
"""

from typing import Callable, List, Tuple

import torch

from benchmark_head_loss import make_inputs as head_inputs
from benchmark_image_prior import make_images
from common import bench_args, run
from tldr_fast import reference as ref
from tldr_fast.backends import BackendUnavailable, resolve

EPS, SEED = 0.1, 1234


def make_block(ops) -> Callable:
    """The loss block written against one backend's ops (``ops.head_loss`` etc.)."""

    def block(logits, target, labels, features, images, w_head, w_feat, w_prior):
        perturbed = ops.perturb(images, EPS, -1.0, 1.0, "rademacher", SEED)
        loss = (
            ops.head_loss(logits, target, labels, features, w_head, True)[0]
            + ops.feature_loss(features, w_feat)[0]
            + ops.image_prior(images, w_prior, -1.0, 1.0)[0]
        )
        return loss, perturbed

    return block


def implementations(device: str, quick: bool) -> List[Tuple[str, Callable, str]]:
    out = [("eager", make_block(ref), "")]
    out.append(("compile", None, "skipped with --quick") if quick else ("compile", torch.compile(make_block(ref), dynamic=False), ""))
    if device.startswith("cuda"):  # torch.compile's own CUDA graphs: the reference's fairest graph-replay row
        ro = None if quick else torch.compile(make_block(ref), mode="reduce-overhead", dynamic=False)
        out.append(("compile-ro", ro, "skipped with --quick" if quick else ""))
    for name in ("triton", "cuda"):  # "cuda" has no perturb: it takes Triton's, as invert does
        try:
            ops = resolve(name, device)
        except BackendUnavailable as e:
            out.append((name, None, f"unavailable: {str(e)[:100]}"))
            continue
        out.append((name, make_block(ops), ""))
        if quick:
            out.append((f"{name}+compile", None, "skipped with --quick"))
        else:
            out.append((f"{name}+compile", torch.compile(make_block(ops), fullgraph=True, dynamic=False), ""))
    return out


def main() -> None:
    args = bench_args(__doc__.splitlines()[0])
    w_feat = torch.tensor([1.0, 0.1], device=args.device)
    w_prior = torch.tensor([1e-3, 1.0, 0.0], device=args.device)

    def case(b, chw):
        def build(fn):
            logits, target, labels, features, w_head = head_inputs(b, args.device)
            images = make_images(b, chw, args.device)
            up = torch.randn_like(images)
            leaves = (logits, features, images)
            nbytes = sum(2 * t.numel() * t.element_size() for t in leaves) + 2 * images.numel() * images.element_size()
            nbytes += target.numel() * target.element_size() + labels.numel() * labels.element_size()

            def step():
                loss, perturbed = fn(logits, target, labels, features, images, w_head, w_feat, w_prior)
                return torch.autograd.grad((loss, perturbed), leaves, (None, up))

            return step, nbytes

        return f"B={b} {'x'.join(map(str, chw))}", build

    run("loss_block", args, implementations(args.device, args.quick), [case(b, chw) for chw in args.shapes for b in args.sizes])


if __name__ == "__main__":
    main()
