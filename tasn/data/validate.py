"""`tasn validate`: the image manifest, a great-expectations suite over it, and a report people read.

The suite is the contract a raw dataset must meet before anything trains on it. Rules that are
about single images run over the manifest (one row per listed image; one more table holds every
file under images/, to catch unlisted ones); rules about the dataset as a whole run over small
per-class and per-split tables. Every failed rule names each offending file (or class) with the
value that broke it. Outputs (`summary.json`, `report.html`, `manifest.parquet`, and GX Data Docs
in `data_docs/`) go to the report directory atomically on success; on failure they go to
`<report-dir>-failed/` instead, so the last good report is never overwritten, and the command exits
non-zero. great-expectations is imported when the suite first runs (`_gx`): it takes seconds, and
nothing else needs it.

The suite as great-expectations users keep it: one GX suite file per table under `gx/expectations/`
(`tasn_images.json`, ...), generated from the rules below with params.yaml's bounds
(`tasn validate --write-suite`; tests/test_gx_suite.py fails when the files are not current), so a
change of a rule or a bound shows up in review as a diff of the suite. Values known only from the
data (the class ids of classes.txt) are GX suite parameters (`{"$PARAMETER": "class_ids"}`). Each
run renders its results as GX Data Docs (`data_docs/index.html`, which open offline: tasn.offline);
`report.html` is the page to open first: the verdict, each rule with its offenders explained, and
what Data Docs cannot show (the picture of image sizes and class balance, the per-class counts),
linking to the Data Docs pages.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd

from tasn.config import ValidateConfig, check
from tasn.config.schema import JPEG_MAX_SIDE
from tasn.data.layout import IMAGES_TXT, LABELS_TXT, SPLIT_TXT, read_layout
from tasn.data.manifest import build_manifest
from tasn.errors import DataError
from tasn.io import atomic_dir, atomic_write_json, atomic_write_text, check_apart, sweep_temps
from tasn.offline import localize_site

log = logging.getLogger(__name__)
MAX_LISTED = 50  # offenders spelled out per rule in the error message (all are in the report)

SUMMARY = "summary.json"  # the verdict, counts and every rule's offenders
REPORT = "report.html"  # the same for people, with a picture of the data
MANIFEST = "manifest.parquet"  # one row per file under images/ (what the rules ran on)
DATA_DOCS = "data_docs"  # GX Data Docs of the run: index.html, expectations/, validations/
FAILED_SUFFIX = "-failed"  # a failed run's report goes to <report-dir>-failed/
SUITE_DIR = Path("gx") / "expectations"  # the suite files, relative to the project (`--write-suite`)
SUITE_PREFIX = "tasn_"  # suite of table T: tasn_T, in SUITE_DIR/tasn_T.json
CLASS_IDS = "class_ids"  # the suite parameter holding the ids of classes.txt
SITE = "tasn"  # the Data Docs site's name


@dataclass(frozen=True)
class ValidateResult:
    report_dir: Path
    summary: dict[str, Any]  # what summary.json holds


def _gx() -> ModuleType:
    """great_expectations, imported on first use (it takes seconds; `tasn --help` and the other
    stages never need it) with its chatty INFO logging turned down."""
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations

    # this one module sets its own logger to INFO and says so for every context it makes
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    return great_expectations


@dataclass
class Rule:
    """One expectation, the table it runs on, and how to describe an offending row."""

    id: str
    title: str
    table: str  # images | files | classes | totals
    expectation: Callable  # () -> a great_expectations Expectation
    detail: Callable[[pd.Series], str]


def rules(cfg: ValidateConfig, class_ids: list[int]) -> list[Rule]:
    """The suite. `class_ids` are the ids of classes.txt (the valid label range)."""
    E = _gx().expectations
    lo, hi = (min(class_ids), max(class_ids)) if class_ids else (0, 0)
    need = max(1, cfg.min_images_per_class)
    return [
        Rule("exists", "every listed image exists", "images",
             lambda: E.ExpectColumnValuesToBeInSet(column="exists", value_set=[True]),
             lambda r: f"listed in {IMAGES_TXT} but missing"),
        Rule("listed", "every image file is listed", "files",
             lambda: E.ExpectColumnValuesToBeInSet(column="listed", value_set=[True]),
             lambda r: f"present but not listed in {IMAGES_TXT}"),
        Rule("unique_id", "image ids are unique", "images",
             lambda: E.ExpectColumnValuesToBeUnique(column="image_id"),
             lambda r: f"duplicate image id {r.image_id} in {IMAGES_TXT}"),
        Rule("has_label", "every image has a label", "images",
             lambda: E.ExpectColumnValuesToNotBeNull(column="class_id"),
             lambda r: f"image id {r.image_id} has no line in {LABELS_TXT}"),
        Rule("label_in_range", "labels are classes of classes.txt", "images",
             lambda: E.ExpectColumnValuesToBeInSet(column="class_id", value_set={"$PARAMETER": CLASS_IDS}),
             lambda r: f"label id {r.class_id} out of range (classes.txt has ids {lo}..{hi})"),
        Rule("has_split", "every image is in a split", "images",
             lambda: E.ExpectColumnValuesToNotBeNull(column="split"),
             lambda r: f"image id {r.image_id} has no line in {SPLIT_TXT}"),
        Rule("decodable", "every image decodes", "images",
             lambda: E.ExpectColumnValuesToBeInSet(column="decodable", value_set=[True]),
             lambda r: f"not decodable: {r.error}"),
        Rule("min_side", f"shorter side >= {cfg.min_side} px", "images",
             lambda: E.ExpectColumnValuesToBeBetween(column="min_side", min_value=cfg.min_side),
             lambda r: f"shorter side {r.min_side} px < {cfg.min_side} px ({r.width}x{r.height})"),
        Rule("max_pixels", f"at most {cfg.max_pixels / 1e6:g} Mpx per image", "images",
             lambda: E.ExpectColumnValuesToBeBetween(column="pixels", max_value=cfg.max_pixels),
             lambda r: f"{r.width}x{r.height} px = {r.pixels / 1e6:.1f} Mpx > validate.max_pixels "
                       f"({cfg.max_pixels / 1e6:g} Mpx); not decoded"),
        Rule("aspect_ratio", f"longer side / shorter side <= {cfg.max_aspect_ratio:g}", "images",
             lambda: E.ExpectColumnValuesToBeBetween(column="aspect", max_value=cfg.max_aspect_ratio),
             lambda r: f"{r.width}x{r.height} px: aspect ratio {r.aspect:.1f} > validate.max_aspect_ratio "
                       f"({cfg.max_aspect_ratio:g}); at preprocess.size its longer side could pass JPEG's "
                       f"{JPEG_MAX_SIDE} px"),
        Rule("unique_bytes", "no two images are identical", "images",
             lambda: E.ExpectColumnValuesToBeUnique(column="sha256"),
             lambda r: f"identical bytes to another listed image (sha256 {str(r.sha256)[:12]})"),
        Rule("no_leakage", "no identical image in both train and test", "images",
             lambda: E.ExpectColumnValuesToBeInSet(column="leak", value_set=[False]),
             lambda r: f"same image bytes in train and test (leakage; sha256 {str(r.sha256)[:12]})"),
        Rule("train_per_class", f"every class has >= {need} train image(s)", "classes",
             lambda: E.ExpectColumnValuesToBeBetween(column="n_train", min_value=need),
             lambda r: f"has {r.n_train} train image(s), needs >= {need}"),
        Rule("test_per_class", f"every class has >= {need} test image(s)", "classes",
             lambda: E.ExpectColumnValuesToBeBetween(column="n_test", min_value=need),
             lambda r: f"has {r.n_test} test image(s), needs >= {need}"),
        Rule("class_balance", f"largest/smallest class <= {cfg.max_class_imbalance:g} per split", "totals",
             lambda: E.ExpectColumnValuesToBeBetween(column="imbalance", max_value=cfg.max_class_imbalance),
             lambda r: f"{r.split} split: largest class / smallest class = {r.imbalance:.2f} "
                       f"> {cfg.max_class_imbalance:g}"),
        Rule("test_fraction", f"test fraction in [{cfg.test_fraction_min:g}, {cfg.test_fraction_max:g}]", "fraction",
             lambda: E.ExpectColumnValuesToBeBetween(column="test_fraction", min_value=cfg.test_fraction_min,
                                                     max_value=cfg.test_fraction_max),
             lambda r: f"test fraction {r.test_fraction:.3f} outside "
                       f"[{cfg.test_fraction_min:g}, {cfg.test_fraction_max:g}]"),
    ]


INDEX = {"images": "path", "files": "path", "classes": "class_dir", "totals": "split", "fraction": "name"}


def dataset_tables(manifest: pd.DataFrame, classes: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The tables the suite runs on: images, files, classes (counts per split), totals, fraction."""
    images = manifest[manifest["listed"]].reset_index(drop=True)
    counts = images.groupby(["class_id", "split"]).size().unstack(fill_value=0)
    per_class = classes.copy()
    for split in ("train", "test"):
        col = counts[split] if split in counts else pd.Series(dtype=int)
        per_class[f"n_{split}"] = [int(col.get(c, 0)) for c in per_class["class_id"]]
    totals = pd.DataFrame(
        [{"split": s, "images": int(per_class[f"n_{s}"].sum()),
          "imbalance": float(per_class[f"n_{s}"].max() / max(1, per_class[f"n_{s}"].min())) if len(per_class) else 0.0}
         for s in ("train", "test")]
    )
    n = int(totals["images"].sum())
    fraction = pd.DataFrame([{"name": "dataset", "test_fraction": float(totals["images"].iloc[1] / n) if n else 0.0}])
    return {"images": images, "files": manifest, "classes": per_class, "totals": totals, "fraction": fraction}


def _plain(df: pd.DataFrame) -> pd.DataFrame:
    """Object columns with None for missing values: what great-expectations' pandas engine expects."""
    return df.astype(object).where(df.notna(), None)


def _context() -> Any:
    """An in-memory great-expectations context, its progress bars off (GX needs an active
    context even to build a suite)."""
    gx = _gx()
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = gx.data_context.types.base.ProgressBarsConfig(globally=False,
                                                                                metric_calculations=False)
    return ctx


def suites(suite_rules: list[Rule]) -> dict[str, Any]:
    """One great-expectations ExpectationSuite per table (`tasn_<table>`), each expectation
    carrying its rule id (`meta.rule`) and title (`notes`, which Data Docs show). Call with a
    context active (`_context`)."""
    gx = _gx()
    out: dict[str, Any] = {}
    for rule in suite_rules:
        suite = out.setdefault(rule.table, gx.ExpectationSuite(
            name=SUITE_PREFIX + rule.table,
            notes=f"The rules `tasn validate` runs on its `{rule.table}` table (tasn/data/validate.py), with the "
                  "bounds of params.yaml `validate`; written by `tasn validate --write-suite`."))
        exp = rule.expectation()
        exp.meta = {"rule": rule.id}
        exp.notes = rule.title
        suite.add_expectation(exp)
    return out


def _without_ids(obj: Any) -> Any:
    """A suite's JSON without the random ids GX gives it and its expectations (stable files)."""
    if isinstance(obj, dict):
        return {k: _without_ids(v) for k, v in obj.items() if k != "id"}
    if isinstance(obj, list):
        return [_without_ids(v) for v in obj]
    return obj


def suite_files(cfg: ValidateConfig) -> dict[str, str]:
    """File name -> text of each GX suite file for `cfg`'s bounds (what `--write-suite` writes)."""
    _context()
    return {f"{suite.name}.json": json.dumps(_without_ids(suite.to_json_dict()), indent=2) + "\n"
            for suite in suites(rules(cfg, [])).values()}


def write_suite(cfg: ValidateConfig, dest: str | os.PathLike[str] = SUITE_DIR) -> list[Path]:
    """Write the suite files to `dest` (default gx/expectations), removing stale tasn_*.json."""
    check(cfg, "validate.")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    files = suite_files(cfg)
    for old in dest.glob(f"{SUITE_PREFIX}*.json"):
        if old.name not in files:
            old.unlink()
    return [atomic_write_text(dest / name, text) for name, text in files.items()]


@dataclass
class SuiteRun:
    """The results of one run of the suite, one per rule with its offenders, and the
    great-expectations context that holds them (for the Data Docs)."""

    results: list[dict[str, Any]]
    context: Any

    def write_data_docs(self, dest: Path) -> None:
        """Render the run as GX Data Docs in `dest` (index.html, one page per suite and result)."""
        self.context.add_data_docs_site(site_name=SITE, site_config={
            "class_name": "SiteBuilder", "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(dest.resolve())}})
        self.context.build_data_docs(site_names=[SITE])
        localize_site(dest)  # the pages load their scripts and styles from the site, not from CDNs


def run_suite(tables: dict[str, pd.DataFrame], suite_rules: list[Rule],
              parameters: dict[str, Any] | None = None) -> SuiteRun:
    """Run every rule through great-expectations (`parameters`: the suite parameters, e.g.
    class_ids); one result per rule with its offenders."""
    gx = _gx()
    ctx = _context()
    source = ctx.data_sources.add_pandas("tasn")
    built = suites(suite_rules)
    run_id = gx.core.run_identifier.RunIdentifier(run_name="tasn-validate")  # Data Docs' run name
    results = []
    for name, table in tables.items():
        if name not in built:
            continue
        mine = [r for r in suite_rules if r.table == name]
        batch_def = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        definition = ctx.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch_def, suite=ctx.suites.add(built[name])))
        key = INDEX[name]
        outcome = definition.run(batch_parameters={"dataframe": _plain(table)}, expectation_parameters=parameters,
                                 result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [key]},
                                 run_id=run_id)
        by_rule = {r.expectation_config.meta["rule"]: r for r in outcome.results}
        lookup = table.drop_duplicates(subset=[key]).set_index(key, drop=False)
        for rule in mine:
            res = by_rule[rule.id]
            if res.exception_info and res.exception_info.get("raised_exception"):
                reason = res.exception_info.get("exception_message")
                raise DataError(f"validation rule {rule.id} could not run: {reason}")
            keys = [] if res.success else [d[key] for d in res.result.get("unexpected_index_list") or []]
            prefix = "images/" if key == "path" else ""
            offenders = [f"{prefix}{k}: {rule.detail(lookup.loc[k])}" for k in dict.fromkeys(keys)]
            results.append({"id": rule.id, "rule": rule.title, "passed": bool(res.success), "offenders": offenders})
    return SuiteRun(results, ctx)


def _picture(manifest: pd.DataFrame, per_class: pd.DataFrame) -> str:
    """Image sizes and per-class counts as a base64 PNG for the HTML report."""
    matplotlib.use("Agg")  # no display
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    ok = manifest.dropna(subset=["width", "height"])
    axes[0].scatter(ok["width"].astype(float), ok["height"].astype(float), s=6, alpha=0.6)
    axes[0].set(xlabel="width (px)", ylabel="height (px)", title="image sizes")
    x = range(len(per_class))
    axes[1].bar(x, per_class["n_train"], label="train")
    axes[1].bar(x, per_class["n_test"], bottom=per_class["n_train"], label="test")
    axes[1].set(xlabel="class id", ylabel="images", title="images per class")
    axes[1].legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def render_html(summary: dict[str, Any], tables: dict[str, pd.DataFrame]) -> str:
    """A self-contained page: verdict, one line per rule, offenders, per-class counts, a picture."""
    e = html.escape
    verdict = "PASSED" if summary["passed"] else "FAILED"
    colour = "#1a7f37" if summary["passed"] else "#cf222e"
    rows = "".join(
        f"<tr><td>{'&#10003;' if r['passed'] else '&#10007;'}</td><td>{e(r['rule'])}</td>"
        f"<td>{len(r['offenders'])}</td></tr>"
        for r in summary["rules"]
    )
    failures = "".join(
        f"<h3>{e(r['rule'])} <small>({e(r['id'])})</small></h3><ul>"
        + "".join(f"<li><code>{e(o)}</code></li>" for o in r["offenders"]) + "</ul>"
        for r in summary["rules"] if not r["passed"]
    )
    per_class = tables["classes"][["class_id", "class_dir", "n_train", "n_test"]].to_html(index=False, border=0)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>tasn validate: {e(summary['data'])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}} table{{border-collapse:collapse}}
td,th{{padding:.2em .8em;border-bottom:1px solid #ddd;text-align:left}} .v{{color:{colour}}}</style></head><body>
<h1>Data validation: <span class="v">{verdict}</span></h1>
<p><code>{e(summary['data'])}</code>: {summary['images']} images ({summary['train']} train, {summary['test']} test),
{summary['classes']} classes, {summary['files']} files under images/.
{summary['failed_rules']} of {len(summary['rules'])} rules failed.</p>
<h2>Rules</h2><table><tr><th></th><th>rule</th><th>offenders</th></tr>{rows}</table>
<p>The great-expectations results, expectation by expectation:
<a href="{DATA_DOCS}/index.html">Data Docs</a>.</p>
{'<h2>Failures</h2>' + failures if failures else ''}
<h2>Data</h2><img alt="image sizes and class counts"
 src="data:image/png;base64,{_picture(tables['images'], tables['classes'])}">
<h2>Classes</h2>{per_class}
</body></html>
"""


def failed_dir(report_dir: str | os.PathLike[str]) -> Path:
    """Where a failed run's report goes, beside the last good one."""
    report_dir = Path(report_dir)
    return report_dir.with_name(report_dir.name + FAILED_SUFFIX)


def validate(data_dir: str | os.PathLike[str], report_dir: str | os.PathLike[str],
             cfg: ValidateConfig) -> ValidateResult:
    """Validate the raw dataset at `data_dir`; write the report to `report_dir`; raise DataError
    (the report then goes to `<report_dir>-failed`) if any rule fails."""
    check(cfg, "validate.")
    start = time.perf_counter()
    for target in (Path(report_dir), failed_dir(report_dir)):
        check_apart(data_dir, target, DataError, "--report-dir")
        sweep_temps(target)  # what killed runs left
    layout = read_layout(data_dir)
    manifest = build_manifest(layout, cfg.workers, cfg.max_pixels)
    tables = dataset_tables(manifest, layout.classes)
    class_ids = [int(c) for c in layout.classes["class_id"]]
    run = run_suite(tables, rules(cfg, class_ids), {CLASS_IDS: class_ids})
    results = run.results
    failed = [r for r in results if not r["passed"]]
    images = tables["images"]
    summary = {
        "passed": not failed,
        "data": str(Path(data_dir)),
        "images": len(images),
        "files": int(manifest["exists"].fillna(False).sum()),
        "classes": len(layout.classes),
        "train": int((images["split"] == "train").sum()),
        "test": int((images["split"] == "test").sum()),
        "bytes": int(manifest["bytes"].fillna(0).sum()),
        "failed_rules": len(failed),
        "rules": results,
    }
    out = failed_dir(report_dir) if failed else Path(report_dir)
    with atomic_dir(out) as tmp:
        manifest.to_parquet(tmp / MANIFEST, index=False)
        atomic_write_text(tmp / REPORT, render_html(summary, tables))
        atomic_write_json(tmp / SUMMARY, summary)
        run.write_data_docs(tmp / DATA_DOCS)
    log.info("validated %d images in %.1f s: %s", len(images), time.perf_counter() - start,
             "passed" if not failed else "FAILED")
    if failed:
        lines = ([f"[{r['id']}] {o}" for r in failed for o in r["offenders"]]
                 or [f"[{r['id']}] {r['rule']}" for r in failed])
        more = f"\n  ... and {len(lines) - MAX_LISTED} more" if len(lines) > MAX_LISTED else ""
        raise DataError(
            f"{data_dir}: {len(failed)} validation rule(s) failed ({', '.join(r['id'] for r in failed)}); "
            f"report: {out / REPORT} ({Path(report_dir)} left as it was)\n  " + "\n  ".join(lines[:MAX_LISTED]) + more
        )
    if failed_dir(report_dir).exists():  # a stale failure report would contradict this pass
        shutil.rmtree(failed_dir(report_dir))
    return ValidateResult(Path(report_dir), summary)
