"""pairwise_ssim: every implementation against scikit-image, and the drivers (blocks, top-k, classes).

Implementations (``tldr_fast.backends``): "reference" (the batched oracle), "torch" (matrix products),
"triton" (the kernel; under the interpreter on CPU, small shapes only), "extension" (the extension's op:
its CPU kernel here, its CUDA kernel on a GPU). scikit-image's ``structural_similarity`` (fp64,
pair by pair) is the oracle: fp32 inputs must agree to ``TOL``.
"""

import io
import os
import sys

import pytest
import torch
from skimage.metrics import structural_similarity
from tqdm import tqdm

from tests.helpers import DEVICE, HAS_CUDA
from tldr_fast import ssim, torch_ops
from tldr_fast.backends import BackendUnavailable
from tldr_fast.data import load_foolbox_samples
from tldr_fast.ops import SPECS

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# max |ours - scikit-image|. The contract is 1e-4; the fast implementations (centred windows in fp32,
# or fp64 sums) measure ~1e-7 and are held to TOL. The reference's fp32 E[ab] - E[a]E[b] loses ~1e-5 on
# real images (cancellation), so it is held to the contract only.
TOL = 1e-5
CONTRACT = 1e-4

# (N, M, C, H, W): N and M not multiples of any tile; 1 and 3 channels; sizes 8 to 64.
SMALL = [(3, 5, 1, 8, 8), (19, 21, 1, 8, 8), (4, 19, 3, 13, 17), (2, 3, 1, 9, 64)]
LARGE = [(2, 17, 1, 28, 28), (3, 5, 3, 32, 32), (2, 3, 3, 64, 64), (7, 40, 1, 64, 7)]
IMPLS = ["reference", "torch", "triton", "extension"]
# (implementation, device): the extension's CPU kernel and the torch path on the CPU also run on GPU machines
CASES = [(name, DEVICE) for name in IMPLS] + ([("extension", "cpu"), ("torch", "cpu")] if HAS_CUDA else [])


def cases_and_shapes(small, large):
    """Every case with every input, except the Triton interpreter with large ones (minutes on a CPU)."""
    out = []
    for name, device in CASES:
        interpreted = name == "triton" and INTERPRET
        for x in small + ([] if interpreted else large):
            label = "x".join(map(str, x)) if isinstance(x, tuple) else x
            out.append(pytest.param(name, device, x, id=f"{name}-{device}-{label}"))
    return out


def implementation(name, device):
    """The op of one implementation on ``device``, or a skip saying why it cannot run here."""
    try:
        return ssim.implementation(name, device)[1]
    except BackendUnavailable as e:
        pytest.skip(f"{name} on {device}: {e}")


def skimage_matrix(a, b, data_range=1.0):
    """The [N, M] matrix pair by pair with scikit-image, in fp64; uint8 images are divided by 255."""
    a, b = (ssim.as_unit_images(x).double().cpu().numpy() for x in (a, b))
    return torch.tensor(
        [[structural_similarity(x, y, data_range=data_range, channel_axis=0) for y in b] for x in a],
        dtype=torch.float64,
    )


def tol_of(name):
    return CONTRACT if name == "reference" else TOL


def check(actual, expected, tol=TOL, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual = actual.double().cpu()
    assert torch.isfinite(actual).all(), f"{what}: non-finite elements (unwritten output?)"
    err = (actual - expected).abs().max().item()
    assert err <= tol, f"{what}: max |ours - scikit-image| = {err:.3g} > {tol:g}"


def images(gen, n, c, h, w, device="cpu"):
    return torch.rand(n, c, h, w, generator=gen).to(device)


def foolbox_images(name):
    """foolbox's real sample images of set ``name`` (e.g. "mnist") as uint8 ``[n, C, H, W]``, and their
    labels (``tldr_fast.data.load_foolbox_samples``; missing data is a skip, or a failure in CI)."""
    ds = load_foolbox_samples(name)
    return (ds.images * 255).round().to(torch.uint8), ds.labels


# --- every implementation against scikit-image ---------------------------------------------------------


@pytest.mark.parametrize("name,device,shape", cases_and_shapes(SMALL, LARGE))
def test_random_images_match_skimage(name, device, shape, gen):
    op = implementation(name, device)
    n, m, c, h, w = shape
    a, b = images(gen, n, c, h, w, device), images(gen, m, c, h, w, device)
    b[1] = a[0]  # one identical pair: SSIM 1
    out = op(a, b, 1.0)
    assert out.dtype == torch.float32 and out.device == torch.device(device)
    check(out, skimage_matrix(a, b), tol_of(name), name)
    assert abs(out[0, 1].item() - 1.0) < tol_of(name)


@pytest.mark.parametrize("name,device,dataset", cases_and_shapes(["mnist", "fashionMNIST"], ["cifar10"]))
def test_real_images_match_skimage(name, device, dataset):
    """foolbox's real MNIST, Fashion-MNIST (1x28x28) and CIFAR-10 (3x32x32) images, uint8."""
    op = implementation(name, device)
    x, _ = foolbox_images(dataset)
    n = 2 if name == "triton" and INTERPRET else 6
    a, b = (ssim.as_unit_images(t) for t in (x[:n], x[n : 2 * n + 3]))
    check(op(a.to(device), b.to(device), 1.0), skimage_matrix(a, b), tol_of(name), f"{name} {dataset}")


@pytest.mark.parametrize("name,device", CASES)
def test_digits_match_skimage(name, device):
    """sklearn's 8x8 digits (values 0..16, data_range 16)."""
    datasets = pytest.importorskip("sklearn.datasets")
    x = torch.from_numpy(datasets.load_digits().images[:40]).float()[:, None]
    a, b = x[:7], x[7:]
    check(
        implementation(name, device)(a.to(device), b.to(device), 16.0), skimage_matrix(a, b, 16.0), tol_of(name), name
    )


@pytest.mark.parametrize("name,device", [c for c in CASES if c[0] != "reference"])
def test_flat_bright_images(name, device, gen):
    """Nearly flat regions near 1: where E[ab] - E[a]E[b] cancels, the covariance must not. (The fp32
    reference computes exactly that difference and errs by ~2e-4 here: it is left out.)"""
    op = implementation(name, device)
    a = 0.95 + 0.002 * images(gen, 3, 1, 12, 12, device)
    b = torch.cat([0.95 + 0.002 * images(gen, 4, 1, 12, 12, device), a[:1]])
    check(op(a, b, 1.0), skimage_matrix(a, b), tol_of(name), name)


@pytest.mark.parametrize(
    "name,device,dtype",
    [
        (name, device, dtype)
        for name, device in CASES
        for dtype in (torch.uint8, torch.float16, torch.bfloat16, torch.float64)
        if not (name == "reference" and dtype == torch.uint8)  # the reference takes floats only
    ],
)
def test_input_dtypes(name, device, dtype, gen):
    """uint8 (divided by 255), fp16, bf16, fp64: the SSIM of the values as given."""
    op = implementation(name, device)
    a, b = images(gen, 3, 2, 10, 11), images(gen, 5, 2, 10, 11)
    if dtype == torch.uint8:
        a, b = (x.mul(255).round().to(torch.uint8) for x in (a, b))
    else:
        a, b = a.to(dtype), b.to(dtype)
    out = op(a.to(device), b.to(device), 1.0)
    assert out.dtype == (
        torch.float64 if dtype == torch.float64 and name in ("reference", "extension") else torch.float32
    )
    check(out, skimage_matrix(a, b), tol_of(name), f"{name} {dtype}")


@pytest.mark.parametrize("name,device", CASES)
def test_empty_and_single(name, device, gen):
    op = implementation(name, device)
    a = images(gen, 1, 1, 7, 7, device)
    check(op(a, a, 1.0), torch.ones(1, 1, dtype=torch.float64), tol_of(name), name)
    if name != "reference":  # the reference cannot reduce over zero pairs; the drivers never ask it to
        assert op(a[:0], a, 1.0).shape == (0, 1)


# --- the extension's op ----------------------------------------------------------------------------------


def test_extension_opcheck(gen):
    """Schema, fake (meta) implementation and dispatch of torch.ops.tldr_fast.pairwise_ssim."""
    implementation("extension", DEVICE)
    a, b = images(gen, 3, 1, 9, 10, DEVICE), images(gen, 4, 1, 9, 10, DEVICE)
    torch.library.opcheck(torch.ops.tldr_fast.pairwise_ssim.default, (a, b, 1.0))
    torch.library.opcheck(torch.ops.tldr_fast.pairwise_ssim.default, (a.double(), b.double(), 2.0))


# --- drivers -----------------------------------------------------------------------------------------


def test_auto_picks_the_fastest_available():
    name, _ = ssim.implementation("auto", DEVICE)
    available = []
    for cand in SPECS["pairwise_ssim"].auto[torch.device(DEVICE).type]:
        try:
            ssim.implementation(cand, DEVICE)
            available.append(cand)
        except BackendUnavailable:
            pass
    assert name == available[0] and name != "reference"


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_pairwise_blocks_do_not_change_the_matrix(backend, gen):
    a, b = images(gen, 13, 1, 11, 9), images(gen, 70, 1, 11, 9)
    name, _ = ssim.implementation(backend, DEVICE)
    fixed = ssim._footprint(name, torch.device(DEVICE), 1, 11, 9)[0] / 2**20
    tiny = fixed + 0.05  # MB: forces many blocks
    bn, bm = ssim._block_shape(name, torch.device(DEVICE), a, b, tiny)
    assert bn < a.shape[0] or bm < b.shape[0], "the tiny budget should split the work"
    whole = ssim.pairwise_ssim(a, b, backend=backend, device=DEVICE)
    split = ssim.pairwise_ssim(a, b, backend=backend, device=DEVICE, budget_mb=tiny)
    assert whole.device.type == "cpu" and whole.dtype == torch.float32
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-6)
    check(whole, skimage_matrix(a, b), what=backend)


def test_pairwise_accepts_numpy_and_3d_uint8(gen):
    a = (images(gen, 3, 1, 9, 9) * 255).round().to(torch.uint8)
    b = (images(gen, 4, 1, 9, 9) * 255).round().to(torch.uint8)
    out = ssim.pairwise_ssim(a[:, 0].numpy(), b[:, 0].numpy(), device=DEVICE)
    check(out, skimage_matrix(a, b), what="numpy uint8 [N, H, W]")


@pytest.mark.parametrize("k", [1, 3])
def test_nearest_equals_topk_of_the_matrix(k, gen):
    a, b = images(gen, 9, 3, 10, 10), images(gen, 50, 3, 10, 10)
    full = ssim.pairwise_ssim(a, b, device=DEVICE)
    vals, idx = ssim.nearest_ssim(a, b, k=k, device=DEVICE, budget_mb=0.05)
    assert vals.shape == idx.shape == (9, k) and idx.dtype == torch.long
    top = full.topk(k, dim=1)
    torch.testing.assert_close(vals, top.values, rtol=0, atol=1e-6)
    torch.testing.assert_close(full.gather(1, idx), top.values, rtol=0, atol=1e-6)


def test_nearest_finds_planted_duplicates(gen):
    """Training images copied into the generated set are found, with SSIM 1."""
    x, _ = foolbox_images("mnist")
    train = torch.cat([x, (images(gen, 30, 1, 28, 28) * 255).to(torch.uint8)])
    planted = torch.tensor([3, 11, 25, 40])
    gen_images = torch.cat([train[planted], (images(gen, 2, 1, 28, 28) * 255).to(torch.uint8)])
    vals, idx = ssim.nearest_ssim(gen_images, train, k=1, device=DEVICE, budget_mb=0.2)
    assert torch.equal(idx[:4, 0], planted)
    torch.testing.assert_close(vals[:4, 0], torch.ones(4), rtol=0, atol=1e-6)
    assert (vals[4:, 0] < 0.9).all()


def test_nearest_caps_k_at_m(gen):
    vals, idx = ssim.nearest_ssim(images(gen, 2, 1, 8, 8), images(gen, 3, 1, 8, 8), k=5, device=DEVICE)
    assert vals.shape == (2, 3) and sorted(idx[0].tolist()) == [0, 1, 2]


def test_drivers_advance_a_shared_bar_by_the_pairs_compared(gen):
    """A stage's one bar, passed to several calls, counts every pair once, block by block, and stays open
    for the stage to close; the calls show no bar of their own."""
    a, b, c = images(gen, 5, 1, 9, 9), images(gen, 40, 1, 9, 9), images(gen, 7, 1, 9, 9)
    stream = io.StringIO()
    bar = tqdm(total=5 * 40 + 5 * 7, file=stream)
    ssim.pairwise_ssim(a, b, device=DEVICE, budget_mb=0.05, bar=bar, progress=True)
    assert bar.n == 5 * 40
    ssim.nearest_ssim(a, c, k=2, device=DEVICE, budget_mb=0.05, bar=bar, progress=True)
    assert bar.n == bar.total and not bar.disable  # not closed by the calls
    bar.close()
    assert stream.getvalue().count("\n") == 1


def test_classwise_blocks(gen):
    a, b = images(gen, 12, 1, 9, 9), images(gen, 20, 1, 9, 9)
    la, lb = torch.randint(0, 3, (12,), generator=gen), torch.randint(0, 4, (20,), generator=gen)
    la[0], lb[0] = 0, 0  # class 0 present on both sides
    out = ssim.classwise_ssim(a, la, b, lb.numpy(), device=DEVICE)
    assert sorted(out) == la.unique().tolist()
    full = ssim.pairwise_ssim(a, b, device=DEVICE)
    for c, block in out.items():
        rows, cols = (la == c).nonzero().flatten(), (lb == c).nonzero().flatten()
        torch.testing.assert_close(block, full[rows][:, cols], rtol=0, atol=1e-6)
    empty = ssim.classwise_ssim(a, la, b, lb, classes=[7], device=DEVICE)[7]
    assert empty.shape == (0, 0)


def test_invalid_inputs_are_rejected():
    with pytest.raises(ValueError, match="same"):
        ssim.pairwise_ssim(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 9, 8), backend="torch")
    with pytest.raises(ValueError, match="7x7"):
        ssim.pairwise_ssim(torch.rand(2, 1, 6, 8), torch.rand(2, 1, 6, 8), backend="torch")
    with pytest.raises(TypeError, match="uint8"):
        ssim.pairwise_ssim(torch.ones(2, 1, 8, 8, dtype=torch.int32), torch.ones(2, 1, 8, 8, dtype=torch.int32))
    with pytest.raises(BackendUnavailable, match="unknown"):
        ssim.pairwise_ssim(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), backend="numpy")


def test_triton_pixels_far_outside_the_data_range(gen):
    """Pixels in the hundreds of thousands with data_range 1 (a caller's mistake that scikit-image accepts)
    would overflow fp16x3's fp16 halves: the kernel takes tf32x3 then, and still matches."""
    op = implementation("triton", DEVICE)
    a, b = images(gen, 5, 1, 9, 9, DEVICE) * 2e5, images(gen, 7, 1, 9, 9, DEVICE) * 2e5
    check(op(a, b, 1.0), torch_ops.pairwise_ssim(a.double(), b.double()).double().cpu(), what="x 2e5")


def test_triton_rejects_images_beyond_int32_offsets(monkeypatch):
    module = sys.modules[implementation("triton", DEVICE).__module__]
    monkeypatch.setattr(module, "_MAX_OFFSET", module.PAD * 8 * 8)
    with pytest.raises(ValueError, match="int32"):
        module.pairwise_ssim(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8))


# --- GPU: the kernels at scale ------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["triton", "extension"])
@pytest.mark.parametrize("shape", [(70, 130, 1, 28, 28), (33, 65, 3, 32, 32), (5, 9, 3, 64, 64), (17, 300, 1, 8, 8)])
def test_gpu_kernel_matches_skimage(name, shape, gen):
    op = implementation(name, "cuda")
    n, m, c, h, w = shape
    a, b = images(gen, n, c, h, w, "cuda"), images(gen, m, c, h, w, "cuda")
    sub = slice(0, 12)  # scikit-image on a sample of rows (it runs ~5k pairs/s)
    out = op(a, b, 1.0)
    check(out[sub], skimage_matrix(a[sub], b), what=name)
    check(out, torch_ops.pairwise_ssim(a, b).double().cpu(), what=f"{name} vs torch path")


@pytest.mark.gpu
@pytest.mark.parametrize("precision,tol", [("fp16x3", TOL), ("ieee", TOL), ("tf32x3", TOL), ("bf16x3", 1e-4)])
def test_gpu_triton_precisions(precision, tol, gen):
    implementation("triton", "cuda")
    from tldr_fast.kernels import pairwise_ssim as triton_ssim

    x, _ = foolbox_images("cifar10")
    a, b = x[:8].cuda(), torch.cat([x[8:], (images(gen, 40, 3, 32, 32) * 255).to(torch.uint8)]).cuda()
    check(triton_ssim(a, b, 1.0, precision=precision), skimage_matrix(a, b), tol=tol, what=precision)


@pytest.mark.gpu
def test_gpu_large_matrix_kernels_agree(gen):
    """1,000 x 20,000 MNIST-sized pairs: Triton, CUDA and the torch path agree; a sample against scikit-image."""
    a, b = images(gen, 1000, 1, 28, 28, "cuda"), images(gen, 20000, 1, 28, 28, "cuda")
    b[12345] = a[999]
    tri, cu = (implementation(name, "cuda")(a, b, 1.0) for name in ("triton", "extension"))
    check(tri, cu.double().cpu(), what="triton vs cuda")
    assert abs(cu[999, 12345].item() - 1) < TOL
    rows, cols = torch.arange(0, 1000, 97), torch.arange(0, 20000, 1999)
    check(cu[rows][:, cols], skimage_matrix(a[rows], b[cols]), what="cuda sample")
    vals, idx = ssim.nearest_ssim(a, b, k=2, device="cuda", budget_mb=64)
    top = cu.topk(2, dim=1)
    torch.testing.assert_close(vals, top.values.cpu(), rtol=0, atol=1e-5)


# --- the Triton kernel compiles for Hopper (no GPU needed) -------------------------------------------

_COMPILE_SM90 = r"""
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tldr_fast.kernels._aot import _resource_usage
import tldr_fast.kernels.pairwise_ssim  # noqa: F401  (the package re-exports the function under this name)
mod = sys.modules["tldr_fast.kernels.pairwise_ssim"]
sig = {name: "*fp32" for name in ("a_ptr", "b_ptr", "mua_ptr", "vara_ptr", "mub_ptr", "varb_ptr", "out_ptr")}
sig.update({name: "i32" for name in ("N", "M", "NP", "MP", "H", "W", "HO", "WO", "P")}, c1="fp32", c2="fp32")
sig.update(BLOCK_N="constexpr", BLOCK_M="constexpr", PRECISION="constexpr", FAST_DIV="constexpr")
# as launched: 16-byte aligned buffers, padded image counts (multiples of 128)
names = mod._pairwise_ssim_kernel.arg_names
aligned = [n for n, t in sig.items() if t.startswith("*")] + ["NP", "MP"]
attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
variants = [(cfg, "fp16x3") for cfg in mod._CONFIGS] + [(mod._CONFIGS[0], p) for p in ("tf32x3", "ieee", "bf16x3")]
for cfg, precision in variants:
    constexprs = dict(cfg.kwargs, PRECISION=precision, FAST_DIV=True)
    k = triton.compile(ASTSource(mod._pairwise_ssim_kernel, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    assert k.metadata.shared <= 227 * 1024, (constexprs, k.metadata.shared)
    usage = _resource_usage(k.asm["cubin"])
    assert precision != "fp16x3" or "stack_bytes=0" in usage, (constexprs, usage)  # no register spills
    print("ok", constexprs, cfg.num_warps, cfg.num_stages, k.metadata.shared, usage)
"""


def test_triton_kernel_compiles_for_sm90():
    """Every autotuned tile shape (and each precision) through Triton's real compiler for sm_90,
    within its shared memory; the default precision's tiles without register spills."""
    import subprocess
    import sys

    try:
        from triton import knobs

        if not os.path.exists(knobs.nvidia.ptxas.path):
            pytest.skip("Triton's NVIDIA backend (ptxas) is not available")
    except Exception as e:
        pytest.skip(f"Triton's NVIDIA backend is not available: {e}")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TLDR_FAST_POISON")}
    r = subprocess.run([sys.executable, "-c", _COMPILE_SM90], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    from tldr_fast.kernels import pairwise_ssim as triton_ssim

    assert r.stdout.count("ok ") == len(sys.modules[triton_ssim.__module__]._CONFIGS) + 3, r.stdout
