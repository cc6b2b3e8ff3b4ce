"""Lineage: which code and which data a model came from, readable in a pod as well as in a checkout.

- `git_commit()`: `git rev-parse HEAD` where there is a checkout, else `TASN_GIT_COMMIT` (the
  image's build arg, infra/docker), else None. Pods have no `.git`: without the image's value
  every cluster model would be registered with an unknown commit.
- `TASN_KFP_RUN_ID`: the Kubeflow Pipelines run a stage runs in, set by the pipeline's components.
- `cpu_model()`: the machine, which the numbers of a run depend on too (README, "Same seed, same
  result").
- `data_version(uri)`: a local dataset folder's DVC md5 (computed the way `dvc add` does, so it is
  the `md5: ....dir` that `data.dvc` records for the same files, and it follows the data rather
  than a `.dvc` file that may have gone stale), an `s3://` prefix's digest of its object listing
  (keys, sizes, ETags: no download), None when there is nothing there.

The raw data's version travels with the data: preprocess records it in the prepared folder's
`summary.json` (`recorded_data_version` reads it back), so train tags its run with the version of
the data it actually trained on, on a laptop, under DVC and on every node of a cluster job alike.
Unknown versions stay None here; the registry writes them as `unknown`, and the gate never compares
models across an unknown version.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path

from tasn import storage

GIT_COMMIT_ENV = "TASN_GIT_COMMIT"
# The Kubeflow Pipelines run a stage runs in (the pipeline's components set it), and the tag that
# records it on MLflow runs and model versions.
KFP_RUN_ID_ENV = "TASN_KFP_RUN_ID"
KFP_RUN_TAG = "kfp.run_id"
LISTING_PREFIX = "s3-listing-sha256:"  # marks a version that is a listing digest, not a content hash
DATA_VERSION_KEY = "data_version"  # the key in preprocess's summary.json
_CHUNK = 1 << 20


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo, else what `platform` knows): with the thread
    count and the kernels torch picks for it, what a run's numbers depend on besides its seed."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(cwd: str | os.PathLike[str] = ".") -> str | None:
    """The commit checked out at `cwd`, else the image's `TASN_GIT_COMMIT`, else None."""
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        res = None
    if res is not None and res.returncode == 0 and res.stdout.strip():
        return res.stdout.strip()
    return os.environ.get(GIT_COMMIT_ENV, "").strip() or None


def _file_md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def dvc_md5(folder: str | os.PathLike[str]) -> str:
    """DVC 3's hash of a directory: the md5 of its sorted `[{"md5": ..., "relpath": ...}]` listing
    as JSON, with `.dir` appended (dvc_data.hashfile.tree.Tree.digest)."""
    root = Path(folder)
    entries = [{"md5": _file_md5(p), "relpath": p.relative_to(root).as_posix()}
               for p in sorted(root.rglob("*")) if p.is_file()]
    entries.sort(key=lambda e: e["relpath"])
    listing = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(listing, usedforsecurity=False).hexdigest() + ".dir"


def listing_digest(prefix: str, endpoint: str | None = None) -> str | None:
    """A digest of every object under an S3 prefix (relative key, size, ETag); None when empty."""
    objects = storage.list_objects(prefix, endpoint)
    if not objects:
        return None
    base = prefix.rstrip("/") + "/"
    lines = "".join(f"{uri[len(base):]}\t{size}\t{etag}\n" for uri, size, etag in objects)
    return LISTING_PREFIX + hashlib.sha256(lines.encode("utf-8")).hexdigest()


def data_version(uri: str | os.PathLike[str], endpoint: str | None = None) -> str | None:
    """The version of the dataset at `uri` (see the module docstring); None when it has no files."""
    text = str(uri)
    if storage.is_s3(text):
        return listing_digest(text, endpoint)
    path = Path(text)
    if not path.is_dir() or not any(p.is_file() for p in path.rglob("*")):
        return None
    return dvc_md5(path)


def recorded_data_version(summary: str | os.PathLike[str]) -> str | None:
    """The raw data version preprocess recorded in its `summary.json` (the path given), if any."""
    path = Path(summary)
    try:
        value = json.loads(path.read_text()).get(DATA_VERSION_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return str(value) if value else None
