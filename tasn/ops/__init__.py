"""The fused attention sampler as torch custom ops (`torch.ops.tasn.*`), built on first use.

`torch.ops.tasn.attention_sample(images, attention, out_size, dense, iters, power)` is the whole
sampler of docs/method.md "The sampler, exactly" in two CUDA launches for the whole batch; it is what
`tasn.model.sampler.attention_sample` calls for CUDA tensors. It is composed of
`tasn::sampler_coordinates` (attention -> 1-D coordinates, (2, n, out)) and `tasn::bilinear_gather`
(images, coordinates -> output; gradient to the images), each with a fake implementation for
torch.compile and CPU kernels for machines without a GPU (see docs/ops.md).

- `load(required=False)`: import the ahead-of-time build, or compile once into a cache (ninja); a
  library already loaded into the process (say `torch.ops.load_library` of a prebuilt) is adopted, never
  loaded a second time: two copies both run `TORCH_LIBRARY(tasn)`, and torch aborts the process.
- `library()`: the path of the loaded library (None before `load()`).
- `available()`: True when CUDA is present and the library with its CUDA kernels is loaded; when
  not, it logs why once (and `unavailable_reason()` says it) and callers use the reference.

`build` (torch's C++ extension toolchain) is imported when the library is first loaded, and the
fake/autograd registrations after it, since they register for the ops the library defines.
"""

from __future__ import annotations

import logging
import threading

import torch

from tasn.errors import TASNError

log = logging.getLogger(__name__)

__all__ = ["OpsUnavailableError", "available", "library", "load", "unavailable_reason"]


class OpsUnavailableError(TASNError):
    """The fused sampler was required but cannot be built or loaded here; the message says why."""


_lock = threading.Lock()
_loaded: str | None = None  # path of the loaded library
_load_error: str | None = None
_available: bool | None = None
_reason: str | None = None


def load(required: bool = False) -> bool:
    """Load the tasn ops library (prebuilt if it matches, else JIT-compiled into the cache).

    Returns True when loaded. On failure: raises OpsUnavailableError when `required`, else logs the
    reason once and returns False. A failed build is not retried in the same process.
    """
    global _loaded, _load_error
    if _loaded is None and _load_error is None:
        with _lock:
            if _loaded is None and _load_error is None:
                try:
                    _loaded = str(_load_library())
                except Exception as exc:  # compiler errors surface as RuntimeError, OSError, ...
                    _load_error = f"{type(exc).__name__}: {exc}".strip()
                    log.warning("tasn ops: could not build or load the fused sampler (%s)", _load_error)
    if _loaded is None and required:
        raise OpsUnavailableError(
            f"the fused sampler (tasn ops) cannot be built or loaded: {_load_error}. "
            "Use impl='reference' (or TASN_SAMPLER=reference), or fix the toolchain: CUDA_HOME, nvcc, ninja "
            "(`python -m tasn.ops.build -v` shows the compiler output)."
        )
    return _loaded is not None


def _load_library():
    from tasn.ops import build

    registered = _registered_library(build.NAME)
    if registered is not None:  # loading a second copy would abort the process (TORCH_LIBRARY twice)
        log.info("tasn ops: already loaded from %s", registered)
        import tasn.ops._registrations  # its fake implementations and autograd formulas
        return registered
    cuda = build.with_cuda()
    lib = build.find_prebuilt(cuda)
    if lib is not None:
        torch.ops.load_library(str(lib))
        log.info("tasn ops: loaded prebuilt %s", lib)
    else:
        lib = build.compile_library(build.cache_dir(build.fingerprint(cuda)), cuda)
        log.info("tasn ops: loaded %s", lib)
    import tasn.ops._registrations  # noqa: F401  fake implementations and autograd formulas

    return lib


def _registered_library(name: str) -> str | None:
    """The library that already defines the `tasn` ops in this process, if one does."""
    if not hasattr(torch.ops.tasn, "sampler_coordinates"):
        return None
    paths = sorted(p for p in torch.ops.loaded_libraries if name in str(p))
    return paths[-1] if paths else "a library loaded before tasn.ops.load()"


def library() -> str | None:
    """The path of the loaded library (None before `load()` or when it failed)."""
    return _loaded


def available() -> bool:
    """True when the fused sampler can run on CUDA tensors here. The answer is computed once."""
    global _available, _reason
    if _available is None:
        reason = None
        if not torch.cuda.is_available():
            reason = "no CUDA device (torch.cuda.is_available() is False)"
        elif not load():
            reason = f"the library could not be built or loaded: {_load_error}"
        elif not torch._C._dispatch_has_kernel_for_dispatch_key("tasn::bilinear_gather", "CUDA"):
            reason = "the library was built without CUDA (no CUDA toolkit found at build time)"
        if reason:  # on a GPU that is a slower run than asked for: said as a warning, not in passing
            log.log(logging.WARNING if torch.cuda.is_available() else logging.INFO,
                    "tasn ops: fused sampler unavailable, using the PyTorch reference: %s", reason)
        _available, _reason = reason is None, reason
    return _available


def unavailable_reason() -> str | None:
    """Why `available()` is False; None when it is True."""
    available()
    return _reason
