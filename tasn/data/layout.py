"""The canonical raw layout, CUB-200-2011's, read into one table and written back.

    images/<class_dir>/<file>
    images.txt              <image_id> <class_dir>/<file>
    image_class_labels.txt  <image_id> <class_id>
    train_test_split.txt    <image_id> <1 = train, 0 = test>
    classes.txt             <class_id> <class_dir>          (ids 1-based)

Anything else in the tree (bounding_boxes.txt, parts/, attributes/) is ignored: TASN learns from
image-level labels only. `read_layout` is lenient about *content* (duplicate ids, labels out of
range, missing files are left for the validation suite to report with every offender named) but
strict about *form*, with a DataError naming the file and line: tables are UTF-8 (`tasn.io.read_text`
names the encoding they look like otherwise) and lie in the tree (not linked from outside it),
every line parses, every path and every file name on disk passes `tasn.paths.path_problem` (it
stays inside images/, has no link loop, is a name a table can hold: a table cannot make a stage
read or write elsewhere), images.txt and classes.txt are not empty, and each class id and class
directory is listed once. `check_layout` is the strict gate used by stages that must not run on a
broken tree.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tasn.errors import DataError
from tasn.io import read_text
from tasn.paths import path_problem

IMAGES_TXT = "images.txt"
LABELS_TXT = "image_class_labels.txt"
SPLIT_TXT = "train_test_split.txt"
CLASSES_TXT = "classes.txt"
TABLES = (IMAGES_TXT, LABELS_TXT, SPLIT_TXT, CLASSES_TXT)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_ID = re.compile(r"[0-9]{1,12}")  # ASCII digits only (str.isdigit takes '²'), small enough for Int64
_INT = re.compile(r"-?[0-9]{1,12}")


@dataclass
class Layout:
    """A raw dataset: one row per line of images.txt, plus the class list.

    `images` columns: image_id, path (relative to `root/images`), class_id (nullable), is_train
    (nullable bool); `classes` columns: class_id, class_dir.
    """

    root: Path
    images: pd.DataFrame
    classes: pd.DataFrame

    def class_names(self) -> list[str]:
        """Class directory names in class-id order (index = 0-based label)."""
        return list(self.classes.sort_values("class_id")["class_dir"])

    def files_on_disk(self) -> list[str]:
        """Every image-like file under images/, as paths relative to it (sorted, '/'-separated).
        A symbolic link among them that leads out of images/ is a DataError naming it."""
        base = self.root / "images"
        found = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                    rel = Path(dirpath, name).relative_to(base).as_posix()
                    problem = path_problem(base, rel)
                    if problem:
                        raise DataError(f"{base / rel}: {problem}")
                    found.append(rel)
        return sorted(found)


@dataclass(frozen=True)
class _Line:
    number: int
    key: int
    value: str


def _read_pairs(path: Path, value_kind: str) -> list[_Line]:
    """Parse `<id> <value>` lines (UTF-8; blank lines skipped); `value_kind` is 'int' or 'path'
    (paths may not hold spaces). A line that does not parse is a DataError naming file and line."""
    if not path.is_file():
        raise DataError(f"{path}: missing (a CUB-layout dataset needs {', '.join(TABLES)})")
    problem = path_problem(path.parent, path.name)
    if problem:  # a table linked from elsewhere: its lines (and this error's quotes of them) are not the dataset's
        raise DataError(f"{path}: {problem}")
    lines = []
    for number, line in enumerate(read_text(path, DataError).split("\n"), 1):
        parts = line.split()  # spaces or tabs; a CRLF's \r is whitespace too
        if not parts:
            continue
        value_ok = len(parts) == 2 and (value_kind == "path" or _INT.fullmatch(parts[1]))
        if not (value_ok and _ID.fullmatch(parts[0])):
            raise DataError(f"{path}:{number}: expected '<id> <{value_kind}>', got {line.strip()!r}")
        lines.append(_Line(number, int(parts[0]), parts[1]))
    return lines


def _first_value(lines: list[_Line], path: Path) -> dict[int, str]:
    """id -> value; an id given twice with different values is ambiguous and rejected."""
    out: dict[int, _Line] = {}
    for line in lines:
        first = out.setdefault(line.key, line)
        if first.value != line.value:
            raise DataError(f"{path}:{line.number}: image id {line.key} is listed twice with different values "
                            f"({first.value!r} at line {first.number}, {line.value!r})")
    return {k: line.value for k, line in out.items()}


def _check_paths(lines: list[_Line], base: Path, table: Path) -> None:
    for line in lines:
        problem = path_problem(base, line.value)
        if problem:
            raise DataError(f"{table}:{line.number}: {problem}")


def _check_classes(lines: list[_Line], table: Path) -> None:
    """Class ids and class directories are each named once (a directory listed under two ids would be
    one class counted twice)."""
    if not lines:
        raise DataError(f"{table}: lists no classes")
    ids: dict[int, int] = {}
    dirs: dict[str, _Line] = {}
    for line in lines:
        if line.key in ids:
            raise DataError(f"{table}:{line.number}: class id {line.key} is listed twice "
                            f"(first at line {ids[line.key]})")
        ids[line.key] = line.number
        first = dirs.setdefault(line.value, line)
        if first is not line:
            raise DataError(f"{table}:{line.number}: class dir {line.value!r} is already class id {first.key} "
                            f"(line {first.number}); each class has one id")


def read_layout(root: str | os.PathLike) -> Layout:
    """Read the four tables of a CUB-layout tree into a `Layout` (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    if not (root / "images").is_dir():
        raise DataError(f"{root / 'images'}: missing (expected images/<class_dir>/<file>)")
    images = _read_pairs(root / IMAGES_TXT, "path")
    if not images:
        raise DataError(f"{root / IMAGES_TXT}: lists no images")
    _check_paths(images, root / "images", root / IMAGES_TXT)
    labels = _first_value(_read_pairs(root / LABELS_TXT, "int"), root / LABELS_TXT)
    split_lines = _read_pairs(root / SPLIT_TXT, "int")
    for line in split_lines:
        if line.value not in ("0", "1"):
            raise DataError(f"{root / SPLIT_TXT}:{line.number}: image id {line.key} has split {line.value!r}; "
                            "expected 1 (train) or 0 (test)")
    split = _first_value(split_lines, root / SPLIT_TXT)
    classes = _read_pairs(root / CLASSES_TXT, "path")
    _check_classes(classes, root / CLASSES_TXT)
    _check_paths(classes, root / "images", root / CLASSES_TXT)
    table = pd.DataFrame(
        {
            "image_id": pd.array([line.key for line in images], dtype="Int64"),
            "path": [line.value for line in images],
            "class_id": pd.array([int(labels[line.key]) if line.key in labels else None for line in images],
                                 dtype="Int64"),
            "is_train": pd.array([split[line.key] == "1" if line.key in split else None for line in images],
                                 dtype="boolean"),
        }
    )
    class_table = pd.DataFrame({"class_id": [c.key for c in classes], "class_dir": [c.value for c in classes]})
    return Layout(root=root, images=table, classes=class_table)


def check_layout(layout: Layout) -> None:
    """Strict consistency gate: raise one DataError naming every offending image and the rule broken."""
    t, root = layout.images, layout.root
    problems: list[str] = []
    dup = t[t["image_id"].duplicated(keep=False)]
    problems += [f"{root / IMAGES_TXT}: image id {r.image_id} is listed more than once ({r.path})"
                 for r in dup.itertuples()]
    twice = t[t["path"].duplicated(keep=False)]
    problems += [f"{root / 'images' / r.path}: listed more than once in {IMAGES_TXT} (image id {r.image_id})"
                 for r in twice.itertuples()]
    unlabelled = t.loc[t.class_id.isna(), ["image_id", "path"]].itertuples(index=False)
    problems += [f"{p}: image id {i} has no label in {LABELS_TXT}" for i, p in unlabelled]
    unsplit = t.loc[t.is_train.isna(), ["image_id", "path"]].itertuples(index=False)
    problems += [f"{p}: image id {i} has no entry in {SPLIT_TXT}" for i, p in unsplit]
    known = set(layout.classes["class_id"])
    bad = t[t.class_id.notna() & ~t.class_id.isin(known)]
    ids = f"ids {min(known, default=0)}..{max(known, default=0)}"
    problems += [f"{p}: class id {c} is not in {CLASSES_TXT} ({ids})" for p, c in zip(bad.path, bad.class_id)]
    missing = [p for p in t.path if not (root / "images" / p).is_file()]
    problems += [f"{root / 'images' / p}: listed in {IMAGES_TXT} but missing" for p in missing]
    unlisted = sorted(set(layout.files_on_disk()) - set(t.path))
    problems += [f"{root / 'images' / p}: present but not listed in {IMAGES_TXT}" for p in unlisted]
    if problems:
        head = "\n  ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise DataError(f"{root}: {len(problems)} layout problem(s):\n  {head}{more}")


def write_layout(dest: str | os.PathLike, rows: list[tuple[str, int, bool]], class_dirs: list[str]) -> None:
    """Write the four tables for images already placed under `dest/images`.

    `rows` are (relative path, class_id, is_train) in image-id order (ids 1..N); `class_dirs[k]`
    is the directory name of class id k + 1.
    """
    dest = Path(dest)
    tables = {
        IMAGES_TXT: (f"{i} {p}" for i, (p, _, _) in enumerate(rows, 1)),
        LABELS_TXT: (f"{i} {c}" for i, (_, c, _) in enumerate(rows, 1)),
        SPLIT_TXT: (f"{i} {int(tr)}" for i, (_, _, tr) in enumerate(rows, 1)),
        CLASSES_TXT: (f"{k} {d}" for k, d in enumerate(class_dirs, 1)),
    }
    for name, lines in tables.items():
        (dest / name).write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
