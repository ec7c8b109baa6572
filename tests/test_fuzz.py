"""Property-based fuzzing of the public API and the command line: random option values, shapes, labels and
file contents produce results or documented errors (ValueError, TypeError and their subclasses, OSError
for paths), never a raw crash from deep inside."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tldr_fast import InversionConfig, invert
from tldr_fast.checkpoint import load_checkpoint
from tldr_fast.cli import main
from tldr_fast.config import TERMS
from tldr_fast.models import PlainCNN

DOCUMENTED = (ValueError, TypeError)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
FIELDS = [
    "steps",
    "batch_size",
    "lr",
    "betas",
    "seed",
    "device",
    "dtype",
    "backend",
    "conditioning",
    "perturbation",
    "eps",
    "shift",
    "rotate",
    "scale",
    "diversity",
    "paired",
    "dropout",
    "select",
    "grad_norm",
    "nz",
    "ngf",
    "preprocess",
    "checkpoint_every",
    "log_every",
    "eval_per_class",
    "progress",
    "compile",
    "cuda_graph",
    "schedules",
    "weights",
]


@SETTINGS
@given(st.dictionaries(st.sampled_from(FIELDS + list(TERMS) + ["stepz", "tvv"]), anything, max_size=4))
def test_config_accepts_or_explains(options):
    try:
        cfg = InversionConfig().with_overrides(**options)
    except DOCUMENTED as e:
        assert str(e)  # a message, not an empty error
        return
    cfg.validate()
    assert InversionConfig.from_dict(cfg.to_dict(), cfg.preprocess if callable(cfg.preprocess) else None) == cfg


@pytest.fixture(scope="module")
def inv():
    m = PlainCNN([1, 16, 16], 3, width=4, feature_dim=8).eval()
    m.tldr_meta = {"mean": [0.2], "std": [0.3], "input_shape": [1, 16, 16]}
    return invert(
        m,
        3,
        (1, 16, 16),
        steps=2,
        batch_size=4,
        nz=8,
        ngf=8,
        device="cpu",
        progress=False,
        backend="torch",
        eval_per_class=1,
    )


@SETTINGS
@given(labels=anything, n=anything, batch_size=anything, seed=anything, select=st.one_of(st.none(), st.integers(-2, 3)))
def test_sample_accepts_or_explains(inv, labels, n, batch_size, seed, select):
    try:
        x = inv.sample(labels=labels, n_per_class=n, batch_size=batch_size, seed=seed, select=select)
    except DOCUMENTED as e:
        assert str(e)
        return
    assert (
        x.dim() == 4
        and x.shape[1:] == (1, 16, 16)
        and torch.isfinite(x).all()
        and (x.numel() == 0 or x.abs().max() <= 1)
    )


@SETTINGS
@given(st.binary(max_size=256))
def test_any_file_content_is_refused_cleanly(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("ckpt") / "x.pt"
    path.write_bytes(content)
    with pytest.raises(DOCUMENTED):
        load_checkpoint(path)


@SETTINGS
@given(
    st.lists(
        st.sampled_from(
            [
                "invert",
                "sample",
                "evaluate",
                "info",
                "--steps",
                "-3",
                "x",
                "--out",
                "",
                "--seed",
                "nan",
                "--batch-size",
                "0",
                "--set",
                "eps=9",
                "--suite",
                "none",
                "--select",
                "2.5",
                "--lr",
                "inf",
            ]
        ),
        max_size=7,
    )
)
def test_command_line_never_crashes(capsys, argv):
    try:
        status = main(argv)
    except SystemExit as e:  # argparse: usage errors exit 2, --help exits 0
        status = e.code
    assert status in (0, 1, 2)
    err = capsys.readouterr().err
    assert "Traceback" not in err
