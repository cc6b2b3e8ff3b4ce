"""Bad input, as a user or an attacker would try it, through the `tasn` commands that read it.

Every case breaks a copy of a valid tiny tree in one way and runs each stage that reads what was
broken (validate, preprocess, import-cub). Each must exit 1 with one error line that names the file
(and line) or the key and says what is wrong, raise nothing (a traceback), and change nothing in the
tree around it: not the earlier outputs of a good run (report/, prep/, imported/), not a file
outside the dataset that a crafted path points at, nothing new anywhere except validate's own
`report-failed/` when a rule fails. Harmless variants of a table (BOM, CRLF, tabs) read the same.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fixtures.models import baseline_model
from tasn import storage
from tasn.cli import main
from tasn.config import ConfigError
from tasn.data.dataset import PreparedDataset
from tasn.data.importers import import_folder
from tasn.data.layout import read_layout
from tasn.data.preprocess import MANIFEST, SHARDS
from tasn.errors import DataError
from tasn.io import output_lock
from test_data_support import jpeg_bytes, noise_image, tree_with_outputs

PARAMS = "validate: {min_side: 32, workers: 1}\npreprocess: {size: 64, workers: 1}\nmodel: {input_size: 48}\n"
STAGES = {
    "validate": ["validate", "--params", "params.yaml", "--data", "raw", "--report-dir", "report"],
    "preprocess": ["preprocess", "--params", "params.yaml", "--data", "raw", "--out", "prep"],
    "import-cub": ["data", "import-cub", "raw", "imported", "--workers", "1"],
}
WRITES = {"validate": "report-failed"}  # a stage's own destination for a failed run, if it has one
ALL = tuple(STAGES)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid raw tree and the outputs of a good run of each stage over it (made once)."""
    return tree_with_outputs(tmp_path_factory.mktemp("bad-input"), PARAMS, list(STAGES.values()))


@pytest.fixture
def tree(good, tmp_path, monkeypatch):
    """A fresh copy of the good tree to break, with a file beside it that crafted paths aim at."""
    shutil.copytree(good, tmp_path, dirs_exist_ok=True, symlinks=True)
    (tmp_path / "outside.jpg").write_bytes(jpeg_bytes(noise_image(np.random.default_rng(9), 64, 64)))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root`: files by content hash, links by target, folders as such."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def tasn(capsys, argv: list[str]) -> tuple[int, str]:
    """Run the CLI in this process: (exit code, stderr). An exception escaping it is what a user
    would see as a traceback, so it fails the test."""
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        rc = int(exc.code or 0)
    except BaseException as exc:
        pytest.fail(f"tasn {' '.join(argv)} raised {exc!r}: a traceback, not a clear error")
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, err


def refuses(capsys, root: Path, argv: list[str], says: tuple[str, ...], may_write: str | None = None) -> str:
    """`argv` exits 1 naming what `says` holds, and leaves everything under `root` as it was
    (but for `may_write`, the stage's own failed-run output)."""
    keep = lambda snap: {k: v for k, v in snap.items() if not (may_write and k.split("/")[0] == may_write)}  # noqa: E731
    before = snapshot(root)
    rc, err = tasn(capsys, argv)
    assert rc == 1, err
    command = " ".join(argv[:2]) if argv[0] == "data" else argv[0]
    assert err.count(f"tasn {command}: error: ") == 1, err
    for text in says:
        assert text in err, f"{text!r} not in:\n{err}"
    assert "secret line" not in err and len(err) < 3000, err  # no other file quoted, no value shown whole
    assert keep(snapshot(root)) == keep(before), "something outside the stage's destination changed"
    return err


# ---------------------------------------------------------------------------------------------
# How each case breaks the tree. Class 1 holds image ids 1-3 (2 train, 1 test), class 2 ids 4-6, ...
def rel(image_id: int) -> str:
    return dict(line.split() for line in Path("raw/images.txt").read_text().splitlines())[str(image_id)]


def set_line(table: str, image_id: int, line: str, encoding: str = "utf-8") -> None:
    """Replace the line of `image_id` (or, for a new id, add `line`) in raw/`table`."""
    path = Path("raw") / table
    lines = path.read_text().splitlines()
    keyed = [i for i, old in enumerate(lines) if old.split()[0] == str(image_id)]
    if keyed:
        lines[keyed[0]] = line
    else:
        lines.append(line)
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))


def append(table: str, line: str) -> None:
    with (Path("raw") / table).open("a") as fh:
        fh.write(line + "\n")


def image(image_id: int, img: Image.Image, fmt: str = "PNG") -> None:
    img.save(Path("raw/images") / rel(image_id), format=fmt)  # the suffix stays .jpg: content decides


def latin1_name() -> None:
    set_line("images.txt", 2, f"2 {rel(2).rsplit('/', 1)[0]}/Gr\xe9be_0002.jpg", encoding="latin-1")


def utf16_labels() -> None:
    path = Path("raw/image_class_labels.txt")
    path.write_bytes(path.read_text().encode("utf-16"))


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def symlink_out() -> None:
    target = Path("raw/images") / rel(2)
    target.unlink()
    target.symlink_to(Path("outside.jpg").resolve())


def stray_symlink_out() -> None:
    (Path("raw/images") / rel(2)).with_name("stray.jpg").symlink_to(Path("outside.jpg").resolve())


def symlink_loop() -> None:
    target = Path("raw/images") / rel(2)
    target.unlink()
    target.symlink_to(target.name)  # a link to itself: resolving it never ends


def non_utf8_name() -> None:
    """A stray image whose name is not UTF-8 (written on a Latin-1 system): no table can list it."""
    listed = Path("raw/images") / rel(2)
    (Path(os.fsdecode(os.fsencode(listed.parent) + b"/caf\xe9.jpg"))).write_bytes(listed.read_bytes())


def table_linked_out() -> None:
    """images.txt a link to a file outside the dataset that does not parse: its lines must not be
    read, let alone quoted in the error."""
    Path("outside.txt").write_text("1 001.Striped_wing_Ringed_eye/a.jpg\nsecret line of another file\n")
    Path("raw/images.txt").unlink()
    Path("raw/images.txt").symlink_to(Path("outside.txt").resolve())


@dataclass
class Case:
    breaks: Callable[[], object]
    says: dict[str, tuple[str, ...]]  # stage -> what its error must hold ("{1}", "{2}": the path of image 1, 2)
    args: list[str] = field(default_factory=list)  # extra arguments for every stage


def _all(*says: str) -> dict[str, tuple[str, ...]]:
    return {stage: says for stage in ALL}


CASES = {
    # tables that are not what they claim
    "latin1_images_txt": Case(latin1_name, _all("raw/images.txt:2: not UTF-8", "Latin-1")),
    "utf16_labels": Case(utf16_labels, _all("raw/image_class_labels.txt:1: not UTF-8", "UTF-16")),
    "empty_images_txt": Case(lambda: Path("raw/images.txt").write_text(""), _all("raw/images.txt: lists no images")),
    "blank_classes_txt": Case(lambda: Path("raw/classes.txt").write_text("\n\n"),
                              _all("raw/classes.txt: lists no classes")),
    "two_ids_one_class_dir": Case(lambda: set_line("classes.txt", 5, "5 001.Striped_wing_Ringed_eye"),
                                  _all("raw/classes.txt:5: class dir '001.Striped_wing_Ringed_eye' is already "
                                       "class id 1")),
    "class_id_twice": Case(lambda: append("classes.txt", "1 another_dir"),
                           _all("raw/classes.txt:5: class id 1 is listed twice")),
    "missing_column": Case(lambda: set_line("images.txt", 3, "3"),
                           _all("raw/images.txt:3: expected '<id> <path>', got '3'")),
    "space_in_path": Case(lambda: set_line("images.txt", 3, "3 001.Striped_wing_Ringed_eye/a b.jpg"),
                          _all("raw/images.txt:3: expected '<id> <path>'")),
    "float_label": Case(lambda: set_line("image_class_labels.txt", 2, "2 1.0"),
                        _all("raw/image_class_labels.txt:2: expected '<id> <int>', got '2 1.0'")),
    "superscript_digit_id": Case(lambda: set_line("images.txt", 2, f"\u00b2 {rel(2)}"),
                                 _all("raw/images.txt:2: expected '<id> <path>'")),
    "id_too_large": Case(lambda: set_line("train_test_split.txt", 2, "2" * 30 + " 1"),
                         _all("raw/train_test_split.txt:2: expected '<id> <int>'")),
    "split_flag_2": Case(lambda: set_line("train_test_split.txt", 2, "2 2"),
                         _all("raw/train_test_split.txt:2: image id 2 has split '2'")),
    "label_given_twice_differently": Case(lambda: append("image_class_labels.txt", "2 3"),
                                          _all("raw/image_class_labels.txt:13: image id 2 is listed twice with "
                                               "different values")),
    # paths that lead out of the tree
    "dotdot_path": Case(lambda: set_line("images.txt", 2, "2 ../../outside.jpg"),
                        _all("raw/images.txt:2: path '../../outside.jpg': part '..' is '.' or '..'")),
    "dotdot_inside_path": Case(lambda: set_line("images.txt", 2, "2 001.Striped_wing_Ringed_eye/../../../outside.jpg"),
                               _all("raw/images.txt:2: path", "part '..' is '.' or '..'")),
    "absolute_path": Case(lambda: set_line("images.txt", 2, f"2 {Path('outside.jpg').resolve()}"),
                          _all("raw/images.txt:2: path", "is absolute")),
    "control_character": Case(lambda: set_line("images.txt", 2, "2 001.Striped_wing_Ringed_eye/a\x01.jpg"),
                              _all("raw/images.txt:2: path", "holds a control character")),
    "class_dir_dotdot": Case(lambda: set_line("classes.txt", 1, "1 .."),
                             _all("raw/classes.txt:1: path '..': part '..' is '.' or '..'")),
    "listed_symlink_out": Case(symlink_out, _all("raw/images.txt:2: path", "leads out of raw/images through a "
                                                 "symbolic link")),
    "stray_symlink_out": Case(stray_symlink_out, _all("stray.jpg: path", "leads out of raw/images through a "
                                                      "symbolic link")),
    "symlink_loop": Case(symlink_loop, _all("raw/images.txt:2: path", "goes through a symbolic link loop")),
    "name_not_utf8": Case(non_utf8_name, _all(r"caf\udce9.jpg", "is not valid UTF-8")),
    "table_linked_out": Case(table_linked_out, _all("raw/images.txt: path 'images.txt' leads out of raw through a "
                                                    "symbolic link")),
    # images that break a rule (validate names the rule; preprocess and import refuse what they cannot use)
    "tall_png_40x45000": Case(lambda: image(2, Image.new("RGB", (40, 45000), (9, 9, 9))), {
        "validate": ("[aspect_ratio] images/{2}: 40x45000 px: aspect ratio 1125.0 > validate.max_aspect_ratio (10)",),
        "preprocess": ("raw/images/{2}: 40x45000 px would become 64x72000 px at preprocess.size 64, "
                       "more than JPEG's 65500 px",)}),
    "96_mpx_png": Case(lambda: image(2, Image.new("1", (12_000, 8_000))), {
        "validate": ("[max_pixels] images/{2}: 12000x8000 px = 96.0 Mpx > validate.max_pixels (90 Mpx); not decoded",),
        "preprocess": ("raw/images/{2}: 12000x8000 px = 96.0 Mpx, more than the limit of 90 Mpx "
                       "(preprocess.max_pixels)",),
        "import-cub": ("raw/images/{2}: 12000x8000 px = 96.0 Mpx, more than the limit of 90 Mpx (--max-pixels)",)}),
    "lowered_pixel_limit": Case(lambda: None, {
        "validate": ("[max_pixels] images/{2}:", "> validate.max_pixels (0.001 Mpx)"),
        "preprocess": ("raw/images/{1}:", "more than the limit of 0.001 Mpx (preprocess.max_pixels)"),
        "import-cub": ("raw/images/{2}:", "more than the limit of 0.001 Mpx (--max-pixels)")}),
    "truncated_jpeg": Case(lambda: truncate(Path("raw/images") / rel(2), 300), {
        "validate": ("[decodable] images/{2}: not decodable: truncated or corrupt",),
        "preprocess": ("raw/images/{2}: truncated or corrupt",),
        "import-cub": ("raw/images/{2}: truncated or corrupt",)}),
    "zero_byte_file": Case(lambda: truncate(Path("raw/images") / rel(2), 0), {
        "validate": ("[decodable] images/{2}: not decodable: file is empty (0 bytes)",),
        "preprocess": ("raw/images/{2}: file is empty (0 bytes)",),
        "import-cub": ("raw/images/{2}: file is empty (0 bytes)",)}),
    "label_names_a_missing_class": Case(lambda: set_line("image_class_labels.txt", 2, "2 9"), {
        "validate": ("[label_in_range] images/{2}: label id 9 out of range (classes.txt has ids 1..4)",),
        "preprocess": ("{2}: class id 9 is not in classes.txt",),
        "import-cub": ("{2}: class id 9 is not in classes.txt",)}),
    "duplicate_image_id": Case(lambda: set_line("images.txt", 3, f"2 {rel(3)}"), {
        "validate": ("[unique_id] images/{2}: duplicate image id 2 in images.txt",),
        "preprocess": ("raw/images.txt: image id 2 is listed more than once",),
        "import-cub": ("raw/images.txt: image id 2 is listed more than once",)}),
    "one_file_under_two_ids": Case(lambda: set_line("images.txt", 3, f"3 {rel(2)}"), {
        "validate": ("[unique_bytes] images/{2}: identical bytes to another listed image",),
        "preprocess": ("raw/images/{2}: listed more than once in images.txt (image id 3)",),
        "import-cub": ("raw/images/{2}: listed more than once in images.txt (image id 3)",)}),
}
CASES["lowered_pixel_limit"].args = ["-S", "validate.max_pixels=1000", "-S", "preprocess.max_pixels=1000"]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_named_exits_1_and_changes_nothing_around_it(name, tree, capsys):
    case = CASES[name]
    paths = {"{1}": rel(1), "{2}": rel(2)}
    case.breaks()
    for stage, says in case.says.items():
        args = case.args
        if stage == "import-cub" and args:  # it has no config: its limit is a flag
            args = ["--max-pixels", "1000"]
        expected = []
        for text in says:
            for key, value in paths.items():
                text = text.replace(key, value)
            expected.append(text)
        refuses(capsys, tree, STAGES[stage] + args, tuple(expected), may_write=WRITES.get(stage))


@pytest.mark.parametrize("argv,says", [
    (["preprocess", "--params", "params.yaml", "--data", "raw", "--out", "raw"], "raw: --out must be outside raw"),
    (["preprocess", "--params", "params.yaml", "--data", "raw/images/..", "--out", "."], ".: --out must be outside"),
    (["validate", "--params", "params.yaml", "--data", "raw", "--report-dir", "raw/report"],
     "raw/report: --report-dir must be outside raw"),
    (["data", "import-cub", "raw", "raw", "--workers", "1"], "raw: DEST must be outside raw"),
    (["data", "import-cub", "raw", "raw/images/x", "--workers", "1"], "raw/images/x: DEST must be outside raw"),
    (["preprocess", "--params", "params.yaml", "--data", "raw", "--out", "params.yaml/prep"],
     "params.yaml: cannot create the folder for prep"),
    (["evaluate", "--params", "params.yaml", "--data", "prep", "--model", "m.pt", "--out", "prep"],
     "prep: --out must be outside prep"),
    (["evaluate", "--params", "params.yaml", "--data", "prep", "--model", "prep/../m.pt", "--out", "."],
     ".: --out must be outside prep"),
    (["evaluate", "--params", "params.yaml", "--data", "prep", "--model", "ev/model.pt", "--out", "ev"],
     "ev: --out must be outside ev/model.pt"),
    (["train", "--params", "params.yaml", "--data", "prep", "--out", "prep/train"],
     "prep/train: --out must be outside prep"),
])
def test_an_output_that_would_overwrite_its_input_is_refused(argv, says, tree, capsys):
    refuses(capsys, tree, argv, (says,))


# Configuration: every value checked before any work starts (nothing is written at all).
CONFIG_CASES = {
    "nan_lr": (["-S", "train.lr=.nan"], "train.lr: must be a finite number, got nan"),
    "inf_lr": (["-S", "train.lr=.inf"], "train.lr: must be a finite number, got inf"),
    "negative_keep": (["-S", "train.keep_checkpoints=-1"], "train.keep_checkpoints: must be >= 0"),
    "negative_min_side": (["-S", "validate.min_side=-5"], "validate.min_side: must be >= 1"),
    "huge_size": (["-S", "preprocess.size=200000"], "preprocess.size: must be >= 8 and <= 8192, got 200000"),
    "negative_workers": (["-S", "validate.workers=-1"], "validate.workers: must be >= 0"),
    "zero_pixel_limit": (["-S", "validate.max_pixels=0"], "validate.max_pixels: must be >= 1"),
    "nan_aspect": (["-S", "validate.max_aspect_ratio=.nan"], "validate.max_aspect_ratio: must be a finite number"),
    "size_past_jpeg": (["-S", "preprocess.size=8000"],
                       "preprocess.size (8000) x validate.max_aspect_ratio (10) is more than 65500 px"),
    "preprocess_limit_below_validate": (["-S", "preprocess.max_pixels=1000"],
                                        "preprocess.max_pixels (1000) is smaller than validate.max_pixels"),
    "bare_s3": (["-S", "train.checkpoint_dir=s3://"], "train.checkpoint_dir: 's3://' names no bucket"),
    "bad_bucket": (["-S", "model.pretrained=s3://no such bucket/w.pt"], "model.pretrained: 's3://no such bucket/w.pt'"),
    "unknown_key": (["-S", "validate.min_sidee=3"], "unknown key validate.min_sidee"),
    "duplicate_yaml_key": ("validate: {min_side: 32}\nvalidate: {workers: 1}\n",
                           "params.yaml:2: duplicate key 'validate' (first at line 1)"),
    "profiles_in_params": ("profiles: [x]\n", "profiles do not live in the params file"),
    "latin1_params": ("tracking: {experiment: caf\xe9}\n".encode("latin-1"), "params.yaml:1: not UTF-8"),
    # pathological YAML and -S values: bounded, named, never a traceback or an endless message
    "alias_bomb": ("validate:\n  min_side: [&a [0,0,0,0,0,0,0,0,0,0], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], "
                   "&c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], "
                   "[*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]]\n",
                   "params.yaml:2: expands to more than 10000 values through anchors and aliases"),
    "nested_too_deep": ("validate: {min_side: " + "[" * 3000 + "]" * 3000 + "}\n",
                        "params.yaml: values nested too deeply to read"),
    "list_as_key": ("validate: {[min_side, workers]: 1}\n", "params.yaml:1: a key must be a name, got ['min_side'"),
    "integer_past_4300_digits": ("validate: {min_side: " + "9" * 5000 + "}\n", "params.yaml: 'Exceeds the limit"),
    "override_nested_too_deep": (["-S", "validate.min_side=" + "[" * 3000], "values nested too deeply to read"),
    "override_empty_part": (["-S", "validate..min_side=3"], "override 'validate..min_side=3': the key must name"),
    "override_huge_value": (["-S", "validate.min_side=" + "x" * 100_000], "validate.min_side: expected int, got 'xxx"),
    "profile_is_a_folder": (["--profile", "raw"], "--profile 'raw' is a folder: give a profile's name"),
    # names MLflow's registry refuses: refused with the key before any stage runs
    "alias_reserved_version": (["-S", "register.alias=v1"], "register.alias: 'v1' is not an alias MLflow takes"),
    "alias_reserved_latest": (["-S", "register.alias=Latest"], "register.alias: 'Latest' is not an alias"),
    "alias_with_space": (["-S", "register.alias=my alias"], "register.alias: 'my alias' is not an alias"),
    "model_name_with_slash": (["-S", "register.model_name=a/b"], "register.model_name: 'a/b' is not a registered"),
}


@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_bad_config_is_named_before_any_work(name, tree, capsys):
    given, says = CONFIG_CASES[name]
    argv = list(STAGES["validate"])
    if isinstance(given, list):
        argv += given
    else:
        Path("params.yaml").write_bytes(given.encode() if isinstance(given, str) else given)
        argv += ["--profile", "x"] if name == "profiles_in_params" else []
    refuses(capsys, tree, argv, (says,))  # not even report-failed/ is written


def test_bad_s3_uris_are_named_wherever_they_are_used(tree, capsys):
    refuses(capsys, tree, ["evaluate", "--params", "params.yaml", "--data", "prep", "--model", "s3://", "--out", "ev"],
            ("'s3://' names no bucket",))
    for uri in ("s3://", "s3:///key"):
        with pytest.raises(ConfigError, match="names no bucket"):
            storage.read_bytes(uri)
    with pytest.raises(ConfigError, match="names a bucket but no object"):
        storage.write_bytes("s3://bucket", b"x")
    assert storage.split_s3("s3://bucket/a/b") == ("bucket", "a/b")


def test_harmless_variants_of_the_tables_read_the_same(tree, capsys):
    """A byte-order mark, CRLF line ends, tabs and blank lines are how editors save text: the same
    dataset, the same validation and byte-identical prepared output."""
    for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"):
        path = Path("raw") / name
        lines = path.read_text().splitlines()
        text = "\r\n".join(line.replace(" ", "\t  ") for line in lines) + "\r\n\r\n"
        path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    before = {p: Path(p).read_bytes() for p in (f"prep/{MANIFEST}", f"prep/{SHARDS}/shard-00000.bin")}
    report = json.loads(Path("report/summary.json").read_text())
    assert tasn(capsys, STAGES["validate"])[0] == 0
    assert tasn(capsys, STAGES["preprocess"])[0] == 0
    assert json.loads(Path("report/summary.json").read_text()) == report
    assert {p: Path(p).read_bytes() for p in before} == before


def test_import_folder_makes_safe_names_and_refuses_a_dest_inside_src(tmp_path, capsys):
    rng = np.random.default_rng(4)
    src = tmp_path / "src"
    for cls in ("wren", "robin"):
        (src / cls).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(noise_image(rng, 40, 48)).save(src / cls / f"img{k}.png")
    # a name that is not UTF-8 (a Latin-1 file system) and one with a newline in it
    os.rename(src / "wren" / "img0.png", os.fsencode(src / "wren") + b"/caf\xe9.png")
    os.rename(src / "robin" / "img1.png", src / "robin" / "two\nlines.png")
    summary = import_folder(src, tmp_path / "raw", workers=1)
    layout = read_layout(tmp_path / "raw")
    assert summary["images"] == 4 and sorted(layout.images["path"]) == [
        "robin/img0.png", "robin/two_lines.png", "wren/caf_.png", "wren/img1.png"]
    refuses(capsys, tmp_path, ["data", "import-folder", str(src), str(src / "wren" / "out"), "--workers", "1"],
            ("DEST must be outside",))


def test_a_manifest_cannot_send_a_reader_out_of_its_folder(tree):
    m = pd.read_parquet(f"prep/{MANIFEST}")
    m.loc[0, "shard"] = "../outside.jpg"
    m.to_parquet(f"prep/{MANIFEST}", index=False)
    with pytest.raises(DataError, match=r"manifest.parquet: shard path '../outside.jpg': part '..' is '.' or '..'"):
        PreparedDataset("prep", "train")


def test_what_validate_accepts_preprocess_can_write(tree, capsys):
    """The limits validate checks are what preprocess needs: an image at the largest accepted aspect
    ratio (10) goes through both."""
    image(2, Image.fromarray(noise_image(np.random.default_rng(5), 40, 400)))
    assert tasn(capsys, STAGES["validate"])[0] == 0
    assert tasn(capsys, STAGES["preprocess"])[0] == 0
    m = pd.read_parquet(f"prep/{MANIFEST}").set_index("image_id")
    data = Path("prep", m.loc[2, "shard"]).read_bytes()[m.loc[2, "offset"]:][: m.loc[2, "length"]]
    assert Image.open(io.BytesIO(data)).size == (640, 64)  # 400 x 40 -> shorter side 64


# Counts given as flags: out of range is a usage error (exit 2, as argparse's own), never a traceback.
@pytest.mark.parametrize("argv,says", [
    (["data", "import-cub", "raw", "imported2", "--workers", "-3"], "argument --workers: -3 is out of range 0..512"),
    (["data", "import-cub", "raw", "imported2", "--max-pixels", "-1"], "argument --max-pixels: -1 is out of range"),
    (["data", "import-folder", "raw/images", "imported2", "--seed", "-1"], "argument --seed: -1 is out of range"),
    (["data", "synth", "synth2", "--workers", "-1"], "argument --workers: -1 is out of range"),
    (["predict", "outside.jpg", "--model", "m.pt", "--topk", "-1"], "argument --topk: -1 is out of range 1..1000"),
])
def test_counts_out_of_range_are_usage_errors(argv, says, tree, capsys):
    before = snapshot(tree)
    rc, err = tasn(capsys, argv)
    assert rc == 2 and says in err, err
    assert snapshot(tree) == before


# import-folder: every name DEST gets and every file it reads passes the containment rule
# (tasn.paths); the imported tree is read back before it replaces DEST.
def _two_classes(src: Path) -> None:
    for cls in ("robin", "wren"):
        (src / cls).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(noise_image(np.random.default_rng(k), 40, 40)).save(src / cls / f"img{k}.png")


IMPORT_CASES = {
    "class_folder_linked_out": (lambda src: (src / "jay").symlink_to(src.parent / "elsewhere"),
                                "src/jay: path 'jay' leads out of"),
    "image_linked_out": (lambda src: (src / "wren" / "x.png").symlink_to(src.parent / "elsewhere" / "img0.png"),
                         "src/wren/x.png: path 'wren/x.png' leads out of"),
    "image_link_loop": (lambda src: (src / "wren" / "loop.png").symlink_to("loop.png"),
                        "src/wren/loop.png: path 'wren/loop.png' goes through a symbolic link loop"),
    "subfolder_linked_out": (lambda src: (src / "wren" / "more").symlink_to(src.parent / "elsewhere"),
                             "src/wren/more: path 'wren/more' leads out of"),
    "class_folder_that_is_a_dot": (lambda src: (src / "robin").rename(src / " . "),
                                   "class folder name ' . ' is '.' or '..'"),
    "subfolder_that_is_blank": (lambda src: (src / "wren" / "   ").mkdir() or shutil.copy(
        src / "wren" / "img0.png", src / "wren" / "   " / "img2.png"), "file or folder name '   ' is empty or blank"),
}


@pytest.mark.parametrize("name", list(IMPORT_CASES))
def test_import_folder_refuses_names_and_links_it_cannot_contain(name, tmp_path, capsys):
    src = tmp_path / "src"
    _two_classes(src)
    _two_classes(tmp_path / "elsewhere")
    breaks, says = IMPORT_CASES[name]
    breaks(src)
    refuses(capsys, tmp_path, ["data", "import-folder", str(src), str(tmp_path / "raw"), "--workers", "1"], (says,))


# A prepared dataset edited by hand or by an attacker: refused with the file and the row, before
# any image is read through it (tasn.data.dataset.read_manifest).
def _manifest(change: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[], None]:
    def apply() -> None:
        change(pd.read_parquet(f"prep/{MANIFEST}")).to_parquet(f"prep/{MANIFEST}", index=False)
    return apply


MANIFEST_CASES = {
    "offset_as_text": (_manifest(lambda m: m.assign(offset=m["offset"].astype(str))),
                       "manifest.parquet: column 'offset' must hold integers"),
    "label_out_of_range": (_manifest(lambda m: m.assign(label=m["label"] + 100)),
                           "manifest.parquet: row 0: label 100 must be 0..3"),
    "length_past_the_shard": (_manifest(lambda m: m.assign(length=m["length"] * 10_000)),
                              "but its rows reach byte"),
    "negative_offset": (_manifest(lambda m: m.assign(offset=-m["length"])), "row 0: offset"),
    "no_split_column": (_manifest(lambda m: m.drop(columns=["split"])), "manifest.parquet: no column 'split'"),
    "not_parquet": (lambda: Path(f"prep/{MANIFEST}").write_text("shard,offset\n"), "not a readable manifest"),
    "classes_not_a_list": (lambda: Path("prep/classes.json").write_text('{"a": 1}'),
                           "classes.json: expected a non-empty list of class names"),
}
TRAIN = ["train", "--params", "params.yaml", "--data", "prep", "--out", "tr", "-S", "tracking.enabled=false",
         "-S", "train.batch_size=2"]


@pytest.mark.parametrize("name", list(MANIFEST_CASES))
def test_a_tampered_prepared_dataset_is_named(name, tree, capsys):
    breaks, says = MANIFEST_CASES[name]
    breaks()
    refuses(capsys, tree, TRAIN, (says,))


# The model file's config passes the checks a params file does (tasn.checkpoint.recorded_config).
def _model_file(folder: Path, edit: Callable[[dict], None]) -> Path:
    path, _, _ = baseline_model(folder)
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(payload, path)
    return path


MODEL_CASES = {
    "sampler_iterations_1e8": (lambda p: p["config"]["model"].update(iters=10**8),
                               "the config recorded in it is not valid: model.iters: must be >= 1 and <= 100"),
    "unknown_key": (lambda p: p["config"]["model"].update(colour="red"),
                    "the config recorded in it is not valid: unknown key model.colour"),
    "weights_of_another_shape": (lambda p: p.update(classes=p["classes"] + ["x", "y"]),
                                 "its weights do not fit the baseline network its config describes"),
    "classes_not_names": (lambda p: p.update(classes=[1, 2, 3]), "its classes must be a non-empty list of names"),
}


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_a_model_file_is_checked_like_a_params_file(name, tree, capsys):
    edit, says = MODEL_CASES[name]
    model = _model_file(tree / "m", edit)
    refuses(capsys, tree, ["predict", "outside.jpg", "--model", str(model)], ("m/model.pt", says))
    refuses(capsys, tree, ["evaluate", "--params", "params.yaml", "--data", "prep", "--model", str(model),
                           "--out", "ev"], ("m/model.pt", says))


def test_train_refuses_a_junk_pretrained_file_a_checkpoint_dir_in_its_data_and_a_busy_out(tree, capsys):
    Path("junk.pt").write_bytes(os.urandom(3000))
    refuses(capsys, tree, [*TRAIN, "-S", "model.pretrained=junk.pt"],
            ("pretrained weights 'junk.pt': not a state dict torch can read",))
    refuses(capsys, tree, [*TRAIN, "-S", "train.checkpoint_dir=prep/ckpt"],
            ("prep/ckpt: train.checkpoint_dir must be outside prep",))
    with output_lock("tr"):  # another `tasn train` is writing tr/
        refuses(capsys, tree, TRAIN, (f"tr: --out is being written by pid {os.getpid()} on ",))
