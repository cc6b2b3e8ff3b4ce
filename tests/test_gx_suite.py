"""The great-expectations suite as GX users keep it: suite files in the repository that are current
with the rules and params.yaml's bounds, loadable by GX, and every run rendered as GX Data Docs."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import great_expectations as gx
import pytest

from fixtures.data_smoke import smoke_config, smoke_data  # noqa: F401  (fixture)
from tasn import offline
from tasn.config import load_config
from tasn.data import validate as validation
from tasn.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
SUITES = ROOT / validation.SUITE_DIR


def test_the_suite_files_are_current():
    """What `tasn validate --write-suite` would write from the rules and params.yaml is what the
    repository holds: a changed rule or bound shows up in review as a diff of these files."""
    want = validation.suite_files(load_config(ROOT / "params.yaml").validate)
    have = {p.name: p.read_text() for p in SUITES.glob(f"{validation.SUITE_PREFIX}*.json")}
    assert have == want, "gx/expectations is stale: run `tasn validate --write-suite` and commit the result"


def test_the_suite_files_are_gx_suites_with_every_rule_and_params_bounds():
    cfg = load_config(ROOT / "params.yaml").validate
    gx.get_context(mode="ephemeral")
    rules = {r.id: r for r in validation.rules(cfg, [])}
    seen = {}
    for path in sorted(SUITES.glob("*.json")):
        suite = gx.ExpectationSuite(**json.loads(path.read_text()))
        table = suite.name.removeprefix(validation.SUITE_PREFIX)
        for exp in suite.expectations:
            seen[exp.meta["rule"]] = (table, exp)
    assert set(seen) == set(rules)
    for rule_id, (table, exp) in seen.items():
        assert rules[rule_id].table == table and exp.notes == rules[rule_id].title
    assert seen["min_side"][1].min_value == cfg.min_side
    assert seen["label_in_range"][1].value_set == {"$PARAMETER": validation.CLASS_IDS}  # known from the data


def test_write_suite_writes_the_files_and_drops_stale_ones(tmp_path):
    stale = tmp_path / f"{validation.SUITE_PREFIX}gone.json"
    stale.write_text("{}")
    (tmp_path / "mine.json").write_text("{}")  # not ours: kept
    written = validation.write_suite(load_config(ROOT / "params.yaml", None, ["validate.min_side=80"]).validate,
                                     tmp_path)
    assert {p.name for p in written} == set(validation.suite_files(smoke_config().validate))
    assert not stale.exists() and (tmp_path / "mine.json").exists()
    images = json.loads((tmp_path / f"{validation.SUITE_PREFIX}images.json").read_text())
    (bound,) = [e["kwargs"]["min_value"] for e in images["expectations"] if e["meta"]["rule"] == "min_side"]
    assert bound == 80


def test_a_run_is_rendered_as_gx_data_docs(smoke_data, tmp_path):  # noqa: F811
    """A failing run (most smoke images are under 200 px): the report beside the data links GX
    Data Docs, whose validation pages show each suite's results with the offending files, and
    load their scripts and styles from the site (tasn.offline), not from CDNs."""
    raw = smoke_data.parent / "raw"
    cfg = smoke_config("validate.min_side=200", "validate.workers=1").validate
    with pytest.raises(DataError, match=r"\[min_side\]"):
        validation.validate(raw, tmp_path / "report", cfg)
    out = validation.failed_dir(tmp_path / "report")
    docs = out / validation.DATA_DOCS
    index = (docs / "index.html").read_text()
    pages = sorted((docs / "validations").rglob("*.html"))
    assert {p.parent.parent.parent.name for p in pages} == {f"{validation.SUITE_PREFIX}{t}" for t in
                                                             ("images", "files", "classes", "totals", "fraction")}
    assert all(p.relative_to(docs).as_posix() in index for p in pages)  # the index lists every result
    (images,) = [p for p in pages if p.parent.parent.parent.name == f"{validation.SUITE_PREFIX}images"]
    text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", images.read_text())))
    (min_side,) = [r for r in json.loads((out / validation.SUMMARY).read_text())["rules"] if r["id"] == "min_side"]
    assert f"greater than or equal to 200.0 . {len(min_side['offenders'])} unexpected values found" in text
    files = [o.split(":")[0].removeprefix("images/") for o in min_side["offenders"]]
    assert sum(f in text for f in files) >= min(len(files), 10)  # the offending files, as GX lists them
    assert f'href="{validation.DATA_DOCS}/index.html"' in (out / validation.REPORT).read_text()
    # and the pages open offline: every script and stylesheet is the site's own vendored copy
    for page in [docs / "index.html", *pages]:
        assert offline.remote_loads(page.read_text()) == [], page
        for ref in re.findall(r'(?:src|href)="(\.[^"]*static/vendor/[^"]+)"', page.read_text()):
            assert (page.parent / ref).resolve().is_file(), (page, ref)
    assert len(re.findall(r"static/vendor/", index)) == 15  # all that GX's page template loads
