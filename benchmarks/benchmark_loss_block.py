"""The whole TLDR loss block as in one training step, forward + backward: head_loss (clean and perturbed
logits, head grad-norm) + feature_loss + image_prior, and perturb of the images.

    pytest benchmarks/benchmark_loss_block.py --benchmark-only [--bench-batch 1024 --bench-chw 1x28x28 ...]
    python benchmarks/benchmark_loss_block.py [the same options]

Implementations: the eager reference, torch.compile of the reference block ("compile"; "compile-ro" with
mode="reduce-overhead", torch's own CUDA graphs: GPU only), the Triton ops and the extension's
("extension", which takes Triton's perturb, as invert does, and the reference's on a CPU) each eager,
under torch.compile(fullgraph=True) and replayed from a CUDA graph. K = 10, D = 256. The perturbed images'
gradient (what the classifier would send back) is a fixed tensor. Bytes: every input read once and
every gradient and output written once. Goals on the GPU at B = 1024: >= 10x eager, >= 3x torch.compile.
"""

import sys
from typing import Callable

import pytest
import torch
from benchmark_head_loss import make_inputs as head_inputs
from benchmark_image_prior import make_images
from benchmark_perturb import EPS, KIND, NO_GRAPH, SEED
from common import GRAPH, backend_or_skip, nbytes

from tldr_fast import reference

IMPLS = ("eager", "compile", "compile-ro", "triton", "triton+compile", "triton" + GRAPH,
         "extension", "extension+compile", "extension" + GRAPH, "eager" + GRAPH)  # fmt: skip


def make_block(ops) -> Callable:
    """The loss block written against one backend's ops (``ops.head_loss`` etc.)."""

    def block(logits, target, labels, features, images, w_head, w_feat, w_prior):
        perturbed = ops.perturb(images, EPS, -1.0, 1.0, KIND, SEED)
        loss = (
            ops.head_loss(logits, target, labels, features, w_head, True)[0]
            + ops.feature_loss(features, w_feat)[0]
            + ops.image_prior(images, w_prior, -1.0, 1.0)[0]
        )
        return loss, perturbed

    return block


def block_impl(impl: str, device: str, timed: bool) -> Callable:
    """The block of ``impl`` (``IMPLS``; "+graph" is the bench fixture's), or a pytest skip."""
    if impl == "eager" + GRAPH:
        pytest.skip(NO_GRAPH)
    name, _, mode = impl.removesuffix(GRAPH).partition("+")
    if name == "compile-ro" and device != "cuda":
        pytest.skip("mode='reduce-overhead' is torch.compile's CUDA graphs: GPU only")
    if name in ("eager", "compile", "compile-ro"):
        block = make_block(reference)
        if name == "eager":
            return block
        return torch.compile(block, dynamic=False, mode="reduce-overhead" if name == "compile-ro" else None)
    ops = backend_or_skip(name, device, timed, fallback=True)
    if mode != "compile":
        return make_block(ops)
    if ops.perturb is reference.perturb:  # the extension on a CPU without the Triton interpreter
        pytest.skip(
            f"{name!r} takes the reference perturb here, which fullgraph compile refuses (a torch.Generator per call)"
        )
    return torch.compile(make_block(ops), fullgraph=True, dynamic=False)


@pytest.mark.parametrize("impl", IMPLS)
def test_loss_block(bench, device, batch, chw, dtype, impl):
    fn = block_impl(impl, device, bench.timed)
    logits, target, labels, features, w_head = head_inputs(batch, device, dtype)
    images = make_images(batch, chw, device, dtype)
    w_feat = torch.tensor([1.0, 0.1, 0.0], device=device)
    w_prior = torch.tensor([1e-3, 1.0, 0.0], device=device)
    up = torch.randn_like(images)
    leaves = (logits, features, images)

    def step():
        loss, perturbed = fn(logits, target, labels, features, images, w_head, w_feat, w_prior)
        return torch.autograd.grad((loss, perturbed), leaves, (None, up))

    moved = 2 * nbytes(*leaves) + 2 * nbytes(images) + nbytes(target, labels)
    bench(step, "loss_block", impl, f"B={batch} {'x'.join(map(str, chw))}", dtype, bytes=moved)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--benchmark-only", *sys.argv[1:]]))
