"""Nothing written outside the destination, checked by the filesystem itself.

Each case runs the real `tasn` command in `fixtures.sandbox`: a private mount namespace chrooted into
a copy-on-write overlay of the whole root filesystem, whose scratch layer records every file the
command creates or changes anywhere, `/` included (and is dropped afterwards, so an escape cannot
touch this machine). A class folder whose name is only whitespace used to become an empty class
directory, so that import-folder wrote its images at the filesystem root; a full disk used to be
reported without the path it hit.
"""

from __future__ import annotations

import sys

import pytest

from fixtures.sandbox import sandboxed, tasn_argv
from test_data_support import tiny_synth

BLANK_CLASS = r'''
import sys
from pathlib import Path
from PIL import Image
src = Path("/tmp/box/src")
for cls in ("   ", "wren"):
    (src / cls).mkdir(parents=True)
    for k in range(2):
        Image.new("RGB", (40, 40), (90 * k, 30, 60)).save(src / cls / f"escaped-{k}.png")
from tasn.cli import main
sys.exit(main(["data", "import-folder", str(src), "/tmp/box/dest", "--workers", "1"]))
'''


def test_import_folder_writes_nothing_outside_dest_for_a_blank_class_name():
    result = sandboxed([sys.executable, "-c", BLANK_CLASS])
    assert result.rc == 1, result.stderr
    assert "src/   : class folder name '   ' is empty or blank" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    # the command's own source files, and nothing else: not at `/`, not in DEST, not anywhere
    assert [f for f in result.written if not f.startswith("tmp/box/src/")] == [], result.written


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    base = tmp_path_factory.mktemp("containment")
    tiny_synth(base / "raw")
    (base / "params.yaml").write_text("preprocess: {size: 64, workers: 1}\nmodel: {input_size: 48}\n")
    return base


def test_a_full_disk_is_named_and_leaves_nothing_behind(raw):
    """preprocess onto a 16 KiB filesystem: ENOSPC while writing the shards, reported with the
    output it was writing, and the half-written temporary gone."""
    argv = tasn_argv("preprocess", "--params", str(raw / "params.yaml"), "--data", str(raw / "raw"),
                     "--out", "/tmp/full/prep")
    result = sandboxed([*argv], binds=(raw,), small=("/tmp/full", "16k"))
    assert result.rc == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "tasn preprocess: error: [Errno 28] No space left on device: '/tmp/full/prep'"), result.stderr
    assert "Traceback" not in result.stderr and result.written == [] and result.small == []
