"""torch.distributed on the CPU (gloo): 2 ranks against 1 process, the exact global-batch diversity
terms, sharded sampling and evaluation, and a killed rank. Ranks run in subprocesses (spawned, or
torchrun), each with a timeout."""

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from tldr_fast import distributed, invert, reference
from tldr_fast.samples import load_sample

pytestmark = pytest.mark.timeout(120)

# a small objective for whole runs (the head grad-norm, moments, bn_stats and mode-seeking, exact too, are
# checked on one step by test_two_ranks_compute_the_objective_of_one_process_with_the_default_terms); the
# activation term on; the torch backend (the reference's perturbation noise)
TINY = dict(
    steps=4,
    batch_size=8,
    nz=8,
    ngf=8,
    device="cpu",
    progress=False,
    eval_per_class=2,
    log_every=1,
    backend="torch",
    grad_norm="off",
    moments=0.0,
    mode_seek=0.0,
    activation=0.1,
    select=1,
)


def classifier(k=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, k)
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, out: Path, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(fn(*args), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, tmp_path: Path, *args):
    """``fn(*args)`` on each of ``world`` spawned ranks in a gloo process group: the list of results."""
    mp.spawn(_worker, (world, _free_port(), fn, tmp_path, args), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _invert(kwargs):
    inv = invert(classifier(), 3, (1, 8, 8), **kwargs)
    return {k: v.detach().clone() for k, v in inv.generator.state_dict().items()}, inv.history


# the adversarial student: the same on every rank, its gradients summed over ranks (the global batch's)
LEVERS = {"output_norm": True, "colour_shift": 0.4, "colour_contrast": 0.5, "surrogate_relu": 5.0, "adversarial": 0.5}


@pytest.mark.parametrize(
    "options", [{}, {"diversity": "class", "paired": True}, LEVERS], ids=["batch", "class-paired", "levers"]
)
def test_two_ranks_train_the_generator_of_one_process(tmp_path, options):
    # seed 1: with seed 0 (batch), one element of project.0.weight with a near-zero gradient ends 1.2e-4 apart
    # and two BatchNorm biases of small norm 4e-5 relative, beyond the tolerance below (seeds 1-5: within 2e-6)
    kwargs = {**TINY, **options, "seed": 1}
    torch.set_num_threads(1)
    weights, history = _invert(kwargs)
    (w0, h0), (w1, h1) = run_ranks(_invert, 2, tmp_path, kwargs)
    assert h0 == h1, "every rank logs the global terms"
    # every tensor (the BatchNorm statistics included) within 1e-5 relative (norm of each tensor: Adam's
    # first steps are about lr * sign(gradient), so an element with a near-zero gradient may step either way)
    for name in sorted(weights):
        torch.testing.assert_close(w0[name], w1[name], rtol=0, atol=0, msg=f"{name} differs between ranks")
        a, b = w0[name].double(), weights[name].double()
        assert (a - b).norm() <= 1e-5 * b.norm(), (
            f"{name}: 2 ranks vs 1 process, relative difference {(a - b).norm() / b.norm():.2e}"
        )
    for term, values in history.items():
        torch.testing.assert_close(
            torch.tensor(h0[term]), torch.tensor(values), rtol=1e-5, atol=1e-6, msg=f"history of {term}"
        )


def bn_classifier(k=3, seed=0):
    """With BatchNorm layers (running statistics away from 0 and 1) and a normalisation (``tldr_meta``): the
    bn_stats and moments terms act."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 8 * 8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, k),
    )  # fmt: skip
    for m in net:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    net.tldr_meta = {"mean": [0.4], "std": [0.3]}
    return net


def _objective(batch_sizes):
    """For each batch size, one step of the objective with the default weights (head grad-norm, moments,
    bn_stats, mode-seeking on) and the reference ops: the loss (this rank's), the global terms and the
    generator's gradients (DDP's average over ranks)."""
    from tldr_fast.backends import resolve
    from tldr_fast.classifier import FrozenClassifier
    from tldr_fast.config import InversionConfig
    from tldr_fast.generator import ConditionedGenerator
    from tldr_fast.step import TLDRObjective

    out = []
    for batch_size in batch_sizes:
        cfg = InversionConfig(batch_size=batch_size, nz=8, ngf=8, device="cpu", backend="reference", select=1)
        target = FrozenClassifier(bn_classifier(), 3, (1, 8, 8), device="cpu", quiet=True)
        torch.manual_seed(0)
        g = ConditionedGenerator(3, (1, 8, 8), cfg.nz, cfg.ngf)
        objective = TLDRObjective(g, target, cfg, resolve("reference", "cpu", quiet=True), torch.device("cpu"))
        loss, terms = objective(3)
        loss.backward()
        out.append((loss.detach(), objective.global_terms(terms), [p.grad.clone() for p in g.parameters()]))
    return out


def test_two_ranks_compute_the_objective_of_one_process_with_the_default_terms(tmp_path):
    """The head grad-norm, moments, bn_stats and mode-seeking of the global batch (from all-reduced sums): the
    mean of the ranks' losses, the logged terms and the generator's gradients are one process's, to fp32
    rounding; with an even batch and an odd one (the ranks hold 4 and 5 rows, the last one unpaired)."""
    from tldr_fast.config import TERMS

    torch.set_num_threads(1)
    sizes = (8, 9)
    ranks = run_ranks(_objective, 2, tmp_path, sizes)
    for i, (loss, terms, grads) in enumerate(_objective(sizes)):
        for name in ("grad_norm", "moments", "bn_stats", "mode_seek"):
            assert terms[TERMS.index(name)] > 0, f"{name} is part of the objective"
        torch.testing.assert_close(torch.stack([r[i][0] for r in ranks]).mean(), loss, rtol=1e-5, atol=1e-6)
        for _, r_terms, r_grads in (r[i] for r in ranks):
            for name, a, b in zip(TERMS, r_terms, terms):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"B={sizes[i]}: term {name}")
            for j, (a, b) in enumerate(zip(r_grads, grads)):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"B={sizes[i]}: generator gradient {j}")


def _feature_terms(phi, w, labels, k):
    rank, world = distributed.world()
    shard = distributed.Shard.of(len(phi), "cpu")
    x = shard.take(phi).clone().requires_grad_(True)
    loss, terms = distributed.feature_loss(x, w, len(phi), None if labels is None else shard.take(labels), k)
    (loss / world).backward()  # the process group's objective: the mean of the ranks' losses
    return loss.detach(), terms, x.grad, shard.index


@pytest.mark.parametrize("by_class", [False, True], ids=["batch", "class"])
def test_distributed_feature_loss_is_the_global_one(tmp_path, by_class):
    gen = torch.Generator().manual_seed(0)
    phi = torch.randn(11, 6, generator=gen, dtype=torch.float64) + 0.3
    phi[3, :2] = 0  # Act's gradient is 0 there
    labels = torch.randint(0, 3, (11,), generator=gen) if by_class else None
    w = torch.tensor([0.7, 1.3, 0.9], dtype=torch.float64)
    x = phi.clone().requires_grad_(True)
    loss, terms = reference.feature_loss(x, w, labels, 3)
    loss.backward()
    grad = torch.zeros_like(phi)
    for r_loss, r_terms, r_grad, index in run_ranks(_feature_terms, 2, tmp_path, phi, w, labels, 3):
        torch.testing.assert_close(r_loss, loss.detach())
        torch.testing.assert_close(r_terms, terms)
        grad[index] = r_grad
    torch.testing.assert_close(grad, x.grad)


KILLED_RANK = textwrap.dedent("""
    import os, signal, sys
    import torch, torch.nn as nn
    from tldr_fast import distributed, invert

    class Dies(nn.Module):  # rank 1 is killed (SIGKILL) in the forward of step 3 (after the probe's 2 and steps 0-2)
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 6 and os.environ["RANK"] == "1":
                os.kill(os.getpid(), signal.SIGKILL)
            return self.net(x)

    with distributed.process_group("cpu"):
        invert(Dies(), 3, (1, 8, 8), steps=1000, batch_size=8, nz=8, ngf=8, device="cpu", progress=False, backend="torch",
               grad_norm="off", select=1, checkpoint=sys.argv[1])
""")


def test_a_killed_rank_stops_the_job_with_a_clear_error_and_rank_0_saves_its_last_step(tmp_path):
    """No periodic checkpoint is due (default checkpoint_minutes=10); rank 0, at a complete step when its
    collective fails, saves that step (with the BatchNorm statistics of that step, not of the unfinished one)."""
    script = tmp_path / "killed.py"
    script.write_text(KILLED_RANK)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TLDR_FAST_DIST_TIMEOUT": "30",
        "PYTHONPATH": str(Path(__file__).parents[1]),
    }
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
    ]
    start = time.monotonic()
    ckpt = tmp_path / "run.pt"
    run = subprocess.run([*torchrun, str(script), str(ckpt)], env=env, capture_output=True, text=True, timeout=90)
    elapsed = time.monotonic() - start
    assert run.returncode != 0
    assert elapsed < 60, f"took {elapsed:.0f} s to stop"
    assert "Signal 9 (SIGKILL) received by PID" in run.stderr and "rank" in run.stderr, run.stderr[-2000:]
    assert f"saved step 3 to {ckpt}" in run.stderr, run.stderr[-2000:]
    from tldr_fast import Inversion

    saved = Inversion.load(ckpt, device="cpu")
    assert saved.step == 3
    tracked = [b for name, b in saved.generator.named_buffers() if name.endswith("num_batches_tracked")]
    assert tracked and all(int(b) == 3 for b in tracked)


def _sample(path, out):
    from tldr_fast import Inversion
    from tldr_fast.samples import write_samples

    inv = Inversion.load(path, classifier=classifier(), device="cpu")
    write_samples(inv, out, inv.labels(n_per_class=5), batch_size=2, select=2)
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def test_sharded_sample_equals_one_process(tmp_path):
    inv = invert(classifier(), 3, (1, 8, 8), **{**TINY, "steps": 2})
    inv.save(tmp_path / "inv.pt")
    files = _sample(tmp_path / "inv.pt", tmp_path / "one")
    (tmp_path / "one" / "0" / "00001.png").unlink()  # and a resumed single-process sample is the same
    assert _sample(tmp_path / "inv.pt", tmp_path / "one") == files
    sharded = run_ranks(_sample, 2, tmp_path, tmp_path / "inv.pt", tmp_path / "two")
    assert sharded[0] == sharded[1] == files and len(files) == 16  # 15 images and the manifest
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f


def _npz_sample(path, out, shard_size):
    from tldr_fast import Inversion
    from tldr_fast.samples import write_samples

    inv = Inversion.load(path, classifier=classifier(), device="cpu")
    written = write_samples(inv, out, inv.labels(n_per_class=5), batch_size=3, select=2, shard_size=shard_size)
    return written.name, sorted(p.name for p in out.parent.iterdir())


SHARDS = [f"s-0000{i}-of-00004.npz" for i in range(4)] + ["s-index.json"]  # 15 images in shards of 4


def test_sharded_npz_sample_equals_one_process(tmp_path):
    """Shards of 4 images, generated 3 at a time (batches straddle shards): 2 ranks write the files one
    process writes, byte for byte, and the shards in index order hold the single .npz's sample."""
    inv = invert(classifier(), 3, (1, 8, 8), **{**TINY, "steps": 2})
    inv.save(tmp_path / "inv.pt")
    assert _npz_sample(tmp_path / "inv.pt", tmp_path / "single" / "s.npz", None) == ("s.npz", ["s.npz"])
    one = _npz_sample(tmp_path / "inv.pt", tmp_path / "one" / "s.npz", 4)
    sharded = run_ranks(_npz_sample, 2, tmp_path, tmp_path / "inv.pt", tmp_path / "two" / "s.npz", 4)
    assert sharded[0] == sharded[1] == one == ("s-index.json", SHARDS)
    for f in SHARDS:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    images, labels = load_sample(tmp_path / "two" / "s-index.json")
    with np.load(tmp_path / "single" / "s.npz") as z:
        assert images.dtype == np.uint8 and images.shape == (15, 1, 8, 8)
        np.testing.assert_array_equal(images, z["images"])
        np.testing.assert_array_equal(labels, z["labels"])


def test_an_interrupted_sharded_sample_is_completed_by_a_rerun(tmp_path):
    """One process wrote the sample, then a shard was lost and a killed writer left its temp file: 2 ranks
    complete it, writing only the missing shard."""
    inv = invert(classifier(), 3, (1, 8, 8), **{**TINY, "steps": 2})
    inv.save(tmp_path / "inv.pt")
    out = tmp_path / "s"
    assert _npz_sample(tmp_path / "inv.pt", out / "s.npz", 4)[1] == SHARDS
    complete = {f: (out / f).read_bytes() for f in SHARDS}
    (out / SHARDS[1]).unlink()  # rank 1's
    (out / f".{SHARDS[2]}.999999.tmp").write_bytes(b"partial")  # rank 0's, never renamed into place
    kept = {f: (out / f).stat().st_mtime_ns for f in SHARDS if f != SHARDS[1]}
    sharded = run_ranks(_npz_sample, 2, tmp_path, tmp_path / "inv.pt", out / "s.npz", 4)
    assert sharded[0] == sharded[1] == ("s-index.json", SHARDS)  # the temp file is gone
    assert {f: (out / f).read_bytes() for f in SHARDS} == complete
    assert {f: (out / f).stat().st_mtime_ns for f in kept} == kept, "a complete shard (or the index) was rewritten"


def _evaluate(generated, labels, train, held):
    from tldr_fast import evaluate

    report = evaluate(
        generated, train, labels, value_range=(0.0, 1.0), held_out=held, backend="reference", device="cpu"
    )
    return None if report is None else report.to_dict()


def test_sharded_evaluate_equals_one_process(tmp_path):
    """Equal reports (the reference SSIM computes each pair alone; the blocked fp32 backends agree to
    rounding, as their block shapes differ with the columns a rank holds)."""
    gen = torch.Generator().manual_seed(0)
    images = lambda n: torch.rand(n, 1, 12, 12, generator=gen)  # noqa: E731
    labels = lambda n: torch.randint(0, 3, (n,), generator=gen)  # noqa: E731
    generated, train, held = (images(10), labels(10)), (images(25), labels(25)), (images(9), labels(9))
    one = _evaluate(*generated, train, held)
    sharded = run_ranks(_evaluate, 2, tmp_path, *generated, train, held)
    assert sharded[1] is None
    assert sharded[0] == one
