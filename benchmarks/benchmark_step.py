"""One whole TLDR training step (generator forward, one 2B classifier forward/backward, all losses,
Adam), built from the objects ``invert`` builds, for each backend and variant.

    pytest benchmarks/benchmark_step.py --benchmark-only [--bench-batch 1024 --bench-impl eager-head,extension-head ...]
    python benchmarks/benchmark_step.py [the same options]

Two settings differ from a default ``invert``: TF32 matmuls are on (on a GPU), and the classifier takes
[0, 1] images (``preprocess="unit"``, no normalisation). The classifier is DESIGN.md §5's: a 3-conv CNN
with a 256-wide penultimate layer. Variants ("impl"): backend, grad-norm ("full": the paper's double
backward; "head": the closed form), bf16 autocast, ``compile=True`` and ``cuda_graph=True`` (GPU only).
The baseline of ``x_eager`` is "eager-head" (the reference losses, ``InversionConfig``'s defaults);
every row gives ``images_per_s``.
"""

import contextlib
import sys

import pytest
import torch
import torch.nn as nn
from common import backend_or_skip

from tldr_fast.classifier import FrozenClassifier
from tldr_fast.config import InversionConfig
from tldr_fast.generator import ConditionedGenerator
from tldr_fast.step import TLDRObjective

AXES = {"batch": {"cuda": (1024, 4096), "cpu": (256,), "smoke": (8,)}}
VARIANTS = {  # impl label: (backend, grad_norm, dtype, InversionConfig.compile, InversionConfig.cuda_graph)
    "eager-full": ("torch", "full", "float32", False, False),
    "eager-head": ("torch", "head", "float32", False, False),
    "compile-head": ("torch", "head", "float32", True, False),
    "triton-head": ("triton", "head", "float32", False, False),
    "extension-head": ("extension", "head", "float32", False, False),
    "triton-head-bf16": ("triton", "head", "bfloat16", False, False),
    "extension-head-bf16": ("extension", "head", "bfloat16", False, False),
    "eager-head-graph": ("torch", "head", "float32", False, True),
    "triton-head-graph": ("triton", "head", "float32", False, True),
    "extension-head-graph": ("extension", "head", "float32", False, True),
    "triton-head-compile": ("triton", "head", "float32", True, False),
    "extension-head-compile": ("extension", "head", "float32", True, False),
    "triton-head-compile-graph": ("triton", "head", "float32", True, True),
    "extension-head-compile-graph": ("extension", "head", "float32", True, True),
}


def cnn(c: int, k: int = 10, d: int = 256) -> nn.Module:
    """The benchmark target: 3 conv layers, global pooling, a 256-wide penultimate layer, a linear head."""
    return nn.Sequential(
        nn.Conv2d(c, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(512, d), nn.ReLU(), nn.Linear(d, k),
    )  # fmt: skip


def step_fn(shape, b, backend, grad_norm, dtype, compile_modules, cuda_graph, device, timed):
    """A closure running one full optimisation step, built exactly as ``invert`` builds it."""
    cfg = InversionConfig(batch_size=b, grad_norm=grad_norm, dtype=dtype, backend=backend, device=device, steps=10**6,
                          compile=compile_modules, cuda_graph=cuda_graph)  # fmt: skip
    dev = torch.device(device)
    torch.manual_seed(0)
    target = FrozenClassifier(cnn(shape[0]), 10, shape, "unit", None, grad_norm == "full", quiet=True, device=dev)
    g = ConditionedGenerator(10, shape, cfg.nz, cfg.ngf).to(dev)
    objective = TLDRObjective(g, target, cfg, backend_or_skip(backend, device, timed, fallback=True), dev)
    attached = contextlib.ExitStack()  # the classifier attached for the closure's life, as for invert's run
    attached.enter_context(target.attached())
    opt = torch.optim.Adam(g.parameters(), lr=cfg.lr, betas=cfg.betas)
    params = list(g.parameters())
    counter = [0]

    def step():
        loss, _ = objective(counter[0])
        opt.zero_grad(set_to_none=True)
        loss.backward(inputs=params)
        opt.step()
        counter[0] += 1

    step.attached = attached  # the classifier stays attached while the closure lives
    return step


@pytest.fixture
def tf32(device):
    """TF32 matmuls and convolutions on a GPU, for one row."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("impl", VARIANTS)
def test_step(bench, tf32, device, batch, chw, impl):
    backend, grad_norm, dtype, compile_modules, cuda_graph = VARIANTS[impl]
    if cuda_graph and device != "cuda":
        pytest.skip("cuda_graph=True needs a GPU")
    step = step_fn(chw, batch, backend, grad_norm, dtype, compile_modules, cuda_graph, device, bench.timed)
    case = f"{'x'.join(map(str, chw))} B={batch}"
    bench(step, "step", impl, case, items=batch, unit="images", baseline="eager-head")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--benchmark-only", *sys.argv[1:]]))
