"""The ``tldr-fast`` command line: train a classifier, invert it, sample, evaluate, or run the demo.

    tldr-fast demo --out demo/                      # the whole pipeline on 1,000 MNIST images
    tldr-fast train-classifier --data mnist --n-per-class 100 --out clf.pt
    tldr-fast invert --classifier clf.pt --steps 2000 --out inv.pt
    tldr-fast sample --inversion inv.pt --n-per-class 10 --out samples.npz   # or a folder of PNGs
    tldr-fast evaluate --inversion inv.pt --classifier clf.pt --out eval/
    tldr-fast audit --classifier clf.pt --out audit/    # which training images does it leak? report.html
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
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Union, get_args, get_origin, get_type_hints

from . import demo, distributed, leakage
from .audit import audit_saved
from .backends import NAMES as BACKEND_NAMES
from .backends import resolve_device
from .checkpoint import check_writable, refuse_overwriting_inputs
from .config import (
    InversionConfig,
    check_field,
    field_docs,
    field_specs,
    parse_overrides,
    read_overrides,
    unwrap_optional,
)
from .data import dataset_names
from .evaluate import evaluate_saved
from .info import info, info_text
from .invert import invert_saved, sample_saved
from .models import ARCHS, accuracies, train_and_save

PROG = "tldr-fast"
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


def _help(text: str) -> str:
    """A docstring's text as an option's help: without reST quotes, ``%`` escaped for argparse."""
    return text.replace("``", "").replace("%", "%%")


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
        text = _help(docs.get(name, ""))
        action = parser.add_argument("--" + name.replace("_", "-"), default=None, help=text, **options)
        action.config_default = getattr(defaults, name)  # shown by _Formatter


def add_function_options(
    parser: argparse.ArgumentParser, func: Callable[..., Any], also: Optional[Callable[..., Any]] = None, **special: Any
) -> None:
    """Add an option for each keyword-only parameter of ``func`` (``n_per_class`` as ``--n-per-class``), its help
    its doc (``Args:`` of ``func``, else of ``also``), its default the parameter's (required without one): a bool
    is a switch, an int a positive integer, a ``Literal`` its choices. ``special``: a parameter's ``add_argument``
    keywords (``flag``: another name, ``parser``: a group for it). Not ``RUN_FIELDS``, nor callables."""
    docs, hints = {**(field_docs(also) if also else {}), **field_docs(func)}, get_type_hints(func)
    for name, param in inspect.signature(func).parameters.items():
        if param.kind is not param.KEYWORD_ONLY or name in RUN_FIELDS:
            continue
        kind, options = unwrap_optional(hints[name]), {"help": _help(docs.get(name, ""))}
        options.update({"required": True} if param.default is param.empty else {"default": param.default})
        if kind is bool:
            options["action"] = "store_true"
        elif get_origin(kind) is Literal:
            options["choices"] = get_args(kind)
        elif kind in (int, float):
            options["type"] = _positive_int if kind is int else float
        elif kind is not str and name not in special:
            continue
        options.update(special.get(name, {}))
        flag, target = options.pop("flag", "--" + name.replace("_", "-")), options.pop("parser", parser)
        target.add_argument(flag, dest=name, **options)


def add_run_options(p: argparse.ArgumentParser, seed_help: str = "seed of everything random") -> None:
    """``--device``, ``--seed`` and ``--quiet``: how a command runs."""
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=None, help=f"{seed_help} (default: 0, or the resumed run's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _data_help() -> str:
    names = ", ".join(dataset_names())
    return f"data set: {names}, an .npz, a folder of IDX files or of class folders; NAME:test picks the test split"


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
    overrides = read_overrides(args.config) if getattr(args, "config", None) else {}
    overrides.update(_given_options(args))
    overrides.update(parse_overrides(getattr(args, "overrides", [])))
    for k in ("device", "progress"):  # how to run, not what to run: from --device and --quiet
        overrides.pop(k, None)
    return overrides


# --- the commands: each maps its options onto the function that does its work (and documents its options) ---


def _say(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr)


def _device(args: argparse.Namespace) -> str:
    """``--device`` made concrete once per command ("auto": the GPU when there is one, quietly)."""
    return str(resolve_device(args.device, quiet=True))


def _call(func: Callable[..., Any], args: argparse.Namespace, **given: Any) -> Any:
    """``func`` called with the options given of its keyword-only parameters (None: not given, the parameter's
    default), ``--device`` made concrete, progress unless ``--quiet``, and ``given``."""
    keywords = [k for k, p in inspect.signature(func).parameters.items() if p.kind is p.KEYWORD_ONLY]
    options = {k: getattr(args, k) for k in keywords if getattr(args, k, None) is not None}
    options.update(device=_device(args), progress=not args.quiet)
    return func(**{**options, **given})


def _train_classifier_options(p: argparse.ArgumentParser) -> None:
    special = {"data": {"help": _data_help()}, "n_per_class": {"type": _n_per_class}, "arch": {"choices": tuple(ARCHS)}}
    add_function_options(p, train_and_save, **special)
    add_run_options(p, "seed of the subset, initialisation and batches")


def cmd_train_classifier(args: argparse.Namespace) -> int:
    model = _call(train_and_save, args, say=_say)
    print(f"saved {args.out}: {accuracies(model.tldr_meta)}")
    return 0


def _invert_options(p: argparse.ArgumentParser) -> None:
    add_function_options(p, invert_saved)
    p.add_argument(
        "--config", help="a JSON file of InversionConfig fields (e.g. as metrics or a checkpoint record them)"
    )
    example = "any InversionConfig field or loss weight, e.g. --set tv=1e-3 --set diversity=class"
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=example)
    add_config_options(p)
    add_run_options(p)


def cmd_invert(args: argparse.Namespace) -> int:
    inputs = {"--classifier": args.classifier, "--config": args.config}  # --resume may be --out: the run goes on
    refuse_overwriting_inputs("--out", args.out, [Path(args.out)], inputs)
    check_writable(args.out, "--out")
    try:
        inv = _call(invert_saved, args, overrides=_invert_overrides(args))
    except KeyboardInterrupt:
        if Path(args.out).is_file():
            _say(
                f"interrupted; {args.out} holds the run so far. Continue it with:\n  {PROG} invert --classifier "
                f"{args.classifier} --resume {args.out} --out {args.out}"
            )
        raise
    if distributed.is_main():  # under torchrun: rank 0 saved it
        print(f"saved {args.out} after {inv.step} steps: target classifier {demo.metrics_line(inv.metrics)}")
    return 0


def _sample_options(p: argparse.ArgumentParser) -> None:
    add_function_options(p, sample_saved, shard_size={"metavar": "N"})
    p.add_argument("--device", default="auto", help="device of the generator")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: the inversion's own)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_sample(args: argparse.Namespace) -> int:
    n, written = _call(sample_saved, args)
    if distributed.is_main():  # under torchrun: every rank wrote its batches
        print(f"wrote {n} images ({args.n_per_class} per class) to {written}")
    return 0


def _evaluate_options(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    data_help = f"training set to compare with instead of the classifier's: {_data_help()}"
    special = {"inversion": {"parser": src}, "images": {"parser": src}, "data": {"help": data_help}}
    add_function_options(p, evaluate_saved, backend={"choices": BACKEND_NAMES}, **special)
    add_run_options(p)


def cmd_evaluate(args: argparse.Namespace) -> int:
    _call(evaluate_saved, args, say=print)
    return 0


def _leakage_options(p: argparse.ArgumentParser) -> None:
    special = {
        "seeds": {"type": _int_list},
        "variants": {"flag": "--variant", "action": "append", "default": [], "metavar": "NAME:KEY=VALUE[,KEY=VALUE]"},
        "data": {"action": "append", "default": [], "metavar": "NAME=TRAIN,TEST"},
        "overrides": {"flag": "--set", "action": "append", "default": [], "metavar": "KEY=VALUE"},
    }
    add_function_options(p, leakage.run_options, **special)
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, ...")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_options(p)


def cmd_leakage(args: argparse.Namespace) -> int:
    results = _call(leakage.run_options, args, common=_given_options(args), say=_say)
    print(leakage.markdown(results))
    print(f"wrote {Path(args.out) / 'results.json'}, {Path(args.out) / 'results.md'} and {Path(args.out) / 'grids'}/")
    return 0


def _audit_options(p: argparse.ArgumentParser) -> None:
    add_function_options(p, audit_saved)
    p.add_argument("--config", help="a JSON file of InversionConfig fields")
    example = "any InversionConfig field or loss weight, e.g. --set tv=1e-3 (repeatable; after --config)"
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=example)
    add_config_options(p)
    add_run_options(p)


def cmd_audit(args: argparse.Namespace) -> int:
    try:
        result = _call(audit_saved, args, overrides=_invert_overrides(args), say=_say)
    except KeyboardInterrupt:
        _say(f"interrupted; {args.out} keeps what is done: the same command continues the audit")
        raise
    print(result.verdict)
    print(f"wrote {result.out / 'report.html'}, {result.out / 'report.json'} and {result.out / 'grids'}/")
    return 0


def _info_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def cmd_info(args: argparse.Namespace) -> int:
    """Versions, devices and which backends can run here.

    Print torch/triton versions, the devices torch sees, tldr_fast.backends.available() for cpu and cuda,
    and the C++/CUDA extension's build info.
    """
    facts = info()
    print(json.dumps(facts, indent=2, default=str) if args.json else info_text(facts))
    return 0


def _demo_options(p: argparse.ArgumentParser) -> None:
    add_function_options(p, demo.run, also=evaluate_saved)
    add_config_options(p)
    add_run_options(p)


def cmd_demo(args: argparse.Namespace) -> int:
    _call(demo.run, args, invert_options=_invert_overrides(args), backend=args.backend or "auto", say=_say)
    return 0


COMMANDS = {  # name: (its function, what adds its options, the function whose docstring is its help)
    "train-classifier": (cmd_train_classifier, _train_classifier_options, train_and_save),
    "invert": (cmd_invert, _invert_options, invert_saved),
    "sample": (cmd_sample, _sample_options, sample_saved),
    "evaluate": (cmd_evaluate, _evaluate_options, evaluate_saved),
    "leakage": (cmd_leakage, _leakage_options, leakage.run_options),
    "audit": (cmd_audit, _audit_options, audit_saved),
    "info": (cmd_info, _info_options, cmd_info),
    "demo": (cmd_demo, _demo_options, demo.run),
}


def build_parser() -> argparse.ArgumentParser:
    """The parser of all subcommands (each sets ``func``); their help is their functions' docstrings."""
    parser = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--traceback", action="store_true", help="on an error, show the full traceback instead of one line"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (func, add_options, documented) in COMMANDS.items():
        summary, _, description = inspect.cleandoc(documented.__doc__ or "").partition("\n\n")
        description = _help(" ".join(description.partition("Args:")[0].split()))
        p = sub.add_parser(name, help=_help(summary.rstrip(".")), description=description)
        add_options(p)
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
