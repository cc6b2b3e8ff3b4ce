"""The fused sampler ops (tasn.ops) against the PyTorch reference sampler (tasn.model.sampler).

Three groups:
- build: the library compiles with this machine's toolchain (CUDA when nvcc is present); the build is
  cached (TASN_OPS_CACHE or ~/.cache/tasn/ops), so it costs minutes once and seconds afterwards;
- CPU: the op's CPU kernels share the per-element arithmetic of the CUDA kernels (sampler_math.h),
  so these check that arithmetic, the registrations (opcheck, fake tensors, autograd, torch.compile)
  and the fallback rules without a GPU;
- GPU (marker `gpu`, skipped without CUDA): the CUDA kernels against the reference on CUDA.
Inputs are fresh random tensors on every run; a failure message carries the seed to replay it.
"""

from __future__ import annotations

import json
import random
import types

import pytest
import torch
import torch.nn.functional as F

import tasn.ops as ops
from tasn.model import sampler
from tasn.model.sampler import reference_attention_sample, sampler_coordinates
from tasn.ops import build

ATOL = 1e-4  # the bound on |fused - reference| for float32 images in [0, 1]
OPS = ("sampler_coordinates", "bilinear_gather", "bilinear_gather_backward", "attention_sample")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU tests run on a GPU host "
                          "(benchmarks/gpu_check.sh)")


def fresh_generator() -> tuple[torch.Generator, int]:
    seed = random.SystemRandom().randrange(2**31)
    return torch.Generator().manual_seed(seed), seed


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
# whole rows or columns), the cumulative density is flat there and the inverse at the last target is
# decided by the rounding of float32 sums: the reference in float32 and in float64 then disagree by
# up to the width of the stretch, and so may the op. The definition, not the kernel, is ill-conditioned
# there, so the maps compared here are positive (as TASN's softmax-based structure maps are).


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(scope="session")
def built():
    """The library, built (or taken from the cache) once per session; skips with the reason if impossible."""
    if not ops.load():
        pytest.skip(f"tasn ops could not be built here: {ops._load_error}")
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
    """The AOT path: `python -m tasn.ops.build` copies the library and a stamp; load() trusts a match only."""
    cuda = build.with_cuda()
    compiled = build.compile_library(build.cache_dir(build.fingerprint(cuda)), cuda)  # cached: no compile
    monkeypatch.setattr(build, "compile_library", lambda *a, **k: compiled)
    monkeypatch.setenv("TASN_OPS_PREBUILT", str(tmp_path / "prebuilt"))
    assert build.main([]) == 0
    lib = tmp_path / "prebuilt" / "tasn_ops.so"
    assert lib.read_bytes() == compiled.read_bytes()
    assert build.find_prebuilt(cuda) == lib
    stamp = tmp_path / "prebuilt" / "build.json"
    meta = json.loads(stamp.read_text())
    meta["build"]["sources_sha256"] = "0" * 64  # sources edited since the image was built
    stamp.write_text(json.dumps(meta))
    assert build.find_prebuilt(cuda) is None
    assert "ignoring prebuilt" in caplog.text


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
    g, seed = fresh_generator()
    images, att = torch.rand(2, 3, 40, 40, generator=g), make_maps("random", 2, 5, 5, g)
    got = sampler.attention_sample(images, att, 16, impl="auto")
    assert torch.equal(got, reference_attention_sample(images, att, 16)), seed


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


def check_against_reference(n, C, S, out, h, w, power, kind, device, dtype=torch.float32, channels_last=False):
    g, seed = fresh_generator()
    images = torch.rand(n, C, S, S, generator=g).to(device=device, dtype=dtype)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    att = make_maps(kind, n, h, w, g).to(device)
    gy, gx = sampler_coordinates(att, S, out, 4.0, 5, power)
    coords = torch.ops.tasn.sampler_coordinates(att, S, out, 4.0, 5, power)
    assert max_diff(coords[0], gy) <= 1e-5 and max_diff(coords[1], gx) <= 1e-5, (seed, max_diff(coords[0], gy))
    want = reference_attention_sample(images, att, out, 4.0, 5, power)
    got = torch.ops.tasn.attention_sample(images, att, out, 4.0, 5, power)
    assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous()
    atol = ATOL if dtype in (torch.float32, torch.float64) else 2 * torch.finfo(dtype).eps
    diff = max_diff(got, want)
    if diff > atol:
        # Float32 coordinates cannot always be resolved to 1e-4 of output: on peaked maps (power 2) the
        # sparse rows amplify one-ulp differences of the cumulative density, and the float32 reference
        # itself is then up to ~1e-3 from the same reference in float64. There the op must be no farther
        # from the float64 reference than the float32 reference is.
        exact = reference_attention_sample(images.double(), att.double(), out, 4.0, 5, power)
        floor = max_diff(want, exact)
        assert max_diff(got, exact) <= max(atol, 1.5 * floor), (
            f"seed {seed}: {diff} from the reference and {max_diff(got, exact)} from it in float64, "
            f"where the reference is {floor} from float64"
        )


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_cpu_kernels_match_the_reference(built, case):
    check_against_reference(*case, device="cpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_cpu_kernels_other_dtypes_and_channels_last(built, dtype):
    check_against_reference(2, 3, 37, 20, 7, 7, 2.0, "blobs", "cpu", dtype=dtype, channels_last=True)


def test_uniform_map_is_exactly_a_resize_in_float64(built):
    g, seed = fresh_generator()
    images = torch.rand(2, 3, 61, 61, generator=g, dtype=torch.float64)
    got = torch.ops.tasn.attention_sample(images, torch.ones(2, 7, 7, dtype=torch.float64), 29, 4.0, 5, 1.0)
    want = F.interpolate(images, size=(29, 29), mode="bilinear", align_corners=True)
    assert max_diff(got, want) <= 1e-12, seed


def image_gradients(images, att, weight, out):
    """The images' gradient through the reference and through the op, for the same weighted sum
    of the outputs; neither may send a gradient to the attention."""
    grads = []
    for fn in (reference_attention_sample, torch.ops.tasn.attention_sample):
        x, a = images.clone().requires_grad_(), att.clone().requires_grad_()
        (fn(x, a, out, 4.0, 5, 2.0) * weight).sum().backward()
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
    return torch.autograd.gradcheck(lambda t: torch.ops.tasn.attention_sample(t, att, out, 4.0, 5, 1.0), (x,))


def test_gradient_reaches_the_images_not_the_attention(built):
    g, seed = fresh_generator()
    images = torch.rand(2, 3, 30, 30, generator=g, dtype=torch.float64)
    att = make_maps("blobs", 2, 6, 6, g).double()
    weight = torch.rand(2, 3, 12, 12, generator=g, dtype=torch.float64)
    ref, op = image_gradients(images, att, weight, 12)
    assert max_diff(ref, op) <= 1e-12, seed
    assert op_gradcheck(images[:1, :1, :9, :9].clone().requires_grad_(), att[:1], 5)


def test_opcheck_on_cpu(built):
    g, _ = fresh_generator()
    images = torch.rand(2, 3, 20, 20, generator=g, requires_grad=True)
    att = make_maps("blobs", 2, 5, 4, g)
    coords = torch.ops.tasn.sampler_coordinates(att, 20, 9, 4.0, 5, 2.0)
    torch.library.opcheck(torch.ops.tasn.sampler_coordinates, (att, 20, 9, 4.0, 5, 2.0))
    torch.library.opcheck(torch.ops.tasn.bilinear_gather, (images, coords))
    torch.library.opcheck(torch.ops.tasn.bilinear_gather_backward, (torch.rand(2, 3, 9, 9), coords, 20, torch.float32))
    torch.library.opcheck(torch.ops.tasn.attention_sample, (images, att, 9, 4.0, 5, 2.0))


def test_compiles_without_graph_breaks(built):
    """fullgraph=True fails on any graph break; aot_eager runs the fake implementations and autograd."""
    g, seed = fresh_generator()
    images = torch.rand(2, 3, 24, 24, generator=g)
    att = make_maps("random", 2, 6, 6, g)

    def step(x, a):
        return (torch.ops.tasn.attention_sample(x * 2, a, 10, 4.0, 5, 2.0) ** 2).mean()

    eager, compiled = eager_and_compiled_gradients(step, images, att, backend="aot_eager")
    assert max_diff(eager, compiled) <= 1e-6, seed


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
        torch.ops.tasn.attention_sample(torch.rand(images), torch.rand(att), out, 4.0, 5, 1.0)


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------
GPU_CASES = CASES + [
    (5, 3, 512, 224, 28, 28, 2.0, "blobs"),  # TASN's shapes
    (3, 3, 1024, 1024, 28, 28, 1.0, "random"),  # S = 1024, out = S
    (2, 3, 1000, 333, 13, 29, 2.0, "blobs"),  # nothing a multiple of a block size
    (67, 1, 96, 50, 28, 28, 1.0, "random"),  # many blocks
    (2, 3, 300, 128, 300, 300, 2.0, "random"),  # full-resolution map
]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_cuda_matches_the_reference(built, case):
    check_against_reference(*case, device="cuda")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_dtypes_and_layouts(built, dtype, channels_last):
    check_against_reference(4, 3, 512, 224, 28, 28, 2.0, "blobs", "cuda", dtype=dtype, channels_last=channels_last)


@pytest.mark.gpu
@cuda
def test_cuda_coordinates_equal_the_cpu_kernels(built):
    """Same arithmetic on both backends: only the order of the sums differs."""
    g, seed = fresh_generator()
    att = make_maps("blobs", 7, 28, 28, g)
    cpu = torch.ops.tasn.sampler_coordinates(att, 512, 224, 4.0, 5, 2.0)
    gpu = torch.ops.tasn.sampler_coordinates(att.cuda(), 512, 224, 4.0, 5, 2.0).cpu()
    assert max_diff(cpu, gpu) <= 2e-6, seed


@pytest.mark.gpu
@cuda
def test_cuda_gradient_and_opcheck(built):
    g, seed = fresh_generator()
    images = torch.rand(3, 3, 200, 200, generator=g).cuda()
    att = make_maps("blobs", 3, 28, 28, g).cuda()
    weight = torch.rand(3, 3, 96, 96, generator=g).cuda()
    ref, op = image_gradients(images, att, weight, 96)
    assert max_diff(ref, op) <= 1e-4, seed
    assert op_gradcheck(images[:1, :2, :20, :20].double().requires_grad_(), att[:1], 9)
    small = images[:2, :, :64, :64].requires_grad_()
    coords = torch.ops.tasn.sampler_coordinates(att[:2], 64, 30, 4.0, 5, 2.0)
    torch.library.opcheck(torch.ops.tasn.sampler_coordinates, (att[:2], 64, 30, 4.0, 5, 2.0))
    torch.library.opcheck(torch.ops.tasn.bilinear_gather, (small, coords))
    torch.library.opcheck(torch.ops.tasn.attention_sample, (small, att[:2], 30, 4.0, 5, 2.0))


@pytest.mark.gpu
@cuda
def test_cuda_compiled_sampler_has_no_graph_breaks(built, monkeypatch):
    """tasn.model.sampler.attention_sample(impl='auto') under torch.compile(fullgraph=True) (inductor)."""
    monkeypatch.delenv("TASN_SAMPLER", raising=False)
    assert ops.available(), ops.unavailable_reason()
    g, seed = fresh_generator()
    images = torch.rand(4, 3, 256, 256, generator=g).cuda()
    att = make_maps("blobs", 4, 28, 28, g).cuda()

    def step(x, a):
        return sampler.attention_sample(x, a, 112, power=2.0).square().mean()

    eager, compiled = eager_and_compiled_gradients(step, images, att)
    assert max_diff(eager, compiled) <= 1e-6, seed


@pytest.mark.gpu
@cuda
def test_cuda_fallback_rules(built, monkeypatch):
    """impl='reference' and TASN_SAMPLER=reference run the reference on CUDA; impl='fused' the op."""
    calls = []
    real = sampler.reference_attention_sample
    monkeypatch.setattr(sampler, "reference_attention_sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    g, _ = fresh_generator()
    images, att = torch.rand(2, 3, 64, 64, generator=g).cuda(), make_maps("random", 2, 7, 7, g).cuda()
    monkeypatch.delenv("TASN_SAMPLER", raising=False)
    sampler.attention_sample(images, att, 32)
    assert calls == []
    sampler.attention_sample(images, att, 32, impl="reference")
    assert calls == [1]
    monkeypatch.setenv("TASN_SAMPLER", "reference")
    sampler.attention_sample(images, att, 32)
    assert calls == [1, 1]
    fused = sampler.attention_sample(images, att, 32, impl="fused")
    assert max_diff(fused, real(images, att, 32)) <= ATOL
