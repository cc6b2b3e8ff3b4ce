"""Names and paths someone else chose: the one containment rule of the project.

Every name or path that a dataset, a user or a remote controls (a class folder, a file name, a line
of a table, a manifest's shard, an object key, a model server's image path) is checked here before
anything is read or written through it, and refused with the name and the rule broken. The rule:
each part of a path is a usable name (`name_problem`: not empty or blank, not '.' or '..', no path
separator, no control character, valid UTF-8), the path is relative (`rel_problem`), and no symbolic
link on the way leads out of the tree or loops (`link_problem`). So no crafted name can make a stage
read or write outside the tree it works on, and nothing a reader would refuse is ever written.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from tasn.errors import shown


def name_problem(name: str) -> str | None:
    """Why `name` cannot be one file or folder name, or None: empty or blank, '.' or '..', a path
    separator ('/' or '\\'), a control character, or bytes that are not UTF-8 (the OS hands such a
    name to Python with lone surrogates; no table, manifest or JSON could hold it)."""
    if not name.strip():
        return "is empty or blank"
    if name in (".", ".."):
        return "is '.' or '..', which names no file of its own"
    if "/" in name or "\\" in name:
        return "holds a path separator ('/' or '\\')"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "holds a control character"
    if any("\udc80" <= c <= "\udcff" for c in name):
        return "is not valid UTF-8"
    return None


def rel_problem(rel: str) -> str | None:
    """Why `rel` is not a plain relative '/'-separated path whose every part passes `name_problem`,
    or None. Lexical only (no file is looked at): what an object-store destination can check."""
    if rel.startswith("/"):
        return f"path {shown(rel)} is absolute; paths are relative"
    for part in rel.split("/"):
        problem = "is empty" if part == "" else name_problem(part)
        if problem:
            return f"path {shown(rel)}: part {shown(part)} {problem}"
    return None


def resolved(path: Path) -> Path | None:
    """`path` with every symbolic link resolved (missing parts kept), or None on a link loop."""
    try:
        return path.resolve()
    except RuntimeError:  # Python < 3.13 reports a symbolic link loop so
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None
        raise


def link_problem(base: str | os.PathLike[str], rel: str | os.PathLike[str]) -> str | None:
    """Why `base / rel` is not inside `base` once symbolic links are followed (a link on the way
    leads out of it, or loops), or None. No lexical check: see `path_problem`."""
    root, real = resolved(Path(base)), resolved(Path(base) / rel)
    if root is None or real is None:
        return f"path {shown(str(rel))} goes through a symbolic link loop"
    if not real.is_relative_to(root):
        return f"path {shown(str(rel))} leads out of {base} through a symbolic link (to {real})"
    return None


def path_problem(base: str | os.PathLike[str], rel: str) -> str | None:
    """Why `base / rel` would not name a file inside `base`, or None when it does: `rel_problem`,
    then `link_problem`. Every path read from a file someone else wrote (a table, a manifest, a
    listing) is checked here before it is opened."""
    problem = rel_problem(rel)
    return f"{problem} (paths stay inside {base})" if problem else link_problem(base, rel)
