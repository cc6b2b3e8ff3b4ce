"""The Kubeflow pipeline: compiled YAML never drifts, the DAG has the right tasks and edges, the
component runtime builds the right `tasn` command lines, and kfp.local executes the DAG (here with
a stand-in `tasn.cli` that records each stage's argv, so the wiring is checked in seconds; the real
stages run end to end in test_pipeline_local.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import kfp
import pytest
import yaml

from components import runtime
from pipelines import runner
from tasn import evaluate, registry
from tasn.config import PARAMS_ENV, PROFILES_DIR, PROFILES_ENV, ConfigError, load_config
from tasn.data import preprocess, validate
from tasn.errors import ServiceError, TASNError
from tasn.training import outputs

ROOT = Path(__file__).resolve().parents[1]
STAGE_TASKS = ("validate", "preprocess", "train", "evaluate", "register")


@pytest.fixture(scope="module")
def spec():
    return yaml.safe_load(runner.compile_to_text())


def test_committed_yaml_is_what_the_code_compiles_to():
    committed = (ROOT / "pipelines" / "tasn_pipeline.yaml").read_text()
    assert committed == runner.compile_to_text(), (
        "pipelines/tasn_pipeline.yaml is stale: run `tasn pipeline compile --output pipelines/tasn_pipeline.yaml`"
    )


def _deps(task) -> set[str]:
    return set(task.get("dependentTasks", []))


def test_dag_has_the_five_stages_gate_and_promote_with_the_right_edges(spec):
    tasks = spec["root"]["dag"]["tasks"]
    assert set(STAGE_TASKS) | {"importer", "train-plan", "gate"} <= set(tasks)
    assert _deps(tasks["validate"]) == {"importer"}
    assert _deps(tasks["preprocess"]) == {"importer", "validate"}  # validation gates everything after it
    assert _deps(tasks["train"]) == {"preprocess", "train-plan"}
    assert _deps(tasks["evaluate"]) == {"preprocess", "train"}
    assert _deps(tasks["register"]) == {"evaluate", "train"}
    assert _deps(tasks["gate"]) == {"register"}
    # promote lives in a condition on the gate's outcome
    (cond_name,) = [n for n, t in tasks.items() if n.startswith("condition")]
    cond = tasks[cond_name]
    assert _deps(cond) == {"gate", "register"}
    assert cond["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--gate-Output'] == true"
    inner = spec["components"][cond["componentRef"]["name"]]["dag"]["tasks"]
    assert list(inner) == ["promote"]
    # data flows through artifacts, not only ordering
    ev = tasks["evaluate"]["inputs"]["artifacts"]
    assert ev["model"]["taskOutputArtifact"] == {"producerTask": "train", "outputArtifactKey": "model"}
    assert ev["prepared"]["taskOutputArtifact"] == {"producerTask": "preprocess", "outputArtifactKey": "prepared"}


def test_caching_retries_resources_and_typed_artifacts(spec):
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["validate"]["cachingOptions"].get("enableCache") is True
    assert tasks["preprocess"]["cachingOptions"].get("enableCache") is True
    for name in ("train", "evaluate", "register", "gate"):  # they write to MLflow: never cached
        assert not tasks[name]["cachingOptions"].get("enableCache")
    for name in STAGE_TASKS + ("gate",):
        assert tasks[name]["retryPolicy"]["maxRetryCount"] == 2
    ex = spec["deploymentSpec"]["executors"]
    res = ex["exec-train"]["container"]["resources"]
    assert res["accelerator"] == {
        "resourceCount": "{{$.inputs.parameters['pipelinechannel--train-plan-gpus']}}",
        "resourceType": "{{$.inputs.parameters['pipelinechannel--accelerator_type']}}",
    }
    assert res["resourceCpuRequest"] == "{{$.inputs.parameters['pipelinechannel--train-plan-cpu']}}"
    for name in STAGE_TASKS:
        assert ex[f"exec-{name}"]["container"]["image"] == "{{$.inputs.parameters['pipelinechannel--image']}}"
    comps = spec["components"]

    def outs(c):
        return {k: v["artifactType"]["schemaTitle"] for k, v in comps[c]["outputDefinitions"]["artifacts"].items()}

    assert outs("comp-validate") == {"validated": "system.Dataset", "report": "system.HTML",
                                     "summary": "system.Metrics"}
    assert outs("comp-train")["model"] == "system.Model"
    assert outs("comp-evaluate")["confusion"] == "system.ClassificationMetrics"
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"data_uri", "params_yaml", "profile", "overrides", "image", "num_nodes", "gpus_per_node",
            "accelerator_type"} <= set(params)
    assert "defaultValue" not in params["data_uri"]  # no silent default dataset


def test_tasn_argv_carries_the_common_options():
    argv = runtime.tasn_argv(["validate", "--data", "d"], "", "smoke", ["train.lr=0.1", "train.epochs=1"])
    assert argv[:3] == [sys.executable, "-m", "tasn.cli"]
    assert argv[3:] == ["validate", "--data", "d", "--params", "params.yaml", "--profile", "smoke",
                        "-S", "train.lr=0.1", "-S", "train.epochs=1"]
    argv = runtime.tasn_argv(["train"], "train: {lr: 0.2}\n", launcher=runtime.torchrun_launcher(4))
    assert argv[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    assert argv[5:8] == ["-m", "tasn.cli", "train"]
    assert Path(argv[argv.index("--params") + 1]).read_text() == "train: {lr: 0.2}\n"


def test_a_profile_name_resolves_beside_params_handed_over_as_text(tmp_path, monkeypatch):
    """In a task the params file is the pipeline's text written to a temporary folder; the profiles
    beside it are the image's (next to $TASN_PARAMS) or, under run-local, the caller's
    ($TASN_PROFILES), so `--profile NAME` means there what it means on the caller's side."""
    image = tmp_path / "etc"
    (image / PROFILES_DIR).mkdir(parents=True)
    (image / "params.yaml").write_text("")
    (image / PROFILES_DIR / "big.yaml").write_text("train: {epochs: 42}\n")
    monkeypatch.setenv(PARAMS_ENV, str(image / "params.yaml"))
    monkeypatch.delenv(PROFILES_ENV, raising=False)
    assert runtime.params_path("") == str(image / "params.yaml")
    written = runtime.params_path("train: {lr: 0.2}\n")
    cfg = load_config(written, "big")
    assert (cfg.train.lr, cfg.train.epochs) == (0.2, 42)
    monkeypatch.setenv(PROFILES_ENV, str(ROOT / PROFILES_DIR))  # what run_local sets: the checkout's
    written = runtime.params_path("train: {lr: 0.2}\n")
    assert load_config(written, "cub").model.backbone == "resnet50"
    with pytest.raises(ConfigError, match="profile 'big' is not in"):
        load_config(written, "big")


def test_numeric_leaves_flattens_and_drops_what_kfp_cannot_hold():
    got = runtime.numeric_leaves({"a": 1, "b": {"c": 0.5, "d": "text", "e": True, "f": float("nan")}, "g": [1]})
    assert got == {"a": 1.0, "b.c": 0.5}


def test_read_confusion_matches_a_direct_count(tmp_path):
    rows = [("crow", "crow"), ("crow", "jay"), ("jay", "jay"), ("wren", "crow"), ("jay", "jay")]
    path = tmp_path / evaluate.CONFUSION_CSV
    path.write_text("actual,predicted\n" + "".join(f"{a},{p}\n" for a, p in rows))
    cats, matrix = runtime.read_confusion(path)
    assert cats == ["crow", "jay", "wren"]
    for i, a in enumerate(cats):
        for j, p in enumerate(cats):
            assert matrix[i][j] == rows.count((a, p))


def test_train_requests_on_one_node_and_for_a_launcher():
    assert runtime.train_requests(1, 4, "8", "32Gi") == (4, "8", "32Gi")
    assert runtime.train_requests(3, 8, "8", "32Gi") == (0, "500m", "1Gi")
    with pytest.raises(ValueError, match="gpus_per_node must be one of"):
        runtime.train_requests(1, 3, "8", "32Gi")
    with pytest.raises(ValueError, match="num_nodes must be >= 1"):
        runtime.train_requests(0, 1, "8", "32Gi")


# The output names the stand-in writes: the stages' own constants (NAMES is prepended to FAKE_CLI).
NAMES = {"report": validate.REPORT, "validate_summary": validate.SUMMARY, "prepare_summary": preprocess.SUMMARY,
         "model": outputs.MODEL, "run": outputs.RUN, "train_metrics": outputs.METRICS,
         "evaluate_metrics": evaluate.METRICS, "confusion": evaluate.CONFUSION_CSV,
         "registration": registry.REGISTRATION}
FAKE_CLI = textwrap.dedent('''
    """Stand-in for `tasn.cli`: records argv and writes what each stage's contract promises."""
    import json, os, sys
    from pathlib import Path
    argv = sys.argv[1:]
    with open(os.environ["FAKE_LOG"], "a") as fh:
        fh.write(json.dumps(argv) + "\\n")
    opt = lambda name: argv[argv.index(name) + 1]
    stage = argv[0]
    if stage == os.environ.get("FAKE_FAIL"):
        sys.exit(f"{stage}: broken on purpose")
    def out(flag, files):
        d = Path(opt(flag)); d.mkdir(parents=True)
        for name, text in files.items():
            (d / name).write_text(text)
    if stage == "validate":
        out("--report-dir", {NAMES["report"]: "<p>ok</p>", NAMES["validate_summary"]: '{"images": 3}'})
    elif stage == "preprocess":
        out("--out", {NAMES["prepare_summary"]: '{"images": 3}'})
    elif stage == "train":
        out("--out", {NAMES["model"]: "w", NAMES["run"]: '{"run_id": "r1"}', NAMES["train_metrics"]: '{"loss": 1.5}'})
    elif stage == "evaluate":
        out("--out", {NAMES["evaluate_metrics"]: '{"master_aux_top1": 0.5}',
                      NAMES["confusion"]: "actual,predicted\\na,a\\na,b\\n"})
    elif stage == "register":
        out("--out", {NAMES["registration"]: '{"name": "tasn", "version": "7"}'})
    elif stage == "promote" and "--dry-run" in argv:
        Path(opt("--decision-file")).write_text(json.dumps({"promote": os.environ["FAKE_PROMOTE"] == "1",
                                                            "reason": "0.5 vs 0.4"}))
''')


def fake_tasn(tmp_path: Path) -> Path:
    """A folder holding a `tasn` package whose `cli` is the stand-in; its other modules (the output
    names the components import) are the real ones."""
    fake = tmp_path / "fake"
    (fake / "tasn").mkdir(parents=True)
    (fake / "tasn" / "__init__.py").write_text(f"__path__.append({str(ROOT / 'tasn')!r})\n")
    (fake / "tasn" / "cli.py").write_text(f"NAMES = {NAMES!r}\n" + FAKE_CLI)
    return fake


@pytest.mark.parametrize("wins", [True, False])
def test_kfp_local_runs_the_dag_and_promotes_only_when_the_gate_says_so(tmp_path, monkeypatch, wins):
    fake = fake_tasn(tmp_path)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "images.txt").write_text("1 a/1.jpg\n")
    params = tmp_path / "params.yaml"
    params.write_text("train: {epochs: 1}\n")
    log = tmp_path / "argv.log"
    monkeypatch.chdir(tmp_path)  # `python -m` puts the cwd first on sys.path: not the checkout's tasn
    monkeypatch.setenv("PYTHONPATH", str(fake))  # the stand-in shadows the real tasn in the tasks
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_PROMOTE", "1" if wins else "0")
    result = runner.run_local(raw, params, "smoke", ["train.lr=0.01"], tmp_path / "root")
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    stages = [c[0] for c in calls]
    promotes = ["promote"] if wins else []
    assert stages == ["validate", "preprocess", "train", "evaluate", "register", "promote", *promotes]
    assert "--dry-run" in calls[5] and "--dry-run" not in calls[-1] or not wins
    for call in calls:  # every stage got the caller's params text, profile and overrides
        assert Path(call[call.index("--params") + 1]).read_text() == "train: {epochs: 1}\n"
        assert call[call.index("--profile") + 1] == "smoke" and call[call.index("-S") + 1] == "train.lr=0.01"
    assert calls[0][calls[0].index("--data") + 1] == str(raw)
    train_out = Path(calls[2][calls[2].index("--out") + 1])
    assert calls[3][calls[3].index("--model") + 1] == str(train_out / outputs.MODEL)  # evaluate reads train's model
    assert calls[4][calls[4].index("--run-json") + 1] == str(train_out / outputs.RUN)
    assert calls[5][calls[5].index("--version") + 1] == "7"  # the gate judges what register made
    reports = list(Path(result["pipeline_root"]).rglob("report"))
    assert [p.read_text() for p in reports] == ["<p>ok</p>"]  # the HTML artifact is validate's report


def test_run_local_stops_at_the_failed_stage_without_retrying(tmp_path, monkeypatch):
    fake = fake_tasn(tmp_path)
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "images.txt").write_text("1 a/1.jpg\n")
    log = tmp_path / "argv.log"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(fake))
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_FAIL", "train")
    with pytest.raises(TASNError, match="the local pipeline run failed: .*train"):
        runner.run_local(tmp_path / "raw", None, None, None, tmp_path / "root")
    assert [json.loads(line)[0] for line in log.read_text().splitlines()] == ["validate", "preprocess", "train"]


def test_run_local_names_a_missing_dataset(tmp_path):
    with pytest.raises(TASNError, match=r"no images.txt\): run `dvc pull`"):
        runner.run_local(tmp_path / "nothing", None, None, None, tmp_path / "root")


def test_submit_to_an_unreachable_endpoint_is_a_clear_error():
    with pytest.raises(ServiceError, match=r"Kubeflow Pipelines at http://127.0.0.1:9 refused or could not be reached"):
        runner.submit("http://127.0.0.1:9", None, "s3://b/raw", params=None)
    proc = subprocess.run([sys.executable, "-m", "tasn.cli", "pipeline", "submit", "--data-uri", "s3://b/raw"],
                          capture_output=True, text=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1 and "pass --host or set KFP_HOST" in proc.stderr


def test_submit_sends_the_pipeline_into_the_experiment_and_returns_the_run_url(monkeypatch, tmp_path):
    seen = {}

    class FakeClient:
        def __init__(self, host, existing_token, namespace):
            seen.update(host=host, token=existing_token)

        def create_run_from_pipeline_func(self, func, arguments, run_name, experiment_name, namespace):
            seen.update(func=func.name, arguments=arguments, experiment=experiment_name, run_name=run_name)
            return type("Result", (), {"run_id": "run-123"})()

    monkeypatch.setattr(kfp, "Client", FakeClient)
    monkeypatch.setenv("KFP_HOST", "https://kf.example/pipeline")
    monkeypatch.setenv("KFP_TOKEN", "tok")
    params = tmp_path / "p.yaml"
    params.write_text("train: {lr: 0.3}\n")
    got = runner.submit(None, None, "s3://b/raw", experiment="exp1", params=params, profile="cub",
                        overrides=["train.epochs=3"], num_nodes=2, gpus_per_node=8, image=None)
    assert got == {"run_id": "run-123", "url": "https://kf.example/pipeline/#/runs/details/run-123"}
    assert seen["host"] == "https://kf.example/pipeline" and seen["token"] == "tok" and seen["experiment"] == "exp1"
    assert seen["arguments"] == {"data_uri": "s3://b/raw", "params_yaml": "train: {lr: 0.3}\n", "profile": "cub",
                                 "overrides": ["train.epochs=3"], "num_nodes": 2, "gpus_per_node": 8}
