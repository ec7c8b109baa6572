"""The ``tldr-fast`` command line: train a classifier, invert it, sample, evaluate, or run the demo.

    tldr-fast demo --out demo/                      # the whole pipeline on 1,000 MNIST images
    tldr-fast train-classifier --data mnist --n-per-class 100 --out clf.pt
    tldr-fast invert --classifier clf.pt --steps 2000 --out inv.pt
    tldr-fast sample --inversion inv.pt --n-per-class 10 --out samples.npz   # or a folder of PNGs
    tldr-fast evaluate --inversion inv.pt --classifier clf.pt --out eval/
    tldr-fast leakage --suite quick                 # the leakage benchmark (default suite: < 45 min on a CPU)
    tldr-fast info

Every command exits non-zero with a one-line reason on bad input (--traceback shows the full one).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Union, get_args, get_origin

import torch

from .checkpoint import check_writable, output_folder, refuse_overwriting_inputs
from .config import InversionConfig, check_field, field_docs, field_specs, parse_overrides, unwrap_optional
from .demo import EPOCHS, EVALUATION_FILES, TRAIN_PER_CLASS, metrics_line

PROG = "tldr-fast"
# tldr_fast.backends.NAMES, spelled out so that the command line starts without importing the package
BACKEND_CHOICES = ("auto", "reference", "torch", "triton", "extension", "cuda")
RUN_FIELDS = ("seed", "device", "progress")  # InversionConfig fields of add_run_options: --seed, --device, --quiet


class _Formatter(argparse.HelpFormatter):
    """Ends an option's help with its default: the value it parses to when not given, or for an option of
    ``add_config_options`` (None until given) the ``InversionConfig`` field's."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        key = "config_default" if hasattr(action, "config_default") else "default"
        shown = getattr(action, key)
        plain_switch = action.nargs == 0 and key == "default"  # off unless given
        if shown is None or shown is argparse.SUPPRESS or shown == [] or plain_switch or "(default" in text:
            return text
        return f"{text} (default: %({key})s)"


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit status 2, and each option's default in its help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{"formatter_class": _Formatter, **kwargs})

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def _int_list(text: str) -> List[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers >= 0 such as 0,1,2, got {text!r}"
        ) from None


def _n_per_class(text: str) -> Union[int, str]:
    if text == "all":
        return text
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None


def _checked(name: str, kind: type) -> Callable[[str], Any]:
    """argparse's ``type`` of field ``name``: the text as a ``kind``, checked by ``config.check_field``."""

    def parse(text: str) -> Any:
        value = kind(text)  # a ValueError is argparse's "invalid int value: 'x'"
        try:
            check_field(name, value)
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value

    parse.__name__ = kind.__name__
    return parse


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """Add an option for each ``InversionConfig`` field a command-line value can express (``batch_size`` as
    ``--batch-size``, a bool as ``--paired``/``--no-paired``, a ``Literal`` with its choices), its help the
    field's doc, its default the field's. Each parses to None until given, so that ``--config`` and a resumed
    run's own options apply (``_given_options``). Not the fields of ``add_run_options`` (``RUN_FIELDS``), nor
    those of other types (loss weights, schedules, preprocess): ``--set`` and ``--config`` give those."""
    docs, defaults = field_docs(InversionConfig), InversionConfig()
    for name, (declared, _, _) in field_specs().items():
        kind, options = unwrap_optional(declared), {}
        if name in RUN_FIELDS:
            continue
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif get_origin(kind) is Literal:
            options["choices"] = get_args(kind)
        elif kind in (int, float, str):
            options["type"] = _checked(name, kind)
        elif get_origin(kind) is tuple and set(get_args(kind)) <= {int, float}:
            options.update(nargs=len(get_args(kind)), type=get_args(kind)[0], metavar=name.upper())
        else:
            continue
        text = docs.get(name, "").replace("``", "").replace("%", "%%")
        action = parser.add_argument("--" + name.replace("_", "-"), default=None, help=text, **options)
        action.config_default = getattr(defaults, name)  # shown by _Formatter


def add_run_options(p: argparse.ArgumentParser, seed_help: str = "seed of everything random") -> None:
    """``--device``, ``--seed`` and ``--quiet``: how a command runs."""
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=None, help=f"{seed_help} (default: 0, or the resumed run's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-per-class", type=_positive_int, default=10, help="generated images per class to evaluate")
    p.add_argument("--tau", type=float, default=0.4, help="SSIM threshold of 'reconstructed'")
    p.add_argument("--grid-per-class", type=_positive_int, default=8, help="pairs per class in grid.png")
    p.add_argument(
        "--teach-per-class",
        type=_positive_int,
        default=100,
        help="generated images per class that the students of CAS and distillation learn from",
    )
    p.add_argument(
        "--student-steps",
        type=_positive_int,
        default=None,
        help="Adam steps of each student, also on the real curve (default: tldr_fast.utility.Teaching's, 400)",
    )


def _data_help() -> str:
    from .data import dataset_names

    names = ", ".join(dataset_names())
    return f"data set: {names}, an .npz, a folder of IDX files or of class folders; NAME:test picks the test split"


# --- the commands: the first paragraph of each docstring is its summary, the next its description, and
# "Options:" the help of each option added without one ----------------------------------------------------


def _say(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr)


def _device(args: argparse.Namespace) -> str:
    """``--device`` made concrete once per command ("auto": the GPU when there is one, quietly)."""
    from .backends import resolve_device

    return str(resolve_device(args.device, quiet=True))


def _train_classifier_options(p: argparse.ArgumentParser) -> None:
    from .models import ARCHS

    p.add_argument("--data", default="mnist", help=_data_help())
    p.add_argument("--n-per-class", type=_n_per_class, default=TRAIN_PER_CLASS)
    p.add_argument("--test-data", default=None)
    p.add_argument("--arch", choices=tuple(ARCHS), default="cnn")
    p.add_argument("--epochs", type=_positive_int, default=EPOCHS)
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", required=True)
    add_run_options(p, "seed of the subset, initialisation and batches")


def cmd_train_classifier(args: argparse.Namespace) -> int:
    """train a small CNN or MLP on a class-balanced subset and save it

    Train the reference CNN (or MLP) on n images per class of a data set and save weights + metadata
    (architecture, normalisation, class names, the subset's indices, accuracies) to a weights-only checkpoint.

    Options:
        --n-per-class: training images per class, or 'all'
        --test-data: held-out data set for the test accuracy, e.g. mnist:test (default: none)
        --arch: classifier architecture: cnn (with BatchNorm), plain_cnn (without), mlp or lenet
        --epochs: training epochs
        --batch-size: training batch size
        --lr: peak learning rate
        --out: checkpoint to write (.pt)
    """
    from .data import load_dataset, subset
    from .models import accuracies, save_classifier, train_classifier

    refuse_overwriting_inputs("--out", args.out, [Path(args.out)], {"--data": args.data, "--test-data": args.test_data})
    check_writable(args.out, "--out")
    device, seed = _device(args), args.seed if args.seed is not None else 0
    train = subset(load_dataset(args.data, seed=seed), args.n_per_class, seed=seed)
    test = load_dataset(args.test_data) if args.test_data else None
    _say(f"training a {args.arch} on {len(train)} images of {train.source}")
    model = train_classifier(
        train, args.arch, args.epochs, args.batch_size, args.lr, seed, device, progress=not args.quiet, test=test
    )
    save_classifier(model, args.out)
    print(f"saved {args.out}: {accuracies(model.tldr_meta)}")
    return 0


def _given_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The ``InversionConfig`` fields given as options (``add_config_options``' and ``--seed``)."""
    return {
        f.name: getattr(args, f.name)
        for f in fields(InversionConfig)
        if f.name not in ("device", "progress") and getattr(args, f.name, None) is not None
    }


def _invert_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    """The invert options given on the command line: ``--config``, then the options, then ``--set`` (options
    not given stay the defaults, or the resumed run's own)."""
    overrides: Dict[str, Any] = {}
    if getattr(args, "config", None):
        try:
            data = json.loads(Path(args.config).read_text())
        except ValueError as e:  # not UTF-8, not JSON
            raise ValueError(f"--config {args.config} is not a JSON file ({e})") from e
        if not isinstance(data, dict):
            raise ValueError(f"{args.config} must hold a JSON object of InversionConfig fields")
        overrides.update(data)
    overrides.update(_given_options(args))
    overrides.update(parse_overrides(getattr(args, "overrides", [])))
    for k in ("device", "progress"):  # how to run, not what to run: from --device and --quiet
        overrides.pop(k, None)
    return overrides


def _add_set_option(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=text)


def _invert_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classifier", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", default=None)
    p.add_argument("--allow-other-classifier", action="store_true")
    p.add_argument("--config", default=None)
    _add_set_option(p, "any InversionConfig field or loss weight, e.g. --set tv=1e-3 --set diversity=class")
    add_config_options(p)
    add_run_options(p)


def cmd_invert(args: argparse.Namespace) -> int:
    """train a generator that inverts a saved classifier (TLDR)

    Invert a classifier saved by train-classifier: train a label-conditioned generator against it and save
    the inversion (generator, config, history, metrics). --resume continues an interrupted run. Options
    apply in this order: --config, then the options, then --set.

    Options:
        --classifier: classifier checkpoint from train-classifier
        --out: inversion checkpoint to write (.pt)
        --resume: continue from this inversion checkpoint (options not given again are the run's own)
        --allow-other-classifier: with --resume: continue a run that was trained against another classifier
            than --classifier
        --config: a JSON file of InversionConfig fields (e.g. as metrics or a checkpoint record them)
    """
    from . import invert
    from .distributed import is_main
    from .models import load_classifier

    inputs = {"--classifier": args.classifier, "--config": args.config}  # --resume may be --out: the run goes on
    refuse_overwriting_inputs("--out", args.out, [Path(args.out)], inputs)
    check_writable(args.out, "--out")
    overrides = _invert_overrides(args)
    if not args.resume:  # every option checked before any work (a resumed run checks them against its own)
        InversionConfig().with_overrides(**overrides)
    device = _device(args)
    classifier = load_classifier(args.classifier, device)
    meta = classifier.tldr_meta
    try:
        inv = invert(  # saves --out at the end and on Ctrl-C, resumable (with the optimiser state)
            classifier,
            meta["num_classes"],
            tuple(meta["input_shape"]),
            resume=args.resume,
            checkpoint=Path(args.out),
            allow_other_classifier=args.allow_other_classifier,
            device=device,
            progress=not args.quiet,
            **overrides,
        )
    except KeyboardInterrupt:
        if Path(args.out).is_file():
            _say(
                f"interrupted; {args.out} holds the run so far. Continue it with:\n  {PROG} invert --classifier "
                f"{args.classifier} --resume {args.out} --out {args.out}"
            )
        raise
    if is_main():  # under torchrun: rank 0 saved it
        print(f"saved {args.out} after {inv.step} steps: target classifier {metrics_line(inv.metrics)}")
    return 0


def _load_inversion(args: argparse.Namespace, device: str, classifier: Optional[torch.nn.Module] = None):
    """``--inversion``, with ``--classifier`` (loaded as ``classifier``) as its target when given."""
    from . import Inversion
    from .classifier import ClassifierError

    try:
        return Inversion.load(args.inversion, classifier=classifier, device=device)
    except ClassifierError as e:  # the classifier does not fit the inversion: name the option
        raise ClassifierError(f"--classifier {args.classifier} does not fit --inversion {args.inversion}: {e}") from e


def _sample_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inversion", required=True)
    p.add_argument("--n-per-class", type=_positive_int, default=10)
    p.add_argument("--out", required=True)
    p.add_argument("--shard-size", type=_positive_int, default=None, metavar="N")
    p.add_argument("--batch-size", type=_positive_int, default=None)
    p.add_argument("--select", type=_positive_int, default=None)
    p.add_argument("--classifier", default=None)
    p.add_argument("--device", default="auto", help="device of the generator")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: the inversion's own)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_sample(args: argparse.Namespace) -> int:
    """write N generated images per class to an .npz or a folder of PNGs

    Sample an inversion: --out ending in .npz writes uint8 images [N, C, H, W] and labels; with --shard-size
    it writes them in shards beside it plus an index (large samples; needed for an .npz under torchrun); any
    other --out is a folder with one sub-folder of PNGs per class.

    Options:
        --inversion: inversion checkpoint from invert
        --n-per-class: images per class
        --out: .npz file or folder (a folder or a sharded .npz resumes an interrupted sample)
        --shard-size: with an .npz --out such as s.npz: shards of N images, s-00000-of-000NN.npz, and their
            index s-index.json (the same files for any number of torchrun ranks, each writing its shards;
            resumable; read back with tldr_fast.samples.load_sample)
        --batch-size: images generated at a time (default: the inversion's batch size); the images do not
            depend on it
        --select: keep the most robustly classified of N candidates per image (needs --classifier; default:
            the inversion's select, or 1 without --classifier)
        --classifier: the target classifier checkpoint (scores the candidates of --select)
    """
    from .distributed import is_main
    from .models import load_classifier
    from .samples import INDEX, MANIFEST, write_samples

    out = Path(args.out)
    if not args.out.strip():
        raise ValueError("--out is empty: give an .npz file or a folder")
    if args.select is not None and args.select > 1 and not args.classifier:
        raise ValueError(f"--select {args.select} needs --classifier (the target classifier scores the candidates)")
    if out.suffix.lower() == ".npz":  # a sharded sample's shards are named after its index
        written = [out.with_name(out.stem + INDEX)] if args.shard_size else [out]
    else:
        written = [out, out / MANIFEST]
    refuse_overwriting_inputs(
        "--out", args.out, written, {"--inversion": args.inversion, "--classifier": args.classifier}
    )
    device = _device(args)
    classifier = load_classifier(args.classifier, device) if args.classifier else None
    inv = _load_inversion(args, device, classifier)
    labels = inv.labels(n_per_class=args.n_per_class)
    written = write_samples(
        inv, out, labels, args.batch_size, args.seed, args.select, progress=not args.quiet, shard_size=args.shard_size
    )
    if is_main():  # under torchrun: every rank wrote its batches
        print(f"wrote {len(labels)} images ({args.n_per_class} per class) to {written}")
    return 0


def _write_evaluation(report, out: Path, grid_per_class: int, extra: Dict[str, Any], header: Sequence[str] = ()):
    from .checkpoint import atomic_write_text

    report.save_json(out / "metrics.json", extra)
    report.save_grid(out / "grid.png", per_class=grid_per_class)
    summary = "\n".join([*header, report.summary()])
    atomic_write_text(out / "summary.txt", summary + "\n")
    print(summary)
    print(f"wrote {out / 'metrics.json'}, {out / 'grid.png'}, {out / 'summary.txt'}")


def _teaching(args: argparse.Namespace, **changes: Any):
    """The students' recipe: ``tldr_fast.utility.Teaching`` with ``--student-steps`` and ``changes``."""
    from .utility import Teaching

    steps = {"steps": args.student_steps} if args.student_steps else {}
    return Teaching(**{**steps, **changes})


def _evaluate_options(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--inversion")
    src.add_argument("--images")
    p.add_argument("--classifier", default=None)
    p.add_argument("--eval-classifier", default=None)
    p.add_argument(
        "--data", default=None, help=f"training set to compare with instead of the classifier's: {_data_help()}"
    )
    p.add_argument("--test-data", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES)
    p.add_argument("--out", required=True)
    _add_eval_options(p)
    add_run_options(p)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """measure how much of the training set an inversion reconstructs

    Compare generated images with the training images of their class by SSIM (nearest neighbour and
    one-to-one Hungarian matching), and report attack accuracy and target confidence. Writes metrics.json,
    grid.png and summary.txt into --out. The training set is the one recorded in --classifier unless --data
    is given.

    Options:
        --inversion: inversion checkpoint (sampled --n-per-class per class)
        --images: generated images: an .npz with images (uint8, or floats in [0, 1]) and labels, a sharded
            sample's -index.json, or a folder of PNGs, as `sample` writes them
        --classifier: the target classifier checkpoint (its training subset, confidence)
        --eval-classifier: an independent classifier checkpoint for the attack accuracy
        --test-data: real images the target never saw, e.g. mnist:test: adds what the generated images teach
            (CAS, worth in real images per class, distillation accuracy), the students tested on them
        --cache-dir: where the real curve of --test-data is kept (default: $TLDR_FAST_CACHE or
            ~/.cache/tldr_fast)
        --backend: SSIM kernels ('cuda' = 'extension')
        --out: folder for metrics.json, grid.png, summary.txt
    """
    from .data import load_dataset, load_npz
    from .evaluate import evaluate
    from .models import check_classifier, load_classifier, training_set

    inputs = {
        "--inversion": args.inversion,
        "--images": args.images,
        "--classifier": args.classifier,
        "--eval-classifier": args.eval_classifier,
        "--data": args.data,
        "--test-data": args.test_data,
    }
    out = output_folder(args.out, EVALUATION_FILES, inputs)
    device = _device(args)
    target = load_classifier(args.classifier, device) if args.classifier else None
    judge = load_classifier(args.eval_classifier, device) if args.eval_classifier else None
    train = load_dataset(args.data) if args.data else training_set(target)
    test = load_dataset(args.test_data) if args.test_data else None
    common = dict(
        tau=args.tau,
        classifier=target,
        eval_classifier=judge,
        test=test,
        teach_per_class=args.teach_per_class,
        teaching=_teaching(args),
        cache=args.cache_dir,
        backend=args.backend,
        device=device,
        progress=not args.quiet,
    )
    if args.inversion:
        inv = _load_inversion(args, device, target)
        given, classes, shape, source = (
            [("--eval-classifier", args.eval_classifier, judge)],
            inv.num_classes,
            inv.image_shape,
            inv,
        )
        common["n_per_class"] = args.n_per_class
    else:
        if Path(args.images).suffix.lower() == ".npz":
            gen = load_npz(args.images)  # [N, C, H, W] in [0, 1]
            images, labels = gen.images, gen.labels
        else:  # a sharded sample's index or a PNG sample folder, as `sample` writes them
            from .samples import load_sample

            x, y = load_sample(args.images)  # uint8 [N, C, H, W], int64 [N]
            images, labels = torch.from_numpy(x).float() / 255, torch.from_numpy(y)
        given = [("--classifier", args.classifier, target), ("--eval-classifier", args.eval_classifier, judge)]
        classes, shape, source = train.num_classes, images.shape[1:], images
        common.update(labels=labels, value_range=(0.0, 1.0))
    for option, path, model in given:  # each against the evaluated images, before any work; the error names the file
        if model is not None:
            check_classifier(model, classes, shape, f"{option} {path}")
    report = evaluate(source, train, **common)
    if report is not None:  # under torchrun: rank 0's
        generated_from = {"inversion": args.inversion} if args.inversion else {"images": args.images}
        _write_evaluation(report, out, args.grid_per_class, {"generated_from": generated_from})
    return 0


def _leakage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", choices=("quick", "default", "colour", "full"), default="default")
    p.add_argument("--targets", default=None)
    p.add_argument("--seeds", type=_int_list, default=None)
    _add_set_option(p, "an invert option for every run, e.g. --set diversity=class (repeatable; after the options)")
    p.add_argument("--variant", dest="variants", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]")
    p.add_argument("--ablation", action="store_true")
    p.add_argument("--out", default="leakage_out")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, ...")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_options(p)


def cmd_leakage(args: argparse.Namespace) -> int:
    """the leakage benchmark: invert classifiers it trains, measure how training-like the images are

    Train (or reuse from --cache-dir) the suite's target classifiers and an independent evaluation
    classifier, invert each target over several seeds, and measure attack accuracy, nearest-neighbour SSIM to
    the training images against the control (as many held-out images), one-to-one matches and same-class
    diversity, beside the same metrics of real unseen images, noise and a black image. Writes results.json,
    results.md and grids/ into --out. The invert options apply to every run, --set after them.

    Options:
        --suite: quick: CI smoke test (< 3 min on 2 CPU cores); default: < 45 min; full: every target
        --targets: comma-separated target names to run instead of the suite's, e.g.
            mnist-cnn-1000,mnist-plain_cnn-10
        --seeds: comma-separated seeds (default: the suite's, 0,1,2)
        --variant: measure a variant beside the defaults, e.g. --variant no-bn:bn_stats=0 (repeatable)
        --ablation: measure every variant of tldr_fast.leakage.ABLATION beside the defaults
        --out: output folder
        --cache-dir: where trained classifiers are cached (default: $TLDR_FAST_CACHE or ~/.cache/tldr_fast)
    """
    from . import leakage

    # every argument checked before any work starts
    try:
        common = {**_given_options(args), **parse_overrides(args.overrides)}
    except ValueError as e:
        raise ValueError(f"--set: {e}") from None
    variants = leakage.parse_variants(common, args.variants, args.ablation)
    seeds = None if args.seeds is None else leakage.check_seeds(args.seeds, "--seeds")
    targets = None
    if args.targets is not None:
        names = [n.strip() for n in args.targets.split(",")]
        targets = [t.name for t in leakage.choose_targets(leakage.SUITES[args.suite], names, "--targets")]
    cache = leakage.check_folder(leakage.cache_dir(args.cache_dir), "--cache-dir (or $TLDR_FAST_CACHE)")
    output_folder(args.out)
    results = leakage.run(
        args.suite,
        args.out,
        variants,
        targets=targets,
        seeds=seeds,
        cache=cache,
        device=_device(args),
        progress=not args.quiet,
        say=_say,
    )
    print(leakage.markdown(results))
    print(f"wrote {Path(args.out) / 'results.json'}, {Path(args.out) / 'results.md'} and {Path(args.out) / 'grids'}/")
    return 0


def _info_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def cmd_info(args: argparse.Namespace) -> int:
    """versions, devices and which backends can run here

    Print torch/triton versions, the devices torch sees, tldr_fast.backends.available() for cpu and cuda,
    and the C++/CUDA extension's build info.
    """
    from .backends import info

    facts = info()
    if args.json:
        print(json.dumps(facts, indent=2, default=str))
        return 0
    _print_tree(facts)
    return 0


def _print_tree(d: Dict[str, Any], indent: str = "") -> None:
    for key, value in d.items():
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            _print_tree(value, indent + "  ")
        else:
            print(f"{indent}{key}: {value}")


def _audit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classifier", required=True)
    p.add_argument("--train", default=None)
    p.add_argument("--held-out", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--eval-classifier", default=None)
    p.add_argument("--n-per-class", type=_positive_int, default=50)
    p.add_argument("--real-per-class", type=_positive_int, default=None)
    p.add_argument("--tau", type=float, default=0.4)
    p.add_argument("--allow-overlap", action="store_true")
    p.add_argument("--config", default=None)
    _add_set_option(p, "any InversionConfig field or loss weight, e.g. --set tv=1e-3 (repeatable; after --config)")
    add_config_options(p)
    add_run_options(p)


def cmd_audit(args: argparse.Namespace) -> int:
    """does a classifier give its training images away? invert, sample, measure, write a report

    Invert --classifier with the library's defaults, sample with selection, compare the generated images
    with the training images and, as the control, with as many held-out images, against real unseen images
    as the null; write report.html (self-contained), report.json and grids/ into --out. A rerun with the
    same arguments reuses what is done there; an interrupted one continues.

    Options:
        --classifier: classifier checkpoint from train-classifier
        --train: its training images, a data set as load_dataset reads it (default: the subset the
            checkpoint records)
        --held-out: images of the same classes it never saw (default: the test split of --train's source,
            e.g. mnist:test)
        --out: folder for report.html, report.json, grids/ and the stages' files
        --eval-classifier: an independent classifier: attack accuracy, feature-space distances
        --n-per-class: generated images per class measured
        --real-per-class: real unseen images per class taken from --held-out for the null (default:
            --n-per-class)
        --tau: SSIM threshold of a match
        --allow-overlap: leave held-out images that are also training images out, instead of refusing
        --config: a JSON file of InversionConfig fields
    """
    from .audit import audit
    from .models import load_classifier

    inputs = {"--classifier": args.classifier, "--train": args.train, "--held-out": args.held_out}
    refuse_overwriting_inputs("--out", args.out, [Path(args.out) / "report.json"], inputs)
    overrides = _invert_overrides(args)
    device = _device(args)
    classifier = load_classifier(args.classifier, device)
    judge = load_classifier(args.eval_classifier, device) if args.eval_classifier else None
    try:
        result = audit(
            classifier, args.train, args.held_out, args.out, eval_classifier=judge, n_per_class=args.n_per_class,
            real_per_class=args.real_per_class, tau=args.tau, allow_overlap=args.allow_overlap,
            seed=overrides.pop("seed", 0), backend=overrides.pop("backend", "auto"), device=device,
            progress=not args.quiet, say=_say, describe={"classifier_file": args.classifier}, **overrides,
        )  # fmt: skip
    except KeyboardInterrupt:
        _say(f"interrupted; {args.out} keeps what is done: the same command continues the audit")
        raise
    print(result.verdict)
    print(f"wrote {result.out / 'report.html'}, {result.out / 'report.json'} and {result.out / 'grids'}/")
    return 0


def _demo_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="tldr-demo")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--train-per-class", type=_positive_int, default=TRAIN_PER_CLASS)
    p.add_argument("--epochs", type=_positive_int, default=EPOCHS)
    p.add_argument("--judge-train-per-class", type=_positive_int, default=None)
    p.add_argument("--judge-epochs", type=_positive_int, default=None)
    add_config_options(p)
    _add_eval_options(p)
    add_run_options(p)


def cmd_demo(args: argparse.Namespace) -> int:
    """the whole pipeline on 1,000 MNIST images, in a few minutes on a CPU

    Train (or reuse from --cache-dir) a small CNN on 1,000 MNIST training images and an independent
    evaluation classifier on other MNIST images, invert the CNN with the library's defaults, evaluate the
    generated images against the 1,000 training images and, as the control, as many held-out images, and
    write metrics.json, grid.png, classifier.pt, inversion.pt and summary.txt into --out; audit the CNN
    (tldr-fast audit, MNIST test-split images as the held-out set) into report.html, report.json and grids/.
    At most 5 minutes on a 2-core CPU.

    Options:
        --out: output folder
        --cache-dir: where the trained classifier is cached (default: $TLDR_FAST_CACHE or ~/.cache/tldr_fast)
        --train-per-class: MNIST training images per class
        --epochs: classifier training epochs
        --judge-train-per-class: training images per class of the evaluation classifier (default: the
            leakage benchmark's, ~560)
        --judge-epochs: its training epochs (default: the leakage benchmark's)
    """
    from . import demo, leakage

    args.seed = args.seed if args.seed is not None else 0
    cache = leakage.cache_dir(args.cache_dir)
    overrides = _invert_overrides(args)
    InversionConfig().with_overrides(**overrides)  # every option checked before any work
    given = {k: v for k, v in vars(args).items() if k in inspect.signature(demo.run).parameters}
    given.update(
        cache=cache,
        invert_options=overrides,
        teaching=_teaching(args, draws=1),  # the real curve from one draw: a demo's budget
        backend=args.backend or "auto",
        device=_device(args),
        progress=not args.quiet,
        say=_say,
    )
    out, report, header, record = demo.run(**given)
    _write_evaluation(report, out, args.grid_per_class, {"demo": record}, header)
    return 0


COMMANDS = {  # name: (its function, what adds its options)
    "train-classifier": (cmd_train_classifier, _train_classifier_options),
    "invert": (cmd_invert, _invert_options),
    "sample": (cmd_sample, _sample_options),
    "evaluate": (cmd_evaluate, _evaluate_options),
    "audit": (cmd_audit, _audit_options),
    "leakage": (cmd_leakage, _leakage_options),
    "info": (cmd_info, _info_options),
    "demo": (cmd_demo, _demo_options),
}


def build_parser() -> argparse.ArgumentParser:
    """The parser of all subcommands (each sets ``func``); their help is their functions' docstrings."""
    parser = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--traceback", action="store_true", help="on an error, show the full traceback instead of one line"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (func, add_options) in COMMANDS.items():
        summary, _, description = (func.__doc__ or "").partition("\n\n")
        p = sub.add_parser(name, help=summary, description=" ".join(description.partition("Options:")[0].split()))
        add_options(p)
        docs = field_docs(func, "Options")
        for action in p._actions:
            if action.help is None:
                action.help = docs.get(action.option_strings[0], "")
        p.set_defaults(func=func)
    return parser


# --- entry point ------------------------------------------------------------------------------------------


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if not isinstance(err, (ValueError, TypeError, OSError, RuntimeError)) or isinstance(err, NotImplementedError):
        text = f"{type(err).__name__}: {text}"
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``tldr-fast`` with ``argv`` (default: the process's arguments); returns the exit status."""
    from . import distributed

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with distributed.process_group(getattr(args, "device", "auto")) as device:  # under torchrun: this rank's
            if hasattr(args, "device"):
                args.device = device
            return args.func(args)
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 - the command line reports every failure in one line
        if args.traceback:
            raise
        print(
            f"{PROG} {args.command}{distributed.rank_label()}: error: {_one_line(e)}{distributed.failure_hint(e)}",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
