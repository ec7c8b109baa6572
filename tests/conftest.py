"""Shared fixtures. Importing tests.helpers first sets up the Triton interpreter when there is no GPU."""

import os

import pytest
import torch

from tests.helpers import FAST_BACKENDS, HAS_CUDA, backend_or_skip


def pytest_collection_modifyitems(config, items):
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
def gen():
    """A fresh generator: every run draws new inputs; the seed is printed on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"input seed: {seed}")
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
