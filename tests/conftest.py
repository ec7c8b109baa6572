"""Shared fixtures, and the test environment, set once before anything is collected:

* without a GPU, Triton kernels run under the interpreter (``TRITON_INTERPRET=1``, fp32, small shapes);
  it must be set before triton is first imported;
* fused kernels fill their outputs with NaN before writing (``TLDR_FAST_POISON=1``), so that an element a
  kernel forgot to write shows up;
* random inputs come from ``gen``, seeded per test from one base seed: fixed (0) by default, so a run is
  reproducible; ``TLDR_FAST_TEST_SEED=N`` picks another, ``TLDR_FAST_TEST_SEED=random`` a fresh one per
  run (printed in the header, and each test's seed on failure).
"""

import os
import zlib

import pytest
import torch

from tests.helpers import FAST_BACKENDS, HAS_CUDA, backend_or_skip

_BASE_SEED = 0


def pytest_configure(config):
    global _BASE_SEED
    if not HAS_CUDA:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["TLDR_FAST_POISON"] = "1"
    chosen = os.environ.get("TLDR_FAST_TEST_SEED", "0").strip()
    _BASE_SEED = int.from_bytes(os.urandom(4), "little") if chosen == "random" else int(chosen)


def pytest_report_header(config):
    return f"tldr_fast test seed: {_BASE_SEED} (TLDR_FAST_TEST_SEED=N or =random to change)"


def pytest_collection_modifyitems(config, items):
    for item in items:
        # A test of a Triton kernel names Triton in its file, its name or a parameter (the ``fast``
        # fixture's "triton" backend): marked ``triton``, so that ``make test`` runs these again under the
        # newest Triton (``pytest -m triton``).
        if any("triton" in keyword.lower() for keyword in item.keywords):
            item.add_marker(pytest.mark.triton)
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=FAST_BACKENDS)
def fast(request):
    """Each fast backend in turn (skipped where it cannot run), on the test device."""
    return backend_or_skip(request.param)


@pytest.fixture
def triton_backend():
    """The Triton backend alone (skipped where it cannot run), for the Triton-specific tests."""
    return backend_or_skip("triton")


@pytest.fixture
def gen(request):
    """A generator seeded from the base seed and the test's id (independent of the test order); the seed
    is printed on failure."""
    seed = zlib.crc32(request.node.nodeid.encode(), _BASE_SEED) & 0x7FFFFFFF
    print(f"input seed: {seed} (base {_BASE_SEED})")
    return torch.Generator().manual_seed(seed)


def _data_unavailable(excinfo) -> bool:
    from tldr_fast.data import DataUnavailable

    return isinstance(excinfo, DataUnavailable)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _skip_missing_data())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _skip_missing_data())


def _skip_missing_data():
    """A test whose offline data set is not installed is skipped with the install command as its reason,
    unless TLDR_FAST_REQUIRE_DATA=1 (``make test`` installs the data and sets it: there, missing data
    fails)."""
    try:
        return (yield)
    except Exception as e:
        if not _data_unavailable(e) or os.environ.get("TLDR_FAST_REQUIRE_DATA") == "1":
            raise
        pytest.skip(f"data not installed: {e}")
