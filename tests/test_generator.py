"""The conditioned generator: shapes, conditioning, the vectorised hot matrix."""

import pytest
import torch
import torch.nn.functional as F

from tldr_fast.generator import ConditionedGenerator, hot_matrix, sample_conditions


def hot_matrix_loop(labels, k, size):
    """The public reference code's construction: a K x K matrix per sample in a Python loop, resized."""
    out = []
    for y in labels.tolist():
        m = torch.zeros(1, 1, k, k)
        m[0, 0, y, :] = 1
        m[0, 0, :, y] = 1
        out.append(F.interpolate(m, size=size, mode="nearest"))
    return torch.cat(out)


@pytest.mark.parametrize("k", [2, 3, 10, 100])
@pytest.mark.parametrize("size", [(14, 14), (4, 4), (16, 32), (7, 5), (50, 50)])
def test_hot_matrix_equals_the_loop(gen, k, size):
    labels = torch.randint(0, k, (9,), generator=gen)
    assert torch.equal(hot_matrix(labels, k, size), hot_matrix_loop(labels, k, size))


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8), (3, 64, 64), (2, 9, 13)])
@pytest.mark.parametrize("k", [2, 10, 100])
@pytest.mark.parametrize("conditioning", ["hot", "soft"])
def test_shapes_range_and_gradients(gen, shape, k, conditioning):
    g = ConditionedGenerator(k, shape, nz=16, ngf=8)
    z, c, y = sample_conditions(5, k, 16, conditioning, gen, "cpu")
    x = g(z, c, y)
    assert x.shape == (5, *shape)
    assert x.abs().max() <= 1
    x.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in g.parameters())


def test_conditions(gen):
    z, c, y = sample_conditions(1000, 7, 3, "hot", gen, "cpu")
    assert z.shape == (1000, 3) and torch.equal(c, F.one_hot(y, 7).float())
    assert set(y.tolist()) == set(range(7))
    z, c, y = sample_conditions(1000, 7, 3, "soft", gen, "cpu")
    torch.testing.assert_close(c.sum(1), torch.ones(1000))
    assert torch.equal(y, c.argmax(1)) and (c > 0).all() and (c.max(1).values < 1).all()


def test_condition_changes_the_image(gen):
    """Both conditioning paths reach the output: another label gives another image for the same z."""
    g = ConditionedGenerator(10, (1, 16, 16), nz=8, ngf=8).eval()
    z = torch.randn(1, 8, generator=gen)
    a = g(z, F.one_hot(torch.tensor([1]), 10).float(), torch.tensor([1]))
    b = g(z, F.one_hot(torch.tensor([2]), 10).float(), torch.tensor([2]))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("k,shape", [(1, (1, 28, 28)), (10, (1, 7, 28)), (10, (0, 28, 28))])
def test_bad_arguments(k, shape):
    with pytest.raises(ValueError):
        ConditionedGenerator(k, shape)
