"""head_loss, Triton-specific: multi-block online softmax (K = 1000), the split Gram reduction, extreme
logits, bitwise determinism, the weights' gradient and torch.library registration (compilation for
Hopper: test_kernels_aot.py). Cross-backend value/gradient checks live in test_head_loss.py."""

import importlib

import pytest
import torch

from tests.helpers import DEVICE, assert_close
from tests.test_head_loss import check_backend, make_inputs

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("triton_backend")  # skipped wherever the Triton backend cannot run

op_module = importlib.import_module("tldr_fast.kernels.head_loss")
gram_module = importlib.import_module("tldr_fast.kernels._gram")


@pytest.mark.parametrize("soft", [False, True])
def test_many_classes_multi_block_softmax(triton_backend, gen, soft):
    """K = 1000 spans many class blocks in every kernel (online logsumexp, grad-norm passes)."""
    logits, target, labels, feats, w = make_inputs(gen, 19, 1000, 24, soft=soft)
    check_backend(triton_backend, logits, target, labels, feats, w, head_bias=True)


def test_split_gram_path(triton_backend, gen):
    """A batch large enough that the Gram reduction is split over programs and summed by a second
    kernel (the shape is chosen so that the plan splits; asserted, so the test cannot go stale)."""
    b, k, d = 150, 10, 40
    assert gram_module.plan_gram(b, k, d, gram_module.EXTRA_ONES, torch.device(DEVICE)).splits > 1
    logits, target, labels, feats, w = make_inputs(gen, b, k, d, soft=True)
    check_backend(triton_backend, logits, target, labels, feats, w, head_bias=True)


def test_extreme_logits_are_stable(triton_backend, gen):
    """Logits of magnitude ~300: exp overflows unless the softmax is max-shifted per block."""
    logits, target, labels, feats, w = make_inputs(gen, 9, 70, 5, soft=True)
    check_backend(triton_backend, logits * 100, target, labels, feats, w, head_bias=True)


def test_bitwise_deterministic(triton_backend, gen):
    logits, target, labels, feats, w = make_inputs(gen, 150, 10, 40, soft=True)
    runs = []
    for _ in range(2):
        z, f = logits.clone().requires_grad_(True), feats.clone().requires_grad_(True)
        loss, terms = triton_backend.head_loss(z, target, labels, f, w, True)
        loss.backward()
        runs.append((loss, terms, z.grad, f.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_weights_gradient_is_the_terms(triton_backend, gen):
    logits, target, labels, feats, w = make_inputs(gen, 13, 10, 8)
    w = w.clone().requires_grad_(True)
    loss, terms = triton_backend.head_loss(logits, target, labels, feats, w, True)
    (loss * 1.5).backward()
    assert not terms.requires_grad
    assert_close(w.grad, 1.5 * terms, what="d/dweights")


@pytest.mark.parametrize("with_features", [True, False])
def test_opcheck(gen, with_features):
    logits, target, labels, feats, w = make_inputs(gen, 7, 5, 6, soft=True)
    f = feats.requires_grad_(True) if with_features else None
    torch.library.opcheck(op_module._head_loss_op, (logits.requires_grad_(True), target, labels, f, w, with_features))


def test_torch_compile_fullgraph(triton_backend, gen):
    """No graph break around the op; the compiled forward and backward equal eager (the Inductor
    lowering of the kernels themselves is checked by the GPU test in test_head_loss.py)."""
    logits, target, labels, feats, w = make_inputs(gen, 33, 10, 16, soft=True)

    def block(z, f):
        loss, terms = triton_backend.head_loss(z, target, labels, f, w, True)
        return loss * 2.0, terms

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = []
    for fn in (compiled, block):
        z, f = logits.clone().requires_grad_(True), feats.clone().requires_grad_(True)
        loss, terms = fn(z, f)
        loss.backward()
        out.append((terms, z.grad, f.grad))
    for a, b, what in zip(*out, ("terms", "d/dlogits", "d/dfeatures")):
        assert_close(a, b, what=what)
