"""The canonical raw layout, CUB-200-2011's, read into one table and written back.

    images/<class_dir>/<file>
    images.txt              <image_id> <class_dir>/<file>
    image_class_labels.txt  <image_id> <class_id>
    train_test_split.txt    <image_id> <1 = train, 0 = test>
    classes.txt             <class_id> <class_dir>          (ids 1-based)

Anything else in the tree (bounding_boxes.txt, parts/, attributes/) is ignored: TASN learns from
image-level labels only. `read_layout` is lenient about *content* (duplicate ids, labels out of
range, missing files are left for the validation suite to report with every offender named) but
strict about *syntax*: a line that cannot be parsed is a DataError naming the file and line.
`check_layout` is the strict gate used by stages that must not run on a broken tree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tasn.errors import DataError

IMAGES_TXT = "images.txt"
LABELS_TXT = "image_class_labels.txt"
SPLIT_TXT = "train_test_split.txt"
CLASSES_TXT = "classes.txt"
TABLES = (IMAGES_TXT, LABELS_TXT, SPLIT_TXT, CLASSES_TXT)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


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
        """Every image-like file under images/, as paths relative to it (sorted, '/'-separated)."""
        base = self.root / "images"
        found = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                    found.append(Path(dirpath, name).relative_to(base).as_posix())
        return sorted(found)


def _read_pairs(path: Path, value_kind: str) -> list[tuple[int, str]]:
    """Parse `<int id> <value>` lines; `value_kind` is 'int' or 'path' (paths may not hold spaces)."""
    if not path.is_file():
        raise DataError(f"{path}: missing (a CUB-layout dataset needs {', '.join(TABLES)})")
    pairs = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit() or (value_kind == "int" and not parts[1].lstrip("-").isdigit()):
            raise DataError(f"{path}:{lineno}: expected '<id> <{value_kind}>', got {line.strip()!r}")
        pairs.append((int(parts[0]), parts[1]))
    return pairs


def _first_value(pairs: list[tuple[int, str]], path: Path) -> dict[int, str]:
    """id -> value; an id given twice with different values is ambiguous and rejected."""
    out: dict[int, str] = {}
    for key, value in pairs:
        if key in out and out[key] != value:
            raise DataError(f"{path}: image id {key} is listed twice with different values ({out[key]!r}, {value!r})")
        out.setdefault(key, value)
    return out


def read_layout(root: str | os.PathLike) -> Layout:
    """Read the four tables of a CUB-layout tree into a `Layout` (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    if not (root / "images").is_dir():
        raise DataError(f"{root / 'images'}: missing (expected images/<class_dir>/<file>)")
    images = _read_pairs(root / IMAGES_TXT, "path")
    labels = _first_value(_read_pairs(root / LABELS_TXT, "int"), root / LABELS_TXT)
    split = _first_value(_read_pairs(root / SPLIT_TXT, "int"), root / SPLIT_TXT)
    classes = _read_pairs(root / CLASSES_TXT, "path")
    for image_id, flag in split.items():
        if flag not in ("0", "1"):
            raise DataError(f"{root / SPLIT_TXT}: image id {image_id} has split {flag!r}; "
                            "expected 1 (train) or 0 (test)")
    class_ids = [c for c, _ in classes]
    if len(set(class_ids)) != len(class_ids):
        dup = next(c for c in class_ids if class_ids.count(c) > 1)
        raise DataError(f"{root / CLASSES_TXT}: class id {dup} is listed twice")
    table = pd.DataFrame(
        {
            "image_id": pd.array([i for i, _ in images], dtype="Int64"),
            "path": [p for _, p in images],
            "class_id": pd.array([int(labels[i]) if i in labels else None for i, _ in images], dtype="Int64"),
            "is_train": pd.array([split[i] == "1" if i in split else None for i, _ in images], dtype="boolean"),
        }
    )
    class_table = pd.DataFrame({"class_id": class_ids, "class_dir": [d for _, d in classes]})
    return Layout(root=root, images=table, classes=class_table)


def check_layout(layout: Layout) -> None:
    """Strict consistency gate: raise one DataError naming every offending image and the rule broken."""
    t, root = layout.images, layout.root
    problems: list[str] = []
    dup = t[t["image_id"].duplicated(keep=False)]
    problems += [f"{root / IMAGES_TXT}: image id {r.image_id} is listed more than once ({r.path})"
                 for r in dup.itertuples()]
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
    (dest / IMAGES_TXT).write_text("".join(f"{i} {p}\n" for i, (p, _, _) in enumerate(rows, 1)))
    (dest / LABELS_TXT).write_text("".join(f"{i} {c}\n" for i, (_, c, _) in enumerate(rows, 1)))
    (dest / SPLIT_TXT).write_text("".join(f"{i} {int(tr)}\n" for i, (_, _, tr) in enumerate(rows, 1)))
    (dest / CLASSES_TXT).write_text("".join(f"{k} {d}\n" for k, d in enumerate(class_dirs, 1)))
