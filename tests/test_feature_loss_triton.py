"""feature_loss, Triton-specific: the split D x D Gram, the B x B Gram over several tiles (masked by
labels too), clamped norms, bitwise determinism, the weights' gradient and torch.library registration
(compilation for Hopper: test_kernels_aot.py). Cross-backend value/gradient checks live in
test_feature_loss.py."""

import importlib

import pytest
import torch

from tests.helpers import DEVICE, assert_close, loss_and_grad, rand, rand_weights
from tests.test_feature_loss import T, check_backend
from tldr_fast.reference import NORM_EPS

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("triton_backend")  # skipped wherever the Triton backend cannot run

op_module = importlib.import_module("tldr_fast.kernels.feature_loss")
gram_module = importlib.import_module("tldr_fast.kernels._gram")


def test_split_gram_path(triton_backend, gen):
    """D x D Gram (with S in its extra column) split over row ranges and summed by a second kernel."""
    b, d = 2 * gram_module._MIN_SPLIT_ROWS + 5, 16  # enough rows to split, on a GPU too
    assert gram_module.plan_gram(b, d, d, gram_module.EXTRA_INV, torch.device(DEVICE)).splits > 1
    check_backend(triton_backend, rand(gen, b, d) + 0.3, rand_weights(gen, T), rtol=2e-5, atol=2e-6)


def test_many_partial_rows(triton_backend, gen):
    """More partial-sum rows than the finishing program reads per step (a tall, thin batch)."""
    b, d = 4200, 3
    assert -(-b // op_module._NORM_ROWS) > op_module.BLOCK_ROWS  # rows written by the norms kernel alone
    check_backend(triton_backend, rand(gen, b, d) + 0.3, rand_weights(gen, T), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("b,d", [(70, 100), (40, 40), (40, 41)])
def test_gram_choice_boundary_and_tiles(triton_backend, gen, b, d):
    """D > B uses the B x B Gram (here 2 x 2 tiles of it, and its quadratic form for Cos); D = B the
    D x D one."""
    check_backend(triton_backend, rand(gen, b, d) + 0.3, rand_weights(gen, T), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("b,d", [(9, 16), (6, 20)])  # both Gram branches
def test_clamped_norms(triton_backend, gen, b, d):
    """A zero row and a row with 0 < ||phi|| < eps: the norm is clamped, u = phi / eps and the
    gradient has no projection term, exactly as the reference's autograd."""
    phi = rand(gen, b, d)
    phi[1] = 0
    phi[4] *= 0.1 * NORM_EPS / phi[4].norm()
    check_backend(triton_backend, phi, torch.ones(T, device=DEVICE), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("by_class", [False, True])
def test_bitwise_deterministic(triton_backend, gen, by_class):
    phi, w = rand(gen, 300, 16), rand_weights(gen, T)
    labels = torch.randint(0, 10, (300,), generator=gen).to(DEVICE) if by_class else None
    runs = [loss_and_grad(lambda f: triton_backend.feature_loss(f, w, labels, 10), phi) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_weights_gradient_is_the_terms(triton_backend, gen):
    w = rand_weights(gen, T).requires_grad_(True)
    loss, terms = triton_backend.feature_loss(rand(gen, 12, 7), w)
    (loss * 0.5).backward()
    assert not terms.requires_grad
    assert_close(w.grad, 0.5 * terms, what="d/dweights")


@pytest.mark.parametrize("b,d", [(6, 5), (3, 9)])
@pytest.mark.parametrize("by_class", [False, True])
def test_opcheck(gen, b, d, by_class):
    labels = torch.randint(0, 3, (b,), generator=gen).to(DEVICE) if by_class else None
    torch.library.opcheck(
        op_module._feature_loss_op, (rand(gen, b, d).requires_grad_(True), rand_weights(gen, T), labels, 3)
    )


def test_by_class_over_several_tiles(triton_backend, gen):
    """B past one tile in both directions of the masked Gram and of the label count, labels interleaved
    across tiles, int32 labels."""
    b = 259  # 3 blocks of the N2 count (128 labels each), 5 x 5 tiles of the Gram
    phi = rand(gen, b, 45) + 0.2
    labels = (torch.arange(b, dtype=torch.int32) % 4).to(DEVICE)
    check_backend(triton_backend, phi, rand_weights(gen, T), labels, 4, rtol=2e-5, atol=2e-6)


def test_bad_labels_are_clear_errors(triton_backend, gen):
    phi, w = rand(gen, 4, 3), rand_weights(gen, T)
    with pytest.raises(ValueError, match="labels must be"):
        triton_backend.feature_loss(phi, w, torch.zeros(4, device=DEVICE), 2)
    with pytest.raises(ValueError, match="labels must be"):
        triton_backend.feature_loss(phi, w, torch.zeros(3, dtype=torch.int64, device=DEVICE), 2)


def test_too_small_batch_is_a_clear_error(triton_backend, gen):
    with pytest.raises(ValueError, match="B >= 2"):
        triton_backend.feature_loss(rand(gen, 1, 8), rand_weights(gen, T))


@pytest.mark.parametrize("by_class", [False, True])
def test_torch_compile_fullgraph(triton_backend, gen, by_class):
    phi = rand(gen, 33, 8)
    w = rand_weights(gen, T)
    labels = torch.randint(0, 3, (33,), generator=gen).to(DEVICE) if by_class else None

    def block(f):
        return triton_backend.feature_loss(f.relu(), w, labels, 3)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = [loss_and_grad(fn, phi)[1:] for fn in (compiled, block)]  # terms, d/dfeatures
    for a, b, what in zip(*out, ("terms", "d/dfeatures")):
        assert_close(a, b, what=what)
