"""The local loop a DVC and MLflow user walks (README): a smoke run that is small and isolated, the
committed demo run that a fresh clone's `dvc pull` brings back whole, and pictures that open
without a network. (The DVC side for real, on a fresh clone: tests/test_dvc_pipeline.py; the
registry's rule for what registers: tests/test_register_stage.py; same seed, same result:
tests/test_stages.py.)"""

from __future__ import annotations

import configparser
import hashlib
from pathlib import Path

import yaml
from dvc_render.html import HTML
from dvc_render.vega import VegaRenderer

from fixtures.data_smoke import smoke_data  # noqa: F401  (fixture)
from tasn import offline
from tasn.config import load_config
from tasn.data.layout import read_layout

ROOT = Path(__file__).resolve().parents[1]
REMOTE = ROOT / "dvc-storage"  # the in-repo default remote (.dvc/config)


def test_the_smoke_profile_is_small_and_isolated():
    """Its own tiny dataset, its own folders, MLflow experiment and registered model: a smoke run
    never trains on the demo's 3,000 images nor shows among the real runs and versions."""
    demo, smoke = load_config(ROOT / "params.yaml"), load_config(ROOT / "params.yaml", "smoke")
    assert smoke.tracking.experiment != demo.tracking.experiment
    assert smoke.register.model_name != demo.register.model_name
    folders = ("raw", "validated", "prepared")
    assert not {getattr(smoke.data, f) for f in folders} & {getattr(demo.data, f) for f in folders}
    layout = read_layout(ROOT / smoke.data.raw)
    assert len(layout.classes) == 4 and len(layout.images) == 36
    assert smoke.train.epochs == 1 and smoke.model.input_size <= 96


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_the_committed_smoke_set_is_what_tasn_data_synth_makes(smoke_data):  # noqa: F811
    """data/smoke is `tasn data synth` of the smoke profile, byte for byte (the tests' fixture
    makes it afresh), so it can always be made again and is what the tests run on."""
    generated = _files(smoke_data.parent / "raw")
    generated.pop("contact_sheet.png")
    assert _files(ROOT / load_config(ROOT / "params.yaml", "smoke").data.raw) == generated


def _cached_outputs(dvc_yaml: dict) -> list[str]:
    """The outputs dvc.yaml keeps in DVC's cache (`cache` not false)."""
    found = []
    for stage in dvc_yaml["stages"].values():
        for entry in (stage.get("outs") or []) + (stage.get("metrics") or []):
            path, options = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
            if (options or {}).get("cache", True):
                found.append(path)
    return found


def test_the_committed_run_is_in_the_in_repo_remote():
    """What a fresh clone's plain `dvc pull` fetches: the dataset and every cached output that
    dvc.lock names (the committed demo run's model, run files and pictures). Each object is in
    dvc-storage/, so the pull exits 0 and brings the run back whole (`make demo-results` puts
    them there after `make run`)."""
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())
    cached = set(_cached_outputs(yaml.safe_load((ROOT / "dvc.yaml").read_text())))
    hashes = {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])
              if out["path"] in cached}
    assert set(hashes) == cached, f"dvc.lock lacks {sorted(cached - set(hashes))}: regenerate it (make demo-results)"
    hashes["data/raw"] = yaml.safe_load((ROOT / "data.dvc").read_text())["outs"][0]["md5"]
    missing = {path: md5 for path, md5 in hashes.items()
               if not (REMOTE / "files" / "md5" / md5[:2] / md5[2:]).is_file()}
    assert not missing, f"not in {REMOTE.name}/ (run `make demo-results` and commit it): {missing}"


def test_the_vendored_web_assets_are_the_pinned_ones_with_their_licences():
    for package in offline.packages():
        folder = offline.VENDOR / f"{package['name']}@{package['version']}"
        assert package["integrity"].startswith("sha512-"), package["name"]
        for rel, digest in package["sha256"].items():
            assert hashlib.sha256((folder / rel).read_bytes()).hexdigest() == digest, f"{folder.name}/{rel}"
        assert sorted(package["sha256"]) == sorted(package["files"])
        notices = [rel for rel in package["files"] if "licen" in rel.lower()]
        assert notices or b"License" in (folder / package["files"][0]).read_bytes()[:400], package["name"]
    vendored = {f"{p['name']}@{p['version']}/{rel}" for p in offline.packages() for rel in p["files"]}
    assert set(offline.GX_CDN.values()) <= vendored and set(offline.PLOTS_SCRIPTS) <= vendored


def test_dvc_plots_show_loads_nothing_from_the_network():
    """`.dvc/config` gives `dvc plots show` a page template with Vega inlined: the page DVC fills
    has no CDN script (DVC's own go where its template says `{scripts}`, which this one lacks)."""
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    template = ROOT / ".dvc" / config["plots"]["html_template"]
    text = template.read_text()
    assert text == offline.plots_template()  # what scripts/vendor_web_assets.py writes from the vendored files
    page = HTML(text).with_scripts(VegaRenderer.SCRIPTS).with_element("<div id='plot'></div>").embed()
    assert "cdn.jsdelivr.net" in VegaRenderer.SCRIPTS and offline.remote_loads(page) == []
    for rel in offline.PLOTS_SCRIPTS:
        assert (offline.VENDOR / rel).read_text() in page
