"""The fused sampler ops (tasn.ops) against the PyTorch reference sampler (tasn.model.sampler).

Three groups:
- build: the library compiles with this machine's toolchain (CUDA when nvcc is present); the build is
  cached (TASN_OPS_CACHE or ~/.cache/tasn/ops), so it costs minutes once and seconds afterwards;
- CPU: the op's CPU kernels share the per-element arithmetic of the CUDA kernels (sampler_math.h),
  so these check that arithmetic, the registrations (opcheck, fake tensors, autograd, torch.compile)
  and the fallback rules without a GPU;
- GPU (marker `gpu`, skipped without CUDA): the CUDA kernels against the reference on CUDA.
Every float32 result is compared with the float64 reference within the bound of the rounding-error
model of tests/fixtures/sampler_bounds.py (derived there, its constant measured by
benchmarks/tolerances.py), never with another float32 implementation at a fixed tolerance: a GPU's
fused multiply-adds or ATen's float32 CUDA scan round differently and are no less right. Seeds are
fixed, so a failure replays.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tasn.ops as ops
from fixtures import sampler_bounds as sb
from tasn.model import TASN, TASNLoss, sampler
from tasn.model.sampler import reference_attention_sample, sampler_coordinates
from tasn.ops import build

OPS = ("sampler_coordinates", "bilinear_gather", "bilinear_gather_backward", "attention_sample")
DENSE, ITERS = 4.0, 5
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU tests run on a GPU host "
                          "(benchmarks/gpu_check.sh)")


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_maps(kind: str, n: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """Attention maps: random with peaks, gaussian blobs, or the degenerate ones (uniform, zero, NaN)."""
    if kind == "random":
        return torch.rand(n, h, w, generator=g) ** 4
    if kind == "blobs":  # kept positive: see the note on zero densities below
        ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
        cy, cx = torch.rand(n, 1, 1, generator=g) * h, torch.rand(n, 1, 1, generator=g) * w
        return 0.01 + torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * (0.1 * max(h, w) + 0.5) ** 2))
    if kind == "uniform":
        return torch.ones(n, h, w)
    if kind == "zeros":
        return torch.zeros(n, h, w)
    if kind == "nan":  # one NaN per map: its row and column profile sums are NaN -> uniform
        a = torch.rand(n, h, w, generator=g)
        a[:, h // 2, w // 2] = float("nan")
        return a
    raise ValueError(kind)


# A note on zero densities. Where a profile is exactly 0 over a stretch (a map that underflows to 0 on
# whole rows or columns), the cumulative density is flat there and the inverse is decided by rounding:
# the error model's slope is 0 and its bound infinite. The definition, not the kernel, is
# ill-conditioned there, so the maps compared here are positive (as TASN's softmax-based maps are).


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


def assert_coordinates_within_bound(coords: torch.Tensor, att: torch.Tensor, size: int, out: int, power: float,
                                    what: str = "op") -> None:
    """`coords` (2, n, out), any float path, within the error model's bound of the float64 reference."""
    ref, slopes = sb.float64_coordinates(att, size, out, DENSE, ITERS, power)
    bound = sb.coordinate_bound(slopes, size, out, eps=sb.eps_of(coords.dtype))
    err = (coords.double().cpu() - ref).abs()
    worst = int((err / bound).flatten().argmax())
    assert bool((err <= bound).all()), (
        f"{what}: coordinate {worst} (flat index) is {err.flatten()[worst]:.3g} from float64, bound "
        f"{bound.flatten()[worst]:.3g}; K needed {sb.needed_k(coords, ref, slopes, size, out):.2f}, "
        f"allowed {sb.COORD_K}")


@pytest.fixture(scope="session")
def built():
    """The library, loaded (prebuilt, already loaded, or built into the cache) once per session; skips
    with the reason if impossible."""
    if not ops.load():
        pytest.skip(f"tasn ops could not be built here: {ops._load_error}")
    return ops


@pytest.fixture(scope="session")
def cuda_built(built):
    """The library with its CUDA kernels: on a CUDA machine, a library without them is a failure
    (the toolkit was missing at build time), not a reason to skip the GPU tests."""
    if not ops.available():
        pytest.fail(f"CUDA is present but the fused sampler is not available: {ops.unavailable_reason()}")
    return ops


# ------------------------------------------------------------------------------------------------
# Build
# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not build.with_cuda(), reason="no CUDA toolkit here (nvcc and include/cuda_runtime.h; set "
                    "CUDA_HOME) or a CPU-only torch: the CUDA source cannot be compiled")
def test_cuda_source_compiles_with_this_nvcc_and_registers_every_kernel():
    assert ops.load(required=True)
    for name in ("sampler_coordinates", "bilinear_gather", "bilinear_gather_backward"):
        for key in ("CUDA", "CPU"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tasn::{name}", key), (name, key)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("tasn::attention_sample", "CompositeImplicitAutograd")


def test_prebuilt_library_is_used_only_when_its_fingerprint_matches(built, tmp_path, monkeypatch, caplog):
    """The AOT path: `python -m tasn.ops.build` copies the library and a stamp; load() trusts a match only.
    The "build" is the library this process already loaded: compiling and loading a second copy (another
    path) would run TORCH_LIBRARY(tasn) twice, and torch aborts the whole test run."""
    cuda = build.with_cuda()
    loaded = ops.library()
    assert loaded is not None
    monkeypatch.setattr(build, "compile_library", lambda *a, **k: Path(loaded))
    monkeypatch.setenv("TASN_OPS_PREBUILT", str(tmp_path / "prebuilt"))
    assert build.main([]) == 0
    lib = tmp_path / "prebuilt" / "tasn_ops.so"
    assert lib.read_bytes() == Path(loaded).read_bytes()
    assert build.find_prebuilt(cuda) == lib
    stamp = tmp_path / "prebuilt" / "build.json"
    meta = json.loads(stamp.read_text())
    meta["build"]["sources_sha256"] = "0" * 64  # sources edited since the image was built
    stamp.write_text(json.dumps(meta))
    assert build.find_prebuilt(cuda) is None
    assert "ignoring prebuilt" in caplog.text


def test_a_library_already_loaded_is_adopted_not_loaded_again(built, monkeypatch):
    """A process that loaded the library itself (torch.ops.load_library of a prebuilt) and then calls
    tasn.ops.load(): no prebuilt lookup, no build, no second copy."""
    def refuse(*args, **kwargs):
        raise AssertionError("a second copy of the library must not be looked for or built")

    path = ops.library()
    for name in ("_loaded", "_load_error", "_available", "_reason"):
        monkeypatch.setattr(ops, name, None)
    monkeypatch.setattr(build, "find_prebuilt", refuse)
    monkeypatch.setattr(build, "compile_library", refuse)
    assert ops.load(required=True)
    assert ops.library() == path


# ------------------------------------------------------------------------------------------------
# Fallback rules (tasn.model.sampler dispatch), no build needed
# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_not_available_without_cuda_and_says_why():
    assert ops.available() is False
    assert "no CUDA device" in ops.unavailable_reason()


def test_auto_on_cpu_uses_the_reference_without_touching_the_ops(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the ops library must not be loaded for CPU tensors")

    monkeypatch.setattr(ops, "load", refuse)
    monkeypatch.setattr(ops, "available", refuse)
    g = generator(1)
    images, att = torch.rand(2, 3, 40, 40, generator=g), make_maps("random", 2, 5, 5, g)
    got = sampler.attention_sample(images, att, 16, impl="auto")
    assert torch.equal(got, reference_attention_sample(images, att, 16))
    assert sampler.implementation(torch.device("cpu")) == "reference"  # what a training run records


def test_dispatch_rules_for_cuda_tensors(monkeypatch):
    """TASN_SAMPLER=reference wins over a built op; 'auto' takes the op only when available()."""
    fake_cuda = types.SimpleNamespace(is_cuda=True, device="cuda:0")
    asked = []
    monkeypatch.setattr(ops, "available", lambda: asked.append(1) or True)
    monkeypatch.delenv("TASN_SAMPLER", raising=False)
    assert sampler._resolve_impl("auto", fake_cuda) == "fused"
    monkeypatch.setenv("TASN_SAMPLER", "reference")
    assert sampler._resolve_impl("auto", fake_cuda) == "reference"
    assert len(asked) == 1
    monkeypatch.setattr(ops, "available", lambda: False)
    monkeypatch.delenv("TASN_SAMPLER")
    assert sampler._resolve_impl("auto", fake_cuda) == "reference"
    monkeypatch.setenv("TASN_SAMPLER", "fastest")
    with pytest.raises(ValueError, match="fastest"):
        sampler._resolve_impl("auto", fake_cuda)


def test_build_failure_is_logged_then_falls_back_or_raises_when_required(monkeypatch, caplog):
    """No compiler / broken toolchain: available() says why and callers fall back; impl='fused' errors."""
    def broken_build():
        raise RuntimeError("Error building extension 'tasn_ops': nvcc: not found")

    for name, value in (("_loaded", None), ("_load_error", None), ("_available", None), ("_reason", None)):
        monkeypatch.setattr(ops, name, value)
    monkeypatch.setattr(ops, "_load_library", broken_build)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU, but no way to build
    assert ops.available() is False
    assert "nvcc: not found" in ops.unavailable_reason()
    assert "could not build or load the fused sampler" in caplog.text
    with pytest.raises(ops.OpsUnavailableError, match="nvcc: not found.*impl='reference'"):
        ops.load(required=True)


# ------------------------------------------------------------------------------------------------
# CPU kernels of the op against the reference
# ------------------------------------------------------------------------------------------------
CASES = [  # n, C, S, out, h, w, power, map kind
    (3, 3, 64, 32, 7, 5, 1.0, "blobs"),
    (2, 3, 100, 100, 28, 28, 2.0, "random"),  # out == S, S not a multiple of 32
    (2, 1, 50, 17, 1, 1, 1.0, "random"),  # 1x1 maps
    (2, 2, 40, 30, 40, 40, 2.0, "random"),  # map already S x S: no upsampling
    (1, 3, 33, 60, 60, 3, 1.0, "random"),  # out > S; map taller than the image
    (2, 3, 45, 20, 6, 6, 1.0, "uniform"),
    (2, 3, 45, 20, 6, 6, 2.0, "zeros"),
    (2, 3, 45, 20, 6, 6, 1.0, "nan"),
]


def check_against_reference(n, C, S, out, h, w, power, kind, device, dtype=torch.float32, channels_last=False,
                            seed=0):
    """The op's coordinates within the error model's bound of the float64 reference; its output the
    gather of exactly those coordinates, within the gather's bound of float64 grid_sample."""
    g = generator(seed)
    images = torch.rand(n, C, S, S, generator=g).to(device=device, dtype=dtype)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    att = make_maps(kind, n, h, w, g).to(device)
    coords = torch.ops.tasn.sampler_coordinates(att, S, out, DENSE, ITERS, power)
    assert coords.dtype == torch.float32 and coords.device == att.device
    assert_coordinates_within_bound(coords, att, S, out, power)
    got = torch.ops.tasn.attention_sample(images, att, out, DENSE, ITERS, power)
    assert got.shape == (n, C, out, out) and got.dtype == dtype and got.is_contiguous()
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    assert torch.equal(got, torch.ops.tasn.bilinear_gather(images, coords.to(opmath)))  # the composite's parts
    diff = max_diff(got, sb.grid_sample64(images, coords))
    assert diff <= sb.gather_bound(images, dtype), (diff, sb.gather_bound(images, dtype))


def case_id(value) -> str:
    return "-".join(map(str, value)) if isinstance(value, tuple) else str(value)


@pytest.mark.parametrize("seed,case", list(enumerate(CASES)), ids=case_id)
def test_cpu_kernels_match_the_reference(built, seed, case):
    check_against_reference(*case, device="cpu", seed=seed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_cpu_kernels_other_dtypes_and_channels_last(built, dtype):
    check_against_reference(2, 3, 37, 20, 7, 7, 2.0, "blobs", "cpu", dtype=dtype, channels_last=True, seed=11)


def test_float32_paths_meet_the_error_model_on_tasn_maps(built):
    """TASN's shapes (512 -> 224, 28x28 maps, power 2 and 1): the op's CPU kernel, the float32
    reference, and the kernel on an upsampled map moved by one ulp (what a GPU's fused multiply-adds
    do) all within the bound; and the bound is not vacuous: half a pixel off, or one iteration short,
    is caught."""
    g = generator(3)
    for power in (2.0, 1.0):
        att = make_maps("blobs", 4, 28, 28, g)
        assert_coordinates_within_bound(torch.ops.tasn.sampler_coordinates(att, 512, 224, DENSE, ITERS, power),
                                        att, 512, 224, power, "cpu kernel")
        assert_coordinates_within_bound(torch.stack(sampler_coordinates(att, 512, 224, DENSE, ITERS, power)),
                                        att, 512, 224, power, "float32 reference")
    up = F.interpolate(att.double().unsqueeze(1), size=(512, 512), mode="bilinear", align_corners=True).squeeze(1)
    nudged = torch.where(torch.rand(up.shape, generator=g) < 0.5, torch.nextafter(up.float(), torch.tensor(2.0)),
                         torch.nextafter(up.float(), torch.tensor(-1.0)))
    assert_coordinates_within_bound(torch.ops.tasn.sampler_coordinates(nudged, 512, 224, DENSE, ITERS, 1.0),
                                    att, 512, 224, 1.0, "cpu kernel, map +-1 ulp")
    ref, slopes = sb.float64_coordinates(att, 512, 224, DENSE, ITERS, 2.0)
    bound = sb.coordinate_bound(slopes, 512, 224)
    half_pixel = ref + 1.0 / 511
    assert ((half_pixel - ref).abs() > bound).float().mean() > 0.9
    short = torch.stack(sampler_coordinates(att.double(), 512, 224, DENSE, ITERS - 1, 2.0))
    assert ((short - ref).abs() > bound).any()


def test_uniform_map_is_exactly_a_resize_in_float64(built):
    images = torch.rand(2, 3, 61, 61, generator=generator(4), dtype=torch.float64)
    got = torch.ops.tasn.attention_sample(images, torch.ones(2, 7, 7, dtype=torch.float64), 29, DENSE, ITERS, 1.0)
    want = F.interpolate(images, size=(29, 29), mode="bilinear", align_corners=True)
    assert max_diff(got, want) <= 1e-12


def image_gradients(images, att, weight, out):
    """The images' gradient through the reference and through the op, for the same weighted sum
    of the outputs; neither may send a gradient to the attention."""
    grads = []
    for fn in (reference_attention_sample, torch.ops.tasn.attention_sample):
        x, a = images.clone().requires_grad_(), att.clone().requires_grad_()
        (fn(x, a, out, DENSE, ITERS, 2.0) * weight).sum().backward()
        assert a.grad is None
        grads.append(x.grad)
    return grads


def eager_and_compiled_gradients(step, images, att, **compile_kwargs):
    """The images' gradient of `step(images, att)` run eagerly and under torch.compile(fullgraph=True),
    which fails on any graph break."""
    compiled = torch.compile(step, fullgraph=True, **compile_kwargs)
    grads = []
    for fn in (step, compiled):
        x = images.clone().requires_grad_()
        fn(x, att).backward()
        grads.append(x.grad)
    return grads


def op_gradcheck(x, att, out) -> bool:
    """Finite differences against the op's backward (x: float64, requires_grad)."""
    return torch.autograd.gradcheck(lambda t: torch.ops.tasn.attention_sample(t, att, out, DENSE, ITERS, 1.0), (x,))


def test_gradient_reaches_the_images_not_the_attention(built):
    g = generator(5)
    images = torch.rand(2, 3, 30, 30, generator=g, dtype=torch.float64)
    att = make_maps("blobs", 2, 6, 6, g).double()
    weight = torch.rand(2, 3, 12, 12, generator=g, dtype=torch.float64)
    ref, op = image_gradients(images, att, weight, 12)
    assert max_diff(ref, op) <= 1e-12
    assert op_gradcheck(images[:1, :1, :9, :9].clone().requires_grad_(), att[:1], 5)


def test_opcheck_on_cpu(built):
    g = generator(6)
    images = torch.rand(2, 3, 20, 20, generator=g, requires_grad=True)
    att = make_maps("blobs", 2, 5, 4, g)
    coords = torch.ops.tasn.sampler_coordinates(att, 20, 9, DENSE, ITERS, 2.0)
    torch.library.opcheck(torch.ops.tasn.sampler_coordinates, (att, 20, 9, DENSE, ITERS, 2.0))
    torch.library.opcheck(torch.ops.tasn.bilinear_gather, (images, coords))
    torch.library.opcheck(torch.ops.tasn.bilinear_gather_backward, (torch.rand(2, 3, 9, 9), coords, 20, torch.float32))
    torch.library.opcheck(torch.ops.tasn.attention_sample, (images, att, 9, DENSE, ITERS, 2.0))


def test_compiles_without_graph_breaks(built):
    """fullgraph=True fails on any graph break; aot_eager runs the fake implementations and autograd."""
    g = generator(7)
    images = torch.rand(2, 3, 24, 24, generator=g)
    att = make_maps("random", 2, 6, 6, g)

    def step(x, a):
        return (torch.ops.tasn.attention_sample(x * 2, a, 10, DENSE, ITERS, 2.0) ** 2).mean()

    eager, compiled = eager_and_compiled_gradients(step, images, att, backend="aot_eager")
    assert max_diff(eager, compiled) <= 1e-6


@pytest.mark.parametrize(
    "images,att,out,match",
    [
        ((2, 3, 20, 21), (2, 5, 5), 8, "square"),
        ((2, 3, 20, 20), (3, 5, 5), 8, "n = 2"),
        ((2, 3, 20, 20), (2, 5, 5), 1, "out_size must be >= 2"),
        ((2, 3, 20, 20), (2, 0, 5), 8, "at least 1x1"),
    ],
)
def test_bad_arguments_are_named(built, images, att, out, match):
    with pytest.raises(ValueError, match=match):
        torch.ops.tasn.attention_sample(torch.rand(images), torch.rand(att), out, DENSE, ITERS, 1.0)


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------
GPU_CASES = CASES + [
    (5, 3, 512, 224, 28, 28, 2.0, "blobs"),  # TASN's shapes
    (5, 3, 512, 336, 28, 28, 1.0, "blobs"),  # the authors' best run
    (3, 3, 1024, 1024, 28, 28, 1.0, "random"),  # S = 1024, out = S
    (2, 3, 1000, 333, 13, 29, 2.0, "blobs"),  # nothing a multiple of a block size
    (67, 1, 96, 50, 28, 28, 1.0, "random"),  # many blocks
    (2, 3, 300, 128, 300, 300, 2.0, "random"),  # full-resolution map
]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("seed,case", list(enumerate(GPU_CASES)), ids=case_id)
def test_cuda_matches_the_reference(cuda_built, seed, case):
    check_against_reference(*case, device="cuda", seed=seed)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_dtypes_and_layouts(cuda_built, dtype, channels_last):
    check_against_reference(4, 3, 512, 224, 28, 28, 2.0, "blobs", "cuda", dtype=dtype, channels_last=channels_last,
                            seed=21)


@pytest.mark.gpu
@cuda
def test_cuda_and_cpu_coordinates_each_meet_the_error_model(cuda_built):
    """The same maps on both backends: each within its float32 bound of float64. They are not compared
    with each other at a fixed tolerance: nvcc contracts the upsampling into fused multiply-adds, the
    CPU build does not, and on peaked power-2 maps one ulp of the map moves a coordinate by ~4e-6."""
    att = make_maps("blobs", 7, 28, 28, generator(22))
    for power in (2.0, 1.0):
        cpu = torch.ops.tasn.sampler_coordinates(att, 512, 224, DENSE, ITERS, power)
        gpu = torch.ops.tasn.sampler_coordinates(att.cuda(), 512, 224, DENSE, ITERS, power)
        assert_coordinates_within_bound(cpu, att, 512, 224, power, "cpu kernel")
        assert_coordinates_within_bound(gpu, att, 512, 224, power, "cuda kernel")


@pytest.mark.gpu
@cuda
def test_cuda_gradient_and_opcheck(cuda_built):
    """The backward kernel (float32 atomics) against float64 grid_sample's backward on the same coordinates."""
    g = generator(23)
    images = torch.rand(3, 3, 200, 200, generator=g).cuda()
    att = make_maps("blobs", 3, 28, 28, g).cuda()
    weight = torch.rand(3, 3, 96, 96, generator=g).cuda()
    x = images.clone().requires_grad_()
    (torch.ops.tasn.attention_sample(x, att, 96, DENSE, ITERS, 2.0) * weight).sum().backward()
    coords = torch.ops.tasn.sampler_coordinates(att, 200, 96, DENSE, ITERS, 2.0)
    x64 = images.double().cpu().requires_grad_()
    (sb.grid_sample64(x64, coords) * weight.double().cpu()).sum().backward()
    bound = sb.gradient_bound(weight, coords, 200, torch.float32)
    assert max_diff(x.grad, x64.grad) <= bound, (max_diff(x.grad, x64.grad), bound)
    assert op_gradcheck(images[:1, :2, :20, :20].double().requires_grad_(), att[:1], 9)
    small = images[:2, :, :64, :64].requires_grad_()
    coords = torch.ops.tasn.sampler_coordinates(att[:2], 64, 30, DENSE, ITERS, 2.0)
    torch.library.opcheck(torch.ops.tasn.sampler_coordinates, (att[:2], 64, 30, DENSE, ITERS, 2.0))
    torch.library.opcheck(torch.ops.tasn.bilinear_gather, (small, coords))
    torch.library.opcheck(torch.ops.tasn.attention_sample, (small, att[:2], 30, DENSE, ITERS, 2.0))


@pytest.mark.gpu
@cuda
def test_cuda_compiled_sampler_has_no_graph_breaks(cuda_built, monkeypatch):
    """tasn.model.sampler.attention_sample(impl='auto') under torch.compile(fullgraph=True) (inductor)."""
    monkeypatch.delenv("TASN_SAMPLER", raising=False)
    g = generator(24)
    images = torch.rand(4, 3, 256, 256, generator=g).cuda()
    att = make_maps("blobs", 4, 28, 28, g).cuda()

    def step(x, a):
        return sampler.attention_sample(x, a, 112, power=2.0).square().mean()

    eager, compiled = eager_and_compiled_gradients(step, images, att)
    assert max_diff(eager, compiled) <= 1e-6


@pytest.mark.gpu
@cuda
def test_cuda_fallback_rules(cuda_built, monkeypatch):
    """impl='reference' and TASN_SAMPLER=reference run the reference on CUDA; 'auto' and impl='fused' the op."""
    calls = []
    real = sampler.reference_attention_sample
    monkeypatch.setattr(sampler, "reference_attention_sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = generator(25)
    images, att = torch.rand(2, 3, 64, 64, generator=g).cuda(), make_maps("random", 2, 7, 7, g).cuda()
    op = torch.ops.tasn.attention_sample(images, att, 32, DENSE, ITERS, 1.0)
    monkeypatch.delenv("TASN_SAMPLER", raising=False)
    assert sampler.implementation(images.device) == "fused"
    assert torch.equal(sampler.attention_sample(images, att, 32), op)
    assert calls == []
    sampler.attention_sample(images, att, 32, impl="reference")
    assert calls == [1]
    monkeypatch.setenv("TASN_SAMPLER", "reference")
    sampler.attention_sample(images, att, 32)
    assert calls == [1, 1]
    assert torch.equal(sampler.attention_sample(images, att, 32, impl="fused"), op)
    assert calls == [1, 1]


@pytest.mark.gpu
@cuda
def test_cuda_tasn_training_step_runs_the_fused_sampler_and_counts_nonfinite_attention(cuda_built, monkeypatch):
    """TASN's training path on CUDA (bf16 autocast, channels-last): both samplers dispatch to the op,
    the loss and the gradients are finite, and an image whose maps are NaN (resized plainly) is
    counted on the device, without a sync, until taken."""
    monkeypatch.delenv("TASN_SAMPLER", raising=False)
    calls = []
    real = sampler.reference_attention_sample
    monkeypatch.setattr(sampler, "reference_attention_sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = TASN(3, backbone="resnet18-slim", att_backbone="resnet18-slim", att_head_channels=8, att_size=64,
                 out_size=48).cuda().to(memory_format=torch.channels_last).train()
    maps_of = model.attention_maps

    def broken(x):
        logits, maps = maps_of(x)
        return logits, torch.where(torch.arange(len(x), device=x.device).view(-1, 1, 1, 1) == 1, float("nan"), maps)

    model.attention_maps = broken
    x = torch.rand(4, 3, 128, 128, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = TASNLoss()(model(x), torch.tensor([0, 1, 2, 0], device="cuda"))
    loss.backward()
    assert calls == []
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.nonfinite_attention.is_cuda
    assert model.take_nonfinite_attention() == 1
