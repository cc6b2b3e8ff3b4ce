"""Re-make docs/images/mlflow_compare.png: the MLflow UI comparing a TASN run and a baseline run.

Everything is real and local: a `mlflow server --workers 1` on loopback, a TASN and a baseline run
that learned, then headless Chromium opens the MLflow compare-runs page, shows only the parameters
that differ, and saves a screenshot. Needs Debian's `chromium`.

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
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mlflow
import websocket

from tasn.config import load_config
from tasn.data.dvc_remote import materialize
from tasn.data.preprocess import preprocess
from tasn.evaluate import evaluate
from tasn.io import atomic_write_bytes
from tasn.training import train
from tasn.training.outputs import MODEL

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, store: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on the sqlite file `store`; its log and any new artifacts under `root`."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--workers", "1", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{store.resolve()}", "--artifacts-destination", str(root / "artifacts")],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mlflow server exited: see {root / 'server.log'}")
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.5)
    raise SystemExit("mlflow server did not start within 180 s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


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
    """Headless Chromium driven over the DevTools protocol (websocket-client, a kfp dependency):
    load the compare page, tidy it, capture from the top to the Artifacts section."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("chromium not found: apt-get install chromium")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        proc = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},1200",
             f"--remote-debugging-port={port}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2))
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("chromium's DevTools endpoint did not answer") from None
                    time.sleep(0.3)
            page = next(t for t in targets if t["type"] == "page")
            ws = websocket.create_connection(page["webSocketDebuggerUrl"], suppress_origin=True, timeout=120)
            counter = iter(range(1, 1_000_000))

            def call(method: str, **params):
                msg_id = next(counter)
                ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
                while True:
                    msg = json.loads(ws.recv())
                    if msg.get("id") == msg_id:
                        return msg.get("result", {})

            def js(expr: str):
                return call("Runtime.evaluate", expression=expr, returnByValue=True).get("result", {}).get("value")

            call("Page.navigate", url=url)
            deadline = time.monotonic() + wait_s
            while not js("!!document.body && document.body.innerText.includes('Run details')"):
                if time.monotonic() > deadline:
                    raise SystemExit(f"the MLflow compare page did not render within {wait_s:.0f} s")
                time.sleep(0.5)
            time.sleep(3)  # metrics tables fill in after the header
            call("Emulation.setDeviceMetricsOverride", width=width, height=5000, deviceScaleFactor=1, mobile=False)
            js(TIDY_JS)
            time.sleep(3)
            bottom = js(BOTTOM_JS) or 1400
            shot = call("Page.captureScreenshot", format="png",
                        clip={"x": 0, "y": 0, "width": width, "height": int(bottom) - 20, "scale": 1})
            atomic_write_bytes(out, base64.b64decode(shot["data"]))
            ws.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)


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
    proc, url = start_server(work, work / "mlflow.db")
    try:
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
        stop_server(proc)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
