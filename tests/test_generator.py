"""The conditioned generator: shapes, conditioning, the vectorised hot matrix."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tldr_fast.generator import ConditionedGenerator, hot_matrix, legacy_optimizer_state, sample_conditions


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


# --- the embedding without a bias, and weights saved with it -------------------------------------


class LegacyGenerator(ConditionedGenerator):
    """The generator as it was before the embedding lost its bias (the state dict has ``embed.bias``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # same place in the module order: embed.weight, embed.bias, ...
        self.embed = nn.Linear(self.num_classes, self.nz)


def _legacy(gen, k=5, shape=(1, 12, 12), nz=6, ngf=8):
    """A legacy generator with a large embedding bias whose running statistics recorded it (3 batches)."""
    legacy = LegacyGenerator(k, shape, nz, ngf)
    with torch.no_grad():
        legacy.embed.bias.copy_(3 * torch.randn(nz, generator=gen))
    for _ in range(3):
        legacy(*sample_conditions(16, k, nz, "soft", gen, "cpu"))
    return legacy


def test_the_embedding_has_no_bias():
    g = ConditionedGenerator(10, (1, 28, 28), nz=8, ngf=8)
    assert g.embed.bias is None and "embed.bias" not in g.state_dict()
    assert "embed.bias" not in dict(g.named_parameters())


def test_weights_with_the_embedding_bias_load_as_the_same_function(gen):
    """Weights saved with ``embed.bias`` load (strictly) into the generator without it as the same function, in
    eval mode (the bias is folded into the BatchNorm's running mean) and in training mode (the batch statistics
    cancel it), and stay so after further training-mode forwards; the caller's state dict is left as it was."""
    k, nz = 5, 6
    legacy = _legacy(gen, k, nz=nz)
    saved = legacy.state_dict()
    kept = {name: t.clone() for name, t in saved.items()}
    g = ConditionedGenerator(k, (1, 12, 12), nz, 8)
    g.load_state_dict(saved)
    assert "embed.bias" not in g.state_dict()
    assert saved.keys() == kept.keys() and all(torch.equal(saved[n], kept[n]) for n in kept), "the caller's dict"
    shift = legacy.project[0].weight[:, nz:] @ legacy.embed.bias  # [M]: what the bias added to the BatchNorm's input
    assert shift.norm() > 1  # the fold matters
    z, c, y = sample_conditions(9, k, nz, "soft", gen, "cpu")
    with torch.no_grad():
        for mode in ("eval", "train", "eval"):  # the train-mode forward updates both running means alike
            legacy.train(mode == "train")
            g.train(mode == "train")
            torch.testing.assert_close(g(z, c, y), legacy(z, c, y), rtol=1e-5, atol=1e-5, msg=mode)
            torch.testing.assert_close(g.project[1].running_mean, legacy.project[1].running_mean - shift)
        unfolded = ConditionedGenerator(k, (1, 12, 12), nz, 8).eval()  # the bias merely dropped: not the same
        unfolded.load_state_dict({n: t for n, t in kept.items() if n != "embed.bias"})
        assert (unfolded(z, c, y) - legacy.eval()(z, c, y)).abs().max() > 1e-2


def test_the_optimizer_state_of_the_embedding_bias_is_dropped(gen):
    """``legacy_optimizer_state``: an Adam state saved with a legacy generator loads into an Adam over the
    generator without the bias, each parameter with its own moments; other states pass unchanged."""
    k, nz = 5, 6
    legacy = _legacy(gen, k, nz=nz)
    opt = torch.optim.Adam(legacy.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        legacy(*sample_conditions(8, k, nz, "hot", gen, "cpu")).square().mean().backward()
        opt.step()
    g = ConditionedGenerator(k, (1, 12, 12), nz, 8)
    g.load_state_dict(legacy.state_dict())
    new = torch.optim.Adam(g.parameters(), lr=1e-3)
    saved = opt.state_dict()
    with pytest.raises(ValueError):  # as saved: one parameter too many
        new.load_state_dict(saved)
    new.load_state_dict(legacy_optimizer_state(g, legacy.state_dict(), saved))
    moments = {name: opt.state[p] for name, p in legacy.named_parameters()}
    assert len(new.state) == len(moments) - 1
    for name, p in g.named_parameters():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(new.state[p][key], moments[name][key]), f"{name}: {key}"
    current = new.state_dict()
    assert legacy_optimizer_state(g, g.state_dict(), current) is current


# --- output standardisation ----------------------------------------------------------------------


def _output_norm_generator(gen, shape=(2, 9, 11), k=3):
    """A float64 generator with output standardisation, its BatchNorm's affine and running statistics
    drawn at random (not the initial 1, 0) so that the test sees each of them."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))  # the initial weights
    g = ConditionedGenerator(k, shape, nz=5, ngf=4, output_norm=True).double()
    n = g.out_norm
    for t in (n.weight, n.bias, n.running_mean):
        t.data = torch.randn(t.shape, generator=gen, dtype=torch.float64)
    n.running_var.data = torch.rand(n.running_var.shape, generator=gen, dtype=torch.float64) + 0.5
    return g


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_output_norm_matches_its_definition(gen, training):
    """tanh(gamma (t - m) / sqrt(v + 1e-5) + beta) of the tanh output t, per channel: (m, v) the batch's
    mean and population variance in training mode, the running statistics in eval mode (``sample``)."""
    g = _output_norm_generator(gen).train(training)
    z, c, y = sample_conditions(6, 3, 5, "hot", gen, "cpu")
    seen = []
    g.out.register_forward_hook(lambda m, i, o: seen.append(o))
    x = g(z.double(), c.double(), y)
    t = torch.tanh(seen[0])  # [6, 2, 9, 11]
    n = g.out_norm
    if training:
        m, v = t.mean((0, 2, 3)), t.var((0, 2, 3), unbiased=False)
    else:
        m, v = n.running_mean, n.running_var
    per_channel = lambda a: a.view(1, -1, 1, 1)  # noqa: E731
    want = torch.tanh(per_channel(n.weight) * (t - per_channel(m)) / per_channel(v + 1e-5).sqrt() + per_channel(n.bias))
    torch.testing.assert_close(x, want, rtol=1e-12, atol=1e-12)
    assert x.abs().max() < 1
    if training:  # the ink budget: each channel's pre-squash batch mean and spread are the affine's
        pre = torch.atanh(x)
        spread = n.weight.detach().abs() * (v / (v + 1e-5)).sqrt()  # |gamma| but for BatchNorm's eps
        torch.testing.assert_close(pre.mean((0, 2, 3)), n.bias.detach(), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(pre.std((0, 2, 3), unbiased=False), spread, rtol=1e-9, atol=1e-9)


def test_output_norm_gradient(gen):
    g = _output_norm_generator(gen)
    _, c, y = sample_conditions(4, 3, 5, "hot", gen, "cpu")
    z = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: g(t, c.double(), y), (z,))


def test_output_norm_is_part_of_the_layout_only_when_on():
    """Off, the generator and its weights are those of before (weights saved without it load); on, its
    BatchNorm's parameters and statistics are in the state dict and another layout's weights do not load."""
    torch.manual_seed(0)
    off = ConditionedGenerator(3, (1, 12, 12), nz=8, ngf=8)
    torch.manual_seed(0)
    on = ConditionedGenerator(3, (1, 12, 12), nz=8, ngf=8, output_norm=True)
    extra = set(on.state_dict()) - set(off.state_dict())
    assert extra == {f"out_norm.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert not any("out_norm" in k for k in off.state_dict())
    on.load_state_dict({**off.state_dict(), **{k: on.state_dict()[k] for k in extra}})
    with pytest.raises(RuntimeError, match="out_norm"):
        on.load_state_dict(off.state_dict())


# --- Olah et al.'s output parameterisation: 1/f-scaled spectrum, decorrelated colour ---------------------


def _spectrum_by_definition(x, h, w):
    """The 1/f filter on the full two-sided spectrum: gain ``1/max(|f|, 1/max(h, w))`` per frequency, scaled
    so that the mean squared gain over all ``h * w`` frequencies is 1."""
    fy = torch.fft.fftfreq(h, dtype=torch.float64).view(h, 1)
    fx = torch.fft.fftfreq(w, dtype=torch.float64).view(1, w)
    gain = 1.0 / torch.maximum(torch.sqrt(fx**2 + fy**2), torch.tensor(1.0 / max(h, w), dtype=torch.float64))
    gain = gain / gain.pow(2).mean().sqrt()
    return torch.fft.ifft2(torch.fft.fft2(x) * gain).real


@pytest.mark.parametrize(
    "shape, colour", [((3, 9, 11), False), ((3, 9, 11), True), ((3, 12, 8), True), ((1, 10, 10), False)]
)
def test_output_parameterisation_matches_its_definition(gen, shape, colour):
    """tanh(M (1/f filter of x)) with x the last convolution's output: the filter by its two-sided definition,
    M the normalised square root of the colour correlation applied per pixel."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    g = ConditionedGenerator(3, shape, nz=5, ngf=4, scaled_spectrum=True, decorrelated_colour=colour).double()
    z, c, y = sample_conditions(4, 3, 5, "hot", gen, "cpu")
    seen = []
    g.out.register_forward_hook(lambda m, i, o: seen.append(o))
    x = g(z.double(), c.double(), y)
    want = _spectrum_by_definition(seen[0], *shape[1:])
    if colour:
        m = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=torch.float64)
        m = m / max(float(m[:, j].norm()) for j in range(3))
        want = torch.stack([sum(m[i, j] * want[:, j] for j in range(3)) for i in range(3)], dim=1)
    torch.testing.assert_close(x, torch.tanh(want), rtol=1e-6, atol=1e-6)  # the basis is stored in fp32


def test_output_parameterisation_gradient(gen):
    torch.manual_seed(0)
    g = ConditionedGenerator(3, (3, 9, 10), nz=5, ngf=4, scaled_spectrum=True, decorrelated_colour=True).double()
    _, c, y = sample_conditions(3, 3, 5, "hot", gen, "cpu")
    z = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: g(t, c.double(), y), (z,))


def test_output_parameterisation_keeps_the_layout_and_checks_channels():
    """The filter and the colour basis are fixed buffers outside the state dict: weights load either way."""
    torch.manual_seed(0)
    off = ConditionedGenerator(3, (3, 12, 12), nz=8, ngf=8)
    on = ConditionedGenerator(3, (3, 12, 12), nz=8, ngf=8, scaled_spectrum=True, decorrelated_colour=True)
    assert list(on.state_dict()) == list(off.state_dict())
    on.load_state_dict(off.state_dict())
    with pytest.raises(ValueError, match="decorrelated_colour needs 3 channels"):
        ConditionedGenerator(3, (1, 12, 12), decorrelated_colour=True)
