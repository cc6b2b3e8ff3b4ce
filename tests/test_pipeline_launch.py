"""The multi-node path without a cluster: TrainJob rendering, create/adopt, and the follow loop
against a fake CustomObjectsApi that plays back a job's life."""

from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path

import pytest

from tasn import jobspec, launch, lineage
from tasn.data.preprocess import MANIFEST, SHARDS
from tasn.errors import ServiceError, TASNError
from tasn.training.outputs import METRICS, MODEL

CRD_DIR = Path(__file__).resolve().parents[1] / "infra" / "crds"


class ApiError(Exception):
    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")
        self.status = status


class FakeApi:
    """Records creates; `get` returns the next state of a scripted sequence (the last repeats)."""

    def __init__(self, states=(), create_status: int | None = None, delete_status: int | None = None):
        self.states = list(states)
        self.created: list[tuple] = []
        self.deleted: list[tuple] = []
        self.delete_status = delete_status
        self.gets = 0
        self.create_status = create_status

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, body):
        self.deleted.append((group, version, namespace, plural, name, body))
        if self.delete_status:
            raise ApiError(self.delete_status)

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        if self.create_status:
            raise ApiError(self.create_status)
        self.created.append((group, version, namespace, plural, body))
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        assert (group, version, plural) in {(k.group, k.version, k.plural) for k in jobspec.KINDS.values()}
        state = self.states[min(self.gets, len(self.states) - 1)]
        self.gets += 1
        if isinstance(state, Exception):
            raise state
        return state


def job(*conditions):
    return {"status": {"conditions": [dict(type=t, status=s, reason=r, message=m) for t, s, r, m in conditions]}}


def spec(**kw):
    base = dict(image="reg.example/tasn:1", num_nodes=3, gpus_per_node=8, data_uri="s3://b/prepared",
                work_uri="s3://b/work/run1", params_yaml="train: {lr: 0.1}\n", profile="cub",
                overrides=["train.epochs=2"])
    base.update(kw)
    return jobspec.TrainJobSpec(**base)


def test_render_trainjob_nodes_gpus_command_and_pinned_fields():
    body = jobspec.render_trainjob(spec(), "tasn-train-x", environ={"MLFLOW_TRACKING_URI": "http://mlflow:5000",
                                                                  "AWS_SECRET_ACCESS_KEY": "leak-me"})
    assert body["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and body["kind"] == "TrainJob"
    tr = body["spec"]["trainer"]
    assert tr["numNodes"] == 3 and tr["numProcPerNode"] == 8
    assert tr["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 8
    assert tr["command"] == ["python", "-m", "tasn.launch", "node"]
    assert tr["args"] == ["--data-uri", "s3://b/prepared", "--work-uri", "s3://b/work/run1",
                          "--profile", "cub", "-S", "train.epochs=2"]
    env = {e["name"]: e for e in tr["env"]}
    assert env[jobspec.PARAMS_ENV]["value"] == "train: {lr: 0.1}\n"
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow:5000"
    # the secret travels as a reference, never as a value copied from the launcher's environment
    assert env["AWS_SECRET_ACCESS_KEY"] == {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {
        "secretKeyRef": {"name": "tasn-s3-credentials", "key": "AWS_SECRET_ACCESS_KEY"}}}
    assert env["MLFLOW_TRACKING_PASSWORD"] == {"name": "MLFLOW_TRACKING_PASSWORD", "valueFrom": {
        "secretKeyRef": {"name": "tasn-mlflow-credentials", "key": "MLFLOW_TRACKING_PASSWORD"}}}
    assert "leak-me" not in json.dumps(body)
    # Trainer v2.1 spelling (v2.0: podSpecOverrides, v2.2: runtimePatches)
    (override,) = body["spec"]["podTemplateOverrides"]
    assert override["targetJobs"] == [{"name": "node"}]
    assert override["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert body["spec"]["runtimeRef"] == {"name": "tasn-torch-distributed", "apiGroup": "trainer.kubeflow.org",
                                          "kind": "TrainingRuntime"}


def test_render_cpu_nodes_request_no_gpu():
    tr = jobspec.render_trainjob(spec(gpus_per_node=0), "n", environ={})["spec"]["trainer"]
    assert "nvidia.com/gpu" not in tr["resourcesPerNode"]["limits"] and tr["numProcPerNode"] == 1


@pytest.mark.parametrize("field,value,needle", [
    ("data_uri", "/local/prepared", "data_uri must be an s3:// URI"),
    ("work_uri", "", "work_uri must be an s3:// URI"),
    ("num_nodes", 0, "num_nodes must be >= 1"),
])
def test_render_rejects_what_a_cluster_cannot_use(field, value, needle):
    with pytest.raises(TASNError, match=needle):
        jobspec.render_trainjob(spec(**{field: value}), "n", environ={})


def test_job_name_is_stable_and_dns_safe():
    a, b = jobspec.job_name("s3://b/w|/out/model"), jobspec.job_name("s3://b/w|/out/model")
    assert a == b and a != jobspec.job_name("s3://b/w|/other") and len(a) <= 63 and a == a.lower()


def test_follow_returns_on_complete_after_transient_errors():
    api = FakeApi([job(), ApiError(503), job(("Created", "True", "", "")),
                   job(("Created", "True", "", ""), ("Complete", "True", "JobsCompleted", "done"))])
    sleeps = []
    obj = launch.follow(api, "j", "ns", poll_s=7, sleep=sleeps.append)
    assert launch._condition(obj, "Complete") and api.gets == 4 and sleeps == [7, 7, 7]


def test_follow_fails_with_the_jobs_reason():
    api = FakeApi([job(("Created", "True", "", "")),
                   job(("Failed", "True", "BackoffLimitExceeded", "node-1 exited with code 137"))])
    with pytest.raises(TASNError, match="TrainJob ns/j failed: BackoffLimitExceeded: node-1 exited with code 137"):
        launch.follow(api, "j", "ns", poll_s=0, sleep=lambda s: None)


def test_follow_ignores_conditions_that_are_not_true():
    api = FakeApi([job(("Failed", "False", "X", "not yet")), job(("Complete", "True", "", ""))])
    launch.follow(api, "j", "ns", poll_s=0, sleep=lambda s: None)
    assert api.gets == 2


def test_follow_gives_up_on_deletion_persistent_errors_and_timeout():
    with pytest.raises(ServiceError, match="was deleted"):
        launch.follow(FakeApi([ApiError(404)]), "j", "ns", poll_s=0, sleep=lambda s: None)
    with pytest.raises(ServiceError, match="lost the Kubernetes API"):
        launch.follow(FakeApi([ApiError(500)]), "j", "ns", poll_s=0, sleep=lambda s: None, max_api_errors=3)
    ticks = iter(range(0, 1000, 10))
    with pytest.raises(ServiceError, match="did not finish within 25 s"):
        launch.follow(FakeApi([job()]), "j", "ns", poll_s=0, timeout_s=25, sleep=lambda s: None,
                      clock=lambda: next(ticks))


def test_create_adopts_an_existing_job_and_reports_other_errors():
    body = jobspec.render_trainjob(spec(), "n", environ={})
    launch.create(FakeApi(create_status=409), body, "ns")  # a retried task: no error, follow it
    with pytest.raises(ServiceError, match="could not create TrainJob ns/n: HTTP 403"):
        launch.create(FakeApi(create_status=403), body, "ns")


def test_run_trainjob_creates_follows_and_fetches_the_model(tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    (work / jobspec.WORK_OUT / MODEL).write_bytes(b"weights")
    (work / jobspec.WORK_OUT / METRICS).write_text("{}")
    api = FakeApi([job(("Complete", "True", "", ""))])
    monkeypatch.setattr(jobspec.TrainJobSpec, "check", lambda self: None)  # a local work dir stands in for S3
    launch.run_trainjob(spec(work_uri=str(work)), str(tmp_path / "model"), namespace="ml", api=api, poll_s=0)
    ((_, _, namespace, _, body),) = api.created
    assert namespace == "ml" and body["metadata"]["name"] == jobspec.job_name(f"{work}|{tmp_path / 'model'}")
    assert (tmp_path / "model" / MODEL).read_bytes() == b"weights"


def test_run_trainjob_fails_when_the_job_left_no_model(tmp_path, monkeypatch):
    monkeypatch.setattr(jobspec.TrainJobSpec, "check", lambda self: None)
    api = FakeApi([job(("Complete", "True", "", ""))])
    with pytest.raises(ServiceError, match="left nothing under"):
        launch.run_trainjob(spec(work_uri=str(tmp_path)), str(tmp_path / "m"), namespace="ml", api=api, poll_s=0)


def _crd_validate():
    """infra/crds/validate.py (the infra area's offline validator, which closes every Kubeflow object
    so a misspelt field fails as it would under strict field validation)."""
    path = CRD_DIR / "validate.py"  # needs jsonschema and kubernetes-validate (dev extras)
    spec_ = importlib.util.spec_from_file_location("tasn_infra_crd_validate", path)
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    return module.validate_document


@pytest.mark.parametrize("gpus", [0, 8])
def test_rendered_trainjob_validates_against_the_crd_schema_in_the_repo(gpus):
    validate_document = _crd_validate()
    body = jobspec.render_trainjob(spec(gpus_per_node=gpus), "tasn-train-abc",
                                  environ={"MLFLOW_TRACKING_URI": "http://m:5000"})
    assert validate_document(body) == []
    bad = json.loads(json.dumps(body))
    bad["spec"]["trainer"]["numNode"] = bad["spec"]["trainer"].pop("numNodes")
    assert any("numNode" in e for e in validate_document(bad))
    old = json.loads(json.dumps(body))  # the v2.0 spelling is not a v2.1 field
    old["spec"]["podSpecOverrides"] = old["spec"].pop("podTemplateOverrides")
    assert any("podSpecOverrides" in e for e in validate_document(old))


@pytest.mark.parametrize("rank,uploads", [("0", True), ("1", False)])
def test_node_trains_under_torchrun_with_resumable_checkpoints_and_node0_uploads(tmp_path, monkeypatch, rank, uploads):
    data, work = tmp_path / "prepared", tmp_path / "work"
    (data / SHARDS).mkdir(parents=True)
    (data / MANIFEST).write_bytes(b"m")
    (data / SHARDS / "0.tar").write_bytes(b"s")
    seen = {}

    def fake_call(argv):
        seen["argv"] = argv
        local = Path(argv[argv.index("--data") + 1])
        seen["data"] = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
        seen["params"] = Path(argv[argv.index("--params") + 1]).read_text()
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir()
        (out / MODEL).write_bytes(b"trained")
        return 0

    monkeypatch.setattr(launch.subprocess, "call", fake_call)
    monkeypatch.setenv("PET_NODE_RANK", rank)
    monkeypatch.setenv(jobspec.PARAMS_ENV, "train: {epochs: 2}\n")
    args = ["--data-uri", str(data), "--work-uri", str(work), "--profile", "cub", "-S", "train.lr=0.1"]
    assert launch.node_main(args) == 0
    argv = seen["argv"]
    assert argv[1:5] == ["-m", "torch.distributed.run", "-m", "tasn.cli"] and argv[5] == "train"
    assert seen["data"] == [MANIFEST, f"{SHARDS}/0.tar"] and seen["params"] == "train: {epochs: 2}\n"
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "-S"]
    assert sets == ["train.lr=0.1", f"train.checkpoint_dir={work}/{jobspec.WORK_CHECKPOINTS}", "train.resume=auto"]
    assert (work / jobspec.WORK_OUT / MODEL).exists() == uploads


def test_node_fails_on_missing_data_and_passes_the_trainers_exit_code(tmp_path, monkeypatch):
    with pytest.raises(TASNError, match="no prepared data under"):
        launch.node_main(["--data-uri", str(tmp_path / "none"), "--work-uri", str(tmp_path / "w")])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("x")
    monkeypatch.setattr(launch.subprocess, "call", lambda argv: 3)
    assert launch.node_main(["--data-uri", str(tmp_path / "d"), "--work-uri", str(tmp_path / "w")]) == 3
    assert not (tmp_path / "w").exists()  # nothing uploaded from a failed run


def test_render_pytorchjob_master_and_workers():
    body = jobspec.render_job(spec(kind="PyTorchJob"), "tasn-train-x", environ={})
    assert body["apiVersion"] == "kubeflow.org/v1" and body["kind"] == "PyTorchJob"
    replicas = body["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2  # 3 nodes
    (container,) = replicas["Worker"]["template"]["spec"]["containers"]
    assert container["name"] == "pytorch" and container["command"] == ["python", "-m", "tasn.launch", "node"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8 and body["spec"]["nprocPerNode"] == "8"
    single = jobspec.render_job(spec(kind="PyTorchJob", num_nodes=1), "n", environ={})
    assert list(single["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    with pytest.raises(TASNError, match="job kind must be one of TrainJob, PyTorchJob"):
        jobspec.render_job(spec(kind="MPIJob"), "n", environ={})


def test_follow_a_pytorchjob_until_succeeded():
    api = FakeApi([job(("Running", "True", "", "")), job(("Succeeded", "True", "PyTorchJobSucceeded", ""))])
    launch.follow(api, "j", "ns", poll_s=0, sleep=lambda s: None, kind="PyTorchJob")
    assert api.gets == 2
    api = FakeApi([job(("Failed", "True", "PyTorchJobFailed", "Master exited 1"))])
    with pytest.raises(TASNError, match="PyTorchJob ns/j failed: PyTorchJobFailed: Master exited 1"):
        launch.follow(api, "j", "ns", poll_s=0, sleep=lambda s: None, kind="PyTorchJob")


@pytest.mark.parametrize("nodes", [1, 4])
def test_rendered_pytorchjob_validates_against_the_crd_schema_in_the_repo(nodes):
    validate_document = _crd_validate()
    body = jobspec.render_job(spec(kind="PyTorchJob", num_nodes=nodes), "tasn-train-abc", environ={})
    assert validate_document(body) == []
    bad = json.loads(json.dumps(body))
    bad["spec"]["nprocPerNode"] = 8  # a string in training-operator v1
    assert validate_document(bad)


def test_follow_has_a_default_timeout_within_the_train_tasks():
    default = inspect.signature(launch.follow).parameters["timeout_s"].default
    assert default == launch.FOLLOW_TIMEOUT_S and 0 < default < float("inf")
    ticks = iter(range(0, 10**8, 3600))
    with pytest.raises(ServiceError, match=f"did not finish within {launch.FOLLOW_TIMEOUT_S:.0f} s"):
        launch.follow(FakeApi([job(("Created", "True", "", ""))]), "j", "ns", poll_s=0, sleep=lambda s: None,
                      clock=lambda: next(ticks))


@pytest.mark.parametrize("kind", ["TrainJob", "PyTorchJob"])
def test_delete_job_removes_the_runs_job_and_tolerates_its_absence(kind):
    api = FakeApi()
    assert launch.delete_job(api, "tasn-train-abc", "tasn", kind) is True
    ((group, version, namespace, plural, name, body),) = api.deleted
    k = jobspec.KINDS[kind]
    assert (group, version, namespace, plural, name) == (k.group, k.version, "tasn", k.plural, "tasn-train-abc")
    assert body == {"propagationPolicy": "Foreground"}  # its pods go with it
    assert launch.delete_job(FakeApi(delete_status=404), "gone", "tasn", kind) is False
    with pytest.raises(ServiceError, match=f"could not delete {kind} tasn/x: HTTP 403"):
        launch.delete_job(FakeApi(delete_status=403), "x", "tasn", kind)


def test_the_pipeline_names_the_job_after_its_run_so_the_exit_task_finds_it(tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / jobspec.WORK_OUT).mkdir(parents=True)
    (work / jobspec.WORK_OUT / MODEL).write_bytes(b"weights")
    monkeypatch.setattr(jobspec.TrainJobSpec, "check", lambda self: None)
    api = FakeApi([job(("Complete", "True", "", ""))])
    launch.run_trainjob(spec(work_uri=str(work), kfp_run_id="run-7"), str(tmp_path / "m"), namespace="ml", api=api,
                        poll_s=0, name=jobspec.job_name("run-7"))
    ((_, _, _, _, body),) = api.created
    assert body["metadata"]["name"] == jobspec.job_name("run-7")
    env = {e["name"]: e.get("value") for e in body["spec"]["trainer"]["env"]}
    assert env[lineage.KFP_RUN_ID_ENV] == "run-7"  # the nodes' MLflow run is tagged with the KFP run
    launch.delete_job(api, jobspec.job_name("run-7"), "ml")
    assert api.deleted[0][4] == body["metadata"]["name"]
