"""The public API: invert, InversionConfig, Inversion, checkpoints, resume, and clear errors."""

import importlib
import io
import pickle

import pytest
import torch
import torch.nn as nn

from tldr_fast import Inversion, InversionConfig, LossWeights, Ramp, invert
from tldr_fast.classifier import ClassifierError, FrozenClassifier
from tldr_fast.config import TERMS

TINY = dict(steps=6, batch_size=8, nz=8, ngf=8, device="cpu", progress=False, eval_per_class=2, log_every=2)


def mlp(k=3, shape=(1, 8, 8), hidden=16, seed=0):
    torch.manual_seed(seed)
    c, h, w = shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, k))


class TupleNet(nn.Module):
    """Returns (logits, features) itself, with no recognisable head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.Tanh())
        self.w = nn.Parameter(torch.randn(3, 12))

    def forward(self, x):
        f = self.body(x)
        return f @ self.w.t(), f


def test_invert_returns_a_trained_inversion():
    clf = mlp()
    before = [p.clone() for p in clf.parameters()]
    inv = invert(clf, 3, (1, 8, 8), **TINY)
    assert isinstance(inv, Inversion) and inv.step == 6
    assert set(inv.history) == {"step", *TERMS} and inv.history["step"] == [2, 4, 6]
    assert set(inv.metrics) >= {"accuracy", "confidence", "perturbed_accuracy"}
    assert all(torch.equal(a, b) for a, b in zip(before, clf.parameters())), "the classifier must never change"
    assert all(p.grad is None for p in clf.parameters())
    x = inv.sample(n_per_class=4)
    assert x.shape == (12, 1, 8, 8) and x.abs().max() <= 1 and x.device.type == "cpu"
    assert inv.sample(labels=[2, 0]).shape == (2, 1, 8, 8)


def test_sample_is_batched_and_seeded():
    inv = invert(mlp(), 3, (1, 8, 8), **TINY)
    a = inv.sample(n_per_class=5, batch_size=4, seed=1)
    b = inv.sample(n_per_class=5, batch_size=7, seed=1)
    assert torch.equal(inv.labels(n_per_class=5), torch.tensor([0] * 5 + [1] * 5 + [2] * 5))
    assert not torch.equal(a, inv.sample(n_per_class=5, batch_size=4, seed=2))
    torch.testing.assert_close(a[:4], b[:4])  # the same latents come first whatever the batch size


def test_compile_computes_the_same_step():
    """compile=True: the objective runs the generator and the classifier under torch.compile; loss,
    terms and the generator's gradients are the eager ones (up to floating-point reordering)."""
    from tldr_fast.backends import resolve
    from tldr_fast.generator import ConditionedGenerator
    from tldr_fast.step import TLDRObjective

    device = torch.device("cpu")
    target = FrozenClassifier(mlp(), 3, (1, 8, 8), device=device)
    torch.manual_seed(0)
    g = ConditionedGenerator(3, (1, 8, 8), 8, 8)
    out = []
    for flag in (False, True):
        cfg = InversionConfig(**{**TINY, "compile": flag})
        objective = TLDRObjective(g, target, cfg, resolve("torch", device, quiet=True), device)
        if flag:  # what runs is compiled: the generator, and the classifier inside the feature capture
            assert objective.generate._orig_mod is g
            assert objective.classifier._orig_mod is target.classifier
        loss, terms = objective(5)
        grads = torch.autograd.grad(loss, list(g.parameters()))
        out.append((loss, terms, grads))
    (l0, t0, g0), (l1, t1, g1) = out
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t1, t0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("options", [{}, {"adversarial": 0.5}], ids=["defaults", "adversarial"])
def test_compile_in_invert(options):
    """invert(compile=True) trains like the eager loop (Adam magnifies last-bit differences in the
    parameters, so compare the recorded loss terms), the adversarial student (eager) too; the user's
    classifier and the returned generator stay plain modules, and the option is saved with the config."""
    clf = mlp()
    runs = [
        invert(clf, 3, (1, 8, 8), seed=3, compile=flag, **{**TINY, "steps": 4}, **options) for flag in (False, True)
    ]
    for t in TERMS:
        torch.testing.assert_close(
            torch.tensor(runs[1].history[t]), torch.tensor(runs[0].history[t]), rtol=1e-3, atol=1e-6
        )
    assert type(clf) is nn.Sequential and not hasattr(runs[1].generator, "_orig_mod")
    assert runs[1].config.compile and InversionConfig.from_dict(runs[1].config.to_dict()).compile


def _objective_steps(cfg: InversionConfig, device: torch.device, steps: int = 4):
    """(loss, terms, generator gradients) of ``steps`` Adam steps of a fresh objective (fixed seeds)."""
    from tldr_fast.backends import resolve
    from tldr_fast.generator import ConditionedGenerator
    from tldr_fast.step import TLDRObjective

    target = FrozenClassifier(mlp(), 3, (1, 8, 8), device=device)
    torch.manual_seed(0)
    g = ConditionedGenerator(3, (1, 8, 8), cfg.nz, cfg.ngf).to(device)
    objective = TLDRObjective(g, target, cfg, resolve(cfg.backend, device, quiet=True), device)
    opt = torch.optim.Adam(g.parameters(), lr=cfg.lr, betas=cfg.betas)
    out = []
    for step in range(steps):
        loss, terms = objective(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        out.append((loss.detach().clone(), terms, [p.grad.clone() for p in g.parameters()]))
        opt.step()
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "extension"])
def test_cuda_graph_computes_the_same_steps(backend):
    """cuda_graph=True: the loss block replayed from CUDA graphs gives the losses, terms and generator
    gradients of launching its ops, step after step (new inputs and weights copied in each time)."""
    from tests.helpers import backend_or_skip

    backend_or_skip(backend)
    device = torch.device("cuda")
    runs = [
        _objective_steps(InversionConfig(**{**TINY, "device": "cuda", "backend": backend, "cuda_graph": flag}), device)
        for flag in (False, True)
    ]
    for (l0, t0, g0), (l1, t1, g1) in zip(*runs):
        torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(t1, t0, rtol=1e-5, atol=1e-6)
        for a, b in zip(g1, g0):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert not torch.equal(runs[1][0][1], runs[1][-1][1]), "each step's terms are its own (not the graph's buffer)"


@pytest.mark.gpu
@pytest.mark.parametrize("options", [{}, {"adversarial": 0.5}], ids=["defaults", "adversarial"])
def test_cuda_graph_in_invert(options):
    """invert(cuda_graph=True) trains, records its terms (the adversarial student's, outside the captured
    loss block, too), and saves the option with the config."""
    inv = invert(mlp(), 3, (1, 8, 8), **{**TINY, "device": "cuda", "cuda_graph": True}, **options)
    assert inv.step == 6 and all(len(inv.history[t]) == 3 for t in TERMS)
    assert all(v < 0 for v in inv.history["adversarial"]) == bool(options)
    assert inv.config.cuda_graph and InversionConfig.from_dict(inv.config.to_dict()).cuda_graph


def test_cuda_graph_needs_a_gpu_and_no_double_backward():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        invert(mlp(), 3, (1, 8, 8), **{**TINY, "cuda_graph": True})
    with pytest.raises(ValueError, match="cuda_graph=True needs grad_norm"):
        InversionConfig(cuda_graph=True, grad_norm="full")


def test_same_seed_same_result_on_cpu():
    a = invert(mlp(), 3, (1, 8, 8), seed=3, **TINY)
    b = invert(mlp(), 3, (1, 8, 8), seed=3, **TINY)
    for p, q in zip(a.generator.state_dict().values(), b.generator.state_dict().values()):
        assert torch.equal(p, q)
    assert a.history == b.history


@pytest.mark.parametrize("grad_norm", ["head", "full", "off"])
@pytest.mark.parametrize("conditioning", ["hot", "soft"])
def test_modes_run(grad_norm, conditioning):
    clf = mlp()
    inv = invert(clf, 3, (1, 8, 8), grad_norm=grad_norm, conditioning=conditioning, perturbation="gaussian", **TINY)
    gn = inv.history["grad_norm"]
    assert (max(gn) > 0) == (grad_norm != "off")
    assert all(p.grad is None for p in clf.parameters()), "full grad-norm must not materialise classifier .grad"


def test_head_and_full_grad_norm_agree_on_a_linear_model():
    """On a classifier that is just a linear layer, both definitions are the same number."""
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    terms = {}
    for mode in ("head", "full"):
        torch.manual_seed(0)
        inv = invert(clf, 3, (1, 8, 8), grad_norm=mode, **{**TINY, "steps": 1, "log_every": 1})
        terms[mode] = inv.history["grad_norm"][0]
    assert terms["head"] == pytest.approx(terms["full"], rel=1e-5)


def test_tuple_classifier_and_named_head():
    inv = invert(TupleNet(), 3, (1, 8, 8), grad_norm="off", **TINY)
    assert inv.history["cos"][-1] != 0
    with pytest.raises(ClassifierError, match="final nn.Linear"):
        invert(TupleNet(), 3, (1, 8, 8), grad_norm="head", **TINY)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(64, 3), nn.ReLU(), nn.Linear(3, 3))  # the last candidate wins
    assert FrozenClassifier(clf, 3, (1, 8, 8)).head_name == "3"
    assert FrozenClassifier(clf, 3, (1, 8, 8), head="3").head_bias
    with pytest.raises(ClassifierError, match="not the classifier's output"):
        FrozenClassifier(clf, 3, (1, 8, 8), head="1")
    with pytest.raises(ClassifierError, match="not an nn.Linear"):
        FrozenClassifier(clf, 3, (1, 8, 8), head="2")
    with pytest.raises(ClassifierError, match="not a submodule"):
        FrozenClassifier(clf, 3, (1, 8, 8), head="fc")


def test_schedules_and_weights():
    cfg = InversionConfig(schedules={"tv": (0.0, 1.0, 0, 4)}, weights={"cos": 0.5})
    assert cfg.weights.cos == 0.5 and cfg.weight("tv", 2) == 0.5 and cfg.weight("tv", 10) == 1.0
    assert cfg.weight("ce", 3) == LossWeights().ce
    assert cfg.weight("my_new_term", 3) == 0.0 and not cfg.active("my_new_term")  # declared, not yet weighed
    assert cfg.active("tv") and not cfg.active("kl")
    assert Ramp(1.0, 0.0, 10, 20).at(torch.tensor([0.0, 15.0, 30.0])).tolist() == [1.0, 0.5, 0.0]
    inv = invert(mlp(), 3, (1, 8, 8), schedules={"tv": Ramp(0.0, 1e-3, 0, 4)}, tv=5.0, **TINY)
    assert inv.history["tv"][-1] > 0
    off = invert(
        mlp(),
        3,
        (1, 8, 8),
        weights={"tv": 0.0, "pix": 0.0, "cos": 0.0, "ortho": 0.0, "activation": 0.0, "ce_pert": 0.0},
        **TINY,
    )
    assert off.history["tv"][-1] == off.history["cos"][-1] == off.history["ce_pert"][-1] == 0.0


# --- checkpoints and resume ----------------------------------------------------------------------


def test_resume_equals_an_uninterrupted_run(tmp_path):
    cfg = dict(TINY, steps=10, schedules={"tv": (0.0, 1e-3, 0, 8)}, checkpoint_every=0)
    full = invert(mlp(), 3, (1, 8, 8), **cfg)
    ckpt = tmp_path / "run.pt"
    first = invert(mlp(), 3, (1, 8, 8), checkpoint=ckpt, **{**cfg, "steps": 4})
    assert first.step == 4 and ckpt.exists()
    resumed = invert(mlp(), 3, (1, 8, 8), resume=ckpt, steps=10)
    assert resumed.step == 10
    for (name, p), q in zip(full.generator.state_dict().items(), resumed.generator.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=name)
    assert resumed.history["step"] == full.history["step"]
    for t in TERMS:
        assert resumed.history[t] == pytest.approx(full.history[t], rel=1e-5, abs=1e-7)


def test_a_checkpoint_from_before_a_term_loads_and_resumes(tmp_path):
    """A checkpoint written before the activation term existed (no weight, no history column): the weight
    is 0 whatever today's default (the term was no part of that run's objective), the term's column starts
    at the resumed steps."""
    ckpt = tmp_path / "run.pt"
    invert(mlp(), 3, (1, 8, 8), checkpoint=ckpt, **{**TINY, "steps": 4})
    state = torch.load(ckpt, weights_only=True)
    del state["config"]["weights"]["activation"], state["history"]["activation"]
    torch.save(state, ckpt)
    assert Inversion.load(ckpt, classifier=mlp()).config.weights.activation == 0.0
    resumed = invert(mlp(), 3, (1, 8, 8), resume=ckpt, steps=6)
    assert resumed.history["step"] == [2, 4, 6] and len(resumed.history["activation"]) == 1
    state["config"]["weights"].pop("cos")  # a missing weight whose default is not 0 (Cos: 1) reads 0 too
    torch.save(state, ckpt)
    assert Inversion.load(ckpt, classifier=mlp()).config.weights.cos == 0.0


def test_output_norm_checkpoints_load_resume_and_sample_in_eval_mode(tmp_path):
    """With output_norm the generator's output BatchNorm is saved with it: a loaded inversion samples the
    same images (eval mode: running statistics, so independent of the batch size) and resumes as the
    uninterrupted run; a checkpoint whose config predates the option is a run without it, and resuming a
    run with the other layout is an error that names the option."""
    cfg = dict(TINY, steps=6, output_norm=True)
    full = invert(mlp(), 3, (1, 8, 8), **cfg)
    ckpt = tmp_path / "run.pt"
    first = invert(mlp(), 3, (1, 8, 8), checkpoint=ckpt, **{**cfg, "steps": 3})
    assert "out_norm.running_mean" in torch.load(ckpt, weights_only=True)["generator"]
    loaded = Inversion.load(ckpt, classifier=mlp())
    assert loaded.config.output_norm and loaded.generator.output_norm
    a = loaded.sample(n_per_class=4, batch_size=5, select=1)
    torch.testing.assert_close(a, first.sample(n_per_class=4, batch_size=12, select=1), rtol=0, atol=1e-6)
    resumed = invert(mlp(), 3, (1, 8, 8), resume=ckpt, steps=6)
    for (name, p), q in zip(full.generator.state_dict().items(), resumed.generator.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=name)
    with pytest.raises(ValueError, match="output_norm"):
        invert(mlp(), 3, (1, 8, 8), resume=ckpt, output_norm=False)

    old = tmp_path / "old.pt"
    invert(mlp(), 3, (1, 8, 8), checkpoint=old, **{**TINY, "steps": 2})
    state = torch.load(old, weights_only=True)
    del state["config"]["output_norm"]
    torch.save(state, old)
    assert not Inversion.load(old, classifier=mlp()).config.output_norm
    assert invert(mlp(), 3, (1, 8, 8), resume=old, steps=4).step == 4
    with pytest.raises(ValueError, match="output_norm"):
        invert(mlp(), 3, (1, 8, 8), resume=old, steps=4, output_norm=True)


def test_output_parameterisation_loads_resumes_and_is_checked(tmp_path):
    """scaled_spectrum and decorrelated_colour change the generator's function, not its weights: a loaded run
    samples as it did, a resume keeps them (turning one off is an error that names it), and decorrelated
    colour on grey images is an error before any step."""
    cfg = dict(TINY, steps=4, scaled_spectrum=True, decorrelated_colour=True, select=1)
    ckpt = tmp_path / "run.pt"
    first = invert(mlp(3, (3, 8, 8)), 3, (3, 8, 8), checkpoint=ckpt, **cfg)
    loaded = Inversion.load(ckpt, classifier=mlp(3, (3, 8, 8)))
    assert loaded.generator.spectrum is not None and loaded.generator.colour is not None
    torch.testing.assert_close(loaded.sample(n_per_class=3), first.sample(n_per_class=3), rtol=0, atol=1e-6)
    assert invert(mlp(3, (3, 8, 8)), 3, (3, 8, 8), resume=ckpt, steps=6).step == 6
    for off in ("scaled_spectrum", "decorrelated_colour"):
        with pytest.raises(ValueError, match=off):
            invert(mlp(3, (3, 8, 8)), 3, (3, 8, 8), resume=ckpt, steps=8, **{off: False})
    with pytest.raises(ValueError, match="decorrelated_colour needs 3 channels"):
        invert(mlp(), 3, (1, 8, 8), **{**TINY, "decorrelated_colour": True})


def test_the_adversarial_student_is_checkpointed_and_resumed(tmp_path):
    """With the adversarial term the checkpoint holds the student and its Adam state: N/2 steps, then a
    resume to N, end where N uninterrupted steps do (the generator and the student); a checkpoint from
    before the term (no student, no weight in its config) is a run without it, and turning the term on
    when resuming it starts a fresh student. Without the term the checkpoint holds no student."""
    cfg = dict(TINY, steps=6, adversarial=0.5, select=1)
    whole, half = tmp_path / "whole.pt", tmp_path / "half.pt"
    full = invert(mlp(), 3, (1, 8, 8), checkpoint=whole, **cfg)
    invert(mlp(), 3, (1, 8, 8), checkpoint=half, **{**cfg, "steps": 3})
    resumed = invert(mlp(), 3, (1, 8, 8), resume=half, steps=6)
    for (name, p), q in zip(full.generator.state_dict().items(), resumed.generator.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=name)
    a, b = (torch.load(f, weights_only=True)["student"] for f in (whole, half))
    for name, p in a["model"].items():
        torch.testing.assert_close(b["model"][name], p, rtol=1e-6, atol=1e-7, msg=name)
    for i, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(b["optimizer"]["state"][i][key], value, rtol=1e-6, atol=1e-9)
    assert resumed.history["adversarial"][-1] == pytest.approx(full.history["adversarial"][-1], rel=1e-5)

    old = tmp_path / "old.pt"
    invert(mlp(), 3, (1, 8, 8), checkpoint=old, **{**TINY, "steps": 2})
    state = torch.load(old, weights_only=True)
    assert state["student"] is None
    del state["student"], state["config"]["weights"]["adversarial"]
    torch.save(state, old)
    assert Inversion.load(old, classifier=mlp()).config.weights.adversarial == 0.0
    assert set(invert(mlp(), 3, (1, 8, 8), resume=old, steps=4).history["adversarial"]) == {0.0}
    assert invert(mlp(), 3, (1, 8, 8), resume=old, steps=6, adversarial=0.5).history["adversarial"][-1] < 0


def test_a_checkpoint_with_the_embedding_bias_loads_and_resumes(tmp_path, monkeypatch):
    """A checkpoint written while the generator's embedding had a bias (removed: its exact gradient is 0)
    loads as the same generator (eval-mode samples) and resumes, Adam's state of the other parameters
    carried over: the resumed run is the old code's uninterrupted run (up to rounding; the bias folded into
    the BatchNorm's running mean), and the checkpoint it writes has neither the bias nor its Adam state."""
    from tests.test_generator import LegacyGenerator

    invert_module = importlib.import_module("tldr_fast.invert")  # the module (the package's `invert` is the function)

    cfg = dict(TINY, steps=10, checkpoint_every=0)
    ckpt = tmp_path / "old.pt"
    with monkeypatch.context() as m:  # the old code
        m.setattr(invert_module, "ConditionedGenerator", LegacyGenerator)
        full = invert(mlp(), 3, (1, 8, 8), **cfg)
        first = invert(mlp(), 3, (1, 8, 8), checkpoint=ckpt, **{**cfg, "steps": 4})
    old = torch.load(ckpt, weights_only=True)
    n = len(list(first.generator.parameters()))
    assert "embed.bias" in old["generator"] and old["optimizer"]["param_groups"][0]["params"] == list(range(n))
    loaded = Inversion.load(ckpt, classifier=mlp())  # the same selection of candidates
    assert "embed.bias" not in loaded.generator.state_dict()
    torch.testing.assert_close(loaded.sample(n_per_class=3), first.sample(n_per_class=3), rtol=1e-5, atol=1e-5)

    resumed = invert(mlp(), 3, (1, 8, 8), resume=ckpt, steps=10)
    assert resumed.step == 10 and "embed.bias" not in resumed.generator.state_dict()
    weights, reference = resumed.generator.state_dict(), full.generator.state_dict()
    # the old run's BatchNorm after the embedding recorded the bias's drift (Adam moved it by about lr a step)
    # in its running mean, which no fold of the final bias undoes: that mean is compared at the load only
    assert weights.keys() == reference.keys() - {"embed.bias"}
    for name in sorted(
        set(weights) - {"project.1.running_mean"}
    ):  # within 1e-5 relative (norm of each tensor: Adam's first steps
        a, b = weights[name].double(), reference[name].double()  # are about lr * sign(gradient), as in the
        assert (a - b).norm() <= 1e-5 * b.norm(), (  # distributed test: a near-zero gradient steps either way)
            f"{name}: relative difference {(a - b).norm() / b.norm():.2e}"
        )
    assert resumed.history["step"] == full.history["step"]
    for t in TERMS:
        assert resumed.history[t] == pytest.approx(full.history[t], rel=1e-5, abs=1e-7), t
    new = torch.load(ckpt, weights_only=True)
    assert "embed.bias" not in new["generator"]
    assert (
        new["optimizer"]["param_groups"][0]["params"] == list(range(n - 1)) and len(new["optimizer"]["state"]) == n - 1
    )


def test_checkpoints_are_written_periodically_and_atomically(tmp_path):
    ckpt = tmp_path / "sub" / "run.pt"
    invert(mlp(), 3, (1, 8, 8), checkpoint=ckpt, checkpoint_every=2, **{**TINY, "steps": 4})
    assert ckpt.exists() and not list(ckpt.parent.glob(".*.tmp"))
    inv = Inversion.load(ckpt, classifier=mlp())
    assert inv.step == 4 and inv.sample(n_per_class=1).shape == (3, 1, 8, 8)
    assert set(inv.classifier_metrics(n_per_class=2)) >= {"accuracy", "confidence"}


@pytest.mark.parametrize("minutes, saved", [(1, [2, 4, 6, 6]), (0, [6])])
def test_checkpoints_are_written_every_checkpoint_minutes(tmp_path, monkeypatch, minutes, saved):
    """A clock that advances 40 s at each reading: with checkpoint_minutes=1, a save whenever a minute has passed
    since the last (then the final one); with 0, only the final one."""
    invert_module = importlib.import_module("tldr_fast.invert")  # the module (the package exports the function)
    seconds = iter(range(0, 10**6, 40))
    steps = []
    monkeypatch.setattr(invert_module, "monotonic", lambda: next(seconds))
    monkeypatch.setattr(invert_module, "save_checkpoint", lambda path, state: steps.append(state["step"]))
    invert(mlp(), 3, (1, 8, 8), checkpoint=tmp_path / "run.pt", checkpoint_minutes=minutes, **TINY)
    assert steps == saved


def test_interrupt_saves_a_resumable_checkpoint(tmp_path):
    class Stop(nn.Module):  # raises KeyboardInterrupt at its 4th training forward (after the probe)
        def __init__(self):
            super().__init__()
            self.net, self.calls = mlp(), 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 5:
                raise KeyboardInterrupt
            return self.net(x)

    ckpt = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        invert(Stop(), 3, (1, 8, 8), checkpoint=ckpt, **TINY)
    resumed = invert(mlp(), 3, (1, 8, 8), resume=ckpt)
    assert resumed.step == TINY["steps"]


class Failing(nn.Module):
    """A CNN with BatchNorm (in training mode, its first convolution frozen by the user) that raises
    ``error`` at its ``fail_at``-th forward (0: never)."""

    def __init__(self, fail_at=0, error=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(256, 8),
            nn.BatchNorm1d(8),
            nn.ReLU(),
            nn.Linear(8, 3),
        )
        self.net[0].requires_grad_(False)
        self.fail_at, self.error, self.calls = fail_at, error, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error
        return self.net(x)


def _user_visible(model: nn.Module) -> dict:
    """What a library must leave as it was: each submodule's attribute names, hooks of every kind,
    training mode, and each parameter's ``requires_grad``."""
    return {
        name: (
            sorted(vars(m)),
            {k: len(v) for k, v in vars(m).items() if "hook" in k and isinstance(v, dict)},
            m.training,
            [p.requires_grad for p in m.parameters(recurse=False)],
        )
        for name, m in model.named_modules()
    }


@pytest.mark.parametrize(
    "fail_at, error, grad_norm",
    [(0, None, "head"), (0, None, "full"), (4, RuntimeError("boom"), "head"), (4, KeyboardInterrupt(), "full")],
)
def test_invert_leaves_the_users_classifier_as_it_was(fail_at, error, grad_norm):
    model = Failing(fail_at, error)
    before, weights = _user_visible(model), {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(2):  # repeated runs leave nothing behind either
        model.calls = 0
        if error is None:
            inv = invert(model, 3, (1, 8, 8), grad_norm=grad_norm, **{**TINY, "steps": 2})
            assert inv.sample(n_per_class=1, select=2).shape == (3, 1, 8, 8)  # selection runs the classifier
        else:
            with pytest.raises(type(error)):
                invert(model, 3, (1, 8, 8), grad_norm=grad_norm, **{**TINY, "steps": 2})
        assert _user_visible(model) == before
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
        torch.save(model, io.BytesIO())  # no hook closures of the library hold on to it


def test_checkpoint_loading_never_unpickles_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as f:
        pickle.dump({"format": "tldr_fast.inversion/1", "x": Evil()}, f)
    with pytest.raises(ValueError, match="weights only"):
        Inversion.load(bad)


# --- bad input -----------------------------------------------------------------------------------


def test_wrong_image_shape():
    with pytest.raises(ClassifierError, match=r"image_shape=\(1, 9, 9\)"):
        invert(mlp(), 3, (1, 9, 9), **TINY)
    with pytest.raises(ValueError, match="image_shape"):
        invert(mlp(), 3, (28, 28), **TINY)
    with pytest.raises(ValueError, match="image_shape"):
        invert(mlp(), 3, (1, 4, 4), **TINY)


def test_num_classes_mismatch():
    with pytest.raises(ClassifierError, match=r"the classifier has 3 classes .*, not num_classes=5") as e:
        invert(mlp(k=3), 5, (1, 8, 8), **TINY)
    assert "head=" not in str(e.value)  # naming a layer would not help: the class counts differ
    with pytest.raises(ValueError, match="num_classes"):
        invert(mlp(), 1, (1, 8, 8), **TINY)


def test_nan_logits():
    class NaNNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 3)

        def forward(self, x):
            return self.fc(x.flatten(1)) * float("nan")

    with pytest.raises(ClassifierError, match="NaN"):
        invert(NaNNet(), 3, (1, 8, 8), **TINY)


def test_softmax_after_the_head_is_refused():
    clf = nn.Sequential(nn.Flatten(), nn.Linear(64, 3), nn.Softmax(dim=1))
    with pytest.raises(ClassifierError, match="softmax"):
        invert(clf, 3, (1, 8, 8), **TINY)


def test_a_forward_that_changes_a_buffer_is_refused():
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 3)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls += 1
            return self.fc(x.flatten(1)) + self.calls  # the same images give other logits on every call

    with pytest.raises(ClassifierError, match="forward changed its buffer 'calls'") as e:
        invert(Counting(), 3, (1, 8, 8), **TINY)
    assert "softmax" not in str(e.value)


def test_not_a_module():
    with pytest.raises(ClassifierError, match="nn.Module"):
        invert(lambda x: x, 3, (1, 8, 8), **TINY)


@pytest.mark.parametrize(
    "override,match",
    [
        ({"stepz": 3}, "did you mean 'steps'"),
        ({"weights": {"tvv": 1.0}}, "did you mean 'tv'"),
        ({"grad_norm": "hed"}, "did you mean 'head'"),
        ({"backend": "cuda2"}, "backend"),
        ({"perturbation": "salt"}, "perturbation"),
        ({"batch_size": 1}, "batch_size"),
        ({"eps": 2.0}, "eps"),
        ({"steps": 0}, "steps"),
        ({"tv": -1.0}, "tv"),
        ({"preprocess": "imagenet"}, "preprocess"),
        ({"compile": True, "grad_norm": "full"}, "double backward"),
        ({"compile": "yes"}, "compile"),
        ({"checkpoint_minutes": -1}, "checkpoint_minutes"),
        ({"checkpoint_minutes": float("nan")}, "checkpoint_minutes"),
    ],
)
def test_bad_options_are_clear(override, match):
    with pytest.raises((TypeError, ValueError), match=match):
        invert(mlp(), 3, (1, 8, 8), **{**TINY, **override})


def test_unknown_backend_and_unavailable_device():
    from tldr_fast.backends import BackendUnavailable, resolve

    with pytest.raises(BackendUnavailable, match="unknown backend"):
        resolve("fast", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            invert(mlp(), 3, (1, 8, 8), **{**TINY, "device": "cuda"})


def test_config_round_trip():
    cfg = InversionConfig(steps=7, schedules={"tv": (0, 1, 0, 5)}, preprocess=((0.5,), (0.25,)), weights={"cos": 2.0})
    assert InversionConfig.from_dict(cfg.to_dict()) == cfg
    custom = InversionConfig(preprocess=lambda x: x)
    with pytest.raises(ValueError, match="preprocess"):
        InversionConfig.from_dict(custom.to_dict())
