"""Property-based fuzzing of the public API and the command line: random option values, shapes, labels and
file contents produce results or documented errors (ValueError, TypeError and their subclasses, OSError
for paths), never a raw crash from deep inside; every command's errors name the offending argument or file."""

import importlib
import json
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tldr_fast import Inversion, InversionConfig, invert
from tldr_fast.checkpoint import load_checkpoint
from tldr_fast.cli import build_parser, main
from tldr_fast.config import TERMS
from tldr_fast.data import load_dataset, load_npz
from tldr_fast.errors import BackendUnavailable
from tldr_fast.models import PlainCNN, load_classifier, save_classifier, train_classifier
from tldr_fast.samples import load_sample, write_samples

DOCUMENTED = (ValueError, TypeError)
# what a command may raise: bad values and files (ValueError, TypeError), paths (OSError), a backend or
# device that cannot run here
COMMAND_ERRORS = (ValueError, TypeError, OSError, BackendUnavailable)
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


# --- every command, every argument, bad input files --------------------------------------------------------


class Ran(BaseException):
    """Raised where a command starts its real work: everything before it (the checks) has passed."""


def _ran(*args, **kwargs):
    raise Ran


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny good inputs and bad ones: random bytes, truncated checkpoints, wrong shapes, NaN pixels."""
    from tldr_fast.data import load_digits, subset

    root = tmp_path_factory.mktemp("fuzz")
    ds = subset(load_digits(), 3, seed=0)  # 30 images of 1 x 8 x 8
    np.savez(root / "digits.npz", images=np.rint(ds.images.numpy() * 255).astype(np.uint8), labels=ds.labels.numpy())
    clf = train_classifier(ds, "mlp", epochs=1, batch_size=16, device="cpu")
    save_classifier(clf, root / "clf.pt")
    tiny = dict(steps=1, batch_size=4, nz=4, ngf=4, device="cpu", progress=False, backend="torch", eval_per_class=1)
    inv = invert(clf, 10, (1, 8, 8), checkpoint=root / "inv.pt", select=1, **tiny)
    write_samples(inv, root / "s.npz", inv.labels(n_per_class=1), shard_size=4)  # s-index.json and its shards
    write_samples(inv, root / "pngs", inv.labels(n_per_class=1))
    (root / "config.json").write_text(json.dumps({"steps": 2, "tv": 0.01}))
    bad = {
        "random.pt": bytes(range(256)) * 2,
        "empty.pt": b"",
        "truncated.pt": (root / "inv.pt").read_bytes()[:700],
        "truncated.npz": (root / "digits.npz").read_bytes()[:300],
        "garbage.json": b"{not json",
        "list.json": b"[1, 2]",
    }
    for name, content in bad.items():
        (root / name).write_bytes(content)
    x = ds.images.numpy().copy()
    x[4, 0, 1, 1] = np.nan
    np.savez(root / "nan.npz", images=x, labels=ds.labels.numpy())
    np.savez(root / "flat.npz", images=x[:, 0, 0], labels=ds.labels.numpy())  # [N, 8]: no image shape
    np.savez(root / "short.npz", images=ds.images.numpy(), labels=ds.labels.numpy()[:5])
    (root / "folder").mkdir()
    return root


BAD_FILES = ["random.pt", "empty.pt", "truncated.pt", "truncated.npz", "garbage.json", "list.json", "nan.npz"]
BAD_FILES += ["flat.npz", "short.npz", "folder", "absent.pt", "clf.pt", "inv.pt", "digits.npz"]
# the good value of each path option (the others come from BAD_FILES)
GOOD = {
    "classifier": "clf.pt",
    "eval_classifier": "clf.pt",
    "inversion": "inv.pt",
    "resume": "inv.pt",
    "images": "digits.npz",
    "data": "digits.npz",
    "test_data": "digits.npz",
    "config": "config.json",
}
VALUES = ["-1", "0", "1", "2", "0.5", "nan", "inf", "x", "", "all", "cpu", "cuda:9", "meta", "torch", "bogus"]
SETS = ["eps=9", "tvv=1", "steps=2", "=", "x", 'batch_size="16"', "seed=1", "preprocess=3", "a:b=1"]
SLOW = {"n_per_class": 2, "teach_per_class": 2, "grid_per_class": 2, "train_per_class": 2}  # cap what runs for real


def _options(command):
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return [a for a in sub._actions if a.option_strings and a.dest != "help"]


def _argv(draw, command, root):
    """``command``'s argv: its required options with good values, then any of its options with values
    drawn from good ones, bad files and odd strings; sometimes a required option is left out."""
    argv, chosen = [command], {}
    options = _options(command)
    for a in options:
        if a.required and draw(st.integers(0, 9)):
            chosen[a.dest] = None
    if command == "evaluate" and draw(st.integers(0, 9)):  # one of its two sources is required
        chosen[draw(st.sampled_from(["inversion", "images"]))] = None
    for a in draw(st.lists(st.sampled_from(options), max_size=4, unique_by=lambda a: a.dest)):
        chosen[a.dest] = a
    for a in options:
        if a.dest not in chosen:
            continue
        flag = a.option_strings[-1]
        if a.nargs == 0:  # store_true
            argv.append(flag)
        elif a.dest == "out":
            argv += [flag, str(root / "out" / draw(st.sampled_from(["o.pt", "o.npz", "o", "folder/x.pt"])))]
        elif a.dest == "cache_dir":
            argv += [flag, str(draw(st.sampled_from([root / "cache", root / "random.pt"])))]
        elif a.dest in GOOD:
            argv += [flag, str(root / draw(st.sampled_from([GOOD[a.dest]] + BAD_FILES)))]
        elif a.dest in ("overrides", "variants"):
            argv += [flag, draw(st.sampled_from(SETS))]
        elif a.dest in SLOW:
            argv += [flag, draw(st.sampled_from(["-1", "0", "x", str(SLOW[a.dest])]))]
        else:
            argv += [flag, draw(st.sampled_from(_fitting(a)) | st.sampled_from(VALUES))]
    if command in ("invert", "sample", "evaluate", "train-classifier"):
        argv += ["--quiet"] + (["--device", "cpu"] if "--device" not in argv else [])
    if command == "train-classifier":  # its defaults read MNIST, 100 images per class
        argv += [] if "--data" in argv else ["--data", str(root / "digits.npz")]
        argv += [] if "--n-per-class" in argv else ["--n-per-class", "2"]
    return argv


def _fitting(action):
    """Values of the kind ``action`` takes (which may still be wrong together)."""
    if action.choices:
        return list(action.choices)
    if action.type is float:
        return ["0.5", "1e-3"]
    if action.type is not None:  # the integers
        return ["1", "2"]
    return ["cpu"] if action.dest == "device" else ["0,1", "mnist-cnn-10"]


def _names_an_argument(message, argv):
    """Whether ``message`` names an argument of ``argv`` (a ``tldr-fast COMMAND ...`` command line): an
    option of the command (as --opt-name, or as opt_name when given), or a value or file given."""
    words = {flag for a in _options(argv[0]) for flag in a.option_strings}  # e.g. a required one left out
    for token in argv[1:]:
        if token.startswith("--"):
            words.add(token[2:].replace("-", "_"))
        else:
            words |= {token, *re.split("[=,:]", token)}
    words = {w for w in words if w and w not in ("out", "x")}  # ordinary words, not names ("out of bounds")
    return any(re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", message) for w in words)


@pytest.mark.parametrize("command", ["train-classifier", "invert", "sample", "evaluate", "leakage", "info", "demo"])
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_every_command_accepts_or_names_the_offender(files, command, data, monkeypatch, capsys):
    argv = _argv(data.draw, command, files)
    with monkeypatch.context() as m:
        m.chdir(files)
        m.setenv("TLDR_FAST_JIT", "0")  # never build the extension here
        module = importlib.import_module
        m.setattr(module("tldr_fast.models"), "train_classifier", _ran)  # train-classifier's training
        m.setattr(module("tldr_fast.invert"), "TLDRObjective", _ran)  # invert's and demo's training
        m.setattr(module("tldr_fast.evaluate"), "_utility", _ran)  # the students
        m.setattr(module("tldr_fast.leakage"), "run", _ran)
        m.setattr(module("tldr_fast.leakage"), "cache_dir", _ran)  # the demo's classifiers
        capsys.readouterr()  # what earlier examples printed
        try:
            main(["--traceback", *argv])
        except Ran:
            return  # every check passed: the work began
        except SystemExit as e:  # argparse: one line that names the argument
            err = capsys.readouterr().err.strip()
            assert e.code in (0, 2), (argv, err)
            assert e.code == 0 or (len(err.splitlines()) == 1 and _names_an_argument(err, argv)), (argv, err)
        except COMMAND_ERRORS as e:
            assert _names_an_argument(str(e), argv), (argv, repr(e))
        except Exception as e:  # noqa: BLE001 - what the fuzz looks for
            pytest.fail(f"{argv}: undocumented {type(e).__name__}: {e}")


def _truncations(path):
    content = path.read_bytes()
    return st.integers(0, len(content) - 1).map(lambda n: content[:n])


def _arrays():
    shapes = st.lists(st.integers(0, 3), min_size=0, max_size=5).map(tuple)
    kinds = st.sampled_from([np.uint8, np.float32, np.float64, np.int64, np.bool_])
    fill = st.sampled_from([0.0, 0.5, 2.0, -1.0, float("nan"), float("inf")])
    return st.tuples(shapes, kinds, fill).map(lambda t: np.full(t[0], t[2]).astype(t[1]))


READERS = {  # reader, suffix, the good file whose truncations it is fed
    "load_classifier": (load_classifier, ".pt", "clf.pt"),
    "Inversion.load": (Inversion.load, ".pt", "inv.pt"),
    "load_npz": (load_npz, ".npz", "digits.npz"),
    "load_dataset": (load_dataset, ".npz", "digits.npz"),
    "load_sample": (load_sample, ".npz", "digits.npz"),
    "load_sample index": (load_sample, "-index.json", "s-index.json"),
}


@pytest.mark.parametrize("reader", list(READERS))
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_bad_input_files_are_refused_naming_them(files, tmp_path_factory, reader, data):
    read, suffix, good = READERS[reader]
    kind = data.draw(st.sampled_from(["bytes", "truncated", "arrays"]))
    path = tmp_path_factory.mktemp("bad") / f"x{suffix}"
    if kind == "bytes":
        path.write_bytes(data.draw(st.binary(max_size=300)))
    elif kind == "truncated":
        path.write_bytes(data.draw(_truncations(files / good)))
    else:  # an .npz of arrays of any shape and dtype (NaN and Inf included), under any of the keys
        keys = data.draw(st.lists(st.sampled_from(["images", "labels", "x", "y", "sample"]), max_size=3, unique=True))
        with open(path, "wb") as f:
            np.savez(f, **{k: data.draw(_arrays()) for k in keys})
    try:
        read(path)
    except DOCUMENTED + (OSError,) as e:
        assert str(path.parent) in str(e), repr(e)  # the file, or one beside it that it names (a shard)
    except Exception as e:  # noqa: BLE001 - what the fuzz looks for
        pytest.fail(f"{reader} of {kind}: undocumented {type(e).__name__}: {e}")
