"""Re-make docs/images/mlflow_compare.png: the MLflow UI comparing a TASN run and a baseline run.

Everything is real and local: a `mlflow server --workers 1` on loopback, a TASN and a baseline run
that learned, then headless Chromium opens the MLflow compare-runs page, shows only the parameters
that differ, and saves a screenshot. Needs Debian's `chromium` (driven by scripts/browser.py).

Where the runs come from:
- by default, trained here: the CPU demo (params.yaml's top level) on the embedded set (read from
  the in-repo DVC remote), one TASN and one baseline run (`tasn.training.train`), each evaluated
  on the test split (`tasn.evaluate.evaluate`, which logs the `test_*` metrics to its run), in a
  sqlite store in a temporary folder (about 7 minutes on 2 CPU cores);
- with `--store mlflow.db --runs TASN_ID BASELINE_ID`: two runs already in a local store, e.g.
  `make run`'s TASN run and a `tasn train -S model.kind=baseline` beside it (the server gets a copy
  of the store, so the original is left as it is).

    .venv/bin/python scripts/mlflow_compare_screenshot.py [--out docs/images/mlflow_compare.png]
        [--epochs N] [--keep DIR] [--store mlflow.db --runs TASN_ID BASELINE_ID]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mlflow
from browser import browser, free_port, serving

from tasn.config import load_config
from tasn.data.dvc_remote import materialize
from tasn.data.preprocess import preprocess
from tasn.evaluate import evaluate
from tasn.io import atomic_write_bytes
from tasn.training import train
from tasn.training.outputs import MODEL


def server_command(root: Path, store: Path, port: int) -> list[str]:
    """`mlflow server` on the sqlite file `store`, any new artifacts under `root`."""
    return [sys.executable, "-m", "mlflow", "server", "--workers", "1", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{store.resolve()}", "--artifacts-destination", str(root / "artifacts")]


def train_and_evaluate(kind: str, data: Path, work: Path, url: str, epochs: int | None) -> str:
    """One demo training run of `kind`, evaluated and logged; returns the run id."""
    cfg = load_config(ROOT / "params.yaml", None, [
        f"model.kind={kind}", f"tracking.uri={url}", "tracking.experiment=tasn-vs-baseline",
        "tracking.system_metrics=false", "evaluate.timing_batches=2",
        *([f"train.epochs={epochs}"] if epochs is not None else []),
    ])
    out = work / kind
    run_id = train(cfg, data, out / "train").run.run_id
    assert run_id is not None
    evaluate(cfg, data, str(out / "train" / MODEL), out / "evaluate", run_id=run_id)
    return run_id


# Run in the page once it has loaded: only differing params, no assistant panel, no plot.
TIDY_JS = """(() => {
  const click = sel => { const e = document.querySelector(sel); if (e) e.click(); return !!e; };
  click('button[aria-label="Parameters - Show diff only"]');
  click('button[data-component-id="mlflow.assistant.chat_panel.close"]');
  const viz = Array.from(document.querySelectorAll('*'))
    .filter(e => e.innerText && e.innerText.trim() === 'Visualizations');
  if (viz.length) viz[viz.length - 1].click();
  return true;
})()"""
BOTTOM_JS = """(() => { const m = Array.from(document.querySelectorAll('*'))
  .filter(e => e.innerText && e.innerText.trim() === 'Artifacts');
  return m.length ? m[m.length - 1].getBoundingClientRect().top : null; })()"""


def screenshot(url: str, out: Path, width: int, wait_s: float) -> None:
    """Headless Chromium (scripts/browser.py): load the compare page, tidy it, capture from the top
    to the Artifacts section."""
    with browser(width) as page:
        page.open(url, width, 1200)
        page.wait_for("!!document.body && document.body.innerText.includes('Run details')", wait_s,
                      "the MLflow compare page rendering")
        time.sleep(3)  # metrics tables fill in after the header
        page.call("Emulation.setDeviceMetricsOverride", width=width, height=5000, deviceScaleFactor=1, mobile=False)
        page.js(TIDY_JS)
        time.sleep(3)
        bottom = page.js(BOTTOM_JS) or 1400
        shot = page.shot(out.with_suffix(".tmp.png"), width, int(bottom) - 20)
        atomic_write_bytes(out, shot.read_bytes())
        shot.unlink()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs/images/mlflow_compare.png"))
    ap.add_argument("--epochs", type=int, default=None, help="default: the demo's train.epochs")
    ap.add_argument("--store", type=Path, default=None, help="an existing sqlite MLflow store holding --runs")
    ap.add_argument("--runs", nargs=2, metavar=("TASN_ID", "BASELINE_ID"), default=None,
                    help="compare these runs of --store instead of training two")
    ap.add_argument("--width", type=int, default=1600, help="browser window width")
    ap.add_argument("--wait", type=float, default=120, help="seconds allowed for the page to render")
    ap.add_argument("--keep", default=None, help="keep the work folder here instead of a temporary one")
    args = ap.parse_args()
    if (args.store is None) != (args.runs is None):
        ap.error("--store and --runs go together")
    if args.store is not None and not args.store.is_file():
        ap.error(f"--store {args.store}: no such file")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ["MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"] = "false"
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        os.environ.pop(name, None)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mlflow-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.store is not None:
        shutil.copyfile(args.store, work / "mlflow.db")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        with serving(server_command(work, work / "mlflow.db", port), url + "/health", work / "server.log", work):
            if args.runs:
                runs = list(args.runs)
            else:
                cfg = load_config(ROOT / "params.yaml")
                raw = materialize(ROOT / "data.dvc", ROOT / "dvc-storage", work / "raw")
                preprocess(raw, work / "prepared", cfg.preprocess)
                runs = [train_and_evaluate(kind, work / "prepared", work, url, args.epochs)
                        for kind in ("tasn", "baseline")]
            exp = mlflow.MlflowClient(url).get_run(runs[0]).info.experiment_id
            page = f"{url}/#/compare-runs?runs={json.dumps(runs)}&experiments={json.dumps([exp])}"
            print("comparing", page)
            screenshot(page, Path(args.out), args.width, args.wait)
            print("wrote", args.out)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
