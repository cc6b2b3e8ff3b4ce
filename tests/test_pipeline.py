"""The Kubeflow pipeline: compiled YAML never drifts, the DAG has the right tasks and edges, every task
carries what a cluster needs (environment from the ConfigMaps and Secrets, labels, requests and
limits, timeouts, retries, GPU placement), each stage is cached on its own config section and the
data version, the component runtime builds the right `tasn` command lines and fails early without
MLflow, and kfp.local executes the DAG (here with a stand-in `tasn.cli` that records each stage's
argv, so the wiring is checked in seconds; the real stages run end to end in
test_pipeline_cluster.py)."""

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
from pipelines import runner, stage_configs, tasn_pipeline
from tasn import evaluate, lineage, registry
from tasn.cli import main as cli_main
from tasn.config import Config, load_config
from tasn.data import preprocess, validate
from tasn.errors import ServiceError, TASNError
from tasn.launch import FOLLOW_TIMEOUT_S
from tasn.registry.lock import LOCK_LEASE_S
from tasn.training import outputs

ROOT = Path(__file__).resolve().parents[1]
STAGE_TASKS = ("validate", "preprocess", "train", "evaluate", "register")
MLFLOW_TASKS = ("train", "evaluate", "register", "gate", "promote")
# validate and preprocess: their launcher reads the imported data, outside the pipeline root
S3_TASKS = ("data-version", "validate", "preprocess", "train", "evaluate", "register", "gate", "promote")
CONTAINER_TASKS = ("data-version", "validate", "preprocess", "train-plan", "train", "evaluate", "register",
                   "gate", "promote", "cleanup")


@pytest.fixture(scope="module")
def docs():
    return list(yaml.safe_load_all(runner.compile_to_text()))


@pytest.fixture(scope="module")
def spec(docs):
    return docs[0]


@pytest.fixture(scope="module")
def k8s(docs):
    """platforms.kubernetes: executor -> its Kubernetes settings."""
    return docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def body(spec) -> dict:
    """The tasks inside the exit handler (every task but the exit task itself)."""
    (handler,) = [t for n, t in spec["root"]["dag"]["tasks"].items() if n.startswith("exit-handler")]
    return spec["components"][handler["componentRef"]["name"]]["dag"]["tasks"]


def all_tasks(spec) -> dict:
    tasks = {**spec["root"]["dag"]["tasks"], **body(spec)}
    for name, task in list(tasks.items()):
        if name.startswith("condition"):
            tasks.update(spec["components"][task["componentRef"]["name"]]["dag"]["tasks"])
    return tasks


def test_committed_yaml_is_what_the_code_compiles_to():
    committed = (ROOT / "pipelines" / "tasn_pipeline.yaml").read_text()
    assert committed == runner.compile_to_text(), (
        "pipelines/tasn_pipeline.yaml is stale: run `tasn pipeline compile --output pipelines/tasn_pipeline.yaml`"
    )


def _deps(task) -> set[str]:
    return set(task.get("dependentTasks", []))


def test_dag_has_the_stages_gate_promote_and_an_exit_task_with_the_right_edges(spec):
    tasks = body(spec)
    assert set(STAGE_TASKS) | {"importer", "data-version", "train-plan", "gate"} <= set(tasks)
    assert _deps(tasks["validate"]) == {"importer", "data-version"}
    assert _deps(tasks["preprocess"]) == {"importer", "validate", "data-version"}  # validation gates the rest
    assert _deps(tasks["train"]) == {"preprocess", "train-plan"}
    assert _deps(tasks["evaluate"]) == {"preprocess", "train"}
    assert _deps(tasks["register"]) == {"evaluate", "train"}
    assert _deps(tasks["gate"]) == {"register"}
    # promote lives in a condition on the gate's outcome
    (cond_name,) = [n for n in tasks if n.startswith("condition")]
    cond = tasks[cond_name]
    assert _deps(cond) == {"gate", "register"}
    assert cond["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--gate-Output'] == true"
    assert list(spec["components"][cond["componentRef"]["name"]]["dag"]["tasks"]) == ["promote"]
    # data flows through artifacts, not only ordering
    ev = tasks["evaluate"]["inputs"]["artifacts"]
    assert ev["model"]["taskOutputArtifact"] == {"producerTask": "train", "outputArtifactKey": "model"}
    assert ev["prepared"]["taskOutputArtifact"] == {"producerTask": "preprocess", "outputArtifactKey": "prepared"}
    # the exit task runs however the body ends (success, failure, cancel) and knows the run
    cleanup = spec["root"]["dag"]["tasks"]["cleanup"]
    assert cleanup["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert cleanup["inputs"]["parameters"]["status"] == {"taskFinalStatus": {"producerTask": "exit-handler-1"}}
    assert cleanup["inputs"]["parameters"]["kfp_run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"


def test_every_task_that_talks_to_mlflow_or_s3_gets_its_environment_from_the_configmaps_and_secrets(k8s):
    def env_from(executor, kind, name_param):
        """{key: env var} mapped from the ConfigMap/Secret named by the pipeline parameter."""
        field, param = {"config_map": ("configMapAsEnv", "configMapNameParameter"),
                        "secret": ("secretAsEnv", "secretNameParameter")}[kind]
        found = {}
        for entry in k8s.get(f"exec-{executor}", {}).get(field, []):
            if entry[param] == {"componentInputParameter": f"pipelinechannel--{name_param}"}:
                assert entry["optional"] is False  # a missing object stops the pod, not the stage later
                found.update({e.get("configMapKey", e.get("secretKey")): e["envVar"] for e in entry["keyToEnv"]})
        return found

    for task in CONTAINER_TASKS:
        s3 = task in S3_TASKS
        assert env_from(task, "config_map", "s3_config_map") == ({k: k for k in (
            "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION", "TASN_WORK_URI")} if s3 else {}), task
        assert env_from(task, "secret", "s3_secret") == (
            {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
            if s3 else {}), task
        talks = task in MLFLOW_TASKS
        assert env_from(task, "config_map", "mlflow_config_map") == (
            {"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"} if talks else {}), task
        assert env_from(task, "secret", "mlflow_secret") == (
            {"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
             "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"} if talks else {}), task
        labels = k8s[f"exec-{task}"]["podMetadata"]["labels"]
        assert (labels.get("tasn/mlflow-client") == "true") == talks, task  # what the MLflow NetworkPolicy admits
        assert labels["app.kubernetes.io/component"] == "pipeline-runner"


def test_the_object_names_are_pipeline_parameters_defaulting_to_what_infra_creates(spec):
    params = spec["root"]["inputDefinitions"]["parameters"]
    contract = yaml.safe_load_all((ROOT / "infra" / "k8s" / "client-config" / "client-config.yaml").read_text())
    config_maps = {d["metadata"]["name"]: set(d["data"]) for d in contract}
    assert params["s3_config_map"]["defaultValue"] == "tasn-s3-config"
    assert params["mlflow_config_map"]["defaultValue"] == "tasn-mlflow-config"
    assert params["s3_secret"]["defaultValue"] == "tasn-s3-credentials"
    assert params["mlflow_secret"]["defaultValue"] == "tasn-mlflow-credentials"
    # every key the pipeline maps exists in the ConfigMap infra/k8s delivers
    assert set(tasn_pipeline.S3_CONFIG_KEYS) <= config_maps["tasn-s3-config"]
    assert set(tasn_pipeline.MLFLOW_CONFIG_KEYS) <= config_maps["tasn-mlflow-config"]
    for secret, keys in (("s3", tasn_pipeline.S3_SECRET_KEYS), ("mlflow-client", tasn_pipeline.MLFLOW_SECRET_KEYS)):
        template = (ROOT / "infra" / "k8s" / "secrets" / f"{secret}.env.example").read_text()
        assert all(f"{k}=" in template for k in keys), secret


def test_every_task_has_requests_limits_a_timeout_and_retries(spec, k8s):
    tasks, executors = all_tasks(spec), spec["deploymentSpec"]["executors"]
    for name in CONTAINER_TASKS:
        res = executors[f"exec-{name}"]["container"]["resources"]
        for kind in ("Cpu", "Memory"):
            assert res[f"resource{kind}Request"] and res[f"resource{kind}Limit"] == res[f"resource{kind}Request"], name
        assert int(k8s[f"exec-{name}"]["activeDeadlineSeconds"]) == tasn_pipeline.TIMEOUTS[name] > 0
        assert executors[f"exec-{name}"]["container"]["image"] == "{{$.inputs.parameters['pipelinechannel--image']}}"
    for name in ("data-version", *STAGE_TASKS, "cleanup"):
        assert tasks[name]["retryPolicy"]["maxRetryCount"] == 2, name
    assert "retryPolicy" not in tasks["train-plan"]  # bad parameters are not transient
    res = executors["exec-train"]["container"]["resources"]
    assert res["accelerator"] == {
        "resourceCount": "{{$.inputs.parameters['pipelinechannel--train-plan-gpus']}}",
        "resourceType": "{{$.inputs.parameters['pipelinechannel--accelerator_type']}}",
    }
    assert res["resourceCpuLimit"] == "{{$.inputs.parameters['pipelinechannel--train-plan-cpu']}}"
    # the launcher follows a job for less than its own pod may live
    assert FOLLOW_TIMEOUT_S < tasn_pipeline.TIMEOUTS["train"]


def test_every_task_has_a_writable_tmp_on_the_images_read_only_root(spec, k8s):
    """KFP's launcher writes output parameters under /tmp/kfp/outputs and the executor's `sh -ec`
    wrapper runs `mktemp -d`: on a read-only root, /tmp must be a volume (tests/test_image_pipeline.py
    runs the tasks so)."""
    for label in spec["deploymentSpec"]["executors"]:
        if "container" in spec["deploymentSpec"]["executors"][label]:
            mounts = {m["mountPath"]: m for m in k8s[label].get("emptyDirMounts", [])}
            assert "/tmp" in mounts, label


def test_the_promote_tasks_retry_for_longer_than_one_promotion_lock_lease(spec):
    """A promoter killed while holding the lock leaves it until its lease ends; the tasks running
    `tasn promote` must keep retrying past that, or the run fails on a lock nobody holds. Argo waits
    `duration * factor**k` before retry k+1 (processNodeRetries in argo-workflows v4.0.5
    workflow/controller/operator.go; KFP compiles no `cap`, and `maxDuration` is a window, not a cap:
    tests/test_pipeline_contract.py)."""
    tasks = all_tasks(spec)
    for name in ("gate", "promote"):
        policy = tasks[name]["retryPolicy"]
        base, factor = float(policy["backoffDuration"].rstrip("s")), policy["backoffFactor"]
        waited = sum(base * factor**k for k in range(policy["maxRetryCount"]))
        assert waited > LOCK_LEASE_S, (name, waited, LOCK_LEASE_S)
    # computed from the lease, not a number that happens to fit today's
    for lease in (30.0, 90.0, 600.0, 7200.0):
        n = tasn_pipeline.retries_outlasting(lease)
        assert sum(30 * 2.0**k for k in range(n)) > lease >= sum(30 * 2.0**k for k in range(n - 1))


def test_a_single_node_gpu_train_task_gets_the_gpu_nodes_selector_and_toleration(spec, k8s):
    train = k8s["exec-train"]
    plan_output = {"taskOutputParameter": {"producerTask": "train-plan", "outputParameterKey": "node_selector"}}
    assert train["nodeSelector"] == {"nodeSelectorJson": plan_output}
    plan_output["taskOutputParameter"]["outputParameterKey"] = "tolerations"
    assert train["tolerations"] == [{"tolerationJson": plan_output}]
    params = spec["root"]["inputDefinitions"]["parameters"]
    runbook = (ROOT / "docs" / "cluster.md").read_text()
    label, taint = params["gpu_node_label"]["defaultValue"], params["gpu_taint"]["defaultValue"]
    assert (label, taint) == ("nvidia.com/gpu.present=true", "nvidia.com/gpu:NoSchedule")
    assert f"label `{label}`" in runbook and f"tainted `{taint}`" in runbook  # the runbook's GPU nodes
    # what train-plan computes: the GPU nodes only when this task itself trains on GPUs
    gpu_nodes = ({"nvidia.com/gpu.present": "true"},
                 [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    assert runtime.train_placement(1, 8, label, taint) == gpu_nodes
    assert runtime.train_placement(1, 0, label, taint) == ({}, [])  # a CPU run goes anywhere
    assert runtime.train_placement(4, 8, label, taint) == ({}, [])  # the launcher needs no GPU node
    assert runtime.train_placement(1, 8, "", "") == ({}, [])
    assert runtime.train_placement(1, 1, "pool=h200,zone=a", "gpu=h200:NoExecute,x:NoSchedule") == (
        {"pool": "h200", "zone": "a"},
        [{"key": "gpu", "operator": "Exists", "effect": "NoExecute"},
         {"key": "x", "operator": "Exists", "effect": "NoSchedule"}])
    for bad in (("pool", ""), ("", "nvidia.com/gpu"), ("", "k:Sometimes")):
        with pytest.raises(ValueError, match="gpu_node_label|gpu_taint"):
            runtime.train_placement(4, 0, *bad)  # checked even where unused: a typo fails the run at its start


def test_each_data_stage_is_cached_on_its_own_config_section_and_the_data_version(spec):
    tasks = body(spec)
    for name in ("validate", "preprocess"):
        assert tasks[name]["cachingOptions"].get("enableCache") is True
        params = tasks[name]["inputs"]["parameters"]
        assert params["config"] == {"componentInputParameter": f"pipelinechannel--{name}_config"}
        assert params["data_version"] == {"taskOutputParameter": {"producerTask": "data-version",
                                                                  "outputParameterKey": "Output"}}
        # nothing else that varies from run to run (no run id, no other stage's config)
        assert set(params) == {"config", "data_version", "base_image", "pipelinechannel--image"}, name
    for name in ("data-version", "train", "evaluate", "register", "gate"):  # write to MLflow, or look at data
        assert not tasks[name]["cachingOptions"].get("enableCache"), name
    assert tasks["train"]["inputs"]["parameters"]["config"] == {
        "componentInputParameter": "pipelinechannel--train_config"}
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {stage_configs.parameter(s) for s in stage_configs.STAGE_KEYS} <= set(params)
    assert "defaultValue" not in params["data_uri"]  # no silent default dataset


def test_changing_train_lr_changes_only_the_configs_of_the_stages_after_preprocess():
    base = stage_configs.stage_configs(load_config(ROOT / "params.yaml", "smoke"))
    changed = {"train.lr=0.01": {"train_config"},
               "preprocess.size=128": {"preprocess_config", "train_config"},
               "validate.min_side=32": {"validate_config"},
               "evaluate.batch_size=4": {"train_config", "evaluate_config"},
               "register.alias=canary": {"register_config"},
               "model.input_size=64": {"preprocess_config", "train_config"}}
    for override, expected in changed.items():
        other = stage_configs.stage_configs(load_config(ROOT / "params.yaml", "smoke", [override]))
        assert {k for k in base if base[k] != other[k]} == expected, override


@pytest.mark.parametrize("profile", ["smoke", "cub", "cub336", "demo"])
def test_each_stage_config_reads_back_as_the_stage_sections_of_the_callers_resolved_config(profile, tmp_path):
    cfg = load_config(ROOT / "params.yaml", profile, ["train.lr=0.02", "validate.min_side=20"])
    for stage, text in stage_configs.stage_configs(cfg).items():
        params = tmp_path / stage / "params.yaml"
        params.parent.mkdir()
        params.write_text(text)
        seen = load_config(params)  # what the task's `tasn <stage> --params` checks and reads
        for key in stage_configs.STAGE_KEYS[stage.removesuffix("_config")]:
            section, _, name = key.partition(".")
            mine, theirs = getattr(seen, section), getattr(cfg, section)
            assert (getattr(mine, name) == getattr(theirs, name)) if name else (mine == theirs), (stage, key)


def test_tasn_argv_runs_the_stage_with_the_params_file():
    argv = runtime.tasn_argv(["validate", "--data", "d"], "/p/params.yaml")
    assert argv == [sys.executable, "-m", "tasn.cli", "validate", "--data", "d", "--params", "/p/params.yaml"]
    argv = runtime.tasn_argv(["train"], runtime.params_path("train: {lr: 0.2}\n"), runtime.torchrun_launcher(4))
    assert argv[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    assert argv[5:8] == ["-m", "tasn.cli", "train"]
    assert Path(argv[argv.index("--params") + 1]).read_text() == "train: {lr: 0.2}\n"


def test_a_task_without_mlflow_fails_first_naming_the_configmap(tmp_path, monkeypatch):
    params = str(tmp_path / "params.yaml")
    Path(params).write_text("tracking: {experiment: x}\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(RuntimeError, match="MLFLOW_TRACKING_URI is not set: it comes from the ConfigMap 'my-mlflow'"):
        runtime.require_tracking(params, "my-mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.raises(RuntimeError, match=r"127.0.0.1:9 is not reachable.*MLFLOW_TRACKING_URI from the ConfigMap 'm'"):
        runtime.require_tracking(params, "m")
    # the stage does not even start, and no local store appears in its place
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="not reachable"):
        runtime.run_tasn(["evaluate"], "tracking: {experiment: x}\n", mlflow_config_map="m")
    assert not list(tmp_path.rglob("mlflow.db")) and not (tmp_path / "mlruns").exists()
    Path(params).write_text("tracking: {enabled: false}\n")
    assert runtime.require_tracking(params, "m") is None  # a train task with tracking off needs none
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/chosen.db")  # explicit, as run-local sets it
    Path(params).write_text("")
    assert runtime.require_tracking(params, "m") == f"sqlite:///{tmp_path}/chosen.db"


def test_the_run_work_uri_is_the_runs_own_under_the_parameter_or_the_configmaps(monkeypatch):
    monkeypatch.delenv(runtime.WORK_URI_ENV, raising=False)
    assert runtime.run_work_uri("s3://b/runs", "r-1") == "s3://b/runs/r-1"
    assert runtime.run_work_uri("", "r-1") == ""  # nowhere to keep them: the task's own output
    monkeypatch.setenv(runtime.WORK_URI_ENV, "s3://tasn/runs")
    assert runtime.run_work_uri("", "r-1") == "s3://tasn/runs/r-1"
    assert runtime.run_work_uri("s3://other", "r-1") == "s3://other/r-1"  # the parameter wins


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
         "registration": registry.REGISTRATION, "run_id_env": lineage.KFP_RUN_ID_ENV}
FAKE_CLI = textwrap.dedent('''
    """Stand-in for `tasn.cli`: records argv and the run id, and writes what each stage's contract promises."""
    import json, os, sys
    from pathlib import Path
    argv = sys.argv[1:]
    with open(os.environ["FAKE_LOG"], "a") as fh:
        fh.write(json.dumps({"argv": argv, "run_id": os.environ.get(NAMES["run_id_env"])}) + "\\n")
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


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A `tasn` package whose `cli` is the stand-in (its other modules are the real ones) shadowing
    the real one in the tasks, a raw dataset, a params file; returns (raw, params, read_calls)."""
    fake = tmp_path / "fake"
    (fake / "tasn").mkdir(parents=True)
    (fake / "tasn" / "__init__.py").write_text(f"__path__.append({str(ROOT / 'tasn')!r})\n")
    (fake / "tasn" / "cli.py").write_text(f"NAMES = {NAMES!r}\n" + FAKE_CLI)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "images.txt").write_text("1 a/1.jpg\n")
    params = tmp_path / "params.yaml"
    params.write_text("train: {epochs: 1}\n")
    log = tmp_path / "argv.log"
    monkeypatch.chdir(tmp_path)  # `python -m` puts the cwd first on sys.path: not the checkout's tasn
    monkeypatch.setenv("PYTHONPATH", str(fake))
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_PROMOTE", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/store/mlflow.db")
    (tmp_path / "store").mkdir()

    def calls():
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        log.unlink(missing_ok=True)
        return records

    return raw, params, calls


def _opt(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_kfp_local_runs_the_dag_handing_each_stage_its_config_and_caches_per_stage(fake, tmp_path, monkeypatch):
    """Three runs with kfp.local's cache on. The first: the wiring, each stage's config, the run id,
    promote after a winning gate. The second, with a new `train.lr`: validate and preprocess come
    from the cache, and a losing gate runs no promote. The third, after the data changed in place at
    the same path (the importer does not reimport it): everything reruns. (Which knob reaches which
    stage: test_changing_train_lr_changes_only_the_configs_of_the_stages_after_preprocess.)"""
    raw, params, calls = fake
    root = tmp_path / "root"
    result = runner.run_local(raw, params, None, ["train.lr=0.01"], root, cache=True)
    records = calls()
    argvs = [r["argv"] for r in records]
    everything = ["validate", "preprocess", "train", "evaluate", "register", "promote", "promote"]
    assert [a[0] for a in argvs] == everything
    assert "--dry-run" in argvs[5] and "--decision-file" in argvs[5]  # the gate decides, changing nothing
    assert "--dry-run" not in argvs[6] and _opt(argvs[6], "--version") == "7"  # the candidate won: promote
    # every stage read the sections of the caller's config that its stage reads, nothing else
    expected = stage_configs.stage_configs(load_config(params, None, ["train.lr=0.01"]))
    for argv in argvs:
        stage = {"promote": "register"}.get(argv[0], argv[0])
        assert Path(_opt(argv, "--params")).read_text() == expected[f"{stage}_config"], argv[0]
        assert "--profile" not in argv and "-S" not in argv  # resolved on the caller's side
    assert yaml.safe_load(expected["train_config"])["train"]["lr"] == 0.01
    # the stages that talk to MLflow know the KFP run; the cached data stages must not (it would
    # change their cache key on every run)
    run_ids = {r["run_id"] for r in records[2:]}
    assert len(run_ids) == 1 and None not in run_ids and [r["run_id"] for r in records[:2]] == [None, None]
    assert _opt(argvs[0], "--data") == str(raw)
    train_out = Path(_opt(argvs[2], "--out"))
    assert _opt(argvs[3], "--model") == str(train_out / outputs.MODEL)  # evaluate reads train's model
    assert _opt(argvs[4], "--run-json") == str(train_out / outputs.RUN)
    assert _opt(argvs[5], "--version") == "7"  # the gate judges what register made
    reports = list(Path(result["pipeline_root"]).rglob("report"))
    assert [p.read_text() for p in reports] == ["<p>ok</p>"]  # the HTML artifact is validate's report
    assert not (tmp_path / "mlflow.db").exists()  # the tasks used the store they were given

    monkeypatch.setenv("FAKE_PROMOTE", "0")  # this time the candidate loses
    runner.run_local(raw, params, None, ["train.lr=0.02"], root, cache=True)
    second = [r["argv"] for r in calls()]
    assert [a[0] for a in second] == everything[2:-1] and "--dry-run" in second[-1]
    assert yaml.safe_load(Path(_opt(second[0], "--params")).read_text())["train"]["lr"] == 0.02
    monkeypatch.setenv("FAKE_PROMOTE", "1")
    (raw / "images.txt").write_text("1 a/1.jpg\n2 a/2.jpg\n")  # same data_uri, other data
    runner.run_local(raw, params, None, ["train.lr=0.02"], root, cache=True)
    assert [r["argv"][0] for r in calls()] == everything


def test_run_local_stops_at_the_failed_stage_without_retrying_and_still_runs_the_exit_task(fake, tmp_path,
                                                                                          monkeypatch, capfd):
    raw, _, calls = fake
    monkeypatch.setenv("FAKE_FAIL", "train")
    with pytest.raises(TASNError, match="the local pipeline run failed: .*train"):
        runner.run_local(raw, None, None, None, tmp_path / "root")
    assert [r["argv"][0] for r in calls()] == ["validate", "preprocess", "train"]
    shown = "".join(capfd.readouterr())
    log = runner._plain(Exception(shown))
    assert "run " in log and "ended FAILED" in log and "Task 'cleanup' finished with status SUCCESS" in log
    # off a terminal: no colour codes, and each task's executor input only in the log file
    full = (tmp_path / "root" / runner.LOG).read_text()
    assert "\x1b[" not in shown and shown.count(runner.EXECUTOR_INPUT) == full.count(runner.EXECUTOR_INPUT) > 3
    assert '"parameterValues"' not in shown and '"parameterValues"' in full


def test_run_local_names_a_missing_dataset(tmp_path):
    with pytest.raises(TASNError, match=r"no images.txt\): run `dvc pull`"):
        runner.run_local(tmp_path / "nothing", None, None, None, tmp_path / "root")


def test_submit_to_an_unreachable_endpoint_is_a_clear_error():
    with pytest.raises(ServiceError, match=r"Kubeflow Pipelines at http://127.0.0.1:9 refused or could not be reached"):
        runner.submit("http://127.0.0.1:9", None, "s3://b/raw", params=None)
    proc = subprocess.run([sys.executable, "-m", "tasn.cli", "pipeline", "submit", "--data-uri", "s3://b/raw"],
                          capture_output=True, text=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1 and "pass --host or set KFP_HOST" in proc.stderr


class FakeClient:
    """kfp.Client as submit uses it: records every call; runs go through `states`."""

    instances: list[FakeClient] = []
    pipelines: dict[str, str] = {}
    states = ["RUNNING", "SUCCEEDED"]

    def __init__(self, host, existing_token, namespace):
        self.host, self.token, self.calls, self.polls = host, existing_token, [], 0
        FakeClient.instances.append(self)

    def create_run_from_pipeline_func(self, func, **kw):
        self.calls.append(("one-off", func.name, kw))
        return type("Run", (), {"run_id": "run-123"})()

    class _healthz_api:  # kfp.Client's attribute, which pipelines/server.py reads raw
        @staticmethod
        def healthz_service_get_healthz(**kw):
            return type("Response", (), {"data": b'{"tag_name": "2.17.0", "multi_user": false}'})()

    def list_pipelines(self, filter, namespace, page_size):
        name = json.loads(filter)["predicates"][0]["stringValue"]
        found = [type("Pipeline", (), {"pipeline_id": self.pipelines[name]})()] if name in self.pipelines else []
        return type("Pipelines", (), {"pipelines": found})()

    def upload_pipeline(self, path, pipeline_name, namespace, description):
        self.calls.append(("upload_pipeline", pipeline_name, yaml.safe_load_all(Path(path).read_text())))
        self.pipelines[pipeline_name] = "p-1"
        return type("Pipeline", (), {"pipeline_id": "p-1"})()

    def list_pipeline_versions(self, pipeline_id, page_size):
        version = type("Version", (), {"pipeline_version_id": "v-1", "display_name": "tasn"})()
        return type("Versions", (), {"pipeline_versions": [version]})()

    def upload_pipeline_version(self, path, pipeline_version_name, pipeline_id):
        self.calls.append(("upload_pipeline_version", pipeline_version_name, pipeline_id,
                           Path(path).read_text() == runner.compile_to_text()))
        return type("Version", (), {"pipeline_version_id": "v-2"})()

    def create_experiment(self, name, namespace):
        return type("Experiment", (), {"experiment_id": f"e-{name}"})()

    def run_pipeline(self, experiment_id, job_name, **kw):
        self.calls.append(("run_pipeline", experiment_id, job_name, kw))
        return type("Run", (), {"run_id": "run-456"})()

    def get_run(self, run_id):
        state = self.states[min(self.polls, len(self.states) - 1)]
        self.polls += 1
        return type("Run", (), {"state": state})()


@pytest.fixture
def client(monkeypatch):
    FakeClient.instances, FakeClient.pipelines, FakeClient.states = [], {}, ["RUNNING", "SUCCEEDED"]
    monkeypatch.setattr(kfp, "Client", FakeClient)
    monkeypatch.setenv("KFP_HOST", "https://kf.example/pipeline")
    monkeypatch.setenv("KFP_TOKEN", "tok")
    return FakeClient


def test_submit_sends_each_stage_its_resolved_config_and_returns_the_run_url(client, tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("train: {lr: 0.3}\n")
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "mine.yaml").write_text("train: {epochs: 3}\n")  # a profile the image does not have
    got = runner.submit(None, None, "s3://b/raw", experiment="exp1", params=params, profile="mine",
                        overrides=["train.batch_size=4"], pipeline_root="s3://b/kfp", num_nodes=2, gpus_per_node=8,
                        image=None)
    assert got == {"run_id": "run-123", "url": "https://kf.example/pipeline/#/runs/details/run-123"}
    (fake,) = client.instances
    assert fake.host == "https://kf.example/pipeline" and fake.token == "tok"
    ((kind, name, kw),) = fake.calls
    assert (kind, name, kw["experiment_name"], kw["pipeline_root"]) == ("one-off", "tasn", "exp1", "s3://b/kfp")
    args = kw["arguments"]
    assert args == {"data_uri": "s3://b/raw", "num_nodes": 2, "gpus_per_node": 8,
                    **stage_configs.stage_configs(load_config(params, "mine", ["train.batch_size=4"]))}
    train = yaml.safe_load(args["train_config"])["train"]
    assert (train["lr"], train["epochs"], train["batch_size"]) == (0.3, 3, 4)  # the profile's values travel


def test_submit_can_upload_a_named_pipeline_with_versions_and_run_that_version(client, tmp_path):
    first = runner.submit(None, None, "s3://b/raw", params=None, pipeline_name="tasn-prod", run_name="r1")
    (fake,) = client.instances
    assert [c[0] for c in fake.calls] == ["upload_pipeline", "run_pipeline"]
    _, experiment_id, job_name, kw = fake.calls[1]
    assert (experiment_id, job_name, kw["pipeline_id"], kw["version_id"]) == ("e-tasn", "r1", "p-1", "v-1")
    assert kw["params"]["data_uri"] == "s3://b/raw" and "train_config" in kw["params"]
    assert first["run_id"] == "run-456" and first["version_id"] == "v-1"
    second = runner.submit(None, None, "s3://b/raw", params=None, pipeline_name="tasn-prod", pipeline_version="v9")
    calls = client.instances[-1].calls
    assert calls[0] == ("upload_pipeline_version", "v9", "p-1", True)  # the pipeline as compiled here
    assert calls[1][3]["version_id"] == "v-2" and second["version"] == "v9"


def test_submit_wait_follows_the_run_and_the_cli_exits_non_zero_unless_it_succeeded(client, tmp_path, capsys,
                                                                                     monkeypatch):
    monkeypatch.setattr(runner, "POLL_S", 0.0)
    got = runner.submit(None, None, "s3://b/raw", params=None, wait=True)
    assert got["state"] == "SUCCEEDED" and client.instances[-1].polls == 2
    for end, code in (("SUCCEEDED", 0), ("FAILED", 4), ("CANCELED", 4)):
        client.states = ["PENDING", "RUNNING", end]
        argv = ["pipeline", "submit", "--data-uri", "s3://b/raw", "--wait", "--train-cpu", "16",
                "--train-memory", "64Gi", "--pipeline-root", "s3://b/kfp", "--work-uri", "s3://b/runs",
                "--pipeline-arg", "mlflow_config_map=my-mlflow", "--pipeline-arg", "gpu_node_label=pool=h200"]
        assert cli_main([*argv, "--params", str(ROOT / "params.yaml")]) == code, end
        ((_, _, kw),) = client.instances[-1].calls
        args = kw["arguments"]
        assert (args["train_cpu"], args["train_memory"], args["work_uri"]) == ("16", "64Gi", "s3://b/runs")
        assert args["mlflow_config_map"] == "my-mlflow" and args["gpu_node_label"] == "pool=h200"
        assert kw["pipeline_root"] == "s3://b/kfp"
    assert "ended CANCELED" in capsys.readouterr().err


def test_follow_run_gives_up_after_its_timeout():
    ticks = iter(range(0, 1000, 10))
    FakeClient.states = ["RUNNING"]
    with pytest.raises(ServiceError, match="did not end within 25 s"):
        runner.follow_run(FakeClient("h", None, None), "run-1", timeout_s=25, poll_s=0, sleep=lambda s: None,
                          clock=lambda: next(ticks))


def test_the_pipeline_parameters_are_documented():
    doc = (ROOT / "docs" / "pipeline.md").read_text()
    for name in tasn_pipeline.tasn_pipeline.component_spec.inputs:
        assert f"`{name}`" in doc, name
    # the config keys stage_configs names exist
    flat, sections = Config().flat(), set(Config().to_dict())
    for keys in stage_configs.STAGE_KEYS.values():
        assert all(k in flat if "." in k else k in sections for k in keys), keys
