"""The C++/CUDA extension: loading, build facts, custom-op registration (opcheck), the compile-only check of
the CUDA sources, and the clear failure of a broken build. Values and gradients against the reference are
checked by the cross-backend tests (the ``fast`` fixture's "extension" parameter runs these ops); the tests here
cover what those do not: gradients w.r.t. the weights, fp64 gradcheck, mixed and low-precision dtypes on
the CPU, non-contiguous inputs.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import DEVICE, HAS_CUDA, assert_close, assert_low_precision_close, rand, rand_weights
from tldr_fast import build
from tldr_fast import extension as ext
from tldr_fast import extension_ops as ext_ops
from tldr_fast import reference as ref
from tldr_fast.backends import BackendUnavailable, resolve
from tldr_fast.ops import LOSS_OPS, SPECS

DEVICES = ["cpu", "cuda"] if HAS_CUDA else ["cpu"]


@pytest.fixture(scope="module")
def lib():
    """The loaded extension (built or JIT-built on first use), or a skip saying why it is not there."""
    reason = ext.unavailable("cpu")
    if reason is not None:
        pytest.skip(reason)
    return torch.ops.tldr_fast


# --- loading and build facts -----------------------------------------------------------------------------


def test_info_describes_the_loaded_library(lib):
    info = ext.info()
    assert info["built"] is True and info["how"] in ("prebuilt", "jit") and info["error"] is None
    assert os.path.exists(info["path"])
    for op in LOSS_OPS:
        assert "cpu" in info["ops"][op]
        assert ("cuda" in info["ops"][op]) == info["cuda"]
    if info["cuda"]:
        assert info["cuda_archs"] and all(a[0].isdigit() for a in info["cuda_archs"])
    else:
        assert info["cuda_archs"] == []


def test_unavailable_matches_the_kernels_present(lib):
    assert ext.unavailable("cpu") is None
    if ext.info()["cuda"]:
        assert ext.unavailable("cuda") is None
    else:
        assert "without CUDA" in ext.unavailable("cuda")
        with pytest.raises(BackendUnavailable, match="without CUDA"):
            resolve("extension", "cuda")
    assert "not 'mps'" in ext.unavailable("mps")


def test_backend_dispatch_serves_the_extension_ops(lib):
    backend = resolve("extension", DEVICE, fallback=False)
    for op in LOSS_OPS:
        assert getattr(backend, op) is getattr(ext_ops, op)
    assert hasattr(backend, "pairwise_ssim") == ext.has_kernel("pairwise_ssim", torch.device(DEVICE).type)
    for op, spec in SPECS.items():  # an op the extension does not implement: none, as no fallback was asked for
        assert hasattr(backend, op) == (spec.extension and ext.has_kernel(op, torch.device(DEVICE).type)), op
    assert resolve("cuda", DEVICE, fallback=False).ops == backend.ops  # "cuda": the former name


def test_build_flags_follow_the_environment(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0 9.0+PTX")
    assert build.cuda_archs() == ["8.0", "9.0+PTX"]
    assert build.nvcc_flags()[1:] == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    assert "-DTLDR_FAST_CUDA_ARCHS=8.0_9.0+PTX" in build.cxx_flags(with_cuda=True)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "Hopper")
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        build.nvcc_flags()
    monkeypatch.setenv("TLDR_FAST_BUILD_CUDA", "0")
    assert build.build_with_cuda() is False
    monkeypatch.setenv("TLDR_FAST_BUILD_CUDA", "1")
    if torch.version.cuda is None:
        with pytest.raises(RuntimeError, match="no CUDA"):
            build.build_with_cuda()
    cu = build.sources(with_cuda=True)
    assert set(build.sources(with_cuda=False)) < set(cu) and all(s.endswith((".cpp", ".cu")) for s in cu)


# --- a broken or disabled build: one clear message, never a crash ----------------------------------------


@pytest.fixture(scope="module")
def broken_library(tmp_path_factory):
    """What open_library returns when the prebuilt module is missing and the JIT build fails to compile."""
    tmp_path = tmp_path_factory.mktemp("broken")
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "broken.cpp").write_text("#include <torch/library.h>\nthis is not C++;\n")
    return ext.open_library(
        prebuilt="tldr_fast._no_such_module",
        csrc=str(csrc),
        jit=True,
        name="tldr_fast_broken_test",
        build_directory=str(tmp_path),
    )


def test_failed_jit_build_is_reported_not_raised(broken_library):
    assert broken_library.how == "missing" and broken_library.module is None
    assert "tldr_fast._no_such_module not importable" in broken_library.error
    assert "just-in-time build failed" in broken_library.error
    assert "broken.cpp" in broken_library.error  # the compiler's error line


def test_failed_build_gives_one_clear_backend_error(broken_library, monkeypatch):
    monkeypatch.setattr(ext, "_library", broken_library)
    for device in ("cpu", "cuda"):
        assert "extension is unavailable" in ext.unavailable(device) and "Fix:" in ext.unavailable(device)
        with pytest.raises(BackendUnavailable, match="just-in-time build failed"):
            resolve("extension", device, fallback=False)
    with pytest.raises(BackendUnavailable, match="extension is unavailable"):
        ext_ops.head_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), None, torch.ones(5))
    assert ext.info() == {"built": False, "how": "missing", "error": broken_library.error}
    auto = resolve("auto", "cpu", quiet=True)
    assert auto.name == "torch" and set(auto.chosen.values()) == {"torch"}


def test_jit_opt_out_and_missing_sources(tmp_path):
    off = ext.open_library(prebuilt="tldr_fast._no_such_module", jit=False)
    assert off.module is None and "TLDR_FAST_JIT=0" in off.error
    empty = ext.open_library(prebuilt="tldr_fast._no_such_module", csrc=str(tmp_path), jit=True)
    assert empty.module is None and "no C++ sources" in empty.error


def test_import_never_builds_or_fails():
    env = dict(os.environ, TLDR_FAST_JIT="0")
    code = "import tldr_fast, tldr_fast.extension as e, tldr_fast.backends; assert e._library is None"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


# --- the just-in-time build's cache: its lock and its messages, with torch's compile and import replaced ---------


def _fake_build(name, sources, extra_cflags, extra_cuda_cflags, extra_sycl_cflags, extra_ldflags, extra_include_paths,
                build_directory, verbose, with_cuda, with_sycl, is_standalone=False):  # fmt: skip
    """Stands in for torch's compile and link: writes torch's real ``build.ninja`` and an empty library."""
    from torch.utils import cpp_extension

    ninja = os.path.join(build_directory, "build.ninja")
    cpp_extension._write_ninja_file_to_build_library(
        ninja, name, sources, extra_cflags, extra_cuda_cflags or [], [], [], [], with_cuda, False, False
    )
    open(os.path.join(build_directory, name + ".so"), "w").close()


def _fake_import(name, path, is_python_module):
    """Stands in for torch's import of the built library."""
    return types.ModuleType(name)


FAKE_JIT = (
    "import sys, tests.test_extension as t, tldr_fast.extension as e\n"
    "from torch.utils import cpp_extension as ce\n"
    "ce._write_ninja_file_and_build_library, ce._import_module_from_library = t._fake_build, t._fake_import\n"
    "lib = e.open_library(prebuilt='tldr_fast._no_such_module', csrc=sys.argv[1], jit=True, build_directory=sys.argv[2])\n"
    "assert lib.how == 'jit', lib.error\n"
)


@pytest.fixture
def one_file_csrc(tmp_path):
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "op.cpp").write_text("// never compiled\n")
    return csrc


@pytest.fixture
def fake_torch_build(monkeypatch):
    """torch's compile and import replaced in this process (``_fake_build``, ``_fake_import``), CPU only."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "_write_ninja_file_and_build_library", _fake_build)
    monkeypatch.setattr(cpp_extension, "_import_module_from_library", _fake_import)
    monkeypatch.setenv("TLDR_FAST_BUILD_CUDA", "0")


def test_jit_says_building_only_when_it_builds(one_file_csrc, tmp_path, monkeypatch, capsys, fake_torch_build):
    from torch.utils import cpp_extension

    directory = tmp_path / "build"

    def messages():  # of a load in a fresh process (torch's record of this process's builds reset)
        monkeypatch.setattr(cpp_extension, "JIT_EXTENSION_VERSIONER", type(cpp_extension.JIT_EXTENSION_VERSIONER)())
        lib = ext.open_library("tldr_fast._no_such_module", str(one_file_csrc), True, build_directory=str(directory))
        assert lib.how == "jit", lib.error
        return capsys.readouterr().err

    assert "building the C++ extension just in time" in messages()
    assert messages().strip() == f"tldr_fast: loading the cached C++ extension from {directory}"
    library = directory / "tldr_fast_C.so"
    earlier = os.path.getmtime(one_file_csrc / "op.cpp") - 10
    os.utime(library, (earlier, earlier))  # a source edited since the build: built again
    assert "building the C++ extension" in messages()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")  # irrelevant without CUDA: still cached
    assert "loading the cached" in messages()


@pytest.mark.skipif(sys.platform == "win32", reason="the build lock uses flock (POSIX)")
def test_a_build_in_progress_is_waited_for_and_named(one_file_csrc, tmp_path, capsys, fake_torch_build):
    """While a live process holds the build directory (here this test: the OS lock, and torch's lock file
    as a build in progress has it), a load waits, naming the holder, and leaves torch's lock file alone."""
    import fcntl

    directory = tmp_path / "build"
    directory.mkdir()
    (directory / "lock").touch()
    loaded = []
    args = ("tldr_fast._no_such_module", str(one_file_csrc), True)
    loader = threading.Thread(target=lambda: loaded.append(ext.open_library(*args, build_directory=str(directory))))
    with open(directory / "tldr_fast.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 12345 on host elsewhere\n")
        held.flush()
        loader.start()
        loader.join(0.5)
        assert loader.is_alive() and (directory / "lock").exists()
        (directory / "lock").unlink()  # the build finishes: torch removes its lock, the OS lock is let go
    loader.join(30)
    assert not loader.is_alive() and loaded[0].how == "jit", loaded
    assert (
        f"waiting for pid 12345 on host elsewhere, which is building or loading the C++ extension in {directory}"
        in (capsys.readouterr().err)
    )


@pytest.mark.skipif(sys.platform == "win32", reason="the stale-lock detection uses flock (POSIX)")
def test_a_lock_left_by_a_killed_build_does_not_hang_later_loads(one_file_csrc, tmp_path):
    """A build killed while it held torch's lock file leaves the file behind; the next load removes it (no live
    process holds the OS lock) instead of waiting for ever."""
    directory = tmp_path / "build"
    directory.mkdir()
    (directory / "lock").touch()  # what torch's FileBaton leaves when its build is killed
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (directory / "tldr_fast.lock").write_text(f"pid {dead.stdout.strip()} on host {socket.gethostname()}\n")
    env = dict(os.environ, TLDR_FAST_BUILD_CUDA="0")
    root = os.path.dirname(os.path.dirname(__file__))
    try:
        done = subprocess.run(
            [sys.executable, "-c", FAKE_JIT, str(one_file_csrc), str(directory)],
            capture_output=True, text=True, env=env, cwd=root, timeout=60,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"the load waited on the stale lock {directory / 'lock'} for 60 s")
    assert done.returncode == 0, done.stderr
    assert f"removed the stale lock {directory / 'lock'}" in done.stderr
    assert not (directory / "lock").exists()


CPU_ONLY_CHECK = pytest.mark.skipif(
    HAS_CUDA, reason="a build check for CPU CI: on a GPU machine the real build does it"
)


@CPU_ONLY_CHECK
def test_jit_build_loads_in_a_fresh_process(tmp_path):
    """The just-in-time path end to end (flags, module init, op registration, Python-side rules), in a
    fresh process, on a subset of csrc/ to keep the compile short: the library and one op's CPU kernel."""
    csrc = tmp_path / "csrc"
    (csrc / "cpu").mkdir(parents=True)
    for name in ("tldr_fast.cpp", "common.h", "cpu/image_prior.cpp"):
        shutil.copy(os.path.join(build.CSRC, name), csrc / name)
    code = (
        "import torch, tldr_fast.extension as e\n"
        f"lib = e.open_library(prebuilt='tldr_fast._no_such_module', csrc={str(csrc)!r}, jit=True, "
        f"build_directory={str(tmp_path)!r})\n"
        "assert lib.how == 'jit', lib.error\n"
        "assert lib.module.with_cuda == 0 and lib.module.cuda_archs == ''\n"
        "x = torch.randn(2, 1, 5, 5)\n"
        "loss, terms, g = torch.ops.tldr_fast.image_prior(x, torch.ones(3), -1.0, 1.0, None)\n"
        "assert torch.isfinite(g).all() and terms.shape == (3,)\n"
    )
    env = dict(os.environ, TLDR_FAST_BUILD_CUDA="0")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))


# --- custom-op registration: schema, fake tensors, autograd, torch.compile (opcheck) ----------------------


def head_args(gen, device, b=6, k=5, d=4, pert=True, features=True, dtype=torch.float32, head_bias=True):
    labels = torch.randint(0, k, (b,), generator=gen).to(device)
    target = F.softmax(rand(gen, b, k, device=device), 1).to(dtype)
    logits = rand(gen, (2 if pert else 1) * b, k, device=device, dtype=dtype).requires_grad_(True)
    feats = rand(gen, b, d, device=device, dtype=dtype).requires_grad_(True) if features else None
    weights = rand_weights(gen, 5, device)
    return (logits, target, labels, feats, weights, head_bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "case",
    [dict(), dict(pert=False), dict(features=False), dict(head_bias=False), dict(dtype=torch.bfloat16), dict(b=1, k=1)],
)
def test_opcheck_head_loss(lib, gen, device, case):
    torch.library.opcheck(lib.head_loss.default, head_args(gen, device, **case))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dtype", [((7, 3), torch.float32), ((3, 9), torch.float32), ((5, 4), torch.float16)])
@pytest.mark.parametrize("by_class", [False, True])
def test_opcheck_feature_loss(lib, gen, device, shape, dtype, by_class):
    phi = rand(gen, *shape, device=device, dtype=dtype).requires_grad_(True)
    labels = torch.randint(0, 3, (shape[0],), generator=gen).to(device) if by_class else None
    torch.library.opcheck(lib.feature_loss.default, (phi, torch.ones(3, device=device), labels, 3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape,dtype", [((2, 3, 5, 6), torch.float32), ((3, 1, 4, 8), torch.bfloat16), ((1, 1, 1, 1), torch.float32)]
)
@pytest.mark.parametrize("with_moments", [False, True])
def test_opcheck_image_prior(lib, gen, device, shape, dtype, with_moments):
    x = rand(gen, *shape, device=device, dtype=dtype, scale=1.5).requires_grad_(True)
    moments = torch.tensor([[0.2] * shape[1], [0.3] * shape[1]], device=device) if with_moments else None
    torch.library.opcheck(lib.image_prior.default, (x, torch.ones(3, device=device), -1.0, 1.0, moments))


def bn_args(gen, device, shape, dtype=torch.float32, stats_dtype=torch.float32):
    """(activations [N, C, ...] requiring grad, running_mean [C], running_var [C])."""
    x = rand(gen, *shape, device=device, dtype=dtype, scale=1.5).requires_grad_(True)
    rm = rand(gen, shape[1], device=device, dtype=stats_dtype, scale=0.3)
    rv = rand(gen, shape[1], device=device, dtype=stats_dtype, scale=0.3).abs() + 0.7
    return x, rm, rv


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (7, 4), (2, 3, 5), (1, 1, 1, 1)], ids=lambda s: "x".join(map(str, s)))
def test_opcheck_bn_stats(lib, gen, device, dtype, shape):
    torch.library.opcheck(lib.bn_stats.default, bn_args(gen, device, shape, dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck_bn_stats_backward(lib, gen, device, dtype):
    """The helper op alone (the backward of bn_stats): schema and fake rule."""
    x, rm, rv = bn_args(gen, device, (3, 5, 4, 6), dtype)
    _, mean, coef = lib.bn_stats(x.detach(), rm, rv)
    grad = torch.tensor(0.7, dtype=mean.dtype, device=device)
    torch.library.opcheck(lib.bn_stats_backward.default, (grad, x.detach(), mean, coef))


def mode_seek_args(gen, device, shape, dtype=torch.float32, q=10):
    """(images [B, ...] requiring grad, latents [B, q] fp32)."""
    x = rand(gen, *shape, device=device, dtype=dtype).requires_grad_(True)
    return x, rand(gen, shape[0], q, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(6, 3, 4, 5), (7, 9), (2, 1, 1, 1)], ids=lambda s: "x".join(map(str, s)))
def test_opcheck_mode_seek(lib, gen, device, dtype, shape):
    torch.library.opcheck(lib.mode_seek.default, mode_seek_args(gen, device, shape, dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck_mode_seek_backward(lib, gen, device, dtype):
    """The helper op alone (the backward of mode_seek): schema and fake rule."""
    x, z = mode_seek_args(gen, device, (7, 3, 4, 5), dtype)
    _, coef = lib.mode_seek(x.detach(), z)
    grad = torch.tensor(0.7, dtype=coef.dtype, device=device)
    torch.library.opcheck(lib.mode_seek_backward.default, (grad, x.detach(), coef))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_pairwise_ssim(lib, gen, device):
    if not hasattr(lib, "pairwise_ssim"):
        pytest.skip("the loaded extension has no pairwise_ssim (csrc/cpu/pairwise_ssim.cpp not compiled in)")
    a = torch.rand(3, 2, 9, 8, generator=gen).to(device)
    b = torch.rand(4, 2, 9, 8, generator=gen).to(device)
    torch.library.opcheck(lib.pairwise_ssim.default, (a, b, 1.0))


def test_ops_under_torch_compile_fullgraph(lib, gen):
    """All three loss ops in one compiled graph, forward and backward, on the test device."""
    logits, target, labels, feats, w, _ = head_args(gen, DEVICE, b=9, k=4, d=6)
    x = rand(gen, 2, 3, 5, 6)
    moments = torch.tensor([[0.2, 0.4, 0.5], [0.3, 0.2, 0.25]], device=DEVICE)

    def block(z, f, x):
        l1, t1 = ext_ops.head_loss(z, target, labels, f, w)
        l2, t2 = ext_ops.feature_loss(f.relu(), w[:3], labels, 4)
        l3, t3 = ext_ops.image_prior(torch.tanh(x), w[:3], -1.0, 1.0, moments)
        return l1 + l2 + 2.0 * l3, torch.cat([t1, t2, t3])

    results = []
    for fn in (torch.compile(block, fullgraph=True), block):
        leaves = [t.detach().clone().requires_grad_(True) for t in (logits, feats, x)]
        loss, terms = fn(*leaves)
        loss.backward()
        results.append((loss, terms, *(t.grad for t in leaves)))
    for a, b, what in zip(*results, ("loss", "terms", "d/dlogits", "d/dfeatures", "d/dimages")):
        assert_close(a, b, what=what)


# --- what the cross-backend tests do not cover ------------------------------------------------------------


def test_gradcheck_fp64_with_weights(lib, gen):
    """fp64 inputs compute in fp64: gradcheck the saved gradients, the weights' gradient included."""
    logits, target, labels, feats, _, _ = head_args(gen, DEVICE, b=4, k=3, d=2, dtype=torch.float64)
    w = (torch.rand(5, generator=gen, dtype=torch.float64) + 0.5).to(DEVICE).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z, f, w: ext_ops.head_loss(z, target, labels, f, w)[0], (logits, feats, w))
    phi = rand(gen, 5, 3, dtype=torch.float64).requires_grad_(True)
    w3 = w[:3].detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p, w: ext_ops.feature_loss(p, w)[0], (phi, w3))
    y = torch.tensor([0, 1, 0, 1, 1], device=DEVICE)
    assert torch.autograd.gradcheck(lambda p, w: ext_ops.feature_loss(p, w, y, 2)[0], (phi, w3))
    x = rand(gen, 2, 2, 4, 5, dtype=torch.float64, scale=1.5).requires_grad_(True)
    moments = torch.tensor([[0.2, 0.4], [0.3, 0.2]], dtype=torch.float64, device=DEVICE)
    assert torch.autograd.gradcheck(lambda x, w: ext_ops.image_prior(x, w, -1.0, 1.0, moments)[0], (x, w3))


def test_bn_stats_fp64_gradcheck_of_the_channel_vectorised_path(lib, gen):
    """[N, C] (S = 1: the CPU kernels vectorise over the channels there), fp64 running statistics; the
    [N, C, H, W] gradcheck is tests/test_bn_stats.py's."""
    x, rm, rv = bn_args(gen, DEVICE, (6, 5), torch.float64, torch.float64)
    assert torch.autograd.gradcheck(lambda t: ext_ops.bn_stats(t, rm, rv), (x,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(16, 8, 9, 11), (64, 24)], ids=lambda s: "x".join(map(str, s)))
def test_bn_stats_low_precision_and_mixed_dtypes(lib, gen, dtype, shape):
    """bf16/fp16 activations with fp64 running statistics: the fp32 value and the gradient in the activations'
    dtype, as close to the fp64 truth as the reference's own low-precision result."""
    x, rm, rv = bn_args(gen, DEVICE, shape, dtype, torch.float64)
    res = {}
    for name, impl, xi in (
        ("hp", ref.bn_stats, x.double()),
        ("ref_lp", ref.bn_stats, x),
        ("ours", ext_ops.bn_stats, x),
    ):
        xi = xi.detach().clone().requires_grad_(True)
        value = impl(xi, rm, rv)
        value.backward()
        res[name] = (value, xi.grad)
    assert res["ours"][0].dtype == torch.float32 and res["ours"][1].dtype == dtype
    for i, what in enumerate(("value", "d/dactivations")):
        assert_low_precision_close(res["ours"][i], res["ref_lp"][i], res["hp"][i], slack=2.0, atol=1e-5, what=what)


@pytest.mark.parametrize("shape", [(4, 8, 64, 64), (4096, 16), (2, 2048, 3, 3)], ids=lambda s: "x".join(map(str, s)))
def test_bn_stats_cpu_is_deterministic_across_thread_counts(lib, gen, shape):
    """The CPU kernel's tasks and their order of summation come from the shape alone: bitwise the same value,
    mean and coefficients on one thread and on several."""
    x, rm, rv = bn_args(gen, "cpu", shape)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lib.bn_stats(x.detach(), rm, rv)
        torch.set_num_threads(max(2, threads))
        many = lib.bn_stats(x.detach(), rm, rv)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(16, 3, 9, 11), (33, 24)], ids=lambda s: "x".join(map(str, s)))
def test_mode_seek_low_precision_and_mixed_dtypes(lib, gen, dtype, shape):
    """bf16/fp16 images with fp64 latents: the fp32 value and the gradient in the images' dtype, as close to
    the fp64 truth as the reference's own low-precision result."""
    x = rand(gen, *shape, device=DEVICE).tanh().to(dtype)
    z = rand(gen, shape[0], 20, device=DEVICE, dtype=torch.float64)
    res = {}
    for name, impl, xi in (
        ("hp", ref.mode_seek, x.double()),
        ("ref_lp", ref.mode_seek, x),
        ("ours", ext_ops.mode_seek, x),
    ):
        xi = xi.detach().clone().requires_grad_(True)
        value = impl(xi, z if name == "hp" else z.float())
        value.backward()
        res[name] = (value, xi.grad)
    assert res["ours"][0].dtype == torch.float32 and res["ours"][1].dtype == dtype
    for i, what in enumerate(("value", "d/dimages")):
        assert_low_precision_close(res["ours"][i], res["ref_lp"][i], res["hp"][i], slack=2.0, atol=1e-5, what=what)


@pytest.mark.parametrize("shape", [(256, 1, 28, 28), (4, 3, 128, 128), (4097, 16)], ids=lambda s: "x".join(map(str, s)))
def test_mode_seek_cpu_is_deterministic_across_thread_counts(lib, gen, shape):
    """The CPU kernel's tasks (pair, chunk of the row) and their order of summation come from the shape alone:
    bitwise the same value and coefficients on one thread and on several."""
    x, z = mode_seek_args(gen, "cpu", shape)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lib.mode_seek(x.detach(), z)
        torch.set_num_threads(max(2, threads))
        many = lib.mode_seek(x.detach(), z)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_terms_are_detached_and_weights_get_their_gradient(lib, gen):
    logits, target, labels, feats, w, _ = head_args(gen, DEVICE)
    w.requires_grad_(True)
    loss, terms = ext_ops.head_loss(logits, target, labels, feats, w)
    assert loss.requires_grad and not terms.requires_grad
    (gw,) = torch.autograd.grad(loss * 1.5, w)
    _, ref_terms = ref.head_loss(logits, target, labels, feats, w)
    assert_close(gw, 1.5 * ref_terms, what="d loss / d weights")


def test_mixed_dtypes_and_int32_labels(lib, gen):
    """bf16 logits and features with a fp32 soft target and int32 labels: the target keeps fp32 precision."""
    logits, target, labels, feats, w, _ = head_args(gen, DEVICE, b=33, k=10, d=17, dtype=torch.bfloat16)
    target = F.softmax(rand(gen, 33, 10, device=DEVICE), 1)  # fp32
    out = {}
    for name, impl, args in (
        ("hp", ref.head_loss, (logits.double(), target.double(), labels, feats.double(), w.double())),
        ("ref_lp", ref.head_loss, (logits, target, labels, feats, w)),
        ("ours", ext_ops.head_loss, (logits, target, labels.int(), feats, w)),
    ):
        z, f = [t.detach().clone().requires_grad_(True) for t in (args[0], args[3])]
        loss, terms = impl(z, args[1], args[2], f, args[4])
        loss.backward()
        out[name] = (terms, z.grad, f.grad)
    for i, what in enumerate(("terms", "d/dlogits", "d/dfeatures")):
        assert out["ours"][i].dtype == out["ref_lp"][i].dtype, what
        assert_low_precision_close(out["ours"][i], out["ref_lp"][i], out["hp"][i], slack=2.0, atol=1e-5, what=what)


def test_non_contiguous_inputs(lib, gen):
    x = rand(gen, 3, 4, 7, 9, scale=1.3).to(memory_format=torch.channels_last).requires_grad_(True)
    w = torch.tensor([0.7, 1.3, 0.5], device=DEVICE)
    for a, b in zip(ext_ops.image_prior(x, w, -1.0, 1.0), ref.image_prior(x, w, -1.0, 1.0)):
        assert_close(a, b, what="image_prior on channels_last")
    g1 = torch.autograd.grad(ext_ops.image_prior(x, w)[0], x)[0]
    g0 = torch.autograd.grad(ref.image_prior(x, w)[0], x)[0]
    assert_close(g1, g0, what="d/dimages on channels_last")
    phi = rand(gen, 9, 5).t().requires_grad_(True)  # [5, 9], column-major
    g1 = torch.autograd.grad(ext_ops.feature_loss(phi, w)[0], phi)[0]
    g0 = torch.autograd.grad(ref.feature_loss(phi, w)[0], phi)[0]
    assert_close(g1, g0, what="d/dfeatures, transposed input")


def test_the_raw_ops_still_guard_their_kernels(lib, gen):
    """The Python functions check against the declarations first (tests/test_ops.py); called directly,
    the C++ ops reject bad input themselves rather than read out of bounds."""
    logits, target, labels, feats, w, _ = head_args(gen, "cpu")
    with pytest.raises(RuntimeError, match="label .* out of range"):
        lib.head_loss(logits, target, labels + 100, feats, w, True)
    with pytest.raises(RuntimeError, match="weights must have shape"):
        lib.head_loss(logits, target, labels, feats, w[:3], True)
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 3\)"):
        lib.feature_loss(torch.randn(4, 4), w[:3], torch.tensor([0, 1, 3, 0]), 3)
    with pytest.raises(RuntimeError, match=r"weights must have shape \[3\]"):
        lib.feature_loss(torch.randn(4, 4), w[:2], None, 0)
    with pytest.raises(RuntimeError, match="moments must be"):
        lib.image_prior(torch.randn(2, 3, 4, 4), w[:3], -1.0, 1.0, torch.ones(2, 2))
    x = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match=r"running_var must be \[C\] with C = 3"):
        lib.bn_stats(x, torch.zeros(3), torch.ones(2))
    with pytest.raises(RuntimeError, match="activations must be a non-empty"):
        lib.bn_stats(torch.randn(3), torch.zeros(3), torch.ones(3))
    _, mean, coef = lib.bn_stats(x, torch.zeros(3), torch.ones(3))
    with pytest.raises(RuntimeError, match=r"coef must be \[2, C\]"):
        lib.bn_stats_backward(torch.tensor(1.0), x, mean, coef[:, :2])
    with pytest.raises(RuntimeError, match="grad must have one element"):
        lib.bn_stats_backward(torch.ones(2), x, mean, coef)
    with pytest.raises(RuntimeError, match="latents must be"):
        lib.mode_seek(torch.randn(4, 3), torch.randn(3, 2))
    with pytest.raises(RuntimeError, match="images must be"):
        lib.mode_seek(torch.randn(1, 3), torch.randn(1, 2))
    _, coef = lib.mode_seek(torch.randn(5, 3), torch.randn(5, 2))
    with pytest.raises(RuntimeError, match=r"coef must be \[h\]"):
        lib.mode_seek_backward(torch.tensor(1.0), torch.randn(5, 3), coef[:1])
    with pytest.raises(RuntimeError, match="grad must have one element"):
        lib.mode_seek_backward(torch.ones(2), torch.randn(5, 3), coef)


# --- the CUDA sources compile (nvcc, compile only; runs without a GPU) ------------------------------------


def _nvcc():
    from torch.utils.cpp_extension import CUDA_HOME

    for home in (CUDA_HOME, os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _nvcc_command(nvcc, src, obj, gen_dir):
    import sysconfig

    from torch.utils import cpp_extension

    includes = [gen_dir, *cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    return [
        nvcc, "-c", src, "-o", obj,
        *[f"-I{p}" for p in includes],
        *cpp_extension.COMMON_NVCC_FLAGS,
        *build.nvcc_flags(["9.0"]),
        "-std=c++20", "--compiler-options", "-fPIC",
        "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
    ]  # fmt: skip


@CPU_ONLY_CHECK
def test_cuda_sources_compile_for_sm90():
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA_HOME, /usr/local/cuda, PATH): the CUDA sources cannot be compile-checked")
    sources = [s for s in build.sources(with_cuda=True) if s.endswith(".cu")]
    assert sources, "no csrc/cuda/*.cu"
    with tempfile.TemporaryDirectory() as tmp:
        # A CPU-only torch lacks this generated header; a CUDA build of torch has exactly this content.
        gen_dir = os.path.join(tmp, "gen")
        os.makedirs(os.path.join(gen_dir, "c10", "cuda", "impl"))
        with open(os.path.join(gen_dir, "c10", "cuda", "impl", "cuda_cmake_macros.h"), "w") as f:
            f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")

        def compile_one(src):
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            proc = subprocess.run(_nvcc_command(nvcc, src, obj, gen_dir), capture_output=True, text=True)
            return src, proc.returncode, (proc.stdout + proc.stderr)[-4000:]

        with ThreadPoolExecutor(max_workers=max(1, min(len(sources), os.cpu_count() or 1))) as pool:
            results = list(pool.map(compile_one, sources))
    failed = [f"{os.path.basename(src)}:\n{log}" for src, rc, log in results if rc != 0]
    assert not failed, "nvcc failed:\n" + "\n".join(failed)
