"""Importers into the canonical CUB layout: a real CUB-200-2011 download, or one folder per class.

Both write DEST atomically (a failed import leaves DEST as it was) and check as they go: every
image must decode within the pixel limit (in parallel, with a progress bar), the tables must agree
with the files, every path stays inside SRC and DEST (`tasn.data.layout`), and DEST must lie apart
from SRC (replacing it would delete the source). Both refuse rather than guess: a problem raises
DataError naming each offending file.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasn.config.schema import DEFAULT_MAX_PIXELS
from tasn.data.images import decode
from tasn.data.layout import IMAGE_SUFFIXES, TABLES, check_layout, read_layout, write_layout
from tasn.data.parallel import imap
from tasn.errors import DataError, shown
from tasn.io import atomic_dir, check_apart
from tasn.paths import link_problem, name_problem


@dataclass
class _Check:
    path: str
    max_pixels: int


def _decode_error(job: _Check) -> str | None:
    try:
        decode(job.path, job.max_pixels, at_least=1, limit_key="--max-pixels")
    except DataError as exc:
        return str(exc)
    return None


def _check_decodable(paths: list[Path], workers: int, max_pixels: int, what: str) -> None:
    jobs = [_Check(str(p), max_pixels) for p in paths]
    errors = [e for e in imap(_decode_error, jobs, workers, desc=what) if e]
    if errors:
        head = "\n  ".join(errors[:50])
        more = f"\n  ... and {len(errors) - 50} more" if len(errors) > 50 else ""
        raise DataError(f"{len(errors)} image(s) cannot be imported:\n  {head}{more}")


def _place(src: Path, dst: Path) -> None:
    """Hard-link when possible (a 1.1 GB CUB import costs no space), else copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def find_cub_root(src: str | os.PathLike) -> Path:
    """Accept the CUB_200_2011 folder itself or the folder the tarball was unpacked in."""
    src = Path(src)
    for candidate in (src, src / "CUB_200_2011"):
        if (candidate / "images.txt").is_file():
            return candidate
    raise DataError(f"{src}: not a CUB-200-2011 folder (no images.txt in it or in {src / 'CUB_200_2011'})")


def import_cub(src: str | os.PathLike, dest: str | os.PathLike, workers: int = 0,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Copy a CUB-200-2011 tree's images and four tables to `dest`; boxes and parts are dropped."""
    root = find_cub_root(src)
    check_apart(root, dest, DataError, "DEST")
    layout = read_layout(root)
    check_layout(layout)
    sources = [root / "images" / p for p in layout.images["path"]]
    _check_decodable(sources, workers, max_pixels, "import-cub")
    with atomic_dir(dest) as tmp:
        for rel, path in zip(layout.images["path"], sources):
            _place(path, tmp / "images" / rel)
        for name in TABLES:
            shutil.copyfile(root / name, tmp / name)
        _check_result(tmp)
    return {"source": str(root), "dest": str(dest), "images": len(sources), "classes": len(layout.classes),
            "train": int(layout.images["is_train"].sum()), "test": int((~layout.images["is_train"]).sum())}


_UNSAFE = re.compile(r"[\s\x00-\x1f\x7f\udc80-\udcff]+")  # whitespace, control chars, bytes that are not UTF-8


def _safe(name: str) -> str:
    """images.txt is space-separated UTF-8 text: whitespace, control characters and bytes of a name
    that are not UTF-8 (Python keeps them as lone surrogates) each become '_'."""
    return _UNSAFE.sub("_", name.strip())


def _dest_name(source: Path, what: str) -> str:
    """The name `source` gets in DEST (`_safe`), refused when not even that is a usable name
    (`tasn.paths.name_problem`: blank, '.', '..')."""
    name = _safe(source.name)
    problem = name_problem(name)
    if problem:
        raise DataError(f"{source}: {what} name {shown(source.name)} {problem} once whitespace is trimmed and "
                        "unsafe characters become '_'; rename it")
    return name


def _inside(src: Path, path: Path) -> Path:
    """`path`, refused when a symbolic link on the way leads out of SRC or loops
    (`tasn.paths.link_problem`): an import copies only what SRC holds."""
    problem = link_problem(src, path.relative_to(src))
    if problem:
        raise DataError(f"{path}: {problem}; only files inside SRC are imported")
    return path


def _class_images(src: Path, folder: Path) -> list[Path]:
    """The image files (by suffix) under a class folder, sub-folders included; symbolic links to
    folders are not followed, and any entry leading out of SRC is refused."""
    found = []
    for dirpath, dirs, files in os.walk(folder):
        base = Path(dirpath)
        for name in dirs:
            if (base / name).is_symlink():
                _inside(src, base / name)
        found += [_inside(src, base / n) for n in files if Path(n).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(p for p in found if p.is_file())


def stratified_split(n: int, test_fraction: float, rng: np.random.Generator) -> list[bool]:
    """`is_train` flags for one class of `n` images: round(n * fraction) test images, at least one
    of each split, chosen by `rng`."""
    n_test = min(n - 1, max(1, round(n * test_fraction)))
    test = set(rng.permutation(n)[:n_test].tolist())
    return [i not in test for i in range(n)]


def import_folder(src: str | os.PathLike[str], dest: str | os.PathLike[str], test_fraction: float = 0.25,
                  seed: int = 0, workers: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """One sub-folder of images per class (sorted by name -> class ids 1..K) into the CUB layout,
    with a seeded split stratified by class. Files that are not images by suffix are skipped;
    every name DEST gets is `_dest_name`'s and every file read lies inside SRC (`_inside`)."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: not a directory")
    check_apart(src, dest, DataError, "DEST")
    if not 0 < test_fraction < 1:
        raise DataError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    folders = sorted(_inside(src, p) for p in src.iterdir() if not p.name.startswith(".") and p.is_dir())
    if len(folders) < 2:
        raise DataError(f"{src}: needs at least two class folders, found {len(folders)}")
    dirs = [_dest_name(f, "class folder") for f in folders]
    if len(set(dirs)) != len(dirs):
        raise DataError(f"{src}: class folder names collide once spaces become '_': {sorted(dirs)}")
    files = []
    for folder in folders:
        images = _class_images(src, folder)
        if len(images) < 2:
            raise DataError(f"{folder}: class has {len(images)} image(s); "
                            "needs at least 2 (one for train, one for test)")
        files.append(images)
    _check_decodable([p for group in files for p in group], workers, max_pixels, "import-folder")
    rng = np.random.default_rng(seed)
    rows = []
    with atomic_dir(dest) as tmp:
        for class_id, (cdir, folder, images) in enumerate(zip(dirs, folders, files), 1):
            flags = stratified_split(len(images), test_fraction, rng)
            seen: set[str] = set()
            for path, is_train in zip(images, flags):
                name = "_".join(_dest_name(Path(part), "file or folder") for part in path.relative_to(folder).parts)
                rel = f"{cdir}/{name}"
                if rel in seen:
                    raise DataError(f"{path}: name collides with another image of {folder} once spaces become '_'")
                seen.add(rel)
                _place(path, tmp / "images" / rel)
                rows.append((rel, class_id, is_train))
        write_layout(tmp, rows, dirs)
        _check_result(tmp)
    return {"source": str(src), "dest": str(dest), "images": len(rows), "classes": len(dirs),
            "train": sum(r[2] for r in rows), "test": sum(not r[2] for r in rows), "seed": seed}


def _check_result(tmp: Path) -> None:
    """The imported tree, before it replaces DEST, read back by the readers of every later stage:
    an importer never leaves a dataset that its own `validate` or `preprocess` would refuse."""
    try:
        check_layout(read_layout(tmp))
    except DataError as exc:
        raise DataError(f"the imported tree would not be a valid dataset, so DEST is left as it was: {exc}") from None
