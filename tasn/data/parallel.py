"""One ordered, parallel map with a progress bar, shared by synth, validate and preprocess.

Results come back in input order whatever the worker count, so every stage that uses it is
deterministic. `workers=0` means one process per core; `workers=1` runs in-process (no pool), which
is what tests and tiny inputs want.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def resolve_workers(workers: int, n_items: int) -> int:
    """0 -> the cores this process may use; never more workers than items."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if workers == 0:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(workers, n_items))


def imap(fn: Callable[[T], R], items: Sequence[T], workers: int = 0, desc: str = "") -> Iterator[R]:
    """`fn(x) for x in items` over `workers` processes, yielded in input order, with a tqdm bar on
    stderr. Results stream (at most a few chunks are held), so big datasets need no big memory.

    `fn` must be a module-level function (it is pickled by name). Exceptions propagate.
    """
    n = resolve_workers(workers, len(items))
    with tqdm(total=len(items), desc=desc, unit="img", disable=None, leave=False) as bar:
        if n == 1:
            for item in items:
                yield fn(item)
                bar.update()
            return
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        ctx = multiprocessing.get_context(method)
        chunk = max(1, min(16, len(items) // (n * 8)))
        with ProcessPoolExecutor(max_workers=n, mp_context=ctx) as pool:
            for result in pool.map(fn, items, chunksize=chunk):
                yield result
                bar.update()
