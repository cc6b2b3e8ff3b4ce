"""Registry, champion/challenger gate and promotion history against a real `mlflow server`.

The registered versions point at a real logged model (a Predictor around a 3-class
resnet18-slim Baseline); each test uses its own registered model name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import mlflow
import pytest

from fixtures.hold import HOLD, MATCH, REACHED
from fixtures.models import log_baseline
from tasn import registry
from tasn.cli import main
from tasn.config import load_config
from tasn.errors import ServiceError, TASNError
from tasn.registry import lock, stage

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tracking(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    mlflow.set_tracking_uri(mlflow_server.url)
    return mlflow_server.url


@pytest.fixture(scope="module")
def runs(mlflow_server, tmp_path_factory):
    """{data version: (run_id, model_uri)}: one real model, two runs tagged as `tasn train` does."""
    mlflow.set_tracking_uri(mlflow_server.url)
    out = {}
    with mlflow.start_run() as run:
        mlflow.set_tags({"data.version": "d1", "git.commit": "c0ffee1"})
        info, _ = log_baseline(tmp_path_factory.mktemp("registry-model"))
    out["d1"] = (run.info.run_id, info.model_uri)
    with mlflow.start_run() as run:
        mlflow.set_tags({"data.version": "d2", "git.commit": "c0ffee2"})
    out["d2"] = (run.info.run_id, info.model_uri)
    return out


@pytest.fixture
def name(tracking):
    return f"tasn-{uuid.uuid4().hex[:8]}"


def add(runs, name, value, data="d1") -> str:
    run_id, uri = runs[data]
    metrics = {"master_aux_top1": value, "top1": value, "loss": float("nan")}
    return str(registry.register_version(run_id, uri, metrics, name).version)


def holder(name, alias="staging"):
    mv = registry.alias_holder(registry.client(), name, alias)
    return None if mv is None else str(mv.version)


def promote_cli(*args) -> int:
    return main(["promote", *args])


def test_register_tags_metrics_data_version_and_commit(runs, name):
    v = add(runs, name, 0.625)
    mv = registry.client().get_model_version(name, v)
    assert mv.tags["metric.master_aux_top1"] == "0.625"  # the gate's number, and no copy of the others:
    assert [k for k in mv.tags if k.startswith("metric.")] == ["metric.master_aux_top1"]  # on the LoggedModel
    assert mv.tags["data_version"] == "d1"
    assert mv.tags["git_commit"] == "c0ffee1"
    assert mv.tags["run_id"] == runs["d1"][0]


def test_first_then_better_then_worse_then_tie(runs, name, capsys):
    v1, v2, v3, v4 = (add(runs, name, x) for x in (0.5, 0.75, 0.25, 0.75))
    assert promote_cli("--name", name, "--version", v1) == 0
    assert holder(name) == v1 and "first promotion" in capsys.readouterr().out

    assert promote_cli("--name", name, "--version", v2) == 0
    assert holder(name) == v2

    assert promote_cli("--name", name, "--version", v3) == 3
    err = capsys.readouterr().err
    assert "refused" in err and "worse" in err and "0.25" in err and "0.75" in err
    assert holder(name) == v2

    assert promote_cli("--name", name, "--version", v4) == 3  # a tie is not a win
    err = capsys.readouterr().err
    assert "tie" in err and err.count("0.75") == 2
    assert holder(name) == v2

    hist = registry.history(name)
    assert [(r["version"], r["previous"]) for r in hist["promotions"]] == [(v1, None), (v2, v1)]
    assert hist["consistent"]


def test_other_data_version_is_not_comparable(runs, name, capsys):
    v1 = add(runs, name, 0.5, "d1")
    v2 = add(runs, name, 0.9, "d2")
    registry.gate(name, v1)
    assert promote_cli("--name", name, "--version", v2) == 3
    err = capsys.readouterr().err
    assert "data version d2" in err and "d1" in err
    assert holder(name) == v1


def test_dry_run_writes_decision_and_changes_nothing(runs, name, tmp_path):
    v1, v2, v3 = (add(runs, name, x) for x in (0.5, 0.25, 0.75))
    registry.gate(name, v1)
    refused = tmp_path / "refused.json"
    assert promote_cli("--name", name, "--version", v2, "--dry-run", "--decision-file", str(refused)) == 0
    d = json.loads(refused.read_text())
    assert d["promote"] is False and d["decision"] == "refuse"
    assert (d["candidate"], d["incumbent"], d["incumbent_version"]) == (0.25, 0.5, v1)
    better = tmp_path / "better.json"
    assert promote_cli("--name", name, "--version", v3, "--dry-run", "--decision-file", str(better)) == 0
    assert json.loads(better.read_text())["promote"] is True
    assert holder(name) == v1 and len(registry.history(name)["promotions"]) == 1


def test_forced_promotion_needs_and_records_reason(runs, name, capsys, monkeypatch):
    v1, v2 = add(runs, name, 0.5), add(runs, name, 0.25)
    registry.gate(name, v1)
    assert promote_cli("--name", name, "--version", v2, "--force") == 1
    assert "--reason" in capsys.readouterr().err and holder(name) == v1
    monkeypatch.setenv("TASN_USER", "alice")
    assert promote_cli("--name", name, "--version", v2, "--force", "--reason", "rollback: v1 misroutes jays") == 0
    assert holder(name) == v2
    rec = registry.history(name)["promotions"][-1]
    assert rec["forced"] is True and "rollback: v1 misroutes jays" in rec["why"]
    assert rec["who"].startswith("alice@") and rec["previous"] == v1
    assert (rec["candidate"], rec["incumbent"]) == (0.25, 0.5)


def test_production_moves_the_staging_version(runs, name, capsys):
    v1, v2 = add(runs, name, 0.5), add(runs, name, 0.75)
    assert promote_cli("--name", name, "--to", "production") == 1  # nothing in staging yet
    assert "staging" in capsys.readouterr().err
    registry.gate(name, v1)
    assert promote_cli("--name", name, "--to", "production") == 0
    assert holder(name, "production") == v1
    registry.gate(name, v2)
    assert promote_cli("--name", name, "--to", "production", "--version", v1) == 1  # not the staging one
    assert "does not hold 'staging'" in capsys.readouterr().err
    assert promote_cli("--name", name, "--to", "production", "--version", v2, "--reason", "canary passed") == 0
    assert holder(name, "production") == v2 and holder(name, "staging") == v2
    rec = registry.history(name)["promotions"][-1]
    assert (rec["alias"], rec["version"], rec["previous"], rec["why"]) == ("production", v2, v1, "canary passed")


def test_history_command_reads_back_in_order(runs, name, capsys):
    v1, v2, v3 = (add(runs, name, x) for x in (0.5, 0.6, 0.7))
    for v in (v1, v2, v3):
        registry.gate(name, v)
    registry.to_production(name)
    capsys.readouterr()
    assert main(["registry", "history", "--name", name, "--json"]) == 0
    hist = json.loads(capsys.readouterr().out)
    assert [r["seq"] for r in hist["promotions"]] == [1, 2, 3, 4]
    assert [(r["alias"], r["version"], r["previous"]) for r in hist["promotions"]] == [
        ("staging", v1, None), ("staging", v2, v1), ("staging", v3, v2), ("production", v3, None)]
    assert all(r["when"].endswith("+00:00") and "@" in r["who"] for r in hist["promotions"])
    assert hist["aliases"] == {"staging": v3, "production": v3} and hist["consistent"]
    assert main(["registry", "history", "--name", name]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["seq", "when", "(UTC)"] and len(table) >= 5
    assert f"aliases now production=v{v3}, staging=v{v3}" in table[-1]


def test_history_flags_an_alias_moved_by_hand(runs, name):
    v1, v2 = add(runs, name, 0.5), add(runs, name, 0.4)
    registry.gate(name, v1)
    registry.client().set_registered_model_alias(name, "staging", v2)  # bypassing the gate
    hist = registry.history(name)
    assert not hist["consistent"] and "held by v" + v2 in hist["problems"][0]


def test_the_lock_serialises_promotions(runs, name):
    v1 = add(runs, name, 0.5)
    mc = registry.client()
    result = {}
    with lock.promotion_lock(mc, name):
        t = threading.Thread(target=lambda: result.update(d=registry.gate(name, v1)))
        t.start()
        t.join(1.5)
        assert t.is_alive() and holder(name) is None  # waiting for the lock
    t.join(60)
    assert result["d"].applied and holder(name) == v1
    assert lock.claims(mc, name) == {}  # every claim is gone


def _claim(mc, name, token, owner, number):
    """A claim as a holder that died left it (no heartbeat renews it)."""
    mc.set_registered_model_tag(name, lock.CLAIM_TAG + token,
                                json.dumps({"owner": owner, "since": "then", "number": number, "beat": 0}))


def test_a_claim_nobody_renews_is_removed_after_one_lease(runs, name, monkeypatch, caplog):
    monkeypatch.setattr(lock, "LOCK_LEASE_S", 1.0)
    v1 = add(runs, name, 0.5)
    mc = registry.client()
    _claim(mc, name, "dead", "dead@host", 1)
    start = time.monotonic()
    assert registry.gate(name, v1).applied and holder(name) == v1
    assert time.monotonic() - start >= 1.0  # it waited for the lease to run out on its own clock
    assert "the claim of dead@host was not renewed" in caplog.text and lock.claims(mc, name) == {}


# A promotion that holds the lock (heartbeat running) until it is killed.
HOLDER = """
import sys, time
from tasn.registry import lock, versions
with lock.promotion_lock(versions.client(sys.argv[1]), sys.argv[2], lease=float(sys.argv[3])):
    print("holding", flush=True)
    time.sleep(600)
"""


def test_a_killed_holder_delays_the_next_promotion_by_at_most_one_lease(runs, name, mlflow_server, monkeypatch):
    lease = 3.0
    monkeypatch.setattr(lock, "LOCK_LEASE_S", lease)
    v1 = add(runs, name, 0.5)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, mlflow_server.url, name, str(lease)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "holding\n"
        # alive and heartbeating: never taken over, however long past one lease we wait
        start = time.monotonic()
        with pytest.raises(ServiceError, match="is being promoted by"), lock.promotion_lock(
                registry.client(), name, timeout=3 * lease):
            pass
        assert time.monotonic() - start >= 3 * lease and holder(name) is None
        (held,) = lock.claims(registry.client(), name).values()
        assert json.loads(held.raw)["beat"] >= 3  # renewed every lease / 3
        proc.kill()  # SIGKILL: no finally, no release
        proc.wait(30)
        killed = time.monotonic()
        decision = registry.gate(name, v1)
        waited = time.monotonic() - killed
    finally:
        proc.kill()
        proc.wait(30)
    assert decision.applied and holder(name) == v1
    assert lease <= waited < 2 * lease  # taken over once the lease ran out, not before, not much after
    assert registry.history(name)["consistent"]


def test_a_holder_that_lost_its_lock_stops_and_spares_the_successor(runs, name):
    """A heartbeat that stalled for a lease lets a waiter delete the claim and go ahead: the old
    holder finds out before it changes anything, and its release leaves the successor's claim alone."""
    add(runs, name, 0.5)
    mc = registry.client()
    with lock.promotion_lock(mc, name) as held:
        held.verify()  # ours
        mc.delete_registered_model_tag(name, held.tag)  # what a waiter does to a claim it finds stale
        _claim(mc, name, "theirs", "successor@host", 1)
        with pytest.raises(ServiceError, match="lost the promotion lock of .*deleted by a waiter"):
            held.verify()
    assert list(lock.claims(mc, name)) == ["theirs"]
    mc.delete_registered_model_tag(name, lock.CLAIM_TAG + "theirs")


def test_a_promotion_killed_in_its_alias_move_is_mended_by_the_next_run(runs, name, mlflow_server, tmp_path):
    """SIGTERM while the record is being written (before the alias moves): exit 143, the alias
    where it was; the rerun promotes, and the history is consistent."""
    v1, v2 = add(runs, name, 0.5), add(runs, name, 0.75)
    registry.gate(name, v1)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.url, HOLD: "json:dumps", MATCH: "'why': ",
           REACHED: str(tmp_path / "reached"), "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    reached = Path(env[REACHED])
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fixtures" / "hold.py"), "promote", "--name", name,
                             "--version", v2], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not reached.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1]
        proc.terminate()
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert promote_cli("--name", name, "--version", v2) == 0 and holder(name) == v2
    hist = registry.history(name)
    assert hist["consistent"], hist["problems"]
    assert lock.claims(registry.client(), name) == {}


def test_a_record_written_before_a_kill_is_withdrawn_by_the_next_promotion(runs, name, capsys):
    """What a SIGKILL between the record and the alias move leaves: a record of a move that never
    happened. `history` says so; the next promotion withdraws it and the chain is whole again."""
    v1, v2 = add(runs, name, 0.5), add(runs, name, 0.75)
    registry.gate(name, v1)
    mc = registry.client()
    record = {"seq": 2, "alias": "staging", "version": v2, "previous": v1, "who": "killed@host", "when": "then",
              "why": "better", "forced": False}
    mc.set_registered_model_tag(name, "promotion_seq", "2")
    mc.set_model_version_tag(name, v2, "promotion.000002", json.dumps(record))
    assert not registry.history(name)["consistent"]
    assert promote_cli("--name", name, "--version", v2) == 0 and holder(name) == v2
    hist = registry.history(name)
    assert hist["consistent"], hist["problems"]
    assert [(r["seq"], bool(r.get("withdrawn"))) for r in hist["promotions"]] == [(1, False), (2, True), (3, False)]
    capsys.readouterr()
    assert main(["registry", "history", "--name", name]) == 0
    assert "WITHDRAWN better" in capsys.readouterr().out


def _register_files(runs, folder: Path) -> tuple[Path, Path]:
    run_id, uri = runs["d1"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps({"run_id": run_id, "model_uri": uri}))
    (folder / "metrics.json").write_text(json.dumps({"master_aux_top1": 0.5}))
    return folder / "run.json", folder / "metrics.json"


def test_register_checks_its_out_first_and_a_rerun_after_a_failure_reuses_the_version(runs, name, tmp_path,
                                                                                       monkeypatch):
    run_json, metrics = _register_files(runs, tmp_path)
    cfg = load_config(ROOT / "params.yaml", None, ["register.promote=true"])
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(TASNError, match="a-file: cannot create the folder for out"):
        registry.register(cfg, run_json, metrics, tmp_path / "a-file" / "out", name=name)
    assert registry.client().search_model_versions(f"name='{name}'") == []  # nothing registered
    real_gate = stage.gate

    def gate_once_down(*args, **kwargs):
        monkeypatch.setattr(stage, "gate", real_gate)
        raise ServiceError("MLflow went away")

    monkeypatch.setattr(stage, "gate", gate_once_down)
    with pytest.raises(ServiceError):
        registry.register(cfg, run_json, metrics, tmp_path / "out", name=name, promote=True)
    again = registry.register(cfg, run_json, metrics, tmp_path / "out", name=name, promote=True)
    assert again.registration["version"] == "1" and again.decision.applied  # the failed attempt's version
    assert [v.version for v in registry.client().search_model_versions(f"name='{name}'")] == ["1"]
    assert not (tmp_path / "out" / stage.PENDING).exists()
    third = registry.register(cfg, run_json, metrics, tmp_path / "out", name=name)  # a new attempt: a new version
    assert third.registration["version"] == "2"


def test_two_concurrent_gates_end_on_the_better_candidate(runs, name):
    """Both beat the incumbent; whichever runs first, the second is judged against it, so the
    better one ends with the alias and the history chain is unbroken."""
    v0, va, vb = add(runs, name, 0.5), add(runs, name, 0.7), add(runs, name, 0.8)
    registry.gate(name, v0)
    barrier = threading.Barrier(2)
    results, errors = {}, []

    def run(v):
        try:
            barrier.wait()
            results[v] = registry.gate(name, v)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(v,)) for v in (va, vb)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert holder(name) == vb
    hist = registry.history(name)
    assert hist["consistent"], hist["problems"]
    chain = [(r["version"], r["previous"]) for r in hist["promotions"]]
    assert chain in ([(v0, None), (va, v0), (vb, va)], [(v0, None), (vb, v0)])
    assert results[vb].applied and results[va].decision in ("promote", "refuse")


def test_two_racing_processes_leave_a_consistent_registry(runs, name, mlflow_server):
    """Two `tasn promote --force` processes at once: both promote, one after the other."""
    v1, v2 = add(runs, name, 0.5), add(runs, name, 0.6)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.url, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-m", "tasn.cli", "promote", "--name", name, "--version", v,
                          "--force", "--reason", f"race {v}"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for v in (v1, v2)
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    hist = registry.history(name)
    assert hist["consistent"], hist["problems"]
    recs = hist["promotions"]
    assert sorted(r["version"] for r in recs) == [v1, v2] and [r["seq"] for r in recs] == [1, 2]
    assert recs[0]["previous"] is None and recs[1]["previous"] == recs[0]["version"]
    assert holder(name) == recs[1]["version"]
