"""Helpers shared by the tests (importing this module changes nothing: the test environment is set up
by ``conftest.pytest_configure``). GPU-only tests carry ``@pytest.mark.gpu`` and are skipped, not failed,
without CUDA.
"""

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

DEVICE = "cuda" if HAS_CUDA else "cpu"
FAST_BACKENDS = ("triton", "extension")


def backend_or_skip(name: str, device: str = DEVICE):
    """The backend's own ops (no fallback to another backend), or a pytest skip saying why it cannot
    run here."""
    from tldr_fast.backends import BackendUnavailable, resolve

    try:
        return resolve(name, device, fallback=False)
    except BackendUnavailable as e:
        pytest.skip(f"backend {name!r} unavailable on {device}: {e}")


def rand(gen, *shape, dtype=torch.float32, device=DEVICE, scale=1.0):
    """Standard normal values drawn on the CPU from ``gen`` (so a seed reproduces them anywhere)."""
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def rand_weights(gen, n, device=DEVICE):
    """Loss weights in [0.5, 1.5) drawn on the CPU from ``gen``: ``[n]`` fp32 on ``device``."""
    return (torch.rand(n, generator=gen) + 0.5).to(device)


def loss_and_grad(fn, x):
    """``fn`` (returning ``(loss, terms)``) on a fresh leaf copy of ``x``, then ``loss.backward()``:
    ``(loss, terms, d loss / d x)``."""
    xi = x.detach().clone().requires_grad_(True)
    loss, terms = fn(xi)
    loss.backward()
    return loss, terms, xi.grad


def assert_close(actual, expected, rtol=2e-5, atol=1e-6, what=""):
    """fp32 tolerance: about 1e-5 relative; every element finite (poisoned outputs are NaN)."""
    assert torch.isfinite(actual).all(), f"{what}: non-finite elements (unwritten output?)"
    torch.testing.assert_close(
        actual.float().cpu(), expected.float().cpu(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}"
    )


def assert_low_precision_close(actual, reference_lp, reference_hp, slack=2.0, atol=1e-6, what=""):
    """bf16/fp16: our error against a high-precision reference is at most ``slack`` times the
    reference's own low-precision error (elementwise bound on norms)."""
    assert torch.isfinite(actual).all(), f"{what}: non-finite elements"
    hp = reference_hp.double().cpu()
    ours = (actual.double().cpu() - hp).norm()
    theirs = (reference_lp.double().cpu() - hp).norm()
    assert ours <= slack * theirs + atol * (1 + hp.norm()), f"{what}: error {ours:.3g} vs reference's own {theirs:.3g}"


def assert_compiled_matches_eager(f, x, **compile_kwargs):
    """``torch.compile(f, fullgraph=True)`` gives the value of ``f(x)`` and its gradient w.r.t. ``x``."""
    out = []
    for fn in (torch.compile(f, fullgraph=True, **compile_kwargs), f):
        xi = x.clone().requires_grad_(True)
        value = fn(xi)
        value.backward()
        out.append((value, xi.grad))
    assert_close(out[0][0], out[1][0], what="value")
    assert_close(out[0][1], out[1][1], what="d/dx")
