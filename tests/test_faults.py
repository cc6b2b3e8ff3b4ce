"""Kills and crashes: what SIGKILL and SIGTERM (Kubernetes, `timeout`) mid-stage leave behind.

A stage is run as its own process (`tests/fixtures/hold.py`, i.e. `tasn` with one function held
forever, so the kill lands at a known point: a worker decoding image 8, or validate writing its
report) with two workers, and killed. Then: the previous output is exactly as it was, no process
the stage started is left, a concurrent sweep did not touch the live run's temporary, and the next
run leaves no temporary behind. Also the pieces on their own: `atomic_dir` never lets a reader find
the output missing, and `sweep_temps` removes only what nobody holds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import pytest
import torch

from fixtures.hold import HOLD, MATCH, REACHED
from tasn import tracking
from tasn.cli import main
from tasn.config import TrackingConfig, load_config
from tasn.data import parallel
from tasn.io import EVALUATED, MODEL_SHA256, STAGING_GRACE_S, atomic_dir, exchange, file_sha256, sweep_temps
from tasn.model import build_model
from tasn.training.outputs import METRICS, MODEL, RUN, write_outputs
from test_data_support import tree_with_outputs

ROOT = Path(__file__).resolve().parents[1]
HOLD_SCRIPT = ROOT / "tests" / "fixtures" / "hold.py"
PARAMS = "validate: {min_side: 32, workers: 2}\npreprocess: {size: 64, workers: 2}\nmodel: {input_size: 48}\n"
STAGE_ARGS = {
    "preprocess": ["preprocess", "--params", "params.yaml", "--data", "raw", "--out", "prep"],
    "validate": ["validate", "--params", "params.yaml", "--data", "raw", "--report-dir", "report"],
}
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    in_process = ["-S", "validate.workers=1", "-S", "preprocess.workers=1"]
    return tree_with_outputs(tmp_path_factory.mktemp("faults"), PARAMS,
                             [[*argv, *in_process] for argv in STAGE_ARGS.values()])


@pytest.fixture
def tree(good, tmp_path, monkeypatch):
    shutil.copytree(good, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def start_held(argv: list[str], hold: str, match: str, reached: Path) -> subprocess.Popen:
    env = {**os.environ, HOLD: hold, MATCH: match, REACHED: str(reached),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(HOLD_SCRIPT), *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def kill_mid_run(argv, hold, match, sig, tmp_path, expect_temp: str | None):
    """Start the held stage, wait until it is stuck at the hold, check a concurrent sweep spares its
    temporary, kill it with `sig`: returns (its stderr, the processes it had started)."""
    reached = tmp_path / "reached"
    proc = start_held(argv, hold, match, reached)
    try:
        wait_for(lambda: reached.exists() or proc.poll() is not None, "the stage to reach the hold")
        assert proc.poll() is None, proc.communicate()[1]
        if expect_temp:
            live = [t for t in temporaries(tmp_path) if t.startswith(f".{expect_temp}.") and t.endswith(".tmp")]
            assert len(live) == 1, temporaries(tmp_path)
            assert sweep_temps(tmp_path / expect_temp) == [] and (tmp_path / live[0]).is_dir()  # a live run's
        children = descendants(proc.pid)
        assert children, "the stage started no worker processes"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_for(lambda: not any(_alive(p) for p in children), "the stage's processes to end", timeout=20)
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, err
        assert err.strip().splitlines()[-1] == f"tasn {argv[0]}: terminated (SIGTERM)", err
        assert "Traceback" not in err, err
    else:
        assert proc.returncode == -signal.SIGKILL
    return err


@pytest.mark.parametrize("sig", list(SIGNALS))
def test_killed_preprocess_keeps_the_old_output_and_leaves_no_process_or_temporary(sig, tree):
    before = digest(tree / "prep")
    image_8 = (tree / "raw" / "images.txt").read_text().splitlines()[7].split()[1]
    kill_mid_run(STAGE_ARGS["preprocess"], "tasn.data.images:decode", image_8, SIGNALS[sig], tree, "prep")
    assert digest(tree / "prep") == before
    left = [t for t in temporaries(tree) if t.startswith(".prep.")]
    assert len(left) == (1 if sig == "SIGKILL" else 0), left  # SIGTERM cleans up at once
    assert main([*STAGE_ARGS["preprocess"], "-S", "preprocess.workers=1"]) == 0
    assert temporaries(tree) == [] and digest(tree / "prep") == before  # swept; the same output again


@pytest.mark.parametrize("sig", list(SIGNALS))
def test_validate_killed_while_decoding_leaves_no_worker(sig, tree):
    before = digest(tree / "report")
    image_8 = (tree / "raw" / "images.txt").read_text().splitlines()[7].split()[1]
    kill_mid_run(STAGE_ARGS["validate"], "tasn.data.images:decode", image_8, SIGNALS[sig], tree, None)
    assert digest(tree / "report") == before and temporaries(tree) == []


def test_validate_killed_while_writing_a_failure_report(tree):
    """The report of a failed run is written last, to report-failed/: SIGKILL there leaves the last
    good report alone, and its temporary (`.report-failed.*.tmp`) to the next run's sweep. (SIGTERM's
    cleanup of a temporary is the same `atomic_dir` code as preprocess's.)"""
    before = digest(tree / "report")
    failing = [*STAGE_ARGS["validate"], "-S", "validate.min_side=500", "-S", "validate.workers=2"]
    reached = tree / "reached"
    proc = start_held(failing, "tasn.data.validate:render_html", "", reached)
    wait_for(lambda: reached.exists() or proc.poll() is not None, "validate to write its report")
    assert proc.poll() is None, proc.communicate()[1]
    live = [t for t in temporaries(tree) if t.startswith(".report-failed.")]
    assert len(live) == 1 and sweep_temps(tree / "report-failed") == []
    proc.kill()
    proc.communicate(timeout=60)
    assert digest(tree / "report") == before and not (tree / "report-failed").exists()
    assert [t for t in temporaries(tree) if t.startswith(".report")] == live
    assert main([*STAGE_ARGS["validate"], "-S", "validate.workers=1"]) == 0
    # the same report again, but for the Data Docs pages, which carry the run's time in names and text
    assert temporaries(tree) == [] and (tree / "report" / "data_docs" / "index.html").is_file()
    assert {k: v for k, v in digest(tree / "report").items() if not k.startswith("data_docs/")} == {
        k: v for k, v in before.items() if not k.startswith("data_docs/")}


def _slow_or_fail(job: tuple[int, str]) -> int:
    x, folder = job
    if x == 0:  # fails once the other worker is busy with item 1
        deadline = time.monotonic() + 60
        while not Path(folder, "started-1").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        raise ValueError("item 0 is bad")
    mark = Path(folder, f".started-{x}")  # renamed into place: item 0 never sees a half-written pid
    mark.write_text(str(os.getpid()))
    mark.rename(Path(folder, f"started-{x}"))
    time.sleep(30)
    Path(folder, f"finished-{x}").touch()
    return x


def test_a_failing_item_stops_the_other_workers_at_once(tmp_path):
    """Leaving a ProcessPoolExecutor waits for every running task; imap kills them instead."""
    with pytest.raises(ValueError, match="item 0 is bad"):
        list(parallel.imap(_slow_or_fail, [(x, str(tmp_path)) for x in range(4)], workers=2))
    started = [int(p.read_text()) for p in tmp_path.glob("started-*")]
    assert started and not any(_alive(pid) for pid in started)
    assert not list(tmp_path.glob("finished-*"))


READER = """
import os, sys
marker, stop = sys.argv[1], sys.argv[2]
open(stop + ".ready", "w").close()
seen = missed = 0
while not os.path.exists(stop):
    seen += 1
    missed += not os.path.isfile(marker)
print(seen, missed)
"""


def test_atomic_dir_never_leaves_the_output_missing(tmp_path):
    """A reader polling a finished output while it is replaced 300 times never finds it missing
    (the swap is one renameat2 RENAME_EXCHANGE; two renames would leave a gap between them)."""
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "marker").write_text("0")
    reader = subprocess.Popen([sys.executable, "-c", READER, str(out / "marker"), str(tmp_path / "stop")],
                              stdout=subprocess.PIPE, text=True)
    wait_for(lambda: (tmp_path / "stop.ready").exists(), "the reader to start")
    for i in range(1, 301):
        with atomic_dir(out) as tmp:
            (tmp / "marker").write_text(str(i))
    (tmp_path / "stop").touch()
    seen, missed = map(int, reader.communicate(timeout=60)[0].split())
    assert seen > 1000 and missed == 0
    assert (out / "marker").read_text() == "300" and temporaries(tmp_path) == []
    assert {p.name for p in tmp_path.iterdir()} == {"out", "stop", "stop.ready"}


def test_without_an_atomic_exchange_a_half_done_swap_is_recovered(tmp_path, monkeypatch):
    monkeypatch.setattr("tasn.io.exchange", lambda a, b: False)  # an OS or filesystem without it
    out = tmp_path / "out"
    for text in ("old", "new"):
        with atomic_dir(out) as tmp:
            (tmp / "marker").write_text(text)
    assert (out / "marker").read_text() == "new" and temporaries(tmp_path) == []
    out.rename(tmp_path / ".out.old")  # killed between the two renames: only the aside copy exists
    with atomic_dir(out) as tmp:
        assert (out / "marker").read_text() == "new"  # put back before anything else
        (tmp / "marker").write_text("newer")
    assert (out / "marker").read_text() == "newer" and temporaries(tmp_path) == []


def test_exchange_swaps_two_names_in_one_step(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").touch()
    (tmp_path / "b").write_text("file")
    assert exchange(tmp_path / "a", tmp_path / "b")  # Linux with renameat2 (the CI machine)
    assert (tmp_path / "a").read_text() == "file" and (tmp_path / "b" / "x").is_file()


def test_sweep_removes_only_what_no_live_run_holds(tmp_path):
    out = tmp_path / "out"
    stale = [tmp_path / ".out.0123456789ab.tmp", tmp_path / ".out.k3j_x9ab.tmp"]  # ours; an earlier version's
    old_staging = tmp_path / ".out.00000000000a.new"
    young_staging = tmp_path / ".out.00000000000b.new"
    others = [tmp_path / ".out2.0123456789ab.tmp", tmp_path / "out.0123456789ab.tmp", tmp_path / ".out.tmp"]
    for p in [*stale, old_staging, young_staging, *others]:
        p.mkdir()
    (stale[0] / "half-written").write_text("x")
    past = time.time() - STAGING_GRACE_S - 5
    os.utime(old_staging, (past, past))
    with atomic_dir(out) as live:  # enters by sweeping, then holds its own temporary
        assert sorted(p.name for p in tmp_path.iterdir() if not p.samefile(live)) == sorted(
            p.name for p in [young_staging, *others])
        assert sweep_temps(out) == []  # the live one stays: it is locked
        (live / "marker").touch()
    assert (out / "marker").is_file()


# -- the training outputs are one unit ----------------------------------------------------------------

def _outputs(out: Path, seed: int) -> None:
    """What `tasn train` writes at its end (tasn.training.outputs.write_outputs), for a small model of `seed`."""
    cfg = load_config(ROOT / "params.yaml", None, ["model.kind=baseline", "model.out_size=32", "model.input_size=32",
                                                   "preprocess.size=40", "tracking.enabled=false"])
    torch.manual_seed(seed)
    model = build_model(cfg.model, 3)
    history = [{"epoch": 1, "train_loss": 1.0 + seed, "val_loss": 1.5, "master_aux_top1": 0.5}]
    write_outputs(out, model, cfg, ["a", "b", "c"], {"master_aux_top1": 0.1 * seed}, 1.0, history,
                  [{"step": 1, "loss": 1.0}], 1, None)


WRITER = f"""
import sys
sys.path[:0] = [{str(ROOT / 'tests')!r}, {str(ROOT)!r}]
import fixtures.hold  # holds the function TASN_TEST_HOLD names
from test_faults import _outputs
from pathlib import Path
_outputs(Path(sys.argv[1]), int(sys.argv[2]))
"""


def test_a_kill_between_the_output_writes_leaves_the_previous_model_with_its_own_metrics(tmp_path):
    """Run A's outputs, then run B SIGKILLed after its model is written and before its history:
    the folder is still exactly A's (model, metrics and run record agree on the model's sha256),
    and the next run sweeps what B left."""
    out = tmp_path / "train"
    _outputs(out, seed=1)
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "ckpt-000000001.pt").write_bytes(b"a checkpoint")  # written during the run
    before = digest(out)
    reached = tmp_path / "reached"
    env = {**os.environ, HOLD: "tasn.training.outputs:csv_text", MATCH: "", REACHED: str(reached)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out), "2"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: reached.exists() or proc.poll() is not None, "run B to reach its history")
        assert proc.poll() is None, proc.communicate()[1]
        proc.kill()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert digest(out) == before
    recorded = {json.loads((out / name).read_text())[MODEL_SHA256] for name in (METRICS, RUN)}
    assert recorded == {file_sha256(out / MODEL)}
    _outputs(out, seed=3)
    assert temporaries(tmp_path) == [] and (out / "checkpoints" / "ckpt-000000001.pt").read_bytes() == b"a checkpoint"
    assert json.loads((out / METRICS).read_text())[MODEL_SHA256] == file_sha256(out / MODEL) != before[MODEL]


def test_evaluate_and_register_refuse_a_model_that_is_not_the_one_the_records_describe(tmp_path, capsys):
    for seed in (1, 2):
        _outputs(tmp_path / f"run{seed}", seed)
    a, b = (file_sha256(tmp_path / f"run{seed}" / MODEL) for seed in (1, 2))
    assert main(["evaluate", "--data", str(tmp_path / "prepared"), "--model", str(tmp_path / "run2" / MODEL),
                 "--run-json", str(tmp_path / "run1" / RUN), "--out", str(tmp_path / "ev")]) == 1
    err = capsys.readouterr().err
    assert f"run2/model.pt is of model sha256 {b[:16]}..., but --run-json {tmp_path / 'run1' / RUN} is of " \
           f"model sha256 {a[:16]}" in err and "Traceback" not in err
    run = {"run_id": "0123abcd", "model_uri": "models:/m-0123", MODEL_SHA256: a}
    (tmp_path / "run.json").write_text(json.dumps(run))
    (tmp_path / "metrics.json").write_text(json.dumps({"master_aux_top1": 0.9}))
    (tmp_path / EVALUATED).write_text(json.dumps({"model": "run2/model.pt", MODEL_SHA256: b}))  # evaluate's record
    assert main(["register", "--run-json", str(tmp_path / "run.json"), "--metrics", str(tmp_path / "metrics.json"),
                 "--out", str(tmp_path / "reg"), "-S", "tracking.uri=http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert f"run.json is of model sha256 {a[:16]}..., but --metrics {tmp_path / 'metrics.json'} (by evaluated.json) " \
           f"is of model sha256 {b[:16]}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [EVALUATED, "metrics.json", "run.json", "run1", "run2"]


# -- MLflow going away in the middle of a run ----------------------------------------------------

class _FakeMLflow(ThreadingHTTPServer):
    """Answers every request as `mode` says: "refuse" (400 INVALID_PARAMETER_VALUE) or "hang"."""

    mode = "refuse"
    hits = 0

    def __init__(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                server.hits += 1
                if server.mode == "hang":
                    time.sleep(5)
                    return
                body = json.dumps({"error_code": "INVALID_PARAMETER_VALUE", "message": "no such metric"}).encode()
                self.send_response(400)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


def _in_time(fn, seconds: float = 30.0) -> None:
    """Run `fn`, failing the test (rather than hanging it) if it has not returned in `seconds`."""
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still blocked after {seconds:.0f} s"


@pytest.mark.integration
def test_an_mlflow_outage_costs_a_bounded_wait_and_a_refusal_is_not_retried(mlflow_server, monkeypatch, caplog):
    for name in tracking.HTTP_ENV.values():  # recorded, so whatever http_settings sets is undone afterwards
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    run = tracking.Run(TrackingConfig(uri=mlflow_server.url, experiment="outages", system_metrics=False), {})
    tracking.http_settings(TrackingConfig(request_timeout=1, request_retries=1))  # what the config would say
    fake = _FakeMLflow()
    try:
        mlflow.set_tracking_uri(fake.url)  # the run's server: from here on every call goes to the fake
        with caplog.at_level(logging.INFO, logger="tasn.tracking"):
            _in_time(lambda: run.log_metrics({"loss": 1.0}, step=1))
            refused = "MLflow refused log_metrics at step 1 (INVALID_PARAMETER_VALUE: no such metric); not retried"
            assert fake.hits == 1 and refused in caplog.text
            fake.mode = "hang"
            _in_time(lambda: run.log_metrics({"loss": 0.9}, step=2))  # MLflow's 1 s timeout, 1 retry: 2 requests
            assert fake.hits == 3 and "log_metrics at step 2 failed" in caplog.text
            assert "the run goes on without MLflow for 300 s" in caplog.text
            _in_time(lambda: run.log_metrics({"loss": 0.8}, step=3))  # the server is left alone: no request
            assert fake.hits == 3
    finally:
        fake.shutdown()
        mlflow.set_tracking_uri(mlflow_server.url)
        run.end()


def test_mlflow_http_settings_come_from_the_config_unless_the_environment_sets_them(monkeypatch):
    for name in tracking.HTTP_ENV.values():  # recorded, so whatever http_settings sets is undone afterwards
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the user's own
    got = tracking.http_settings(TrackingConfig(request_timeout=7, request_retries=2))
    assert got == {"MLFLOW_HTTP_REQUEST_TIMEOUT": "7", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                   "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    assert tracking.http_settings(TrackingConfig(request_timeout=9))["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "9"
