"""Stage files: atomic writes (a killed stage leaves either the old output or the new one, never
half of one), and reading a JSON object another stage wrote, with errors that name the file."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasn.errors import TASNError


def _read_umask() -> int:
    """The process umask. Reading it means setting it, so this runs once, at import, rather than
    around every write, where another thread could create a file under the temporary 0 mask."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temporary file beside `path`, fsync, then rename over it.

    mkstemp creates files 0600; the result gets the usual 0666 & ~umask, like a plain open().
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `path`; on success it replaces `path` whole.

    On an exception the temporary directory is removed and `path` is left exactly as it was.
    The swap is two renames (old aside, new in), so at every instant a complete directory is
    either at `path` or at its `.old` sibling, from which the next run recovers.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.with_name(f".{path.name}.old")
    if old.exists() and not path.exists():  # a previous swap was killed between its renames
        os.replace(old, path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_UMASK)  # mkdtemp makes 0700; outputs are meant to be shared
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def read_json(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """The JSON object in `path`; `what` names it in errors (e.g. "--run-json")."""
    p = Path(path)
    if not p.is_file():
        raise TASNError(f"{what} {p}: no such file")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise TASNError(f"{what} {p}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise TASNError(f"{what} {p}: expected a JSON object")
    return data
