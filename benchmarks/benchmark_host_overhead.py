"""Where the host time of a small loss op goes: wall-clock time per call, for each layer from a bare
Triton launch up to forward + backward of each op through autograd.

    pytest benchmarks/benchmark_host_overhead.py --benchmark-only --bench-device cuda
    python benchmarks/benchmark_host_overhead.py [the same options]

At B = 1024 the kernels take a few microseconds of GPU time, so a loop of calls without a sync is
paced by the host: each round times 300 calls back to back on the wall clock (``time.perf_counter``,
not the CUDA-event clock), and its time per call is the host cost. Rows: an empty Triton kernel
launched directly (no arguments; 16 arguments; GPU), ``torch.empty``, then each op of each fast
backend, forward under ``no_grad`` ("fwd") and forward + backward through ``torch.autograd.grad``.
On a CPU the ops' own work is host time too.
"""

import sys
import time

import pytest
import torch
from benchmark_head_loss import make_inputs as head_inputs
from benchmark_image_prior import make_images
from common import backend_or_skip

triton = pytest.importorskip("triton")
tl = triton.language

pytestmark = pytest.mark.benchmark(timer=time.perf_counter)
AXES = {"batch": {"cuda": (1024,), "cpu": (1024,), "smoke": (16,)}}
CALLS = 300  # calls per round


@triton.jit
def _empty_kernel():
    pass


@triton.jit
def _args_kernel(p0, p1, p2, p3, p4, p5, p6, p7, n0, n1, n2, n3, f0, f1, f2, f3, B: tl.constexpr):
    pass


def calls(bench):
    return CALLS if bench.timed else 1


@pytest.mark.parametrize("args", (0, 16))
def test_launch(bench, device, args):
    if device != "cuda":
        pytest.skip("a bare Triton launch needs a GPU")
    t = [torch.empty(16, device=device) for _ in range(8)]
    if args == 0:
        launch = lambda: _empty_kernel[(1,)]()  # noqa: E731
    else:
        launch = lambda: _args_kernel[(1,)](*t, 1, 2, 3, 4, 0.5, 1.5, 2.5, 3.5, B=16)  # noqa: E731
    bench(launch, "host", "triton", f"launch, {args} args", iterations=calls(bench), baseline=None)


def test_empty(bench, device):
    bench(
        lambda: torch.empty(1024, device=device),
        "host",
        "torch",
        "empty [1024]",
        iterations=calls(bench),
        baseline=None,
    )


@pytest.mark.parametrize("backward", (False, True), ids=("fwd", "fwd+bwd"))
@pytest.mark.parametrize("op", ("head_loss", "feature_loss", "image_prior", "perturb"))
@pytest.mark.parametrize("impl", ("triton", "extension"))
def test_op(bench, device, batch, impl, op, backward):
    ops = backend_or_skip(impl, device, bench.timed)
    if not hasattr(ops, op):
        pytest.skip(f"backend {impl!r} has no {op}")
    logits, target, labels, features, w_head = head_inputs(batch, device)
    images = make_images(batch, (1, 28, 28), device)
    w_feat, w_prior = torch.tensor([1.0, 0.1, 0.0], device=device), torch.tensor([1e-3, 1.0, 0.0], device=device)
    forward, leaves = {  # op: (the loss, the leaves of its backward)
        "head_loss": (lambda: ops.head_loss(logits, target, labels, features, w_head, True)[0], (logits, features)),
        "feature_loss": (lambda: ops.feature_loss(features, w_feat)[0], (features,)),
        "image_prior": (lambda: ops.image_prior(images, w_prior, -1.0, 1.0)[0], (images,)),
        "perturb": (lambda: ops.perturb(images, 0.1, -1.0, 1.0, "rademacher", 7).sum(), (images,)),
    }[op]

    def step():
        if backward:
            return torch.autograd.grad(forward(), leaves)
        with torch.no_grad():
            return forward()

    case = f"{op} {'fwd+bwd' if backward else 'fwd (no_grad)'} B={batch}"
    bench(step, "host", impl, case, iterations=calls(bench), baseline=None)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--benchmark-only", *sys.argv[1:]]))
