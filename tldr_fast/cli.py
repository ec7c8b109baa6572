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
import json
import os
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

if TYPE_CHECKING:
    from .data import ImageDataset

PROG = "tldr-fast"
DEMO_TRAIN_PER_CLASS = 100  # 1,000 MNIST training images
DEMO_EPOCHS = 10
# tldr_fast.backends.NAMES, spelled out so that the command line starts without importing the package
BACKEND_CHOICES = ("auto", "reference", "torch", "triton", "extension", "cuda")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit status 2."""

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


def _add_run_options(p: argparse.ArgumentParser, seed_help: str = "seed of everything random") -> None:
    p.add_argument(
        "--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, cuda:1, ... (default: auto)"
    )
    p.add_argument("--seed", type=int, default=None, help=f"{seed_help} (default: 0, or the resumed run's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_invert_options(p: argparse.ArgumentParser) -> None:
    from .config import InversionConfig

    d = InversionConfig()
    p.add_argument(
        "--steps", type=_positive_int, default=None, help=f"generator optimisation steps (default: {d.steps})"
    )
    p.add_argument("--batch-size", type=_positive_int, default=None, help=f"images per step (default: {d.batch_size})")
    p.add_argument("--lr", type=float, default=None, help="generator learning rate (default: InversionConfig's)")
    p.add_argument(
        "--backend",
        default=None,
        choices=BACKEND_CHOICES,
        help="kernels for the loss ops and SSIM (default: auto; 'cuda' = 'extension')",
    )
    p.add_argument(
        "--conditioning",
        choices=("hot", "soft"),
        default=None,
        help="hot: one-hot (TLDR, default); soft: softmax of noise",
    )
    p.add_argument(
        "--grad-norm",
        choices=("head", "full", "off"),
        default=None,
        help="gradient-norm term: head (closed form, default), full (double backward), off",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="generator and classifier under torch.compile (faster steps after a compile)",
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        default=None,
        help="replay the loss block from CUDA graphs (GPU; not with --grad-norm full)",
    )


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--n-per-class", type=_positive_int, default=10, help="generated images per class to evaluate (default: 10)"
    )
    p.add_argument("--tau", type=float, default=0.4, help="SSIM threshold of 'reconstructed' (default: 0.4)")
    p.add_argument("--grid-per-class", type=_positive_int, default=8, help="pairs per class in grid.png (default: 8)")
    p.add_argument(
        "--teach-per-class",
        type=_positive_int,
        default=100,
        help="generated images per class that the students of CAS and distillation learn from (default: 100)",
    )
    p.add_argument(
        "--student-steps",
        type=_positive_int,
        default=None,
        help="Adam steps of each student, also on the real curve (default: tldr_fast.utility.Teaching's, 400)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of all subcommands (each sets ``func``)."""
    parser = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--traceback", action="store_true", help="on an error, show the full traceback instead of one line"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    from .data import dataset_names
    from .models import ARCHS

    data_help = f"data set: {', '.join(dataset_names())}, an .npz, a folder of IDX files or of class folders; NAME:test picks the test split"

    p = sub.add_parser(
        "train-classifier",
        help="train a small CNN or MLP on a class-balanced subset and save it",
        description=(
            "Train the reference CNN (or MLP) on n images per class of a data set and save weights + metadata "
            "(architecture, normalisation, class names, the subset's indices, accuracies) to a weights-only checkpoint."
        ),
    )
    p.add_argument("--data", default="mnist", help=f"{data_help} (default: mnist)")
    p.add_argument(
        "--n-per-class",
        type=_n_per_class,
        default=DEMO_TRAIN_PER_CLASS,
        help="training images per class, or 'all' (default: 100)",
    )
    p.add_argument(
        "--test-data", default=None, help="held-out data set for the test accuracy, e.g. mnist:test (default: none)"
    )
    p.add_argument(
        "--arch",
        choices=tuple(ARCHS),
        default="cnn",
        help="classifier architecture: cnn (with BatchNorm), plain_cnn (without), mlp or lenet (default: cnn)",
    )
    p.add_argument(
        "--epochs", type=_positive_int, default=DEMO_EPOCHS, help=f"training epochs (default: {DEMO_EPOCHS})"
    )
    p.add_argument("--batch-size", type=_positive_int, default=64, help="training batch size (default: 64)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: 3e-3)")
    p.add_argument("--out", required=True, help="checkpoint to write (.pt)")
    _add_run_options(p, "seed of the subset, initialisation and batches")
    p.set_defaults(func=cmd_train_classifier)

    p = sub.add_parser(
        "invert",
        help="train a generator that inverts a saved classifier (TLDR)",
        description=(
            "Invert a classifier saved by train-classifier: train a label-conditioned generator against it and save "
            "the inversion (generator, config, history, metrics). --resume continues an interrupted run."
        ),
    )
    p.add_argument("--classifier", required=True, help="classifier checkpoint from train-classifier")
    p.add_argument("--out", required=True, help="inversion checkpoint to write (.pt)")
    p.add_argument(
        "--resume",
        default=None,
        help="continue from this inversion checkpoint (options not given again are the run's own)",
    )
    p.add_argument(
        "--allow-other-classifier",
        action="store_true",
        help="with --resume: continue a run that was trained against another classifier than --classifier",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="also save --out every N steps (default: only at the end and on Ctrl-C)",
    )
    p.add_argument(
        "--checkpoint-minutes",
        type=float,
        default=None,
        help="also save --out whenever this many minutes have passed since the last save (default 10; 0: off)",
    )
    p.add_argument(
        "--config",
        default=None,
        help="a JSON file of InversionConfig fields (e.g. as metrics or a checkpoint record them)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any InversionConfig field or loss weight, e.g. --set tv=1e-3 --set diversity=class (repeatable; after --config)",
    )
    _add_invert_options(p)
    _add_run_options(p)
    p.set_defaults(func=cmd_invert)

    p = sub.add_parser(
        "sample",
        help="write N generated images per class to an .npz or a folder of PNGs",
        description=(
            "Sample an inversion: --out ending in .npz writes uint8 images [N, C, H, W] and labels; with --shard-size "
            "it writes them in shards beside it plus an index (large samples; needed for an .npz under torchrun); "
            "any other --out is a folder with one sub-folder of PNGs per class."
        ),
    )
    p.add_argument("--inversion", required=True, help="inversion checkpoint from invert")
    p.add_argument("--n-per-class", type=_positive_int, default=10, help="images per class (default: 10)")
    p.add_argument(
        "--out", required=True, help=".npz file or folder (a folder or a sharded .npz resumes an interrupted sample)"
    )
    p.add_argument(
        "--shard-size",
        type=_positive_int,
        default=None,
        metavar="N",
        help="with an .npz --out such as s.npz: shards of N images, s-00000-of-000NN.npz, and their index "
        "s-index.json (the same files for any number of torchrun ranks, each writing its shards; resumable; "
        "read back with tldr_fast.samples.load_sample)",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="images generated at a time (default: the inversion's batch size); the images do not depend on it",
    )
    p.add_argument(
        "--select",
        type=_positive_int,
        default=None,
        help="keep the most robustly classified of N candidates per image "
        "(needs --classifier; default: the inversion's select, or 1 without --classifier)",
    )
    p.add_argument(
        "--classifier", default=None, help="the target classifier checkpoint (scores the candidates of --select)"
    )
    p.add_argument("--device", default="auto", help="device of the generator (default: auto)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: the inversion's own)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "evaluate",
        help="measure how much of the training set an inversion reconstructs",
        description=(
            "Compare generated images with the training images of their class by SSIM (nearest neighbour and "
            "one-to-one Hungarian matching), and report attack accuracy and target confidence. Writes metrics.json, "
            "grid.png and summary.txt into --out. The training set is the one recorded in --classifier unless --data is given."
        ),
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--inversion", help="inversion checkpoint (sampled --n-per-class per class)")
    src.add_argument(
        "--images",
        help="generated images: an .npz with images (uint8, or floats in [0, 1]) and labels, a sharded "
        "sample's -index.json, or a folder of PNGs, as `sample` writes them",
    )
    p.add_argument(
        "--classifier", default=None, help="the target classifier checkpoint (its training subset, confidence)"
    )
    p.add_argument(
        "--eval-classifier", default=None, help="an independent classifier checkpoint for the attack accuracy"
    )
    p.add_argument(
        "--data", default=None, help=f"training set to compare with instead of the classifier's: {data_help}"
    )
    p.add_argument(
        "--test-data",
        default=None,
        help="real images the target never saw, e.g. mnist:test: adds what the generated images teach (CAS, worth in "
        "real images per class, distillation accuracy), the students tested on them",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where the real curve of --test-data is kept (default: $TLDR_FAST_CACHE or ~/.cache/tldr_fast)",
    )
    p.add_argument(
        "--backend", default="auto", choices=BACKEND_CHOICES, help="SSIM kernels (default: auto; 'cuda' = 'extension')"
    )
    p.add_argument("--out", required=True, help="folder for metrics.json, grid.png, summary.txt")
    _add_eval_options(p)
    _add_run_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "audit",
        help="does a classifier give its training images away? invert, sample, measure, write a report",
        description=(
            "Invert --classifier with the library's defaults, sample with selection, compare the generated images with "
            "the training images and, as the control, with as many held-out images, against real unseen images as the "
            "null; write report.html (self-contained), report.json and grids/ into --out. A rerun with the same "
            "arguments reuses what is done there; an interrupted one continues."
        ),
    )
    p.add_argument("--classifier", required=True, help="classifier checkpoint from train-classifier")
    p.add_argument(
        "--train", default=None, help=f"its training images: {data_help} (default: the subset the checkpoint records)"
    )
    p.add_argument(
        "--held-out",
        default=None,
        help="images of the same classes it never saw (default: the test split of --train's source, e.g. mnist:test)",
    )
    p.add_argument("--out", required=True, help="folder for report.html, report.json, grids/ and the stages' files")
    p.add_argument(
        "--eval-classifier", default=None, help="an independent classifier: attack accuracy, feature distances"
    )
    p.add_argument(
        "--n-per-class", type=_positive_int, default=50, help="generated images per class measured (default: 50)"
    )
    p.add_argument(
        "--real-per-class",
        type=_positive_int,
        default=None,
        help="real unseen images per class taken from --held-out for the null (default: --n-per-class)",
    )
    p.add_argument("--tau", type=float, default=0.4, help="SSIM threshold of a match (default: 0.4)")
    p.add_argument("--select", type=_positive_int, default=None, help="candidates per image (default: the config's)")
    p.add_argument(
        "--allow-overlap",
        action="store_true",
        help="leave held-out images that are also training images out, instead of refusing",
    )
    p.add_argument("--config", default=None, help="a JSON file of InversionConfig fields")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any InversionConfig field or loss weight (repeatable; after --config)",
    )
    _add_invert_options(p)
    _add_run_options(p)
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser(
        "leakage",
        help="the leakage benchmark: invert classifiers it trains, measure how training-like the images are",
        description=(
            "Train (or reuse from --cache-dir) the suite's target classifiers and an independent evaluation classifier, invert "
            "each target over several seeds, and measure attack accuracy, nearest-neighbour SSIM to the training images against "
            "the control (as many held-out images), one-to-one matches and same-class diversity, beside the same metrics of real "
            "unseen images, noise and a black image. Writes results.json, results.md and grids/ into --out."
        ),
    )
    p.add_argument(
        "--suite",
        choices=("quick", "default", "colour", "full"),
        default="default",
        help="quick: CI smoke test (< 3 min on 2 CPU cores); default: < 45 min; full: every target (default: default)",
    )
    p.add_argument(
        "--targets",
        default=None,
        help="comma-separated target names to run instead of the suite's, e.g. mnist-cnn-1000,mnist-plain_cnn-10",
    )
    p.add_argument("--seeds", type=_int_list, default=None, help="comma-separated seeds (default: the suite's, 0,1,2)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an invert option for every run, e.g. --set diversity=class (repeatable)",
    )
    p.add_argument(
        "--variant",
        dest="variants",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[,KEY=VALUE]",
        help="measure a variant beside the defaults, e.g. --variant no-bn:bn_stats=0 (repeatable)",
    )
    p.add_argument(
        "--ablation",
        action="store_true",
        help="measure every variant of tldr_fast.leakage.ABLATION beside the defaults",
    )
    p.add_argument("--out", default="leakage_out", help="output folder (default: leakage_out)")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where trained classifiers are cached (default: $TLDR_FAST_CACHE or ~/.cache/tldr_fast)",
    )
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, ... (default: auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_leakage)

    p = sub.add_parser(
        "info",
        help="versions, devices and which backends can run here",
        description=(
            "Print torch/triton versions, the devices torch sees, tldr_fast.backends.available() for cpu and cuda, "
            "and the C++/CUDA extension's build info."
        ),
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "demo",
        help="the whole pipeline on 1,000 MNIST images, in a few minutes on a CPU",
        description=(
            "Train (or reuse from --cache-dir) a small CNN on 1,000 MNIST training images and an independent evaluation "
            "classifier on other MNIST images, invert the CNN with the library's defaults, evaluate the generated images "
            "against the 1,000 training images and, as the control, as many held-out images, audit it (tldr-fast audit, "
            "with MNIST test-split images as the held-out set), and write metrics.json, grid.png, classifier.pt, "
            "inversion.pt, summary.txt, report.html, report.json and grids/ into --out. At most 5 minutes on a 2-core CPU."
        ),
    )
    p.add_argument("--out", default="tldr-demo", help="output folder (default: tldr-demo)")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where the trained classifier is cached (default: $TLDR_FAST_CACHE or ~/.cache/tldr_fast)",
    )
    p.add_argument(
        "--train-per-class",
        type=_positive_int,
        default=DEMO_TRAIN_PER_CLASS,
        help="MNIST training images per class (default: 100)",
    )
    p.add_argument(
        "--epochs", type=_positive_int, default=DEMO_EPOCHS, help=f"classifier training epochs (default: {DEMO_EPOCHS})"
    )
    p.add_argument(
        "--judge-train-per-class",
        type=_positive_int,
        default=None,
        help="training images per class of the evaluation classifier (default: the leakage benchmark's, ~560)",
    )
    p.add_argument(
        "--judge-epochs",
        type=_positive_int,
        default=None,
        help="its training epochs (default: the leakage benchmark's)",
    )
    _add_invert_options(p)
    _add_eval_options(p)
    _add_run_options(p)
    p.set_defaults(func=cmd_demo)
    return parser


# --- the commands ----------------------------------------------------------------------------------------


def _say(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr)


def _refuse_overwriting_inputs(
    option: str, value: str, files: Sequence[Path], inputs: Dict[str, Optional[str]]
) -> None:
    """Refuse, before any work, to write any of ``files`` (what ``option value`` writes) where it is one of
    the command's ``inputs`` (``{option: value}``; a data set given as ``PATH:test`` is its ``PATH``): the
    same file by its resolved path, through a symbolic or hard link included. Writing it would destroy the input."""
    for in_option, given in inputs.items():
        if not given:
            continue
        source = Path(given.rsplit(":", 1)[0] if given.endswith((":train", ":test")) else given)
        for file in files:
            if _same_file(file, source):
                what = "is" if file == Path(value) else f"would write {file}, which is"
                raise ValueError(
                    f"{option} {value} {what} the same file as {in_option} {given}: writing it would destroy that "
                    f"input; give another {option}"
                )


def _same_file(a: Path, b: Path) -> bool:
    """Whether paths ``a`` and ``b`` name one file (resolved, so also through links; existing or not)."""
    try:
        if os.path.samefile(a, b):
            return True
    except OSError:  # one of them does not exist (yet)
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def _device(args: argparse.Namespace) -> str:
    """``--device`` made concrete once per command ("auto": the GPU when there is one, quietly)."""
    from .backends import resolve_device

    return str(resolve_device(args.device, quiet=True))


def _train(
    args: argparse.Namespace, train: ImageDataset, test: Optional[ImageDataset], arch: str, lr: float, batch_size: int
):
    from .models import train_classifier

    _say(f"training a {arch} on {len(train)} images of {train.source}")
    return train_classifier(
        train,
        arch,
        epochs=args.epochs,
        batch_size=batch_size,
        lr=lr,
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
        test=test,
    )


def _accuracies(meta: Dict[str, Any]) -> str:
    test = meta.get("test_accuracy")
    return f"train accuracy {meta['train_accuracy']:.3f}" + (f", test accuracy {test:.3f}" if test is not None else "")


def cmd_train_classifier(args: argparse.Namespace) -> int:
    from .checkpoint import check_writable
    from .data import load_dataset, subset
    from .models import save_classifier

    _refuse_overwriting_inputs(
        "--out", args.out, [Path(args.out)], {"--data": args.data, "--test-data": args.test_data}
    )
    check_writable(args.out, "--out")
    args.device = _device(args)
    args.seed = args.seed if args.seed is not None else 0
    train = subset(load_dataset(args.data, seed=args.seed), args.n_per_class, seed=args.seed)
    test = load_dataset(args.test_data) if args.test_data else None
    model = _train(args, train, test, args.arch, args.lr, args.batch_size)
    save_classifier(model, args.out)
    print(f"saved {args.out}: {_accuracies(model.tldr_meta)}")
    return 0


def _invert_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    """The invert options given on the command line: ``--config``, then the flags, then ``--set`` (options
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
    flags = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "conditioning": args.conditioning,
        "grad_norm": args.grad_norm,
        "compile": args.compile,
        "cuda_graph": args.cuda_graph,
        "seed": args.seed,
        "backend": args.backend,
        "checkpoint_every": getattr(args, "checkpoint_every", None),
        "checkpoint_minutes": getattr(args, "checkpoint_minutes", None),
    }
    overrides.update({k: v for k, v in flags.items() if v is not None})
    overrides.update(parse_overrides(getattr(args, "overrides", [])))
    for k in ("device", "progress"):  # how to run, not what to run: from --device and --quiet
        overrides.pop(k, None)
    return overrides


def _invert(args: argparse.Namespace, classifier: torch.nn.Module, out: Path, resume: Optional[str] = None):
    from . import invert

    meta = classifier.tldr_meta
    return invert(  # saves `out` at the end and on Ctrl-C, resumable (with the optimiser state)
        classifier,
        meta["num_classes"],
        tuple(meta["input_shape"]),
        resume=resume,
        checkpoint=out,
        allow_other_classifier=getattr(args, "allow_other_classifier", False),
        device=args.device,
        progress=not args.quiet,
        **_invert_overrides(args),
    )


def _metrics_line(metrics: Optional[Dict[str, float]]) -> str:
    if not metrics:
        return "no metrics"
    return ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))


def cmd_invert(args: argparse.Namespace) -> int:
    from .checkpoint import check_writable
    from .config import InversionConfig
    from .distributed import is_main
    from .models import load_classifier

    inputs = {"--classifier": args.classifier, "--config": args.config}  # --resume may be --out: the run goes on
    _refuse_overwriting_inputs("--out", args.out, [Path(args.out)], inputs)
    check_writable(args.out, "--out")
    if not args.resume:  # every option checked before any work (a resumed run checks them against its own)
        InversionConfig().with_overrides(**_invert_overrides(args))
    args.device = _device(args)
    classifier = load_classifier(args.classifier, args.device)
    try:
        inv = _invert(args, classifier, Path(args.out), args.resume)
    except KeyboardInterrupt:
        if Path(args.out).is_file():
            _say(
                f"interrupted; {args.out} holds the run so far. Continue it with:\n  {PROG} invert --classifier {args.classifier} "
                f"--resume {args.out} --out {args.out}"
            )
        raise
    if is_main():  # under torchrun: rank 0 saved it
        print(f"saved {args.out} after {inv.step} steps: target classifier {_metrics_line(inv.metrics)}")
    return 0


def _load_inversion(args: argparse.Namespace, device: str, classifier: Optional[torch.nn.Module] = None):
    """``--inversion``, with ``--classifier`` (loaded as ``classifier``) as its target when given."""
    from . import Inversion
    from .classifier import ClassifierError

    try:
        return Inversion.load(args.inversion, classifier=classifier, device=device)
    except ClassifierError as e:  # the classifier does not fit the inversion: name the option
        raise ClassifierError(f"--classifier {args.classifier} does not fit --inversion {args.inversion}: {e}") from e


def cmd_sample(args: argparse.Namespace) -> int:
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
    _refuse_overwriting_inputs(
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


def _write_evaluation(
    report, out: Path, grid_per_class: int, extra: Dict[str, Any], header: Sequence[str] = ()
) -> None:
    from .checkpoint import atomic_write_text

    report.save_json(out / "metrics.json", extra)
    report.save_grid(out / "grid.png", per_class=grid_per_class)
    summary = "\n".join([*header, report.summary()])
    atomic_write_text(out / "summary.txt", summary + "\n")
    print(summary)
    print(f"wrote {out / 'metrics.json'}, {out / 'grid.png'}, {out / 'summary.txt'}")


def _training_set(classifier: Optional[torch.nn.Module], data: Optional[str]):
    from .data import load_dataset

    if data:
        return load_dataset(data)
    meta = getattr(classifier, "tldr_meta", None) or {}
    if "train_source" not in meta:
        raise ValueError(
            "no training set to compare with: give --data, or --classifier with a recorded training subset"
        )
    return load_dataset(meta["train_source"]).select_source(meta["train_indices"])


EVALUATION_FILES = ("metrics.json", "grid.png", "summary.txt")  # what evaluate and demo write into --out


def _output_folder(path: str, files: Sequence[str] = (), inputs: Optional[Dict[str, Optional[str]]] = None) -> Path:
    """``path`` as a folder for a command's outputs, created and checked for writability now; none of the
    ``files`` it will hold may be one of the command's ``inputs``."""
    from .checkpoint import check_writable

    if not path.strip():
        raise ValueError("--out is empty: give a folder")
    out = Path(path)
    _refuse_overwriting_inputs("--out", path, [out / f for f in files], inputs or {})
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a folder")
    check_writable(out / "metrics.json", "--out folder")
    return out


def _teaching(args: argparse.Namespace, **changes: Any):
    """The students' recipe: ``tldr_fast.utility.Teaching`` with ``--student-steps`` and ``changes``."""
    from .utility import Teaching

    steps = {"steps": args.student_steps} if args.student_steps else {}
    return Teaching(**{**steps, **changes})


def _check_classifiers(
    given: Sequence[Tuple[str, Optional[str], Optional[torch.nn.Module]]], classes: int, shape
) -> None:
    """Each classifier of ``given`` (``(option, file, model or None)``) against the evaluated images' class
    count and shape ``[C, H, W]``, before any work; an error names the option and the file."""
    from .models import check_classifier

    for option, path, model in given:
        if model is not None:
            check_classifier(model, classes, shape, f"{option} {path}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .data import load_dataset, load_npz
    from .evaluate import evaluate
    from .models import load_classifier

    inputs = {
        "--inversion": args.inversion,
        "--images": args.images,
        "--classifier": args.classifier,
        "--eval-classifier": args.eval_classifier,
        "--data": args.data,
        "--test-data": args.test_data,
    }
    out = _output_folder(args.out, EVALUATION_FILES, inputs)
    device = _device(args)
    args.seed = args.seed if args.seed is not None else 0
    target = load_classifier(args.classifier, device) if args.classifier else None
    judge = load_classifier(args.eval_classifier, device) if args.eval_classifier else None
    train = _training_set(target, args.data)
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
        _check_classifiers([("--eval-classifier", args.eval_classifier, judge)], inv.num_classes, inv.image_shape)
        report = evaluate(inv, train, n_per_class=args.n_per_class, **common)
        source = {"inversion": args.inversion}
    else:
        if Path(args.images).suffix.lower() == ".npz":
            gen = load_npz(args.images)  # [N, C, H, W] in [0, 1]
            images, labels = gen.images, gen.labels
        else:  # a sharded sample's index or a PNG sample folder, as `sample` writes them
            from .samples import load_sample

            x, y = load_sample(args.images)  # uint8 [N, C, H, W], int64 [N]
            images, labels = torch.from_numpy(x).float() / 255, torch.from_numpy(y)
        given = [("--classifier", args.classifier, target), ("--eval-classifier", args.eval_classifier, judge)]
        _check_classifiers(given, train.num_classes, images.shape[1:])
        report = evaluate(images, train, labels, value_range=(0.0, 1.0), **common)
        source = {"images": args.images}
    if report is not None:  # under torchrun: rank 0's
        _write_evaluation(report, out, args.grid_per_class, {"generated_from": source})
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from .audit import audit
    from .models import load_classifier

    inputs = {"--classifier": args.classifier, "--train": args.train, "--held-out": args.held_out}
    _refuse_overwriting_inputs("--out", args.out, [Path(args.out) / "report.json"], inputs)
    overrides = _invert_overrides(args)
    device = _device(args)
    classifier = load_classifier(args.classifier, device)
    judge = load_classifier(args.eval_classifier, device) if args.eval_classifier else None
    try:
        result = audit(
            classifier, args.train, args.held_out, args.out, eval_classifier=judge, n_per_class=args.n_per_class,
            real_per_class=args.real_per_class, tau=args.tau, select=args.select, allow_overlap=args.allow_overlap,
            seed=overrides.pop("seed", 0), backend=overrides.pop("backend", "auto"), device=device,
            progress=not args.quiet, say=_say, describe={"classifier_file": args.classifier}, **overrides,
        )  # fmt: skip
    except KeyboardInterrupt:
        _say(f"interrupted; {args.out} keeps what is done: the same command continues the audit")
        raise
    print(result.verdict)
    print(f"wrote {result.out / 'report.html'}, {result.out / 'report.json'} and {result.out / 'grids'}/")
    return 0


def parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses (numbers, true/false, lists), else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_overrides(pairs: Sequence[str], option: str = "--set") -> Dict[str, Any]:
    """``["tv=1e-3", "diversity=class"]`` -> ``{"tv": 0.001, "diversity": "class"}`` (validated by invert);
    ``option``: the command-line option they came from, named in the error."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{option} expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = parse_value(value.strip())
    return out


def _variant_pairs(text: str) -> List[str]:
    """``"eps=0.1,betas=[0.5,0.9]"`` -> ``["eps=0.1", "betas=[0.5,0.9]"]``: split at the commas before a ``KEY=``."""
    return [p for p in re.split(r",(?=[^,=\[\]{}]+=)", text) if p]


def _leakage_variants(args: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    """``{"defaults": --set}`` and one variant per ``--variant`` (and ``--ablation``), each checked."""
    from . import leakage

    try:
        common = parse_overrides(args.overrides)
    except ValueError as e:
        raise ValueError(f"--set: {e}") from None
    leakage.check_overrides(common, "--set")
    variants = {"defaults": common}
    specs = list(args.variants)
    if args.ablation:
        specs += [
            f"{name}:" + ",".join(f"{k}={json.dumps(v)}" for k, v in changes.items())
            for name, changes in leakage.ABLATION.items()
        ]
    for spec in specs:
        name, sep, rest = spec.partition(":")
        if not sep or not name:
            raise ValueError(f"--variant expects NAME:KEY=VALUE[,KEY=VALUE], got {spec!r}")
        leakage.check_variant_name(name, "--variant")
        if name in variants:
            taken = "the runs of --set's options" if name == "defaults" else "another variant (--variant or --ablation)"
            raise ValueError(f"--variant {name!r}: that name is taken by {taken}; give each variant its own name")
        try:
            changes = parse_overrides(_variant_pairs(rest))
        except ValueError as e:
            raise ValueError(f"--variant {name}: {e}") from None
        leakage.check_overrides(changes, f"--variant {name}")
        variants[name] = {**common, **changes}
        leakage.check_overrides(variants[name], f"--variant {name} with --set")
    return variants


def _leakage_seeds(seeds: Optional[Sequence[int]]) -> Optional[Tuple[int, ...]]:
    """``--seeds`` (integers already: argparse's ``_int_list``) checked: distinct, >= 0, not empty."""
    from . import leakage

    return None if seeds is None else leakage.check_seeds(seeds, "--seeds")


def cmd_leakage(args: argparse.Namespace) -> int:
    from . import leakage

    # every argument checked before any work starts
    variants = _leakage_variants(args)
    seeds = _leakage_seeds(args.seeds)
    targets = None
    if args.targets is not None:
        targets = [
            t.name
            for t in leakage.choose_targets(
                leakage.SUITES[args.suite], [n.strip() for n in args.targets.split(",")], "--targets"
            )
        ]
    cache = leakage.check_folder(leakage.cache_dir(args.cache_dir), "--cache-dir (or $TLDR_FAST_CACHE)")
    _output_folder(args.out)
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


def info() -> Dict[str, Any]:
    """Versions, devices, and the availability of every backend on cpu and cuda."""
    from . import __version__, extension
    from .backends import available

    try:
        import triton

        triton_version = triton.__version__
    except ImportError as e:
        triton_version = f"not installed ({e})"
    devices = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    return {
        "tldr_fast": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cuda_devices": devices,
        "cpu_threads": torch.get_num_threads(),
        "backends": {"cpu": available("cpu"), "cuda": available("cuda")},
        "extension": extension.info(),
    }


def cmd_info(args: argparse.Namespace) -> int:
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


def cmd_demo(args: argparse.Namespace) -> int:
    from . import leakage
    from .audit import audit
    from .data import load_dataset, subset
    from .evaluate import evaluate
    from .models import load_classifier, save_classifier

    start = time.perf_counter()
    args.seed = args.seed if args.seed is not None else 0
    cache = leakage.cache_dir(args.cache_dir)
    cached = cache / f"demo-cnn-mnist-{args.train_per_class}pc-{args.epochs}ep-seed{args.seed}.pt"
    files = (*EVALUATION_FILES, "classifier.pt", "inversion.pt", "report.html", "report.json")
    out = _output_folder(args.out, files, {"--cache-dir (its cached classifier)": str(cached)})
    args.device = _device(args)
    classifier = None
    if cached.is_file():
        try:
            classifier = load_classifier(cached, args.device)
            _say(f"reusing the classifier cached at {cached}")
            train = _training_set(classifier, None)
        except ValueError as e:  # e.g. saved by another version: train a new one in its place
            _say(f"not reusing the cached classifier ({e}); training a new one")
    # the leakage benchmark's split of the MNIST test split: held-out control images, and the independent
    # evaluation classifier's training images (it is trained once and cached with the benchmark's)
    suite = leakage.SUITES["default"]
    suite = replace(
        suite,
        judge_max_per_class=args.judge_train_per_class or suite.judge_max_per_class,
        judge_epochs=args.judge_epochs or suite.judge_epochs,
    )
    parts = leakage.split("mnist", suite)
    if classifier is None:
        train = subset(load_dataset("mnist"), args.train_per_class, seed=args.seed)
        classifier = _train(args, train, parts.held_out, "cnn", 3e-3, 64)
        save_classifier(classifier, cached)
    judge = leakage.judge("mnist", parts, suite, cache, args.device, _say)
    save_classifier(classifier, out / "classifier.pt")
    _say(
        f"classifier: {_accuracies(classifier.tldr_meta)}; evaluation classifier (lenet on {len(parts.judge)} other "
        f"MNIST images): held-out accuracy {judge.tldr_meta['test_accuracy']:.3f}"
    )
    overrides = _invert_overrides(args)
    audited = audit(  # inverts into out/inversion.pt; report.html, report.json and grids/ beside it
        classifier, train, parts.held_out, out, eval_classifier=judge, seed=overrides.pop("seed"),
        backend=overrides.pop("backend", "auto"), device=args.device, progress=not args.quiet, say=_say,
        describe={"classifier_file": str(out / "classifier.pt")}, restart=True, **overrides,
    )  # fmt: skip
    inv = audited.inversion
    _say(f"inversion: target classifier {_metrics_line(inv.metrics)}")
    _say(f"audit: {audited.verdict}")
    report = evaluate(
        inv,
        train,
        n_per_class=args.n_per_class,
        tau=args.tau,
        classifier=classifier,
        eval_classifier=judge,
        held_out=parts.held_out,
        test=parts.held_out,
        teach_per_class=args.teach_per_class,
        real_pool=load_dataset("mnist"),
        teaching=_teaching(args, draws=1),  # the real curve from one draw: a demo's budget
        cache=cache,
        backend=args.backend or "auto",
        device=args.device,
        progress=not args.quiet,
    )
    seconds = round(time.perf_counter() - start, 1)
    header = [
        f"demo: CNN on {len(train)} MNIST images ({_accuracies(classifier.tldr_meta)}), inverted in {inv.step} steps "
        f"of {inv.config.batch_size} images; {seconds} s in all",
    ]
    extra = {
        "demo": {
            "classifier": classifier.tldr_meta["arch"],
            "train_accuracy": classifier.tldr_meta["train_accuracy"],
            "test_accuracy": classifier.tldr_meta["test_accuracy"],
            "eval_classifier": judge.tldr_meta["arch"],
            "eval_classifier_accuracy": judge.tldr_meta["test_accuracy"],
            "held_out_images": len(parts.held_out),
            "audit": audited.verdict,
            "inversion_steps": inv.step,
            "inversion_batch_size": inv.config.batch_size,
            "inversion_metrics": inv.metrics,
            "seconds": seconds,
        }
    }
    _write_evaluation(report, out, args.grid_per_class, extra, header)
    return 0


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
