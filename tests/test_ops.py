"""The op declarations (``tldr_fast/ops/``) and the structure built on them: every backend rejects the same
bad input with the same error, the term layout and the "auto" order come from the declarations, the
backend registry is the one dispatch, the package has no import cycle, the kernels import only the
declarations, and every document a source file cites exists.
"""

import ast
import inspect
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.helpers import backend_or_skip
from tldr_fast import backends, cli, config, reference
from tldr_fast.backends import BACKENDS, BackendUnavailable, resolve
from tldr_fast.ops import LOSS_OPS, OPS, SPECS, OpSpec

ROOT = Path(__file__).resolve().parent.parent


# --- the declarations --------------------------------------------------------------------------------


def _registered(folder: str, dispatch_key: str) -> dict:
    """``{op name: file}`` of every ``m.impl("<op>", ...)`` in a ``TORCH_LIBRARY_IMPL(tldr_fast, <key>, m)``
    block of the C++/CUDA sources under ``csrc/<folder>`` (``""``: csrc/ itself, not its subfolders)."""
    found = {}
    for path in sorted((ROOT / "csrc" / folder).glob("*.c*")):
        text = path.read_text()
        for block in re.findall(rf"TORCH_LIBRARY_IMPL\(tldr_fast, {dispatch_key}, m\) \{{(.*?)\}}", text, re.S):
            for op in re.findall(r'm\.impl\("(\w+)"', block):
                found[op] = str(path.relative_to(ROOT))
    return found


def op_problems(spec: OpSpec) -> list:
    """What ``spec``'s op lacks of the checklist in CONTRIBUTING.md ("Adding an op"), one line each."""
    name, files, problems = spec.name, set(spec.files), []
    if not (ROOT / "tldr_fast" / "ops" / f"{name}.py").exists():
        problems.append(f"no declaration tldr_fast/ops/{name}.py")
    problems += [f"files names {f}, which does not exist" for f in spec.files if not (ROOT / f).exists()]
    expected = {
        "reference": "tldr_fast/reference.py",
        "test": f"tests/test_{name}.py",
        "benchmark": f"benchmarks/benchmark_{name}.py",
    }
    if "triton" in spec.auto.get("cuda", ()):
        expected["Triton kernel"] = f"kernels/{name}.py"
    if spec.extension:
        expected["C++ kernel"] = f"csrc/cpu/{name}.cpp"
        expected["CUDA kernel"] = f"csrc/cuda/{name}.cu"
    problems += [f"files lacks its {what} {f}" for what, f in expected.items() if f not in files]
    if not callable(getattr(reference, name, None)):
        problems.append(f"tldr_fast/reference.py defines no function {name}")
    elif list(inspect.signature(getattr(reference, name)).parameters) != list(inspect.signature(spec.check).parameters):
        problems.append(f"reference.{name} and the declaration's check take different arguments")
    if f"kernels/{name}.py" in files and (ROOT / "kernels" / f"{name}.py").exists():
        text = (ROOT / "kernels" / f"{name}.py").read_text()
        if not re.search(rf"^def {name}\(", text, re.M):
            problems.append(f"kernels/{name}.py defines no function {name}")
        if "triton_op(SPEC" in text and not re.search(r"^def compile_cases\(", text, re.M):
            problems.append(f"kernels/{name}.py registers tldr_triton::{name} but has no compile_cases for _aot")
    if spec.extension:
        names = (name, *(helper for helper, _, _ in spec.helpers))
        for folder, key, suffix in (("cpu", "CPU", ".cpp"), ("cuda", "CUDA", ".cu")):
            registered = _registered(folder, key)
            problems += [
                f"csrc/{folder}/{name}{suffix} does not register tldr_fast::{n} for {key}"
                for n in names
                if registered.get(n) != f"csrc/{folder}/{name}{suffix}"
            ]
        if spec.schema.split("->")[1].strip().startswith("(") and name not in _registered("", "Autograd"):
            problems.append(f"csrc/autograd.cpp registers no autograd for tldr_fast::{name} (its fused form)")
    return problems


def stray_files(specs) -> list:
    """The op files (Triton kernels, C++/CUDA kernels, Triton tests, op declarations) that no declaration
    in ``specs`` names."""
    named = {f for spec in specs for f in (*spec.files, f"tldr_fast/ops/{spec.name}.py")}
    candidates = [
        *(ROOT / "kernels").glob("[!_]*.py"),
        *(ROOT / "csrc" / "cpu").glob("*.cpp"),
        *(ROOT / "csrc" / "cuda").glob("*.cu"),
        *(ROOT / "tests").glob("test_*_triton.py"),
        *(ROOT / "tldr_fast" / "ops").glob("[!_]*.py"),
    ]
    return sorted(str(p.relative_to(ROOT)) for p in candidates if str(p.relative_to(ROOT)) not in named)


def test_every_op_is_complete():
    """Every declared op has its files and registrations (CONTRIBUTING.md, "Adding an op"), and every op
    file belongs to a declared op."""
    problems = [f"{name}: {p}" for name, spec in SPECS.items() for p in op_problems(spec)]
    problems += [f"{f} belongs to no declared op (tldr_fast.ops.SPECS)" for f in stray_files(SPECS.values())]
    assert not problems, "\n".join(problems)
    for name, spec in SPECS.items():
        assert spec.name == name and spec.schema.startswith("(") and "->" in spec.schema
        assert set(spec.auto) == {"cpu", "cuda"} and all(b in BACKENDS for o in spec.auto.values() for b in o)
    for name in LOSS_OPS:
        spec = SPECS[name]
        assert spec.terms and spec.weights_arg is not None and spec.grad_inputs
        assert "Tensor weights" in spec.schema


def test_an_incomplete_op_is_named_with_what_it_lacks():
    """The checklist's test fails where an op's files or registrations are missing."""
    spec = SPECS["bn_stats"]
    new = replace(spec, name="new_loss")
    assert "no declaration tldr_fast/ops/new_loss.py" in op_problems(new)
    assert "tldr_fast/reference.py defines no function new_loss" in op_problems(new)
    assert "files lacks its Triton kernel kernels/new_loss.py" in op_problems(new)
    assert "csrc/cpu/new_loss.cpp does not register tldr_fast::new_loss for CPU" in op_problems(new)
    assert "csrc/autograd.cpp registers no autograd for tldr_fast::new_loss (its fused form)" in op_problems(new)
    no_test = replace(spec, files=tuple(f for f in spec.files if f != "tests/test_bn_stats.py"))
    assert op_problems(no_test) == ["files lacks its test tests/test_bn_stats.py"]
    assert op_problems(replace(spec, files=(*spec.files, "benchmarks/gone.py"))) == [
        "files names benchmarks/gone.py, which does not exist"
    ]
    assert stray_files(s for n, s in SPECS.items() if n != "mode_seek") == [
        "csrc/cpu/mode_seek.cpp",
        "csrc/cuda/mode_seek.cu",
        "kernels/mode_seek.py",
        "tests/test_mode_seek_triton.py",
        "tldr_fast/ops/mode_seek.py",
    ]


def test_the_term_layout_is_the_declared_terms_by_name():
    declared = tuple(t for op in LOSS_OPS for t in SPECS[op].terms)
    assert config.TERMS[: len(declared)] == declared
    for op in LOSS_OPS:
        assert config.TERMS[config.TERM_SLICES[op]] == SPECS[op].terms


def test_backend_names_are_one_list():
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    offered = [a.choices for p in commands.values() for a in p._actions if a.dest == "backend"]
    assert offered and all(list(c) == list(backends.NAMES) for c in offered)
    for name in backends.NAMES:
        config.InversionConfig(backend=name)
    with pytest.raises(ValueError, match="backend"):
        config.InversionConfig(backend="numpy")
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        resolve("numpy", "cpu")


def test_auto_takes_each_op_from_its_declared_order():
    auto = resolve("auto", "cpu", quiet=True)
    for op in OPS:
        expected = None
        for name in SPECS[op].auto["cpu"]:
            try:
                if hasattr(resolve(name, "cpu", fallback=False), op):
                    expected = name
                    break
            except BackendUnavailable:
                continue
        assert auto.chosen[op] == expected, op
        assert auto.chosen[op] != "reference"


def test_fallback_fills_what_a_backend_lacks():
    torch_only = resolve("torch", "cpu", fallback=False)
    assert set(torch_only.ops) == set(OPS)  # plain PyTorch has every op
    ref = resolve("reference", "cpu", fallback=False)
    assert set(ref.ops) == set(OPS) and set(ref.chosen.values()) == {"reference"}


# --- the same bad input, the same error, on every backend -----------------------------------------------


def _w(n):
    return torch.ones(n)


def _head(b=4, k=3, **change):
    args = dict(
        logits=torch.randn(2 * b, k),
        condition=torch.softmax(torch.randn(b, k), 1),
        labels=torch.tensor([0, 1, 2, 0][:b]),
        features=torch.randn(b, 5),
        weights=_w(5),
        head_bias=True,
    )
    args.update(change)
    return tuple(args.values())


def _warp(theta, mode="bilinear", images=None):
    """perturb's arguments with ``theta`` and ``mode`` (images ``[2, 1, 4, 4]`` unless given)."""
    return (torch.randn(2, 1, 4, 4) if images is None else images, 0.1, -1.0, 1.0, "uniform", 0, theta, mode)


BAD = {
    "head_loss": [
        (_head(labels=torch.tensor([0, 1, 3, 0])), r"labels must lie in \[0, 3\), got values in \[0, 3\]"),
        (_head(labels=torch.tensor([0, 1, -1, 0])), r"labels must lie in \[0, 3\)"),
        (_head(weights=_w(3)), r"weights must have shape \[5\]"),
        (_head(logits=torch.randn(5, 3)), "logits must have B or 2B rows"),
        (_head(labels=torch.zeros(4)), "labels must be an integer tensor"),
        (_head(features=torch.randn(3, 5)), "features must be"),
        (_head(condition=torch.rand(4, 2)), "condition must be"),
        (_head(logits=torch.randn(8, 3).long()), "logits must be a floating-point tensor"),
    ],
    "feature_loss": [
        ((torch.randn(1, 4), _w(3)), "B >= 2"),
        ((torch.randn(4, 4), _w(3), torch.zeros(4), 3), "labels must be an integer tensor"),
        ((torch.randn(4, 4), _w(3), torch.tensor([0, 1, 3, 0]), 3), r"labels must lie in \[0, 3\)"),
        ((torch.randn(4, 4), _w(2)), r"weights must have shape \[3\]"),  # the layout before Act
        ((torch.randn(4, 4), _w(4)), r"weights must have shape \[3\]"),
        ((torch.randn(4, 4), _w(3), torch.tensor([0, 1, 1, 0])), "num_classes must be an int >= 1"),
        ((torch.randn(4, 4), _w(3), torch.tensor([0, 1, 1])), "labels must be"),
    ],
    "image_prior": [
        ((torch.randn(2, 4, 4), _w(3)), "images must be a non-empty"),
        ((torch.randn(2, 3, 4, 4), _w(3), -1.0, 1.0, torch.ones(2, 2)), r"moments must be \[2, C\] with C = 3"),
        ((torch.randn(2, 3, 4, 4), _w(3), 1.0, -1.0), "lo < hi"),
        ((torch.randn(2, 3, 4, 4), _w(2)), r"weights must have shape \[3\]"),
    ],
    "perturb": [
        ((torch.randn(2, 1, 4, 4), 0.1, -1.0, 1.0, "salt", 0), "unknown perturbation 'salt'"),
        ((torch.randn(2, 1, 4, 4), -0.1, -1.0, 1.0, "uniform", 0), "eps must be finite and >= 0"),
        ((torch.randn(2, 1, 4, 4), 0.1, -1.0, 1.0, "uniform", 0.5), "seed must be an int"),
        (_warp(None, "bicubic"), "unknown warp mode 'bicubic'"),
        (_warp(torch.zeros(3, 2, 3)), r"theta must be \[B, 2, 3\] with B = 2"),
        (_warp(torch.zeros(2, 3, 3)), r"theta must be \[B, 2, 3\] with B = 2"),
        (_warp(torch.zeros(2, 2, 3).long()), "theta must be a floating-point tensor"),
        (_warp([[0.0] * 3] * 2), "theta must be a tensor"),
        (_warp(torch.full((2, 2, 3), math.inf)), "theta must be finite"),
        (_warp(torch.zeros(2, 2, 3), images=torch.randn(2, 4, 4)), r"images must be \[B, C, H, W\] with theta"),
    ],
    "bn_stats": [
        ((torch.randn(4), torch.zeros(1), torch.ones(1)), r"activations must be a non-empty \[N, C, \.\.\.\]"),
        ((torch.randn(4, 3, 2, 2), torch.zeros(2), torch.ones(3)), r"running_mean must be \[C\] with C = 3"),
        ((torch.randn(4, 3, 2, 2), torch.zeros(3), torch.ones(3, 1)), r"running_var must be \[C\] with C = 3"),
        ((torch.ones(4, 3, dtype=torch.long), torch.zeros(3), torch.ones(3)), "activations must be a floating-point"),
    ],
    "mode_seek": [
        ((torch.randn(1, 1, 4, 4), torch.randn(1, 8)), "B >= 2"),
        ((torch.randn(4, 1, 4, 4), torch.randn(3, 8)), r"latents must be \[B, \.\.\.\] with B = 4"),
        ((torch.randn(4, 1, 4, 4), torch.ones(4, 8, dtype=torch.long)), "latents must be a floating-point"),
    ],
    "colour_line": [
        ((torch.randn(2, 1, 4, 4),), r"images must be a non-empty \[B, 3, H, W\] \(RGB\)"),
        ((torch.randn(2, 3, 4),), r"images must be a non-empty \[B, 3, H, W\] \(RGB\)"),
        ((torch.ones(2, 3, 4, 4, dtype=torch.long),), "images must be a floating-point"),
    ],
    "pairwise_ssim": [
        ((torch.rand(2, 1, 6, 8), torch.rand(2, 1, 6, 8)), "at least 7x7"),
        ((torch.rand(2, 1, 8, 8), torch.rand(2, 3, 8, 8)), r"the same \[C, H, W\]"),
        ((torch.ones(2, 1, 8, 8, dtype=torch.int32), torch.ones(2, 1, 8, 8, dtype=torch.int32)), "uint8 or floating"),
        ((torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), 0.0), "data_range must be finite and > 0"),
        ((torch.rand(2, 8, 8), torch.rand(2, 1, 8, 8)), r"\[N, C, H, W\]"),
    ],
}
CASES = [pytest.param(op, i, id=f"{op}-{i}") for op, cases in BAD.items() for i in range(len(cases))]


@pytest.mark.parametrize("op,i", CASES)
def test_every_backend_rejects_bad_input_alike(op, i):
    args, pattern = BAD[op][i]
    messages = {}
    for name in BACKENDS:
        try:
            ops = resolve(name, "cpu", quiet=True, fallback=False)
        except BackendUnavailable:
            continue
        if not hasattr(ops, op):
            continue
        with pytest.raises(ValueError, match=pattern) as e:
            getattr(ops, op)(*args)
        messages[name] = str(e.value)
    assert {"reference", "torch"} <= set(messages), messages
    assert len(set(messages.values())) == 1, f"backends disagree: {messages}"
    assert next(iter(messages.values())).startswith(f"{op}: ")


def test_every_backend_reads_uint8_images_as_divided_by_255():
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, 256, (n, 1, 9, 8), generator=gen, dtype=torch.uint8) for n in (3, 4))
    for name in BACKENDS:
        try:
            op = resolve(name, "cpu", quiet=True, fallback=False).pairwise_ssim
        except (BackendUnavailable, AttributeError):
            continue
        torch.testing.assert_close(op(a, b), op(a.float() / 255, b.float() / 255), rtol=0, atol=1e-5, msg=name)


def test_the_triton_and_extension_backends_run_the_checks():
    """The cross-backend test above covers a backend only where it runs here: say which ran."""
    for name in ("triton", "extension"):
        ops = backend_or_skip(name, "cpu")
        with pytest.raises(ValueError, match="B >= 2"):
            ops.feature_loss(torch.randn(1, 4), _w(3))


# --- structure ---------------------------------------------------------------------------------------


def _modules():
    """``{module name: path}`` of the package (``kernels/`` is installed as ``tldr_fast.kernels``)."""
    out = {}
    for folder, package in ((ROOT / "tldr_fast", "tldr_fast"), (ROOT / "kernels", "tldr_fast.kernels")):
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _imports(name, path, modules):
    """The package modules that ``name`` imports anywhere in its file (functions included), but for the
    type-only imports under ``if TYPE_CHECKING:``, which never run."""
    is_package = path.name == "__init__.py"
    base = name if is_package else name.rsplit(".", 1)[0]
    found = set()
    tree = ast.parse(path.read_text())
    type_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
        for stmt in block.body
        for n in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            targets = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = base.rsplit(".", node.level - 1)[0] if node.level > 1 else base
                mod = f"{pkg}.{node.module}" if node.module else pkg
            else:
                mod = node.module
            targets = [(mod, a.name) for a in node.names]
        else:
            continue
        for mod, attr in targets:
            if attr and f"{mod}.{attr}" in modules:
                found.add(f"{mod}.{attr}")
            elif mod in modules:
                found.add(mod)
    return found - {name}


def test_no_import_cycles_and_kernels_import_only_the_declarations():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    # Tarjan's strongly connected components: a cycle is a component of more than one module
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"
    for m, deps in graph.items():
        if m.startswith("tldr_fast.kernels"):
            outside = {d for d in deps if not d.startswith(("tldr_fast.kernels", "tldr_fast.ops"))}
            assert not outside, f"{m} imports {outside}: kernels may import only tldr_fast.ops"
        if m.startswith("tldr_fast.ops"):
            assert all(d.startswith("tldr_fast.ops") for d in deps), f"{m} imports {deps}"


def test_every_cited_document_and_section_exists():
    design = (ROOT / "DESIGN.md").read_text()
    sections = set(re.findall(r"^#+ (\d+(?:\.\d+)*)[. ]", design, re.M))
    sources = [
        p
        for d in ("tldr_fast", "kernels", "csrc", "benchmarks", "tests")
        for p in (ROOT / d).rglob("*")
        if p.suffix in (".py", ".cpp", ".cu", ".h", ".cuh", ".sh")
    ]
    sources += [ROOT / "setup.py", ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "Makefile"]
    bad = []
    for path in sources:
        text = path.read_text()
        for doc in set(re.findall(r"\b([A-Z][A-Za-z_]*\.md)\b", text)):
            if not (ROOT / doc).exists():
                bad.append(f"{path.relative_to(ROOT)} cites {doc}")
        for sec in re.findall(r"DESIGN\.md,? (?:section |§)(\d+(?:\.\d+)*)", text):
            if sec not in sections:
                bad.append(f"{path.relative_to(ROOT)} cites DESIGN.md §{sec}")
    assert not bad, "\n".join(bad)


def test_ops_are_found_and_ordered_by_their_declared_positions(monkeypatch):
    """Every module of tldr_fast/ops is an op, in the order of the positions its declaration gives; two ops
    at one position are an error, not a silent reordering of the term vector."""
    from tldr_fast import ops

    assert [SPECS[name].position for name in ops.OPS] == list(range(len(ops.OPS)))
    found = {p.stem for p in (ROOT / "tldr_fast" / "ops").glob("*.py") if not p.name.startswith("_")}
    assert set(ops.OPS) == found
    clash = replace(SPECS["perturb"], position=SPECS["head_loss"].position)
    monkeypatch.setattr(ops.perturb, "SPEC", clash)
    with pytest.raises(RuntimeError, match="positions must be 0..7, each once"):
        ops._declared()
