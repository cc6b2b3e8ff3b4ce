"""One ordered, parallel map with a progress bar, shared by synth, validate and preprocess.

Results come back in input order whatever the worker count, so every stage that uses it is
deterministic. `workers=0` means one process per core; `workers=1` runs in-process (no pool), which
is what tests and tiny inputs want.

Workers never outlive the stage. They are spawned as direct children and ask the kernel to kill
them when their parent dies (Linux PR_SET_PDEATHSIG), so SIGKILL of the stage takes them along; they
ignore SIGINT, so Ctrl-C reaches the parent alone, which (like SIGTERM, see `tasn.cli`, or any
error) stops them at once: `ProcessPoolExecutor.shutdown` would let every running task finish first.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")
_PR_SET_PDEATHSIG = 1


def resolve_workers(workers: int, n_items: int) -> int:
    """0 -> the cores this process may use; never more workers than items."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if workers == 0:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(workers, n_items))


def _worker_init(parent: int) -> None:
    """In each worker: leave Ctrl-C to the parent, and die with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request above was made
        os._exit(1)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Kill the running workers now and drop the queued work."""
    # No public call stops a running task (Python 3.14 adds terminate_workers); the pool's process
    # table is the one handle on them.
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.kill()
    pool.shutdown(wait=True, cancel_futures=True)


def imap(fn: Callable[[T], R], items: Sequence[T], workers: int = 0, desc: str = "") -> Iterator[R]:
    """`fn(x) for x in items` over `workers` processes, yielded in input order, with a tqdm bar on
    stderr. Results stream (at most a few chunks are held), so big datasets need no big memory.

    `fn` must be a module-level function (it is pickled by name). Exceptions propagate; the workers
    are stopped as soon as one is raised (here, in `fn` or in the consumer) or the consumer stops.
    """
    n = resolve_workers(workers, len(items))
    with tqdm(total=len(items), desc=desc, unit="img", disable=None, leave=False) as bar:
        if n == 1:
            for item in items:
                yield fn(item)
                bar.update()
            return
        chunk = max(1, min(16, len(items) // (n * 8)))
        pool = ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init, initargs=(os.getpid(),))
        try:
            for result in pool.map(fn, items, chunksize=chunk):
                yield result
                bar.update()
        except BaseException:  # an error, Ctrl-C / SIGTERM, or the consumer closing this generator
            _stop(pool)
            raise
        pool.shutdown(wait=True)
