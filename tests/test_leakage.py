"""The leakage benchmark: its data split, its targets, and the quick suite end to end (a smoke test that
checks it runs and writes well-formed results; quality thresholds are for the real suites, not tests)."""

import dataclasses
import json
import math
import shutil

import pytest
import torch
from PIL import Image

import tldr_fast
from tldr_fast import leakage
from tldr_fast.cli import main, parse_overrides
from tldr_fast.models import CHECKPOINT_FORMAT, build_classifier, load_classifier, save_classifier


def test_target_names_round_trip():
    for t in leakage.SUITES["full"].targets:
        assert leakage.Target.parse(t.name) == t
    assert leakage.Target.parse("fashion-mnist-plain_cnn-100") == leakage.Target("fashion-mnist", 100, "plain_cnn")
    assert leakage.Target.parse("colour-fashion-mnist-cnn-100") == leakage.Target("colour-fashion-mnist", 100, "cnn")


def test_colour_split_is_the_grey_split_in_colour():
    suite = leakage.SUITES["colour"]
    grey, colour = leakage.split("mnist", suite), leakage.split("colour-mnist", suite)
    for g, c in zip(
        (grey.train, grey.held_out, grey.real, grey.judge), (colour.train, colour.held_out, colour.real, colour.judge)
    ):
        assert torch.equal(g.indices, c.indices) and c.image_shape == [3, 28, 28]
    assert colour.judge.source == "colour-mnist:test"


def test_split_parts_are_disjoint_and_balanced():
    suite = leakage.SUITES["default"]
    parts = leakage.split("mnist", suite)
    held, real, judge = (set(p.indices.tolist()) for p in (parts.held_out, parts.real, parts.judge))
    assert not (held & real) and not (held & judge) and not (real & judge)
    assert len(held | real | judge) == 10_000  # the whole test split
    assert parts.held_out.class_counts() == [suite.held_out_per_class] * 10
    assert parts.real.class_counts() == [suite.real_per_class] * 10
    assert parts.train.source == "mnist:train" and parts.judge.source == "mnist:test"


def test_suites_fit_their_promises():
    default = leakage.SUITES["default"]
    names = {t.name for t in default.targets}
    assert {"mnist-plain_cnn-1000", "mnist-cnn-1000", "mnist-cnn-10"} <= names and len(default.seeds) >= 3
    full = {t.name for t in leakage.SUITES["full"].targets}
    assert {f"mnist-{a}-{n}" for a in leakage.ARCHS for n in (10, 100, 1000, "all")} <= full
    assert {f"fashion-mnist-{a}-100" for a in leakage.ARCHS} <= full
    colour = {t.name for t in leakage.SUITES["colour"].targets}
    assert {f"{d}-{a}-100" for d in ("colour-mnist", "colour-fashion-mnist") for a in ("cnn", "plain_cnn")} == colour
    assert colour <= full


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("leakage")
    cache = tmp_path_factory.mktemp("cache")
    variants = {"defaults": {}, "class": {"diversity": "class"}}
    return out, leakage.run("quick", out, variants, cache=cache, device="cpu", progress=False), cache


def test_quick_suite_writes_well_formed_results(quick):
    out, results, _ = quick
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert set(on_disk) >= {"suite", "date", "versions", "machine", "settings", "judges", "targets", "variants"}
    judge = on_disk["judges"]["mnist"]
    assert judge["arch"] == "lenet" and 0 <= judge["held_out_accuracy"] <= 1
    (entry,) = on_disk["targets"]
    assert entry["target"] == "mnist-mlp-10" and entry["n_train"] == 100
    assert set(entry["variants"]) == {"defaults", "class"} and set(entry["references"]) == set(leakage.REFERENCES)
    for v in entry["variants"].values():
        (run,) = v["runs"]
        assert set(run) == {"seed", "seconds", "steps", *leakage.METRICS} and run["steps"] == 20
        for k in ("attack_accuracy", "nn_ssim_mean", "held_out_ssim_mean", "same_class_ssim_mean", "closer_to_train"):
            assert 0 <= run[k] <= 1 or (k == "nn_ssim_mean" and -1 <= run[k] <= 1)
        assert (
            run["n_train_matched"] == int(run["n_train_matched"])
            and v["mean"]["attack_accuracy"] == run["attack_accuracy"]
        )
        assert v["std"]["attack_accuracy"] is None  # one seed: no spread
    refs = entry["references"]
    assert refs["real_unseen"]["attack_accuracy"] > refs["noise"]["attack_accuracy"]
    assert refs["black"]["same_class_ssim_mean"] == pytest.approx(1.0)  # identical images: total collapse


def test_quick_suite_markdown_and_grids(quick):
    out, results, _ = quick
    text = (out / "results.md").read_text()
    tables = [t for t in text.split("\n\n") if t.startswith("|")]
    assert len(tables) == 2  # the similarity metrics, then what the images teach
    for table, columns in zip(tables, (leakage.COLUMNS, leakage.TEACH_COLUMNS)):
        rows = table.splitlines()
        assert {line.count("|") for line in rows} == {len(columns) + 3 + (table is tables[0])}  # + s/run
        assert len(rows) == 2 + 2 + len(leakage.REFERENCES)  # header, rule, two variants, references
        assert "mnist-mlp-10 | class" in table and "↳ black" in table
    assert "Real curve of mnist" in text
    (run,) = results["targets"][0]["variants"]["defaults"]["runs"]
    assert 0 <= run["cas"] <= 1 and 0 <= run["distill_accuracy"] <= 1 and run["worth_real_per_class"] >= 0
    assert set(results["real_curves"]["mnist"]) == {"1", "4"}  # the quick suite's sizes
    for variant in ("defaults", "class"):
        with Image.open(out / "grids" / f"mnist-mlp-10--{variant}.png") as im:
            assert im.format == "PNG"


def test_classifiers_are_cached(quick, tmp_path):
    _, first, cache = quick
    files = sorted(p.name for p in cache.iterdir())
    assert any("judge" in f for f in files) and any("mnist-mlp-10" in f for f in files)
    again = leakage.run("quick", tmp_path, cache=cache, device="cpu", progress=False)
    assert again["judges"] == first["judges"]  # loaded, not retrained: the same accuracy
    assert again["targets"][0]["held_out_accuracy"] == first["targets"][0]["held_out_accuracy"]


def test_command_line(tmp_path, capsys):
    status = main(
        [
            "leakage",
            "--suite",
            "quick",
            "--out",
            str(tmp_path / "o"),
            "--cache-dir",
            str(tmp_path / "c"),
            "--device",
            "cpu",
            "--quiet",
            "--variant",
            "drop:dropout=0.2",
        ]
    )
    assert status == 0 and (tmp_path / "o" / "results.md").is_file()
    assert "| mnist-mlp-10 | drop |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "nonsense=1"], "unknown option"),
        (["--variant", "x:eps=7"], "eps"),
        (["--variant", "nocolon"], "NAME:KEY=VALUE"),
        (["--set", "noequals"], "KEY=VALUE"),
        (["--set", "seed=5"], "--set: 'seed' is set by the benchmark for every run; give it with --seeds"),
        (["--variant", "s:seed=1"], "--variant s: 'seed' is set by the benchmark for every run; give it with --seeds"),
        (["--set", "device=cuda"], "--set: 'device' is set by the benchmark for every run; give it with --device"),
        (["--set", "progress=false"], "give it with --quiet"),
        (["--seeds", "0,0"], "--seeds gives seed 0 more than once"),
        (["--seeds", "0,-1"], "--seeds: a seed is an integer >= 0, got -1"),
        (["--targets", "bogus"], "--targets: target 'bogus' is not DATA-ARCH-N: DATA one of mnist, fashion-mnist"),
        (["--targets", "mnist-lenet-10"], "ARCH one of cnn, plain_cnn, mlp"),
        (["--targets", "mnist-cnn-7"], "--targets: target 'mnist-cnn-7': this suite trains targets of 10 images"),
        (["--targets", "mnist-mlp-10,mnist-mlp-10"], "--targets names 'mnist-mlp-10' twice"),
        (["--variant", "a/b:eps=0.1"], "--variant: a variant's name is letters, digits"),
        (["--variant", "defaults:eps=0.1"], "--variant 'defaults': that name is taken by the runs of --set's options"),
        (["--variant", "a:eps=0.1", "--variant", "a:eps=0.2"], "--variant 'a': that name is taken"),
        (["--ablation", "--variant", "no-select:select=2"], "--variant 'no-select': that name is taken"),
        (["--variant", "b:betas=[0.5,0.9],eps=7"], "--variant b: eps is a fraction"),  # a comma inside a value
    ],
)
def test_command_line_rejects_bad_options_before_any_work(tmp_path, capsys, argv, message):
    status = main(
        ["leakage", "--suite", "quick", "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"), *argv]
    )
    assert status == 1 and message in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # nothing trained


def test_command_line_rejects_seeds_that_are_not_integers(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # argparse's own error: usage and exit status 2
        main(["leakage", "--suite", "quick", "--out", str(tmp_path / "o"), "--seeds", "1.5"])
    assert e.value.code == 2
    assert "argument --seeds: expected comma-separated integers >= 0" in capsys.readouterr().err


def test_parse_overrides():
    assert parse_overrides(["tv=1e-3", "diversity=class", "shift=0", "paired=true"]) == {
        "tv": 1e-3,
        "diversity": "class",
        "shift": 0,
        "paired": True,
    }
    assert math.isnan(parse_overrides(["eps=NaN"])["eps"])


# --- resuming: every finished run is stored and reused; an interrupt never shrinks results.json ---------

TWO = dataclasses.replace(
    leakage.SUITES["quick"], targets=(leakage.Target("mnist", 10, "mlp"), leakage.Target("mnist", 10, "plain_cnn"))
)


@pytest.fixture(scope="module")
def two(quick, tmp_path_factory):
    """A finished two-target suite (the quick suite's settings; its cached judge and MLP)."""
    out = tmp_path_factory.mktemp("two")
    return out, leakage.run(TWO, out, cache=quick[2], device="cpu", progress=False), quick[2]


def _counting_invert(monkeypatch, fail_from=None):
    """Count the benchmark's calls of invert; call ``fail_from`` and later ones raise KeyboardInterrupt."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs["seed"])
        if fail_from is not None and len(calls) >= fail_from:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = tldr_fast.invert
    monkeypatch.setattr(tldr_fast, "invert", counted)
    return calls


class Measured(Exception):
    """Raised where the benchmark starts to measure a target (loading its data set's split)."""


def _no_data(monkeypatch):
    def measuring(*args, **kwargs):
        raise Measured

    monkeypatch.setattr(leakage, "split", measuring)


def test_rerun_reuses_every_stored_run(two, tmp_path, monkeypatch):
    out, first, cache = two
    shutil.copytree(out, tmp_path / "o")
    calls, said = _counting_invert(monkeypatch), []
    _no_data(monkeypatch)  # nothing is measured again: no data set is even loaded
    again = leakage.run(TWO, tmp_path / "o", cache=cache, device="cpu", progress=False, say=said.append)
    assert calls == [] and "reusing 2 of 2 runs" in " ".join(said)
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(first))
    assert (tmp_path / "o" / "results.json").read_text() == (out / "results.json").read_text()
    assert (tmp_path / "o" / "results.md").read_text() == (out / "results.md").read_text()


def _without_seconds(results):
    for e in results["targets"]:
        for v in e["variants"].values():
            for part in (*v["runs"], v["mean"], v["std"]):
                part.pop("seconds")
    return results


def test_interrupt_never_shrinks_results_and_the_rerun_resumes(two, tmp_path, monkeypatch):
    out, first, cache = two
    shutil.copytree(out, tmp_path / "o")
    shutil.rmtree(tmp_path / "o" / "runs", ignore_errors=True)  # results.json alone: each run is measured again
    before = (tmp_path / "o" / "results.json").read_text()
    assert len(json.loads(before)["targets"]) == 2
    calls = _counting_invert(monkeypatch, fail_from=2)  # the second target's run is interrupted
    with pytest.raises(KeyboardInterrupt):
        leakage.run(TWO, tmp_path / "o", cache=cache, device="cpu", progress=False)
    assert len(calls) == 2
    assert (tmp_path / "o" / "results.json").read_text() == before  # not the first target alone
    monkeypatch.undo()
    calls, said = _counting_invert(monkeypatch), []
    resumed = leakage.run(TWO, tmp_path / "o", cache=cache, device="cpu", progress=False, say=said.append)
    assert calls == [0] and "reusing 1 of 2 runs" in " ".join(said)  # only the interrupted run again
    assert _without_seconds(json.loads(json.dumps(resumed))) == _without_seconds(json.loads(json.dumps(first)))
    for t in ("mnist-mlp-10", "mnist-plain_cnn-10"):
        grid = f"grids/{t}--defaults.png"
        assert (tmp_path / "o" / grid).read_bytes() == (out / grid).read_bytes()


@pytest.mark.parametrize(
    "changes",
    [
        {"seeds": (1,)},
        {"variants": {"defaults": {"steps": 21}}},
        {"suite": dataclasses.replace(TWO, teaching=dataclasses.replace(TWO.teaching, steps=11))},
    ],
    ids=["seed", "invert-option", "teaching"],
)
def test_runs_of_other_settings_are_not_reused(two, tmp_path, monkeypatch, changes):
    out, _, cache = two
    shutil.copytree(out, tmp_path / "o")
    said = []
    _no_data(monkeypatch)
    with pytest.raises(Measured):  # the first target is measured again, not taken from the stored runs
        leakage.run(
            **{"suite": TWO, **changes}, out=tmp_path / "o", cache=cache, device="cpu", progress=False, say=said.append
        )
    assert not any("reusing" in line for line in said)
    assert (tmp_path / "o" / "results.json").read_text() == (out / "results.json").read_text()


@pytest.mark.parametrize("below", ["", "sub"])
def test_command_line_refuses_a_cache_dir_that_is_a_file(tmp_path, capsys, below):
    (tmp_path / "f").write_text("not a folder")
    cache = tmp_path / "f" / below if below else tmp_path / "f"
    status = main(["leakage", "--suite", "quick", "--out", str(tmp_path / "o"), "--cache-dir", str(cache)])
    assert status == 1
    assert (
        f"--cache-dir (or $TLDR_FAST_CACHE) {cache}: {tmp_path / 'f'} is a file, not a folder"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seeds": [1, 1]}, "seeds gives seed 1 more than once"),
        ({"seeds": [True]}, "seeds: a seed is an integer >= 0"),
        ({"seeds": []}, "seeds is empty"),
        ({"targets": ["mnist-cnn"]}, "targets: target 'mnist-cnn' is not DATA-ARCH-N"),
        ({"targets": "mnist-mlp-10"}, "targets is a list of target names"),
        ({"variants": {"v": {"seed": 3}}}, "variants['v']: 'seed' is set by the benchmark for every run"),
        ({"variants": {"v": {"nonsense": 3}}}, "variants['v']: unknown option 'nonsense'"),
        ({"variants": {"a b": {}}}, "variants: a variant's name"),
        ({"suite": "nonsense"}, "suite must be one of quick, default, colour, full"),
    ],
)
def test_run_rejects_bad_arguments_before_any_work(tmp_path, kwargs, message):
    with pytest.raises(ValueError) as e:
        leakage.run(**{"suite": "quick", **kwargs}, out=tmp_path / "o", cache=tmp_path / "c", progress=False)
    assert message in str(e.value)
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


# --- the classifier cache: a file is trusted only if it records the recipe that would train it ----------

TINY = dataclasses.replace(
    leakage.SUITES["quick"], judge_epochs=1, judge_max_per_class=5, held_out_per_class=5, target_epochs=((10, 2),)
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """TINY's split of MNIST and a cache holding its judge."""
    parts, cache = leakage.split("mnist", TINY), tmp_path_factory.mktemp("tiny-cache")
    leakage.judge("mnist", parts, TINY, cache, "cpu", print)
    return parts, cache


def _five_classes(judge):
    model = build_classifier("lenet", [1, 28, 28], 5)
    model.tldr_meta = {**judge.tldr_meta, "num_classes": 5, "class_names": list("01234")}
    return model


def _other_recipe(judge):
    recipe = {**judge.tldr_meta["leakage_recipe"], "epochs": 7}
    judge.tldr_meta = {**judge.tldr_meta, "leakage_recipe": recipe}
    return judge


@pytest.mark.parametrize(
    "bad, why",
    [
        (_five_classes, "it has 5 classes, the data 10"),
        (_other_recipe, "its training recipe differs in epochs (7, not 1)"),
        (lambda judge: {"format": CHECKPOINT_FORMAT, "state_dict": {}}, "it does not load (ValueError"),
    ],
    ids=["five-classes", "other-recipe", "no-meta"],
)
def test_a_cached_judge_of_another_recipe_is_retrained(tiny, tmp_path, bad, why):
    parts, cache = tiny
    shutil.copytree(cache, tmp_path / "c")
    (path,) = (tmp_path / "c").glob("*judge*.pt")
    thing = bad(load_classifier(path))
    save_classifier(thing, path) if isinstance(thing, torch.nn.Module) else torch.save(thing, path)
    said = []
    model = leakage.judge("mnist", parts, TINY, tmp_path / "c", "cpu", said.append)
    assert said[0].startswith(f"retraining the cached classifier {path}: {why}") and len(said) == 2  # + training
    assert model.tldr_meta["num_classes"] == 10 and model.tldr_meta["arch"] == "lenet"
    said.clear()
    again = leakage.judge("mnist", parts, TINY, tmp_path / "c", "cpu", said.append)
    assert not said and again.tldr_meta["leakage_recipe"] == model.tldr_meta["leakage_recipe"]  # now trusted


def test_a_cached_target_that_is_another_classifier_is_retrained(tiny, tmp_path):
    parts, cache = tiny
    (judge_file,) = cache.glob("*judge*.pt")
    said = []
    t = leakage.Target("mnist", 10, "mlp")
    trained = leakage.target(t, parts, TINY, tmp_path, "cpu", said.append)  # writes the target's cache file
    (path,) = tmp_path.glob("*mnist-mlp-10*.pt")
    shutil.copyfile(judge_file, path)  # a 10-class classifier of the right input shape, but the judge
    said.clear()
    model = leakage.target(t, parts, TINY, tmp_path, "cpu", said.append)
    assert said[0].startswith(f"retraining the cached classifier {path}: its training recipe differs in kind")
    assert model.tldr_meta["arch"] == "mlp" and model.tldr_meta["leakage_recipe"] == trained.tldr_meta["leakage_recipe"]


# --- the user's own data sets ---------------------------------------------------------------------------


def _npz(path, ds):
    import numpy as np

    np.savez(path, images=ds.images.permute(0, 2, 3, 1).numpy(), labels=ds.labels.numpy())
    return str(path)


@pytest.fixture(scope="module")
def mine(tmp_path_factory):
    """A three-class colour data set of the user's, as two .npz files: 12 train and 70 test images per class."""
    folder = tmp_path_factory.mktemp("mine")

    def first(ds, n):  # the first n images of each of the classes 0, 1, 2
        return ds.select(torch.cat([torch.nonzero(ds.labels == c).view(-1)[:n] for c in range(3)]))

    train = first(tldr_fast.data.load_dataset("colour-mnist:train"), 12)
    test = first(tldr_fast.data.load_dataset("colour-mnist:test"), 70)
    return _npz(folder / "train.npz", train), _npz(folder / "test.npz", test)


def test_user_data_sets_are_checked(mine, tmp_path):
    import numpy as np

    train, test = mine
    with pytest.raises(ValueError, match="'mnist' is a built-in data set"):
        leakage.user_data({"mnist": (train, test)})
    with pytest.raises(ValueError, match="name 'a/b' must be"):
        leakage.user_data({"a/b": (train, test)})
    with pytest.raises(ValueError, match=r"data\['mine'\] must be \(train, test\)"):
        leakage.user_data({"mine": train})
    grey = tmp_path / "grey.npz"
    np.savez(grey, images=np.zeros((6, 28, 28), np.float32), labels=np.arange(6) % 3)
    with pytest.raises(ValueError, match=r"data\['mine'\]: the train and test sets differ: 3 classes of \(3, 28, 28\)"):
        leakage.user_data({"mine": (train, str(grey))})
    with pytest.raises(ValueError, match="DATA one of mnist"):  # not registered: not a target
        leakage.choose_targets(leakage.SUITES["quick"], ["mine-mlp-10"])


def test_user_data_set_is_split_and_keyed_by_its_content(mine, tmp_path):
    import numpy as np

    suite = leakage.SUITES["quick"]
    user = leakage.user_data({"mine": mine})
    (t,) = leakage.choose_targets(suite, ["mine-mlp-10"], data=leakage.DATA + tuple(user))
    assert t == leakage.Target("mine", 10, "mlp")
    parts = leakage.split("mine", suite, user=user)
    assert parts.digest == user["mine"][2] and parts.train.image_shape == [3, 28, 28]
    assert parts.held_out.class_counts() == [suite.held_out_per_class] * 3
    assert (
        leakage._recipe("target", "mine", "mlp", parts.train, 3, **leakage._content(parts))["data_digest"]
        == parts.digest
    )
    arrays = dict(np.load(mine[0]))
    arrays["images"][0, 0, 0, 0] = 1 - arrays["images"][0, 0, 0, 0]  # one pixel of one image edited
    np.savez(tmp_path / "edited.npz", **arrays)
    assert leakage.user_data({"mine": (str(tmp_path / "edited.npz"), mine[1])})["mine"][2] != parts.digest


def test_suite_runs_on_a_user_colour_data_set(mine, tmp_path):
    """The quick suite end to end on the user's data: a target trained on it, inverted, measured against its
    own held-out split; a rerun reuses the stored run, and an edited file is measured again."""
    out, cache = tmp_path / "o", tmp_path / "c"
    results = leakage.run(
        "quick", out, targets=["mine-mlp-10"], data={"mine": mine}, cache=cache, device="cpu", progress=False
    )
    (entry,) = results["targets"]
    assert entry["target"] == "mine-mlp-10" and entry["data"] == "mine" and entry["n_train"] == 30
    run = entry["variants"]["defaults"]["runs"][0]
    assert 0 <= run["attack_accuracy"] <= 1 and math.isfinite(run["nn_ssim_mean"])
    said = []
    leakage.run(
        "quick",
        out,
        targets=["mine-mlp-10"],
        data={"mine": mine},
        cache=cache,
        device="cpu",
        progress=False,
        say=said.append,
    )
    assert "reusing 1 of 1 runs" in " ".join(said)
