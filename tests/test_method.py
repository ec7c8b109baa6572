"""The method's options beyond the paper's loss: geometric robustness (warp), the mode-seeking term,
the BatchNorm-statistics prior, pixel moments from the classifier's normalisation, paired sampling,
generator dropout and robust selection when sampling. Each against an explicit definition."""

import math

import pytest
import torch
import torch.nn as nn

from tldr_fast import invert, samples
from tldr_fast import reference as ref
from tldr_fast.classifier import FrozenClassifier, batchnorm_layers, normalisation
from tldr_fast.config import TERM_SLICES, TERMS, InversionConfig
from tldr_fast.generator import ConditionedGenerator, sample_conditions
from tldr_fast.models import PlainCNN, SmallCNN, SmallMLP, shift_images
from tldr_fast.ops import LOSS_OPS, SPECS

TINY = dict(
    steps=4, batch_size=8, nz=8, ngf=8, device="cpu", progress=False, eval_per_class=2, log_every=2, backend="torch"
)


def with_meta(model, channels=1):
    model.tldr_meta = {"mean": [0.2] * channels, "std": [0.3] * channels}
    return model.eval()


# --- warp -------------------------------------------------------------------------------------------


def _theta(n, size, shift, rotate, scale, seed):
    return ref.warp_theta(n, size, shift, rotate, scale, torch.Generator().manual_seed(seed), "cpu")


def test_warp_shift_only_moves_whole_pixels(gen):
    x = torch.rand(6, 2, 9, 7, generator=gen) * 2 - 1
    theta = _theta(6, (9, 7), 2, 0.0, 0.0, int(torch.randint(0, 2**31, (1,), generator=gen)))
    out = ref.warp(x, theta, -1.0, "nearest")
    for i in range(len(x)):
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2), value=-1.0)
        matches = [
            (dy, dx) for dy in range(5) for dx in range(5) if torch.equal(out[i], padded[:, dy : dy + 9, dx : dx + 7])
        ]
        assert matches, f"image {i} is not a whole-pixel shift of its input filled with -1"


def test_warp_theta_ranges():
    theta = _theta(2000, (28, 28), 2, 15.0, 0.1, 0)
    lin = theta[:, :, :2]
    scale = lin[:, 0, 0].hypot(lin[:, 1, 0])
    angle = torch.atan2(lin[:, 1, 0], lin[:, 0, 0]) * 180 / math.pi
    shifts = theta[:, :, 2] * 28 / 2  # pixels
    assert scale.min() >= 0.9 - 1e-6 and scale.max() <= 1.1 + 1e-6 and angle.abs().max() <= 15 + 1e-4
    assert torch.equal(shifts.round(), shifts.round().clamp(-2, 2)) and torch.allclose(
        shifts, shifts.round(), atol=1e-5
    )
    assert set(shifts.round().flatten().tolist()) == {-2.0, -1.0, 0.0, 1.0, 2.0}


def test_warp_identity_and_gradient(gen):
    x = torch.rand(4, 1, 8, 8, generator=gen, dtype=torch.float64).requires_grad_(True)
    assert torch.equal(ref.warp(x, _theta(4, (8, 8), 0, 0.0, 0.0, 0), 0.0, "nearest"), x)
    y = ref.warp(x, _theta(4, (8, 8), 1, 20.0, 0.2, 0), -1.0)
    assert y.shape == x.shape and torch.isfinite(y).all()
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert grad.abs().sum() > 0 and (grad >= 0).all()  # bilinear resampling: non-negative weights


def test_warp_theta_is_seeded():
    a, b, c = (_theta(5, (10, 10), 2, 15.0, 0.1, s) for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("geometry", [{}, {"rotate": 0.0, "scale": 0.0}], ids=["affine", "shift"])
def test_the_step_warps_in_perturb_with_the_draws_of_before(geometry):
    """One process: the step hands its random transforms to ``ops.perturb`` (noise, clip and warp in one
    op), and they are the transforms the step drew from its generator right after the conditions before
    the warp was fused (``reference.warp_theta``), with the config's resampling: the same perturbed copies."""
    from tldr_fast.backends import resolve
    from tldr_fast.step import TLDRObjective, step_seed

    cfg = InversionConfig().with_overrides(**{**TINY, **geometry})
    shape = (1, 12, 12)
    target = FrozenClassifier(with_meta(PlainCNN(list(shape), 3, width=4, feature_dim=8)), 3, shape, device="cpu")
    ops = resolve("torch", "cpu", quiet=True)
    calls = []

    def recorded(x, *args):
        calls.append((x.detach(), args))
        return ref.perturb(x, *args)

    ops.ops["perturb"] = recorded
    objective = TLDRObjective(ConditionedGenerator(3, shape, cfg.nz, cfg.ngf), target, cfg, ops, torch.device("cpu"))
    objective(3)
    ((x, (eps, lo, hi, kind, seed, theta, mode)),) = calls
    gen = torch.Generator().manual_seed(step_seed(cfg.seed, 3))
    sample_conditions(cfg.batch_size, 3, cfg.nz, cfg.conditioning, gen, "cpu", objective.paired)
    drawn = ref.warp_theta(len(x), shape[-2:], cfg.shift, cfg.rotate, cfg.scale, gen, "cpu")
    expected_mode = "nearest" if geometry else "bilinear"
    before = ref.warp(ref.perturb(x, eps, lo, hi, kind, seed), drawn, lo, expected_mode)
    assert mode == expected_mode
    assert torch.equal(ref.perturb(x, eps, lo, hi, kind, seed, theta, mode), before)


# --- mode seeking, BatchNorm statistics, moments -------------------------------------------------------------


def test_mode_seek_matches_its_definition(gen):
    x = torch.rand(7, 1, 5, 5, generator=gen, dtype=torch.float64)
    z = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    ratios = []
    for i in range(3):  # rows i and i + 3; row 6 is unpaired
        dx = sum(abs(float(a - b)) for a, b in zip(x[i].flatten(), x[i + 3].flatten())) / 25
        dz = sum(abs(float(a - b)) for a, b in zip(z[i], z[i + 3])) / 3
        ratios.append(dx / dz)
    expected = 1 / (sum(ratios) / 3 + 1e-5)
    assert math.isclose(float(ref.mode_seek(x, z)), expected, rel_tol=1e-12)


def test_mode_seek_gradient(gen):
    x = torch.rand(6, 1, 4, 4, generator=gen, dtype=torch.float64).requires_grad_(True)
    z = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: ref.mode_seek(t, z), (x,))


def _kkt_explicit(model, x, y):
    """1 - cos(theta, -sum_i grad_theta CE_i): one sample's CE gradient at a time, then the cosine."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for xi, yi in zip(x, y):
        z = model(xi[None])[0]
        ce = torch.logsumexp(z, 0) - z[yi]
        for t, g in zip(total, torch.autograd.grad(ce, params)):
            t -= g
    theta = torch.cat([p.detach().flatten() for p in params])
    g = torch.cat([t.flatten() for t in total])
    return 1 - float(theta @ g) / (float(theta.norm()) * float(g.norm()))


def test_kkt_matches_its_definition(gen):
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.Tanh(), nn.Linear(7, 4)).double()
    x = torch.randn(9, 1, 3, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (9,), generator=gen)
    value = ref.kkt(model(x), y, list(model.parameters())).detach()
    assert math.isclose(float(value), _kkt_explicit(model, x, y), rel_tol=1e-10)


def test_kkt_gradient(gen):
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(4, 1, 2, 3, generator=gen, dtype=torch.float64).requires_grad_(True)
    y = torch.tensor([0, 2, 1, 2])
    assert torch.autograd.gradcheck(lambda t: ref.kkt(model(t), y, list(model.parameters())), (x,))


def test_kkt_in_the_step():
    clf = with_meta(PlainCNN([1, 16, 16], 3, width=4, feature_dim=8))
    inv = invert(clf, 3, (1, 16, 16), kkt=1.0, **TINY)
    assert all(0 < v <= 2 for v in inv.history["kkt"])
    assert all(p.grad is None for p in clf.parameters())  # the classifier accumulates no gradient
    assert invert(clf, 3, (1, 16, 16), **TINY).history["kkt"][-1] == 0.0  # weight 0: not computed
    with pytest.raises(ValueError, match="kkt"):
        InversionConfig(compile=True, weights={"kkt": 1.0})


def test_bn_stats_matches_its_definition(gen):
    a = torch.randn(5, 3, 4, 2, generator=gen, dtype=torch.float64)
    rm, rv = torch.randn(3, generator=gen, dtype=torch.float64), torch.rand(3, generator=gen, dtype=torch.float64)
    flat = a.transpose(0, 1).reshape(3, -1)  # [C, N H W]
    mu = flat.mean(1)
    var = ((flat - mu[:, None]) ** 2).mean(1)
    expected = math.sqrt(float(((mu - rm) ** 2).sum())) + math.sqrt(float(((var - rv) ** 2).sum()))
    assert math.isclose(float(ref.bn_stats(a, rm, rv)), expected, rel_tol=1e-12)
    a1 = torch.randn(6, 4, generator=gen, dtype=torch.float64).requires_grad_(True)  # BatchNorm1d input
    assert torch.autograd.gradcheck(lambda t: ref.bn_stats(t, rm[:1].expand(4), rv[:1].expand(4)), (a1,))


def test_normalisation_from_meta_and_preprocess():
    clf = with_meta(SmallMLP([3, 8, 8], 4), 3)
    torch.testing.assert_close(normalisation(None, clf, 3), torch.tensor([[0.2] * 3, [0.3] * 3]))
    torch.testing.assert_close(normalisation((0.5, 0.25), clf, 3), torch.tensor([[0.5] * 3, [0.25] * 3]))
    assert normalisation("unit", clf, 3) is None and normalisation(lambda x: x, clf, 3) is None
    assert normalisation(None, nn.Linear(3, 3), 3) is None
    with pytest.raises(ValueError, match="channels"):
        normalisation(([0.1, 0.2], [0.3, 0.3]), clf, 3)


def test_forward_bn_stats_sums_every_batchnorm_layer(gen):
    clf = with_meta(SmallCNN([1, 12, 12], 3, width=4, feature_dim=8))
    frozen = FrozenClassifier(clf, 3, (1, 12, 12), quiet=True)
    assert len(frozen.batchnorms) == len(batchnorm_layers(clf)) == 4
    x = torch.rand(6, 1, 12, 12, generator=gen) * 2 - 1
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda m, i: inputs.append((m, i[0].detach()))) for m in frozen.batchnorms]
    logits, feats, bn = frozen.forward_bn_stats(x, 4)
    for h in hooks:
        h.remove()
    expected = sum(ref.bn_stats(a[:4], m.running_mean, m.running_var) for m, a in inputs)
    torch.testing.assert_close(bn, expected)
    plain_logits, plain_feats = frozen(x)
    torch.testing.assert_close(logits, plain_logits)
    assert float(frozen.forward_bn_stats(x, 0)[2]) == 0.0  # rows=0: no term
    no_bn = FrozenClassifier(with_meta(PlainCNN([1, 16, 16], 3, width=4)), 3, (1, 16, 16), quiet=True)
    assert no_bn.batchnorms == [] and float(no_bn.forward_bn_stats(torch.zeros(2, 1, 16, 16), 2)[2]) == 0.0


# --- the objective and the generator ------------------------------------------------------------------------


def test_paired_conditions():
    z, c, y = sample_conditions(9, 5, 4, "hot", torch.Generator().manual_seed(0), "cpu", paired=True)
    assert torch.equal(y[4:8], y[:4]) and torch.equal(c[4:8], c[:4]) and not torch.equal(z[4:8], z[:4])
    _, c2, y2 = sample_conditions(8, 5, 4, "soft", torch.Generator().manual_seed(0), "cpu", paired=True)
    assert torch.equal(y2[4:], y2[:4]) and torch.equal(c2[4:], c2[:4])


def test_dropout_acts_only_in_training():
    g = ConditionedGenerator(3, (1, 12, 12), nz=8, ngf=8, dropout=0.5)
    z, c, y = sample_conditions(6, 3, 8, "hot", torch.Generator().manual_seed(0), "cpu")
    g.eval()
    assert torch.equal(g(z, c, y), g(z, c, y))
    g.train()
    torch.manual_seed(0)
    a = g(z, c, y)
    torch.manual_seed(1)
    assert not torch.equal(a, g(z, c, y))
    assert ConditionedGenerator(3, (1, 12, 12), nz=8, ngf=8).state_dict().keys() == g.state_dict().keys()


def test_term_layout_comes_from_the_ops():
    for op in LOSS_OPS:
        assert TERMS[TERM_SLICES[op]] == SPECS[op].terms
    assert set(TERMS) >= {"bn_stats", "mode_seek", "moments", "kkt"}


def test_new_terms_are_logged_where_they_apply():
    bn_clf = with_meta(SmallCNN([1, 12, 12], 3, width=4, feature_dim=8))
    inv = invert(bn_clf, 3, (1, 12, 12), mode_seek=0.1, **TINY)
    last = {t: inv.history[t][-1] for t in TERMS}
    assert last["bn_stats"] > 0 and last["moments"] > 0 and last["mode_seek"] > 0
    plain = with_meta(PlainCNN([1, 16, 16], 3, width=4, feature_dim=8))
    inv = invert(plain, 3, (1, 16, 16), mode_seek=0.0, **TINY)
    assert inv.history["bn_stats"][-1] == 0.0 and inv.history["mode_seek"][-1] == 0.0  # no BatchNorm; weight 0
    no_meta = PlainCNN([1, 16, 16], 3, width=4, feature_dim=8).eval()
    inv = invert(no_meta, 3, (1, 16, 16), preprocess="unit", **TINY)
    assert inv.history["moments"][-1] == 0.0  # no known normalisation: nothing to match


def test_colour_line_needs_rgb_images_and_is_logged():
    """The colour-line prior is refused before any step on a grey classifier, with the reason; on an RGB one
    its term is logged and the generator's images move towards one colour line per image."""
    grey = with_meta(PlainCNN([1, 12, 12], 3, width=4, feature_dim=8))
    with pytest.raises(ValueError, match="colour_line needs RGB images \\(3 channels\\), the classifier takes 1"):
        invert(grey, 3, (1, 12, 12), colour_line=1.0, **TINY)
    rgb = with_meta(PlainCNN([3, 12, 12], 3, width=4, feature_dim=8))
    runs = {w: invert(rgb, 3, (3, 12, 12), colour_line=w, **{**TINY, "steps": 12}) for w in (0.0, 50.0)}
    assert runs[0.0].history["colour_line"][-1] == 0.0  # weight 0: not computed
    assert runs[50.0].history["colour_line"][-1] > 0
    off_line = {w: float(ref.colour_line(inv.sample(torch.arange(3).repeat(4)))) for w, inv in runs.items()}
    assert off_line[50.0] < off_line[0.0]


@pytest.mark.parametrize("op", ["bn_stats", "mode_seek", "colour_line"])
def test_fused_method_terms_in_the_step_are_the_backends(fast, op):
    """The step takes bn_stats (once per BatchNorm layer), mode_seek and colour_line (RGB images) from its
    backend: with only that op
    from a fast backend (every other op from the reference), the first step's terms and the generator's
    gradients are the reference path's. (Later steps are not compared: Adam's first steps are about
    lr * sign(gradient), so a rounding difference in a near-zero gradient can become a step of lr.)"""
    from tldr_fast.backends import resolve
    from tldr_fast.generator import ConditionedGenerator
    from tldr_fast.step import TLDRObjective

    fused = getattr(fast, op, None)
    if fused is None:
        pytest.skip(f"backend {fast.name!r} has no {op} kernel")
    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return fused(*args)

    shape = (3, 12, 12) if op == "colour_line" else (1, 12, 12)
    clf = with_meta(SmallCNN(list(shape), 3, width=4, feature_dim=8))  # BatchNorm layers
    weights = {"mode_seek": 0.5, "colour_line": 0.5 if op == "colour_line" else 0.0}
    cfg = InversionConfig().with_overrides(**{**TINY, "backend": "reference", **weights})
    target = FrozenClassifier(clf, 3, shape, preprocess=cfg.preprocess, device="cpu")
    out = []
    for use_fused in (False, True):
        ops = resolve("reference", "cpu", quiet=True)
        if use_fused:
            ops.ops[op] = counted
        torch.manual_seed(0)
        g = ConditionedGenerator(3, shape, cfg.nz, cfg.ngf)
        loss, terms = TLDRObjective(g, target, cfg, ops, torch.device("cpu"))(0)
        loss.backward()
        out.append((terms, [p.grad.clone() for p in g.parameters() if p.grad is not None]))
    assert len(calls) == (len(target.batchnorms) if op == "bn_stats" else 1) > 0, f"the fast {op} ran"
    (t0, g0), (t1, g1) = out
    assert t0[TERMS.index(op)] > 0
    torch.testing.assert_close(t1, t0, rtol=2e-5, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_activation_alone_runs_feature_loss_in_the_step():
    """With only the activation term of feature_loss on, the step runs the op (with all its weights) and the
    term is -mean |phi| of the clean rows' features; with every term of the op at weight 0 the op does not
    run and the term reads 0."""
    from tldr_fast.backends import resolve
    from tldr_fast.step import TLDRObjective

    shape = (1, 16, 16)
    clf = with_meta(PlainCNN(list(shape), 3, width=4, feature_dim=8))
    cfg = InversionConfig().with_overrides(**{**TINY, "cos": 0.0, "ortho": 0.0, "activation": 0.5})
    target = FrozenClassifier(clf, 3, shape, preprocess=cfg.preprocess, device="cpu")
    ops = resolve("torch", "cpu", quiet=True)
    calls = []
    fused = ops.ops["feature_loss"]

    def counted(feats, w, *args):
        calls.append(w.clone())
        feature_terms = fused(feats, w, *args)
        torch.testing.assert_close(feature_terms[1][-1], -feats.detach().abs().mean())
        return feature_terms

    ops.ops["feature_loss"] = counted
    torch.manual_seed(0)
    g = ConditionedGenerator(3, shape, cfg.nz, cfg.ngf)
    _, terms = TLDRObjective(g, target, cfg, ops, torch.device("cpu"))(0)
    assert len(calls) == 1 and calls[0].tolist() == [0.0, 0.0, 0.5]
    assert terms[TERMS.index("activation")] < 0
    off = invert(clf, 3, shape, cos=0.0, ortho=0.0, activation=0.0, **TINY)
    assert off.history["activation"][-1] == 0.0


def test_class_diversity_changes_the_step():
    clf = with_meta(PlainCNN([1, 16, 16], 3, width=4, feature_dim=8))
    a = invert(clf, 3, (1, 16, 16), **TINY)
    b = invert(clf, 3, (1, 16, 16), diversity="class", **TINY)
    assert a.history["cos"] != b.history["cos"]


def test_select_keeps_the_best_scored_candidate(monkeypatch):
    clf = with_meta(PlainCNN([1, 16, 16], 3, width=4, feature_dim=8))
    inv = invert(clf, 3, (1, 16, 16), **TINY)
    picked = {}

    def score(inv, images, labels, seed, first=0, draws=4):  # the third candidate of each image wins
        s = torch.zeros(len(labels))
        s[2::3] = 1.0
        picked["candidates"] = images.clone()
        return s

    monkeypatch.setattr(samples, "robustness_score", score)
    out = inv.sample(n_per_class=2, select=3, batch_size=6)
    torch.testing.assert_close(out, picked["candidates"][2::3].float())
    with pytest.raises(ValueError, match="select"):
        inv.sample(n_per_class=1, select=0)


def test_default_select_falls_back_without_the_classifier(tmp_path, capsys):
    from tldr_fast import Inversion

    clf = with_meta(PlainCNN([1, 16, 16], 3, width=4, feature_dim=8))
    inv = invert(clf, 3, (1, 16, 16), **{**TINY, "select": 3})
    inv.save(tmp_path / "inv.pt")
    bare = Inversion.load(tmp_path / "inv.pt", device="cpu")
    capsys.readouterr()
    out = bare.sample(n_per_class=2, batch_size=4)  # the default select=3 cannot score: no selection, with a notice
    assert "sampling without selection" in capsys.readouterr().err
    torch.testing.assert_close(out, inv.sample(n_per_class=2, batch_size=4, select=1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="classifier"):  # an explicit select > 1 without the classifier is an error
        bare.sample(n_per_class=2, select=3)
    with_clf = Inversion.load(tmp_path / "inv.pt", classifier=clf, device="cpu")
    torch.testing.assert_close(with_clf.sample(n_per_class=2), inv.sample(n_per_class=2, select=3), rtol=0, atol=0)
    assert capsys.readouterr().err == ""


def test_robustness_score_is_the_mean_probability(gen):
    clf = with_meta(PlainCNN([1, 16, 16], 3, width=4, feature_dim=8))
    inv = invert(clf, 3, (1, 16, 16), **TINY)
    x = torch.rand(4, 1, 16, 16, generator=gen) * 2 - 1
    s = inv.robustness_score(x, torch.tensor([0, 1, 2, 0]), seed=5)
    assert s.shape == (4,) and ((s >= 0) & (s <= 1)).all()
    torch.testing.assert_close(inv.robustness_score(x[2:], torch.tensor([2, 0]), seed=5, first=2), s[2:])  # per image


def test_robustness_score_moves_images_like_training(gen, monkeypatch):
    """With whole-pixel shifts alone (and no noise), the score's perturbed copies are exact moves, as in
    the step: every pixel the classifier sees is a pixel of the image or background."""
    clf = with_meta(PlainCNN([1, 16, 16], 3, width=4, feature_dim=8))
    inv = invert(clf, 3, (1, 16, 16), **{**TINY, "eps": 0.0, "rotate": 0.0, "scale": 0.0, "shift": 3})
    x = torch.rand(4, 1, 16, 16, generator=gen) * 2 - 1
    seen = []
    forward = type(inv.target).__call__
    monkeypatch.setattr(type(inv.target), "__call__", lambda self, t: seen.append(t) or forward(self, t))
    inv.robustness_score(x, torch.tensor([0, 1, 2, 0]), seed=5)
    allowed = torch.cat([x.flatten(), torch.tensor([-1.0])])
    assert seen and all(torch.isin(t, allowed).all() for t in seen)
    assert any(not torch.equal(t, x) for t in seen)  # they did move


def test_samples_do_not_depend_on_the_batch_size():
    clf = with_meta(PlainCNN([1, 16, 16], 3, width=4, feature_dim=8))
    inv = invert(clf, 3, (1, 16, 16), **TINY)
    a = inv.sample(n_per_class=50, batch_size=7, seed=1)
    torch.testing.assert_close(inv.sample(n_per_class=50, batch_size=150, seed=1), a, rtol=0, atol=1e-6)
    b = inv.sample(n_per_class=10, batch_size=4, seed=1, select=3)
    torch.testing.assert_close(inv.sample(n_per_class=10, batch_size=30, seed=1, select=3), b, rtol=0, atol=1e-6)
    assert not torch.equal(a, inv.sample(n_per_class=50, batch_size=7, seed=2))
    for bad in (0, -4, True, 2.5):
        with pytest.raises(ValueError, match="batch_size"):
            inv.sample(n_per_class=1, batch_size=bad)


# --- zoom -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "zoom,steps,size,want",
    [
        (4, 100, (28, 28), [(7, 7)] * 25 + [(14, 14)] * 25 + [(21, 21)] * 25 + [None] * 25),
        (3, 7, (9, 11), [(3, 4)] * 3 + [(6, 8)] * 2 + [None] * 2),
        (0, 10, (28, 28), [None] * 10),
        (1, 10, (28, 28), [None] * 10),
    ],
)
def test_zoom_stages(zoom, steps, size, want):
    assert [ref.zoom_size(zoom, s, steps, size) for s in range(steps)] == want
    assert ref.zoom_size(zoom, steps + 5, steps, size) is None  # a resumed run past steps: full resolution


def test_zoom_matches_its_definition(gen):
    x = torch.randn(3, 2, 8, 12, generator=gen, dtype=torch.float64)
    out = ref.zoom(x, (4, 3))
    blocks = x.view(3, 2, 4, 2, 3, 4).mean((3, 5))  # the mean of each 2 x 4 area

    # bilinear back up (align_corners=False): output pixel i reads source coordinate (i + 0.5) / f - 0.5
    def weights(n_out, n_in):
        w = torch.zeros(n_out, n_in, dtype=torch.float64)
        for i in range(n_out):
            s = min(max((i + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
            lo = int(math.floor(s))
            hi = min(lo + 1, n_in - 1)
            w[i, lo] += 1 - (s - lo)
            w[i, hi] += s - lo
        return w

    want = torch.einsum("hi,bcij,wj->bchw", weights(8, 4), blocks, weights(12, 3))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: ref.zoom(t, (3, 5)), (x[:1].clone().requires_grad_(True),))
    assert ref.zoom(x.float(), (4, 3)).dtype == torch.float32


def test_zoom_in_the_step(monkeypatch):
    clf = with_meta(PlainCNN([1, 16, 16], 3, width=4, feature_dim=8))
    seen = []
    forward = clf.forward

    def record(x):
        seen.append(x.detach().clone())
        return forward(x)

    monkeypatch.setattr(clf, "forward", record)
    zoomed, zoom = [], ref.zoom

    def spy(images, size):
        out = zoom(images, size)
        zoomed.append((size, len(images), out.detach().clone()))
        return out

    import tldr_fast.step

    monkeypatch.setattr(tldr_fast.step.reference, "zoom", spy)
    cfg = dict(TINY, steps=4, select=1)
    invert(clf, 3, (1, 16, 16), zoom=2, **cfg)
    # steps 0 and 1 at 8 x 8, clean and perturbed images together; steps 2 and 3 at full resolution
    assert [(size, n) for size, n, _ in zoomed] == [((8, 8), 16), ((8, 8), 16)]
    for _, _, out in zoomed:  # what the classifier saw: the zoomed batch, normalised by its meta
        want = ((out + 1) / 2 - 0.2) / 0.3
        assert any(s.shape == want.shape and torch.allclose(s, want, atol=1e-5) for s in seen)
    monkeypatch.undo()
    off = invert(clf, 3, (1, 16, 16), zoom=0, **cfg).history
    on = invert(clf, 3, (1, 16, 16), zoom=2, **cfg).history
    assert off["ce"][0] != on["ce"][0]


# --- ColorShift -------------------------------------------------------------------------------------


def test_colour_shift_matches_its_definition(gen):
    x = torch.randn(3, 2, 5, 7, generator=gen, dtype=torch.float64)
    shifts = ref.colour_draws(3, 2, 0.5, 0.4, gen, "cpu", torch.float64)
    want = torch.empty_like(x)
    for i in range(3):
        for ch in range(2):
            want[i, ch] = math.exp(float(shifts[i, 0, ch])) * x[i, ch] + float(shifts[i, 1, ch])
    torch.testing.assert_close(ref.colour_shift(x, shifts), want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: ref.colour_shift(t, shifts), (x.clone().requires_grad_(True),))
    assert ref.colour_shift(x.float(), shifts).dtype == torch.float32


def test_colour_draws_ranges_and_seeding():
    def draws(seed, contrast=0.5, offset=0.4):
        return ref.colour_draws(4000, 3, contrast, offset, torch.Generator().manual_seed(seed), "cpu")

    d = draws(0)
    assert d.shape == (4000, 2, 3)
    for row, bound in ((0, 0.5), (1, 0.4)):  # uniform on [-bound, bound]: its range and its mean
        assert d[:, row].abs().max() <= bound and d[:, row].abs().max() > 0.99 * bound
        assert abs(float(d[:, row].mean())) < 0.02
    assert torch.equal(d, draws(0)) and not torch.equal(d, draws(1))
    offsets_only = draws(0, contrast=0.0)
    assert not offsets_only[:, 0].any() and torch.equal(offsets_only[:, 1], d[:, 1])  # the same stream either way


@pytest.mark.parametrize("colour", [{}, {"colour_shift": 0.4, "colour_contrast": 0.5}], ids=["off", "on"])
def test_colour_shift_in_the_step(colour):
    """The classifier sees the clean images and, as their perturbed copies, ``ops.perturb``'s output shifted
    by the ColorShifts the step draws from its generator after the conditions and the transforms; off,
    the copies are ``ops.perturb``'s output unchanged."""
    from tldr_fast.backends import resolve
    from tldr_fast.step import TLDRObjective, step_seed

    cfg = InversionConfig().with_overrides(**TINY, **colour)
    shape = (3, 10, 12)
    target = FrozenClassifier(with_meta(PlainCNN(list(shape), 3, width=4, feature_dim=8), 3), 3, shape, device="cpu")
    ops = resolve("torch", "cpu", quiet=True)
    perturbed, seen = [], []

    def recorded(x, *args):
        perturbed.append((x.detach(), ref.perturb(x, *args)))
        return perturbed[-1][1]

    ops.ops["perturb"] = recorded
    forward = target.forward_bn_stats
    target.forward_bn_stats = lambda batch, *args: seen.append(batch.detach()) or forward(batch, *args)
    objective = TLDRObjective(ConditionedGenerator(3, shape, cfg.nz, cfg.ngf), target, cfg, ops, torch.device("cpu"))
    objective(5)
    ((x, x_pert),), (batch,) = perturbed, seen
    gen = torch.Generator().manual_seed(step_seed(cfg.seed, 5))
    sample_conditions(cfg.batch_size, 3, cfg.nz, cfg.conditioning, gen, "cpu", objective.paired)
    ref.warp_theta(len(x), shape[-2:], cfg.shift, cfg.rotate, cfg.scale, gen, "cpu")
    want = x_pert.detach()
    if colour:
        want = ref.colour_shift(want, ref.colour_draws(len(x), 3, 0.5, 0.4, gen, "cpu"))
        assert want.abs().max() > 1  # not clipped
    assert torch.equal(batch[: len(x)], x)
    torch.testing.assert_close(batch[len(x) :], want, rtol=0, atol=0)


# --- surrogate ReLU derivative ---------------------------------------------------------------------


class ExplicitSurrogateReLU(nn.Module):
    """relu(x) forward, sigmoid(alpha x) as its derivative: that of softplus(alpha x) / alpha."""

    def __init__(self, alpha):
        super().__init__()
        self.alpha = alpha

    def forward(self, x):
        smooth = nn.functional.softplus(self.alpha * x) / self.alpha
        return x.relu().detach() + smooth - smooth.detach()


RELUS = {
    "nn.ReLU": nn.ReLU(),
    "nn.ReLU(inplace)": nn.ReLU(inplace=True),
    "F.relu": nn.functional.relu,
    "F.relu(inplace)": lambda t: nn.functional.relu(t, True),
    "F.relu_": nn.functional.relu_,
    "torch.relu": torch.relu,
    "torch.relu_": torch.relu_,
    "Tensor.relu": torch.Tensor.relu,
    "Tensor.relu_": torch.Tensor.relu_,
}


@pytest.mark.parametrize("name", sorted(RELUS))
def test_surrogate_relu_matches_its_definition(gen, name):
    """A 2-layer ReLU net ``v . relu(W x + b)``: the forward is relu's; the gradients are the hand-computed
    ones with sigmoid(alpha h) for relu'(h), w.r.t. the input and the first layer's weights."""
    relu, alpha = RELUS[name], 3.0
    x = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(11, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    b1, v = (torch.randn(11, generator=gen, dtype=torch.float64) for _ in range(2))
    with ref.surrogate_relu(alpha):
        h = x @ w1.T + b1  # [5, 11]
        pre = h.detach().clone()
        out = relu(h)
        if name.endswith(("inplace)", "_")):  # overwritten in place, as relu_ does
            assert out.data_ptr() == h.data_ptr() and torch.equal(h, pre.clamp(min=0))
        y = out @ v
    torch.testing.assert_close(y, pre.clamp(min=0) @ v, rtol=0, atol=0)
    gx, gw = torch.autograd.grad(y.sum(), (x, w1))
    d = v * torch.sigmoid(alpha * pre)  # [5, 11]: dy_i/dh_ij
    torch.testing.assert_close(gx, d @ w1.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, d.T @ x.detach(), rtol=1e-12, atol=1e-12)


def test_surrogate_relu_leaves_nothing_behind():
    """Only the graph built inside the context has the surrogate; after it, also after an error inside it,
    relu's gradient is 1[x > 0] again."""
    x = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    with pytest.raises(KeyError, match="inside"):
        with ref.surrogate_relu(2.0):
            inside = torch.relu(x)
            raise KeyError("inside")
    for f in (torch.relu, nn.ReLU(), nn.functional.relu):
        (g,) = torch.autograd.grad(f(x).sum(), x)
        assert g.tolist() == [0.0, 1.0, 1.0]
    (g,) = torch.autograd.grad(inside.sum(), x)
    torch.testing.assert_close(g, torch.sigmoid(2.0 * x.detach()))


def test_surrogate_relu_tends_to_the_plain_gradient(gen):
    clf = PlainCNN([1, 12, 12], 3, width=4, feature_dim=8).double().eval()
    x = torch.randn(3, 1, 12, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    (plain,) = torch.autograd.grad(clf(x).square().sum(), x)

    def surrogate(alpha):
        with ref.surrogate_relu(alpha):
            out = clf(x)
        torch.testing.assert_close(out, clf(x), rtol=0, atol=0)
        return torch.autograd.grad(out.square().sum(), x)[0]

    errors = [float((surrogate(a) - plain).norm() / plain.norm()) for a in (1.0, 10.0, 1e3, 1e9)]
    assert errors[0] > 0.1 and errors == sorted(errors, reverse=True) and errors[-1] < 1e-9


def test_surrogate_relu_in_the_step():
    """In the step the forward (loss, terms) is unchanged, and the generator's gradient is the one through
    the same classifier with every ReLU replaced by the explicit surrogate (the head grad-norm term's
    gradient included); with a huge alpha it is the plain gradient."""
    import copy

    from tldr_fast.backends import resolve
    from tldr_fast.step import TLDRObjective

    shape = (1, 12, 12)
    clf = with_meta(PlainCNN(list(shape), 3, width=4, feature_dim=8))
    explicit = copy.deepcopy(clf)
    for parent in list(explicit.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, name, ExplicitSurrogateReLU(5.0))

    def step(model, **options):
        cfg = InversionConfig().with_overrides(**TINY, **options)
        assert cfg.active("grad_norm") and cfg.grad_norm == "head"
        torch.manual_seed(0)
        g = ConditionedGenerator(3, shape, cfg.nz, cfg.ngf)
        target = FrozenClassifier(model, 3, shape, device="cpu")
        loss, terms = TLDRObjective(g, target, cfg, resolve("torch", "cpu", quiet=True), torch.device("cpu"))(2)
        return loss.detach(), terms, torch.autograd.grad(loss, list(g.parameters()))

    plain, surrogate, want, huge = (
        step(clf),
        step(clf, surrogate_relu=5.0),
        step(explicit),
        step(clf, surrogate_relu=1e9),
    )
    for run in (surrogate, want, huge):
        torch.testing.assert_close(run[:2], plain[:2], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(surrogate[2], want[2], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(huge[2], plain[2], rtol=1e-5, atol=1e-7)
    assert any((a - b).abs().max() > 1e-3 * b.abs().max() for a, b in zip(surrogate[2], plain[2]))


# --- adversarial student (DFAD) ----------------------------------------------------------------------


def test_disagreement_matches_its_definition(gen):
    """(1/(B K)) sum |t - s|; gradient sign(t - s) / (B K) w.r.t. t and its negative w.r.t. s."""
    t, s = (torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    td, sd = t.detach(), s.detach()
    want = sum(abs(float(td[i, k] - sd[i, k])) for i in range(5) for k in range(4)) / 20
    value = ref.disagreement(t, s)
    assert value.dtype == torch.float64 and math.isclose(value.item(), want, rel_tol=1e-12)
    gt, gs = torch.autograd.grad(value, (t, s))
    sign = torch.sign(td - sd) / 20
    torch.testing.assert_close(gt, sign, rtol=0, atol=0)
    torch.testing.assert_close(gs, -sign, rtol=0, atol=0)
    assert torch.autograd.gradcheck(ref.disagreement, (t, s))
    assert ref.disagreement(td.bfloat16(), sd.bfloat16()).dtype == torch.float32


def _student(seed=0, shape=(1, 12, 12), k=3, batch=8):
    from tldr_fast.distributed import Shard
    from tldr_fast.step import Student

    return Student(k, shape, seed, torch.device("cpu"), Shard.of(batch, "cpu"))


def test_the_student_learns_the_target_on_fixed_images(gen):
    """Each ``learn`` is one Adam step towards the target's logits on the last ``disagreement``'s images:
    on fixed images the disagreement falls; ``disagreement`` itself leaves the student as it is."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))  # the target's weights
    clf = PlainCNN([1, 12, 12], 3, width=4, feature_dim=8).eval()
    x = torch.rand(8, 1, 12, 12, generator=gen) * 2 - 1
    with torch.no_grad():
        teacher = clf(x) * 5  # logits of some size, as a trained target's
    student = _student()
    before = [p.detach().clone() for p in student.model.parameters()]
    student.learn()  # no batch yet: nothing to learn from
    values = [student.disagreement(x, teacher).item()]
    for a, b in zip(student.model.parameters(), before):
        assert torch.equal(a, b)
    for _ in range(15):
        student.learn()
        values.append(student.disagreement(x, teacher).item())
    assert all(v < values[0] for v in values[1:]) and values[-1] < 0.5 * values[0], values


def test_the_student_is_a_function_of_the_seed_and_leaves_the_global_random_state():
    state = torch.get_rng_state()
    a, b, c = _student(0), _student(0), _student(1)
    assert torch.equal(torch.get_rng_state(), state)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    assert any(not torch.equal(p, r) for p, r in zip(a.model.parameters(), c.model.parameters()))


def _adversarial_objective(weight=0.5, **options):
    from tldr_fast.backends import resolve
    from tldr_fast.step import TLDRObjective

    shape = (1, 12, 12)
    cfg = InversionConfig().with_overrides(**TINY, **options, weights={t: 0.0 for t in TERMS} | {"adversarial": weight})
    torch.manual_seed(0)
    g = ConditionedGenerator(3, shape, cfg.nz, cfg.ngf)
    target = FrozenClassifier(with_meta(PlainCNN(list(shape), 3, width=4, feature_dim=8)), 3, shape, device="cpu")
    seen = []
    forward = target.forward_bn_stats
    target.forward_bn_stats = lambda batch, *args: seen.append(batch) or forward(batch, *args)
    return g, target, TLDRObjective(g, target, cfg, resolve("torch", "cpu", quiet=True), torch.device("cpu")), seen


def test_adversarial_in_the_step():
    """The term is -(1/(B K)) sum |t - s| of the target's and the student's logits on the clean images as
    the target sees them (preprocessed); the generator's gradient is that of the explicit expression, and
    a small step along it raises the disagreement (ascent); the student gets no gradient from it."""
    g, target, objective, seen = _adversarial_objective(0.5)

    def disagreement(batch):  # explicit: the logits' mean absolute difference on the preprocessed images
        pre = ((batch + 1) / 2 - 0.2) / 0.3  # the classifier's tldr_meta normalisation
        t, s = target.classifier(pre), objective.student.model(pre)
        return (t - s).abs().sum() / t.numel()

    loss, terms = objective(3)
    explicit = -disagreement(seen[0])
    i = TERMS.index("adversarial")
    torch.testing.assert_close(terms[i], explicit.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(loss, 0.5 * explicit, rtol=1e-6, atol=1e-9)
    params = list(g.parameters())
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    want = torch.autograd.grad(0.5 * explicit, params)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert all(p.grad is None for p in objective.student.model.parameters())
    norm = torch.sqrt(sum(gr.square().sum() for gr in grads))
    with torch.no_grad():
        for p, gr in zip(params, grads):
            p -= 1e-3 * gr / norm  # a small descent step of the generator's loss
    objective(3)  # the same draws, the same student (it has not learnt)
    assert disagreement(seen[1]) > disagreement(seen[0]), "descending the generator's loss ascends the disagreement"


def test_adversarial_student_learns_after_each_step_and_off_changes_nothing():
    """``learn`` moves the student on the last step's images; with the weight 0 there is no student and
    every other term of the step is the same as with it (its initial weights leave the global random
    state alone, so the generator's draws are unchanged)."""
    g_on, _, on, _ = _adversarial_objective(0.5, activation=1.0, tv=1e-3, ce=1.0)
    g_off, _, off, _ = _adversarial_objective(0.0, activation=1.0, tv=1e-3, ce=1.0)
    assert off.student is None and on.student is not None
    for p, q in zip(g_on.parameters(), g_off.parameters()):
        assert torch.equal(p, q)
    (l_on, t_on), (l_off, t_off) = on(0), off(0)
    i = TERMS.index("adversarial")
    assert t_off[i] == 0 and t_on[i] < 0
    keep = [j for j in range(len(TERMS)) if j != i]
    torch.testing.assert_close(t_on[keep], t_off[keep], rtol=0, atol=0)
    torch.testing.assert_close(l_on, l_off + 0.5 * t_on[i], rtol=1e-6, atol=1e-7)
    before = [p.detach().clone() for p in on.student.model.parameters()]
    on.learn()
    off.learn()
    assert all(not torch.equal(p, q) for p, q in zip(on.student.model.parameters(), before))


def test_levers_from_the_command_line_and_in_invert():
    """The options as ``--set KEY=VALUE`` gives them, all on in a short run: finite terms, images in range."""
    from tldr_fast.cli import parse_overrides

    levers = parse_overrides(
        ["output_norm=true", "colour_shift=0.4", "colour_contrast=0.5", "surrogate_relu=50", "adversarial=0.5"]
    )
    cfg = InversionConfig().with_overrides(**levers)
    assert (cfg.output_norm, cfg.colour_shift, cfg.colour_contrast, cfg.surrogate_relu) == (True, 0.4, 0.5, 50)
    assert cfg.weights.adversarial == 0.5
    clf = with_meta(PlainCNN([1, 12, 12], 3, width=4, feature_dim=8))
    inv = invert(clf, 3, (1, 12, 12), **{**TINY, "select": 1}, **levers)
    assert all(math.isfinite(v) for t in TERMS for v in inv.history[t])
    x = inv.sample(n_per_class=2)
    assert x.shape == (6, 1, 12, 12) and x.abs().max() < 1


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"zoom": -1}, "zoom"),
        ({"zoom": 2.0}, "zoom"),
        ({"colour_shift": -0.1}, "colour_shift must be"),
        ({"colour_contrast": float("inf")}, "colour_contrast must be"),
        (
            {"colour_contrast": 0.5, "weights": {"ce_pert": 0.0}},
            "colour_shift and colour_contrast act on the perturbed",
        ),
        ({"output_norm": 1}, "output_norm must be True or False"),
        ({"surrogate_relu": -1.0}, "surrogate_relu must be"),
        ({"surrogate_relu": 5.0, "grad_norm": "full"}, "surrogate_relu needs"),
        ({"surrogate_relu": 5.0, "weights": {"kkt": 1.0}}, "surrogate_relu needs"),
        ({"surrogate_relu": 5.0, "compile": True}, "surrogate_relu needs"),
        ({"weights": {"adversarial": -0.5}}, "weight 'adversarial' must be"),
        ({"weights": {"adversarial": float("inf")}}, "weight 'adversarial' must be"),
        ({"schedules": {"adversarial": (0.5, -1.0)}}, "Ramp: end is a weight"),
        ({"shift": -1}, "shift"),
        ({"rotate": 200.0}, "rotate"),
        ({"scale": 1.0}, "scale"),
        ({"dropout": 1.0}, "dropout"),
        ({"diversity": "pairs"}, "diversity"),
        ({"select": 0}, "select"),
        ({"paired": 1}, "paired"),
        ({"rotate": float("nan")}, "rotate"),
    ],
)
def test_new_options_are_validated(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        InversionConfig(**bad)


def test_shift_images_moves_by_whole_pixels(gen):
    x = torch.rand(5, 2, 6, 7, generator=gen)
    out = shift_images(x, 2, torch.Generator().manual_seed(1), 0.0)
    for i in range(5):
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        assert any(torch.equal(out[i], padded[:, dy : dy + 6, dx : dx + 7]) for dy in range(5) for dx in range(5))
