"""Retake the README's walk through the local loop on a fresh clone, timing each step and retaking
the pictures the README shows, looked at through headless Chromium (scripts/browser.py; Debian's
`chromium`):

  make run's pipeline (scripts/run_pipeline.sh) -> mlflow ui (docs/images/mlflow_runs.png) ->
  dvc metrics show / dvc exp show -> dvc plots show, offline (docs/images/dvc_plots.png) ->
  dvc exp run + dvc exp apply -> tasn predict -> mlflow models serve -> tasn pipeline run-local
  --profile smoke -> a baseline run beside make run's, and the MLflow compare view
  (docs/images/mlflow_compare.png, scripts/mlflow_compare_screenshot.py)

The clone is of HEAD (commit first), with this checkout's .venv linked in (the venv present, as
the README's figures say; `make install` adds about 3 minutes on a fresh machine). Each step's
wall time, what it showed and the load average go to a table, written to the README between its
`readme-walk` markers and to a report (default outputs/readme_walk.md). About 25 minutes on 2
quiet cores.

    .venv/bin/python scripts/readme_walk.py [--keep DIR] [--report outputs/readme_walk.md] [--no-images]
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from browser import browser, free_port, serving
from machine import load, machine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasn.tracking import runs_page

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
MARK_START, MARK_END = "<!-- readme-walk:start -->", "<!-- readme-walk:end -->"


class Walk:
    """The clone, its environment, and the report's rows."""

    def __init__(self, clone: Path, images: bool):
        self.clone, self.images = clone, images
        self.commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True,
                                     text=True, check=True).stdout.strip()
        self.rows: list[tuple[str, float, str, str]] = []
        bin_dir = clone / ".venv" / "bin"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
        self.env.update({"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(clone),
                         "DVC_NO_ANALYTICS": "1", "OMP_WAIT_POLICY": "PASSIVE", "GIT_AUTHOR_NAME": "readme-walk",
                         "GIT_AUTHOR_EMAIL": "walk@localhost", "GIT_COMMITTER_NAME": "readme-walk",
                         "GIT_COMMITTER_EMAIL": "walk@localhost"})

    def run(self, step: str, cmd: list[str], timeout: float = 3600) -> subprocess.CompletedProcess:
        """Run `cmd` in the clone (not on a terminal, as a log or CI sees it); record its wall time."""
        before, start = load(), time.monotonic()
        proc = subprocess.run(cmd, cwd=self.clone, env=self.env, capture_output=True, text=True, timeout=timeout)
        seconds = time.monotonic() - start
        if proc.returncode != 0:
            raise SystemExit(f"{step}: `{' '.join(cmd)}` exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
        self.record(step, seconds, "", before)
        return proc

    def record(self, step: str, seconds: float, shows: str, before: str | None = None) -> None:
        self.rows.append((step, seconds, shows, f"{before or load()} -> {load().split(' ', 2)[-1]}"))
        print(f"{step}: {seconds:.0f} s {shows}", flush=True)

    def note(self, shows: str) -> None:
        """Add what the last step showed."""
        step, seconds, old, loads = self.rows[-1]
        self.rows[-1] = (step, seconds, "; ".join(x for x in (old, shows) if x), loads)
        print(f"  {shows}", flush=True)

    def table(self) -> str:
        """The README's table: each step, its wall time, what it showed, the machine and load."""
        when = time.strftime("%Y-%m-%d")
        lines = [f"{when}, a fresh clone of `{self.commit}` with the venv present, on {machine()}:",
                 "", "| step | wall time | what it showed | load average before -> after |", "|---|---|---|---|"]
        for step, seconds, shows, loads in self.rows:
            lines.append(f"| {step} | {_duration(seconds)} | {shows} | {loads} |")
        return "\n".join(lines) + "\n"


def update_readme(table: str) -> None:
    """Put the walk's table between the README's readme-walk markers."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = text.index(MARK_START) + len(MARK_START), text.index(MARK_END)
    readme.write_text(text[:start] + "\n" + table + text[end:])


def _duration(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:02.0f} s" if seconds >= 60 else f"{seconds:.0f} s"


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_run(walk: Walk) -> None:
    """A plain `dvc pull` (the sample and the committed run), `make run`'s pipeline, and its results
    committed, as the README says (the experiment step comes back to this commit)."""
    walk.run("dvc pull (the sample and the committed run)", ["dvc", "pull"])
    pulled = (walk.clone / "outputs/train/model.pt").is_file()
    walk.note(f"exit 0, the committed run's model.pt {'there' if pulled else 'MISSING'}")
    walk.run("make run (dvc repro: validate, preprocess, train, evaluate, register)",
             ["./scripts/run_pipeline.sh"])
    reg = json.loads((walk.clone / "outputs/register/registration.json").read_text())
    walk.note(f"`{reg['name']}` v{reg['version']}: {reg['decision']}, {reg['primary_metric']} {reg['candidate']:.3f}")
    walk.run("git commit (dvc.lock, outputs/)", ["sh", "-c", "git add dvc.lock outputs && git commit -qm 'make run'"])


def mlflow_ui(walk: Walk) -> None:
    """`mlflow ui` as the README says; what its first page and the experiment page show."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = ["mlflow", "ui", "--backend-store-uri", "sqlite:///mlflow.db", "--host", "127.0.0.1", "--port", str(port)]
    with serving(cmd, url + "/health", walk.clone / "mlflow-ui.log", walk.clone, walk.env) as seconds:
        walk.record("mlflow ui (until it answers)", seconds, "")
        exp = json.load(urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=tasn"))
        exp = exp["experiment"]
        kind = {t["key"]: t["value"] for t in exp.get("tags", [])}.get("mlflow.experimentKind")
        with browser(1600) as page:
            page.open(f"{url}/#/experiments/{exp['experiment_id']}", 1600, 1000)  # the plain address
            page.wait_for("/workflowType=/.test(location.hash)", 120, "the experiment page choosing its pages")
            plain = page.js("location.hash").split("?")[0]
            page.open(runs_page(exp["experiment_id"], url), 1600, 1000)  # what make run prints
            page.wait_for("document.body && /Run Name/.test(document.body.innerText)", 120,
                          "the experiment's runs table")
            page.js("document.querySelector('button[data-component-id=\"mlflow.assistant.chat_panel.close\"]')?.click()")
            time.sleep(4)
            opened = page.js("location.hash").split("?")[0]
            if walk.images:
                page.shot(IMAGES / "mlflow_runs.png", 1600, 900)
        walk.note(f"experiment `tasn` (kind {kind}): its plain address opens on {plain}, the address make run "
                  f"prints on {opened}")


def dvc_tables(walk: Walk) -> None:
    shown = walk.run("dvc metrics show", ["dvc", "metrics", "show"]).stdout
    walk.note(f"{max(len(line) for line in shown.splitlines())} columns wide")
    table = list(csv.DictReader(io.StringIO(walk.run("dvc exp show --csv", ["dvc", "exp", "show", "--csv"]).stdout)))
    only = walk.run("dvc exp show --only-changed", ["dvc", "exp", "show", "--only-changed"]).stdout
    walk.note(f"{len(table[0])} columns in --csv; --only-changed {max(len(line) for line in only.splitlines())} "
              "columns wide")


def dvc_plots(walk: Walk) -> None:
    walk.run("dvc plots show", ["dvc", "plots", "show"])
    with browser(1400, offline=True) as page:
        page.open((walk.clone / "dvc_plots" / "index.html").as_uri(), 1400, 1000)
        page.wait_for("document.readyState === 'complete'", 60, "the plots page loading")
        time.sleep(5)
        charts = page.js("document.querySelectorAll('.vega-embed .marks').length")
        pictures = page.js("Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length")
        if walk.images:
            page.shot(IMAGES / "dvc_plots.png", 1400, 1150)
    walk.note(f"offline: {charts} Vega charts and {pictures} pictures drawn")


def experiment(walk: Walk) -> None:
    walk.run("dvc exp run -S train.lr=0.05", ["dvc", "exp", "run", "-n", "walk-lr", "-S", "train.lr=0.05"])
    model = walk.clone / "outputs/train/model.pt"
    made = _md5(model)
    back = ["sh", "-c", "git checkout -q . && dvc checkout -q"]
    walk.run("git checkout . && dvc checkout (back to the commit)", back)
    walk.note(f"model.pt {'restored' if _md5(model) != made else 'NOT restored'}")
    walk.run("dvc exp apply walk-lr", ["dvc", "exp", "apply", "walk-lr"])
    status = walk.run("dvc status", ["dvc", "status", "--json"]).stdout.strip()
    walk.note(f"model.pt {'is' if _md5(model) == made else 'is NOT'} the experiment's, dvc status {status}")
    walk.run("back to the commit", back)


def predict_and_serve(walk: Walk) -> None:
    images = sorted((walk.clone / "data/raw/images").rglob("*.jpg"))[:2]
    out = walk.run("tasn predict (2 images, models:/tasn@staging)",
                   ["tasn", "predict", *map(str, images), "--model", "models:/tasn@staging", "--topk", "1",
                    "--json"]).stdout
    walk.note(", ".join(f"{Path(r['image']).parent.name} -> {r['class_name']}" for r in json.loads(out)))
    port = free_port()
    cmd = ["mlflow", "models", "serve", "-m", "models:/tasn@staging", "--env-manager", "local", "-p", str(port)]
    walk.env["MLFLOW_TRACKING_URI"] = "sqlite:///mlflow.db"
    try:
        with serving(cmd, f"http://127.0.0.1:{port}/ping", walk.clone / "serve.log", walk.clone, walk.env) as seconds:
            body = json.dumps({"dataframe_records": [{"image": base64.b64encode(images[0].read_bytes()).decode()}]})
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body.encode(),
                                             {"Content-Type": "application/json"})
            answer = json.load(urllib.request.urlopen(request, timeout=120))["predictions"][0]
            walk.record("mlflow models serve (until it answers /ping)", seconds, f"POST -> {answer['class_name']}")
    finally:
        walk.env.pop("MLFLOW_TRACKING_URI")


def smoke(walk: Walk) -> None:
    proc = walk.run("tasn pipeline run-local --profile smoke", ["tasn", "pipeline", "run-local", "--profile", "smoke"])
    text = proc.stdout + proc.stderr
    walk.note(f"{len(text.splitlines())} lines of output, {'no' if not ANSI.search(text) else 'WITH'} ANSI codes")


def compare(walk: Walk) -> None:
    """A baseline run beside make run's, evaluated, and the MLflow compare view of the two."""
    walk.run("a baseline run (tasn train -S model.kind=baseline, tasn evaluate)", [
        "sh", "-c", "tasn train --data data/prepared --out outputs/baseline -S model.kind=baseline && "
                    "tasn evaluate --data data/prepared --model outputs/baseline/model.pt --out outputs/baseline-eval "
                    "--run-json outputs/baseline/run.json"])
    runs = [json.loads((walk.clone / f"outputs/{d}/run.json").read_text())["run_id"] for d in ("train", "baseline")]
    if walk.images:
        walk.run("the MLflow compare screenshot", [sys.executable, str(ROOT / "scripts/mlflow_compare_screenshot.py"),
                                                   "--store", "mlflow.db", "--runs", *runs,
                                                   "--out", str(IMAGES / "mlflow_compare.png")])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", default=None, help="clone here and keep it (default: a temporary folder)")
    ap.add_argument("--report", default=str(ROOT / "outputs" / "readme_walk.md"))
    ap.add_argument("--no-images", dest="images", action="store_false",
                    help="time the walk only: leave docs/images and README.md as they are")
    args = ap.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="readme-walk-"))
    clone = work / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    (clone / ".venv").symlink_to(ROOT / ".venv")
    walk = Walk(clone, args.images)
    try:
        for step in (make_run, mlflow_ui, dvc_tables, dvc_plots, experiment, predict_and_serve, smoke, compare):
            step(walk)
        if args.images:
            update_readme(walk.table())
    finally:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(f"# README walk\n\n{walk.table()}")
        print(f"wrote {args.report}")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
