"""Read a DVC-tracked folder straight from a local DVC remote, without DVC.

`make run` gets the embedded dataset with `dvc pull`. Two places must read it where DVC may be
missing: `benchmarks/details.py` on a GPU host (which gets a copy of the working tree, the in-repo
remote `dvc-storage/` included, but no DVC) and the tests that train on a slice of it. The format
is small and stable: the `.dvc` file names a directory object `<md5>.dir`, a JSON list of
`{"md5", "relpath"}`; every object lives at `files/md5/<first two hex digits>/<the rest>`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from tasn.errors import DataError
from tasn.paths import path_problem


def _object(remote: Path, digest: str) -> Path:
    path = remote / "files" / "md5" / digest[:2] / digest[2:]
    if not path.is_file():
        raise DataError(f"{path}: missing from the DVC remote {remote} (is the checkout complete?)")
    return path


def listing(dvc_file: str | os.PathLike, remote: str | os.PathLike) -> list[dict]:
    """The tracked folder's files, `[{"md5": ..., "relpath": ...}, ...]`, from the remote."""
    outs = yaml.safe_load(Path(dvc_file).read_text()).get("outs") or []
    if len(outs) != 1 or not str(outs[0].get("md5", "")).endswith(".dir"):
        raise DataError(f"{dvc_file}: expected one tracked folder (an md5 ending in .dir)")
    return json.loads(_object(Path(remote), outs[0]["md5"]).read_text())


def materialize(dvc_file: str | os.PathLike, remote: str | os.PathLike, dest: str | os.PathLike,
                keep=lambda relpath: True) -> Path:
    """Copy the tracked folder's files for which `keep(relpath)` holds under `dest`, each path
    checked to stay inside `dest` (`tasn.paths.path_problem`). Copies, not hard links: a file written
    to later must not change the remote's object. Returns `dest`."""
    remote, dest = Path(remote), Path(dest)
    for entry in listing(dvc_file, remote):
        rel = entry["relpath"]
        if not keep(rel):
            continue
        problem = path_problem(dest, rel)
        if problem:
            raise DataError(f"{dvc_file}: {problem}")
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_object(remote, entry["md5"]), target)
    return dest
