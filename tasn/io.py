"""Stage files: atomic writes (a killed stage leaves either the old output or the new one, never
half of one), the sweep of what killed runs left behind, the lock that keeps two runs out of one
output, and reading text and JSON another stage or a person wrote, with errors that name the file.
An OSError that names no file (a full disk, a quota) is re-raised naming the output it hit.

Temporaries. Everything is first written beside its target as `.<name>.<12 hex>.tmp` (a file or a
directory) and locked with flock(2) by the process writing it for as long as it writes. SIGKILL
leaves no chance to clean up, but the kernel drops a dead process's locks; so `sweep_temps(path)`,
run when a stage starts writing `path`, removes exactly the temporaries nobody holds (those of
killed runs) and never those of a run still going. A temporary is created as `....new`, locked,
then renamed to `....tmp`, so no sweep can see a live one unlocked.

Replacing a directory. Linux can swap two names in one step (renameat2 with RENAME_EXCHANGE), so a
reader of `path` always finds a complete directory: the old one up to the swap, the new one after.
Where it cannot (another OS, a filesystem without it) the swap is two renames through
`.<name>.old`, and the next run restores that if a kill fell between them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tasn.errors import TASNError

log = logging.getLogger(__name__)

STAGING_GRACE_S = 60.0  # a `.new` older than this was never renamed to `.tmp`: its creator died in between
# This module's temporaries end in 12 hex digits; 8 of [a-z0-9_] are the tempfile.mkdtemp names
# of earlier versions, left by runs killed before the sweep existed.
_TOKEN = r"(?:[0-9a-f]{12}|[a-z0-9_]{8})"


def _temp_name(path: Path, state: str) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.{state}")


def _make_dir(p: Path) -> int:
    os.mkdir(p, 0o777)  # the umask applies, as for any directory the user creates
    return os.open(p, os.O_RDONLY | os.O_DIRECTORY)


def _make_file(p: Path) -> int:
    return os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()


@contextlib.contextmanager
def _held_temp(path: Path, make: Callable[[Path], int]) -> Iterator[tuple[Path, int]]:
    """A new temporary beside `path`, flock-ed for the duration of the block: (its path, its fd)."""
    staging = _temp_name(path, "new")
    fd = make(staging)
    try:
        with contextlib.suppress(OSError):  # a filesystem without locks: never swept, never lost
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        tmp = staging.with_suffix(".tmp")
        os.rename(staging, tmp)
        yield tmp, fd
    finally:
        os.close(fd)


def _abandoned(p: str) -> bool:
    """True when no live process holds the temporary at `p` (its lock can be taken)."""
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held by a run still going (or locks unsupported): not ours to remove
        return False
    finally:
        os.close(fd)
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def sweep_temps(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries of `path` that killed runs left (see the module docstring); returns
    what was removed. Temporaries of other names, and of runs still writing, are left alone."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{_TOKEN}\.(tmp|new)")
    try:
        entries = list(os.scandir(path.parent))
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if not match:
            continue
        if match.group(1) == "new" and time.time() - entry.stat(follow_symlinks=False).st_mtime < STAGING_GRACE_S:
            continue  # being renamed to .tmp this instant, or its creator just died: the next run sees
        if _abandoned(entry.path):
            _remove(Path(entry.path))
            removed.append(Path(entry.path))
    if removed:
        log.info("removed %d temporar%s of %s left by killed runs", len(removed), "y" if len(removed) == 1 else "ies",
                 path)
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a locked temporary file beside `path`, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _held_temp(path, _make_file) as (tmp, fd):
        try:
            with open(fd, "wb", closefd=False) as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fd)
            os.replace(tmp, path)
        except BaseException as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            renamed = named(exc, path)
            if renamed is not exc:
                raise renamed from None
            raise
    return path


def named(exc: BaseException, path: str | os.PathLike[str]) -> BaseException:
    """An OSError that names no file (a full disk, a quota, an I/O error say only what, not where)
    as the same error naming `path`; anything else unchanged."""
    if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
        return OSError(exc.errno, exc.strerror, str(path))
    return exc


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
if _renameat2 is not None:
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    _renameat2.restype = ctypes.c_int


def exchange(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Swap the names `a` and `b` in one step; False where the OS or filesystem cannot (nothing moved)."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _install(tmp: Path, path: Path) -> None:
    """Put the finished `tmp` at `path` (module docstring: replacing a directory)."""
    if not os.path.lexists(path):
        os.rename(tmp, path)
    elif exchange(tmp, path):
        _remove(tmp)  # the old tree, now under the temporary's name (swept if a kill lands here)
    else:
        old = _old(path)
        if os.path.lexists(old):
            _remove(old)
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)


def check_apart(source: str | os.PathLike[str], output: str | os.PathLike[str], error: type[TASNError] = TASNError,
                what: str = "the output") -> None:
    """Refuse an `output` that is `source`, holds it or sits inside it: replacing the output (or
    writing into the input) would destroy or change what the stage reads."""
    src, out = Path(source).resolve(), Path(output).resolve()
    if src == out or src.is_relative_to(out) or out.is_relative_to(src):
        raise error(f"{output}: {what} must be outside {source} and must not contain it "
                    "(writing it would destroy or change the input)")


def _output_dir(path: Path) -> None:
    """`path` can be replaced: it has a name of its own and its parent is (or can be) a directory."""
    if path.name in ("", ".", ".."):
        raise TASNError(f"{path}: name the directory to write (e.g. out/prepared), not '.', '..' or '/'")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TASNError(f"{path.parent}: cannot create the folder for {path.name} ({exc.strerror})") from None


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh, locked temporary directory beside `path`; on success it replaces `path` whole.

    On an exception (Ctrl-C and SIGTERM included) the temporary is removed and `path` is left exactly
    as it was. Temporaries of `path` that killed runs left are swept first.
    """
    path = Path(path)
    _output_dir(path)
    old = _old(path)
    if os.path.lexists(old) and not os.path.lexists(path):  # a two-rename swap was killed between its renames
        os.replace(old, path)
    sweep_temps(path)
    with _held_temp(path, _make_dir) as (tmp, _fd):
        try:
            yield tmp
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            renamed = named(exc, path)
            if renamed is not exc:
                raise renamed from None
            raise
        _install(tmp, path)


@contextlib.contextmanager
def output_lock(path: str | os.PathLike[str], what: str = "--out") -> Iterator[None]:
    """Hold the output `path` for the block: a second run aimed at it refuses at once, naming the
    first (its pid, host, command and start time), instead of one result silently replacing the
    other. flock(2) on `.<name>.lock` beside it, so the kernel drops the lock when its holder dies
    (a killed run never blocks the next); the file goes when the holder is done."""
    path = Path(path)
    _output_dir(path)
    lock = path.with_name(f".{path.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 1000, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise TASNError(f"{path}: {what} is being written by {holder}; wait for it to finish, "
                            "or write to another folder") from None
        except OSError:  # a filesystem without locks: nothing to hold
            break
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break  # the file we locked is the one under the name (not one a finished holder removed)
        os.close(fd)
    try:
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:2]])
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} ({command}, since {started})".encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


MODEL_SHA256 = "model_sha256"  # the key under which train's metrics.json and run.json record their model's file_sha256
EVALUATED = "evaluated.json"  # beside evaluate's metrics.json: the model measured and its MODEL_SHA256


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks (a model file may be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_same_model(first: tuple[str | None, str], second: tuple[str | None, str],
                     error: type[TASNError] = TASNError) -> None:
    """Refuse two accounts of a model, each (its sha256, what says so), that are of different model
    files, naming both; one without a digest (written by an older tasn) passes with a warning."""
    (a, a_what), (b, b_what) = first, second
    if a is None or b is None:
        log.warning("cannot check that %s and %s are of the same model: %s records no %s", a_what, b_what,
                    a_what if a is None else b_what, MODEL_SHA256)
    elif a != b:
        raise error(f"{a_what} is of model sha256 {a[:16]}..., but {b_what} is of model sha256 {b[:16]}...: "
                    "the model and the record come from different trainings (a killed or concurrent run?); "
                    "train or evaluate again so that they agree")


def _looks_like(raw: bytes) -> tuple[str, str]:
    """A guess at the encoding of bytes that are not UTF-8 (for the message), and its iconv name."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16 (it starts with a UTF-16 byte-order mark)", "utf-16"
    if b"\x00" in raw[:4096]:
        return "UTF-16 or a binary file (it holds NUL bytes)", "utf-16"
    try:
        raw.decode("cp1252")
    except UnicodeDecodeError:
        return "Latin-1 (ISO-8859-1)", "latin1"
    return "Latin-1 (ISO-8859-1) or Windows-1252", "cp1252"


def read_text(path: str | os.PathLike[str], error: type[TASNError] = TASNError) -> str:
    """The text of `path`, which must be UTF-8 (a leading byte-order mark is dropped: Windows editors
    write one). Otherwise `error` naming the file, the line and the encoding the bytes look like."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        looks, name = _looks_like(raw)
        raise error(f"{path}:{line}: not UTF-8 (byte 0x{raw[exc.start]:02x}); it looks like {looks}. "
                    f"Save it as UTF-8, e.g. iconv -f {name} -t utf-8") from None


def read_json(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """The JSON object in `path`; `what` names it in errors (e.g. "--run-json")."""
    p = Path(path)
    if not p.is_file():
        raise TASNError(f"{what} {p}: no such file")
    try:
        data = json.loads(read_text(p))
    except json.JSONDecodeError as exc:
        raise TASNError(f"{what} {p}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise TASNError(f"{what} {p}: expected a JSON object")
    return data
