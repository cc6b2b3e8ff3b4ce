"""Compile the fused sampler extension: just in time at first use, or ahead of time for an image.

Both paths run `torch.utils.cpp_extension.load` (ninja) on the sources in `csrc/`:
- JIT (`tasn.ops.load()`): into a cache directory keyed by the sources' hash and the torch/CUDA
  versions, so a build happens once per machine and version, and an edited source never loads a stale
  library. `TASN_OPS_CACHE` moves the cache (default `~/.cache/tasn/ops`).
- AOT (`python -m tasn.ops.build`, run in the container image build): the library and a `build.json`
  stamp go to `tasn/ops/prebuilt/` (or `--dest`, or `TASN_OPS_PREBUILT`), where `load()` finds them
  and imports without a compiler, so pods never compile. A prebuilt library is trusted for what it
  was built from and for (these sources, this torch and its CUDA version, and on a GPU the GPU's
  architecture among the ones it was compiled for), never for what the running machine could build:
  the runtime image has no nvcc, and needs none.

Without a CUDA toolkit (or with a CPU-only torch) the library is built from the C++ sources alone: the
CPU kernels still register, which is what CPU-only test machines use; the op is then not "available"
for CUDA tensors and `tasn.model.sampler` uses the reference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.utils.cpp_extension as cpp

from tasn.errors import TASNError
from tasn.io import atomic_dir

log = logging.getLogger(__name__)

NAME = "tasn_ops"
CSRC = Path(__file__).resolve().parent / "csrc"
PREBUILT = Path(__file__).resolve().parent / "prebuilt"
STAMP = "build.json"
DEFAULT_ARCH = "9.0"  # H100/H200; used when no GPU is visible to pick the architecture from


def cuda_home() -> str | None:
    """A CUDA toolkit directory with both `bin/nvcc` and `include/cuda_runtime.h`, or None.

    torch derives CUDA_HOME from `which nvcc`; where nvcc is a wrapper script (/usr/local/bin/nvcc)
    that guess is /usr/local and linking fails, so the candidates are checked, not trusted.
    """
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp.CUDA_HOME]
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    candidates += ["/usr/local/cuda"]
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda_runtime.h").exists():
            return c
    return None


def with_cuda() -> bool:
    """True when this torch is a CUDA build and a usable toolkit is present."""
    return torch.version.cuda is not None and cuda_home() is not None


def sources(cuda: bool) -> list[Path]:
    names = ["ops.cpp"] + (["sampler_cuda.cu"] if cuda else [])
    return [CSRC / n for n in names]


def fingerprint(cuda: bool) -> dict:
    """What a built library depends on; a prebuilt one is used only when this matches exactly."""
    h = hashlib.sha256()
    for p in sorted(CSRC.iterdir()):
        if p.suffix in (".cpp", ".cu", ".h", ".cuh"):
            h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return {
        "name": NAME,
        "sources_sha256": h.hexdigest(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "with_cuda": cuda,
    }


def cache_dir(fp: dict) -> Path:
    root = Path(os.environ.get("TASN_OPS_CACHE") or Path.home() / ".cache" / "tasn" / "ops")
    kind = f"cu{fp['torch_cuda']}" if fp["with_cuda"] else "cpu"
    return root / f"{NAME}-torch{fp['torch'].replace('+', '_')}-{kind}-{fp['sources_sha256'][:12]}"


def prebuilt_dir() -> Path:
    return Path(os.environ.get("TASN_OPS_PREBUILT") or PREBUILT)


def arch_covers(arch_list: str | None, capability: tuple[int, int]) -> bool:
    """Whether code built for `arch_list` (TORCH_CUDA_ARCH_LIST: "8.0;9.0", "9.0+PTX", "9.0a") runs on
    a GPU of compute `capability`: machine code (SASS) runs on the same major version at an equal or
    newer minor, architecture-specific code ("9.0a") on that exact architecture, and embedded PTX
    ("+PTX") on any newer GPU, compiled by the driver at load time."""
    for entry in re.split(r"[;,\s]+", arch_list or ""):
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", entry.strip())
        if not m:
            continue
        built = (int(m.group(1)), int(m.group(2)))
        if m.group(4) and built <= capability:
            return True
        if built[0] == capability[0] and (built[1] == capability[1] if m.group(3) else built[1] <= capability[1]):
            return True
    return False


def find_prebuilt(cuda: bool) -> Path | None:
    """The ahead-of-time library, when it was built from these sources for this torch (its version
    and CUDA version) and, where GPUs are visible, for their architectures. Whether a compiler is
    here does not matter, with one exception: a prebuilt without CUDA kernels gives way when `cuda`
    (a toolkit is here, `with_cuda()`), since a build here would have them."""
    d = prebuilt_dir()
    lib, stamp = d / f"{NAME}.so", d / STAMP
    if not (lib.exists() and stamp.exists()):
        return None
    try:
        built = json.loads(stamp.read_text())
        made = dict(built["build"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring prebuilt %s: unreadable %s (%s)", lib, stamp, exc)
        return None
    here = fingerprint(bool(made.get("with_cuda")))
    differ = {k: (made.get(k), here[k]) for k in here if made.get(k) != here[k]}
    if differ:
        log.warning("ignoring prebuilt %s: built for another %s", lib,
                    "; ".join(f"{k} ({was!r}, this is {now!r})" for k, (was, now) in differ.items()))
        return None
    if not made["with_cuda"] and cuda:
        log.info("not using prebuilt %s: it has no CUDA kernels, and a CUDA toolkit is here to build them", lib)
        return None
    if made["with_cuda"] and torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            if not arch_covers(built.get("arch"), cap):
                log.warning("ignoring prebuilt %s: compiled for CUDA architectures %s, GPU %d is sm_%d%d",
                            lib, built.get("arch"), i, *cap)
                return None
    return lib


def compile_library(build_dir: Path, cuda: bool, arch: str | None = None, verbose: bool = False) -> Path:
    """Build (or reuse the up-to-date build in) `build_dir` and load it; returns the library path."""
    if cuda:
        home = cuda_home()
        assert home is not None  # with_cuda() found it
        os.environ["CUDA_HOME"] = home
        cpp.CUDA_HOME = home  # torch read its guess at import; the build reads this global
        if arch:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch
        elif not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH
    build_dir.mkdir(parents=True, exist_ok=True)
    log.info("building %s in %s (CUDA: %s, arch %s)", NAME, build_dir, cuda, os.environ.get("TORCH_CUDA_ARCH_LIST"))
    path = cpp.load(
        name=NAME,
        sources=[str(p) for p in sources(cuda)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3"],
        extra_include_paths=[str(CSRC)],
        build_directory=str(build_dir),
        with_cuda=cuda,
        is_python_module=False,
        verbose=verbose,
    )
    return Path(path)


def build_prebuilt(dest: Path, arch: str | None, verbose: bool) -> Path:
    """The AOT build: compile in a scratch directory, then swap the library and its stamp into `dest`."""
    cuda = with_cuda()
    if not cuda:
        log.warning("no CUDA toolkit (or a CPU-only torch): building the CPU kernels only")
    with tempfile.TemporaryDirectory(prefix="tasn-ops-build-") as tmp:
        lib = compile_library(Path(tmp), cuda, arch, verbose)
        with atomic_dir(dest) as out:
            shutil.copy2(lib, out / f"{NAME}.so")
            stamp = {"build": fingerprint(cuda), "arch": os.environ.get("TORCH_CUDA_ARCH_LIST") if cuda else None}
            (out / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
    return dest / f"{NAME}.so"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tasn.ops.build",
        description="Build the fused attention sampler ahead of time (container image), so pods never compile.",
    )
    parser.add_argument("--dest", type=Path, default=None, help=f"output directory (default {prebuilt_dir()})")
    parser.add_argument("--arch", default=None, help="TORCH_CUDA_ARCH_LIST, e.g. '9.0' or '8.0;9.0' (default: the "
                        f"visible GPU, else $TORCH_CUDA_ARCH_LIST, else {DEFAULT_ARCH})")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        lib = build_prebuilt(args.dest or prebuilt_dir(), args.arch, args.verbose)
    except (OSError, RuntimeError, TASNError) as exc:
        print(f"error: building {NAME} failed: {exc}", file=sys.stderr)
        return 1
    print(lib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
