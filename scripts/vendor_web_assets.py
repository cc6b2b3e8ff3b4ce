"""Vendor what the offline HTML pages load, from the npm registry, pinned: the files
tasn/offline/assets.json lists, into tasn/offline/vendor/<name>@<version>/, and the `dvc plots show`
template .dvc/plots/offline.html with Vega, Vega-Lite and Vega-Embed inlined.

Each package is fetched with `npm pack NAME@VERSION` (the registry npm is configured with), its
tarball checked against the `integrity` recorded in assets.json (the first fetch records it), and
the listed files (licences included) extracted; the sha256 of every file is recorded too, and
tests/test_local_loop.py checks the vendored files and the template against them. Run it only to
change a version (edit assets.json, drop that package's `integrity`, run, review the diff):

    .venv/bin/python scripts/vendor_web_assets.py
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / ".dvc" / "plots" / "offline.html"  # .dvc/config: plots.html_template = plots/offline.html
sys.path.insert(0, str(ROOT))

from tasn import offline


def integrity(data: bytes) -> str:
    """npm's `dist.integrity` of a tarball: sha512, base64."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def fetch(name: str, version: str, work: Path) -> Path:
    """`npm pack name@version` into `work`; the tarball's path."""
    out = subprocess.run(["npm", "pack", f"{name}@{version}", "--pack-destination", str(work), "--json"],
                         capture_output=True, text=True, check=True)
    return work / json.loads(out.stdout)[0]["filename"]


def vendor_package(package: dict, work: Path) -> None:
    """Fetch, check and extract one package's listed files; record integrity and sha256s."""
    name, version = package["name"], package["version"]
    tarball = fetch(name, version, work)
    found = integrity(tarball.read_bytes())
    if package.get("integrity") not in (None, found):
        raise SystemExit(f"{name}@{version}: the registry's tarball is {found}, "
                         f"assets.json says {package['integrity']}")
    package["integrity"] = found
    dest = offline.VENDOR / f"{name}@{version}"
    shutil.rmtree(dest, ignore_errors=True)
    sha256 = {}
    with tarfile.open(tarball) as tar:
        for rel in package["files"]:
            member = tar.extractfile(f"package/{rel}")
            if member is None:
                raise SystemExit(f"{name}@{version}: no file {rel} in the package")
            data = member.read()
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(data)
            sha256[rel] = hashlib.sha256(data).hexdigest()
    package["sha256"] = sha256
    print(f"{name}@{version}: {len(sha256)} files ({found[:20]}...)")


def main() -> int:
    lock = json.loads(offline.ASSETS.read_text())
    with tempfile.TemporaryDirectory(prefix="tasn-npm-") as tmp:
        for package in lock["packages"]:
            vendor_package(package, Path(tmp))
    offline.ASSETS.write_text(json.dumps(lock, indent=2) + "\n")
    TEMPLATE.parent.mkdir(parents=True, exist_ok=True)
    TEMPLATE.write_text(offline.plots_template())
    print(f"wrote {offline.ASSETS.relative_to(ROOT)} and {TEMPLATE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
