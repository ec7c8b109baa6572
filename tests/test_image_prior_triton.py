"""image_prior, Triton-specific: blocks that split image lines, launches in chunks, degenerate image
sizes, the Moments statistics over many programs, bitwise determinism, the weights' gradient and
torch.library registration (compilation for Hopper: test_kernels_aot.py). Cross-backend checks live in
test_image_prior.py."""

import importlib

import pytest
import torch

from tests.helpers import DEVICE, assert_close, loss_and_grad, rand, rand_weights
from tests.test_image_prior import check_backend, rand_moments

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("triton_backend")  # skipped wherever the Triton backend cannot run

op_module = importlib.import_module("tldr_fast.kernels.image_prior")


def test_blocks_split_image_lines(triton_backend, gen):
    """More pixels than one program's block, with odd H and W: block edges fall inside image lines, so
    the neighbours of a block's first and last pixels are another program's pixels."""
    shape = (3, 2, 37, 29)
    assert shape[0] * shape[1] * shape[2] * shape[3] > 3 * op_module._BLOCK and (shape[3] * shape[2]) % op_module._BLOCK
    check_backend(triton_backend, rand(gen, *shape, scale=1.3), rand_weights(gen, 3), -1.0, 1.0)


@pytest.mark.parametrize("with_moments", [False, True])
def test_launches_in_chunks_of_whole_images(triton_backend, gen, monkeypatch, with_moments):
    """Past ``_CHUNK`` pixels the op launches once per run of whole images (int32 offsets inside each);
    the partial sums of all launches add up (the channels' sums too, with their shift from the first
    image)."""
    shape = (5, 2, 9, 11)
    monkeypatch.setattr(op_module, "_CHUNK", 2 * 2 * 9 * 11)  # two images per launch: 3 launches
    moments = rand_moments(gen, 2) if with_moments else None
    check_backend(triton_backend, rand(gen, *shape, scale=1.3), rand_weights(gen, 3), -1.0, 1.0, moments)


@pytest.mark.parametrize("shape", [(3, 2, 1, 7), (3, 2, 7, 1), (1, 1, 1, 1), (4, 1, 5, 3)])
@pytest.mark.parametrize("with_moments", [False, True])
def test_degenerate_sizes(triton_backend, gen, shape, with_moments):
    """A single line, a single column, a single pixel (zero variance): TV terms without neighbours vanish."""
    moments = rand_moments(gen, shape[1]) if with_moments else None
    check_backend(triton_backend, rand(gen, *shape, scale=1.3), rand_weights(gen, 3), -1.0, 1.0, moments)


def test_pixels_on_the_bounds_have_zero_pix_gradient(triton_backend, gen):
    """relu'(0) = 0: pixels exactly at lo or hi get no Pix gradient (as torch)."""
    x = rand(gen, 2, 1, 6, 6).clamp(-1, 1)
    x[0, 0, 0, :3] = 1.0
    x[1, 0, 2, :3] = -1.0
    check_backend(triton_backend, x, torch.tensor([0.0, 1.0, 0.0], device=DEVICE), -1.0, 1.0)


def test_non_contiguous_input(triton_backend, gen):
    x = rand(gen, 3, 9, 8, 2, scale=1.3).permute(0, 3, 1, 2)  # [3, 2, 9, 8], channels-last-like
    check_backend(triton_backend, x, rand_weights(gen, 3), -1.0, 1.0)


@pytest.mark.parametrize("with_moments", [False, True])
def test_bitwise_deterministic(triton_backend, gen, with_moments):
    x = rand(gen, 2, 2, 64, 300, scale=1.3)
    w = rand_weights(gen, 3)
    moments = rand_moments(gen, 2) if with_moments else None
    runs = [loss_and_grad(lambda xi: triton_backend.image_prior(xi, w, -1.0, 1.0, moments), x) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_weights_gradient_is_the_terms(triton_backend, gen):
    w = rand_weights(gen, 3).requires_grad_(True)
    loss, terms = triton_backend.image_prior(rand(gen, 2, 3, 5, 6, scale=1.3), w, -1.0, 1.0)
    (loss * 2.0).backward()
    assert not terms.requires_grad
    assert_close(w.grad, 2.0 * terms, what="d/dweights")


@pytest.mark.parametrize("with_moments", [False, True])
def test_opcheck(gen, with_moments):
    x = rand(gen, 2, 3, 5, 6, scale=1.3).requires_grad_(True)
    moments = rand_moments(gen, 3) if with_moments else None
    torch.library.opcheck(op_module._image_prior_op, (x, rand_weights(gen, 3), -1.0, 1.0, moments))


def test_moments_over_many_programs(triton_backend, gen):
    """More pixels than one program's block, three channels: every program's per-channel sums count, and
    blocks of a channel's walk cross image boundaries."""
    shape = (5, 3, 37, 29)
    assert shape[0] * shape[1] * shape[2] * shape[3] > 4 * op_module._BLOCK
    check_backend(triton_backend, rand(gen, *shape, scale=1.3), rand_weights(gen, 3), -1.0, 1.0, rand_moments(gen, 3))


@pytest.mark.parametrize("with_moments", [False, True])
def test_torch_compile_fullgraph(triton_backend, gen, with_moments):
    x = rand(gen, 3, 3, 8, 8)
    w = rand_weights(gen, 3)
    moments = rand_moments(gen, 3) if with_moments else None

    def block(xi):
        return triton_backend.image_prior(torch.tanh(xi) * 1.2, w, -1.0, 1.0, moments)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = [loss_and_grad(fn, x)[1:] for fn in (compiled, block)]  # terms, d/dimages
    for a, b, what in zip(*out, ("terms", "d/dimages")):
        assert_close(a, b, what=what)
