"""The cluster contract: what KFP 2.17's driver and launcher, Argo v4.0.5 (as KFP 2.17 installs it)
and Kubeflow Trainer v2.1.0 do with the committed pipelines/tasn_pipeline.yaml and the objects the
project renders. Each test reads them the way the upstream code reads them (a few lines of that
code, ported, with the file and function named in its docstring), rather than asserting the
settings we meant to write. The upstream refs read: kubeflow/pipelines tag 2.17.0 (the backend the
kfp 2.17 SDK targets), argoproj/argo-workflows v4.0.5 (its manifests/kustomize/third-party/argo),
kubeflow/trainer v2.1.0. (The infra side, kfp-launcher `providers` and DNS: tests/test_infra.py.)
"""

from __future__ import annotations

import ast
import functools
import json
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import kfp
import pytest
import yaml

from components.runtime import GPU_COUNTS
from components.train import train, train_plan
from pipelines import runner, server, stage_configs, tasn_pipeline
from tasn import jobspec, launch
from tasn.commands import registry as registry_commands
from tasn.config import load_config
from tasn.errors import ConfigError, ServiceError, TASNError
from tasn.registry import REFUSED_EXIT

ROOT = Path(__file__).resolve().parents[1]
COMPILED = ROOT / "pipelines" / "tasn_pipeline.yaml"
PROFILES = sorted(p.stem for p in (ROOT / "profiles").glob("*.yaml"))


@functools.cache
def compiled() -> tuple[dict, dict]:
    """The committed YAML's pipeline spec and platform spec, as the KFP API server receives them
    (test_pipeline.py keeps the file equal to a fresh compile)."""
    spec, platform = yaml.safe_load_all(COMPILED.read_text())
    return spec, platform


@pytest.fixture
def spec():
    return compiled()[0]


@pytest.fixture
def executors():
    """platforms.kubernetes: what the driver reads per executor (volumes, env, deadlines)."""
    return compiled()[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def tasks_of(spec) -> dict:
    """Every task of every DAG (root, exit handler, condition), by name."""
    out = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        out.update(comp.get("dag", {}).get("tasks", {}))
    return out


def component_of(spec, task: dict) -> dict:
    return spec["components"][task["componentRef"]["name"]]


def quantity(text: str) -> float:
    """A Kubernetes resource quantity in bytes or units (k8s.io/apimachinery resource.ParseQuantity)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T|m)?", str(text))
    assert match, f"{text!r} is not a quantity the driver parses"
    scale = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
             "Ti": 2**40}[match[2]]
    return float(match[1]) * scale


# --- 1. S3 reaches every task that needs it ---------------------------------------------------------

def test_every_task_whose_launcher_reads_data_outside_the_pipeline_root_gets_the_s3_keys(spec, executors):
    """The launcher opens an input artifact outside the pipeline root's bucket with a session of its
    own: no session info, so `objectstore.OpenBucket` builds `newS3Client(ctx, nil, nil)` from the
    pod's environment (kubeflow/pipelines 2.17.0 backend/src/v2/component/launcher_v2.go,
    fetchNonDefaultBuckets; backend/src/v2/objectstore/object_store.go, OpenBucket). The importer's
    `data_uri` is such an artifact, so every task consuming it must carry AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY (secretAsEnv) and the endpoint and region (configMapAsEnv); so must every
    task that reads or writes S3 itself (data, checkpoints, MLflow's S3 artifacts)."""
    tasks = tasks_of(spec)
    executors_ = spec["deploymentSpec"]["executors"]
    importers = {name for name, t in tasks.items()
                 if "importer" in executors_.get(component_of(spec, t).get("executorLabel", ""), {})}
    readers = {name for name, t in tasks.items()
               if any(a.get("taskOutputArtifact", {}).get("producerTask") in importers
                      for a in t.get("inputs", {}).get("artifacts", {}).values())}
    assert readers == {"validate", "preprocess"}
    for name in readers | {"data-version", "train", "evaluate", "register", "gate", "promote"}:
        cfg = executors[f"exec-{name}"]
        secret_keys = {k["secretKey"] for e in cfg.get("secretAsEnv", []) for k in e["keyToEnv"]}
        env = {k["envVar"] for e in cfg.get("configMapAsEnv", []) for k in e["keyToEnv"]} | secret_keys
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"} <= env, name
    assert set(tasn_pipeline.S3_TASKS) >= readers


# --- 2. the single-node train task's GPUs -----------------------------------------------------------

def pod_spec_value(value: str, parameter_values: dict) -> str:
    """kubeflow/pipelines 2.17.0 backend/src/v2/driver/resolve.go, resolvePodSpecInputRuntimeParameter:
    `{{$.inputs.parameters['NAME']}}` becomes the executor input's value through protobuf's
    GetStringValue(), which is the string of a string Value and "" for a number, a bool or a struct;
    anything else is a constant."""
    match = re.fullmatch(r"\{\{\$\.inputs\.parameters\['(.+)'\]\}\}", value)
    if not match:
        return value
    found = parameter_values[match[1]]
    return found if isinstance(found, str) else ""


def test_the_gpu_count_reaches_the_driver_as_a_string_and_becomes_the_pods_limit(spec):
    """driver.go (initPodSpecPatch, 2.17.0) sets `limits[type] = count` only when both resolve to a
    non-empty string. The count is train-plan's output `gpus`; the value the driver sees has the
    kind of that output's declared parameterType (a number for NUMBER_INTEGER: then "" and no
    limit at all, and the pod lands on a GPU node without a GPU)."""
    tasks = tasks_of(spec)
    train_task = tasks["train"]
    accelerator = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]["accelerator"]
    plan = train_plan.python_func(num_nodes=1, gpus_per_node=8, cpu="32", memory="256Gi",
                                  gpu_node_label="nvidia.com/gpu.present=true", gpu_taint="nvidia.com/gpu:NoSchedule")
    params = {}
    for name, source in train_task["inputs"]["parameters"].items():
        if "taskOutputParameter" in source:
            out = source["taskOutputParameter"]
            declared = component_of(spec, tasks[out["producerTask"]])["outputDefinitions"]["parameters"]
            kind = declared[out["outputParameterKey"]]["parameterType"]
            value = getattr(plan, out["outputParameterKey"])
            params[name] = {"STRING": str, "NUMBER_INTEGER": float, "NUMBER_DOUBLE": float, "LIST": list,
                            "STRUCT": dict}[kind](value)
            if kind == "STRING":
                assert isinstance(value, str), (name, value)  # what the component returns is what it declares
        elif "componentInputParameter" in source:
            params[name] = "nvidia.com/gpu" if "accelerator_type" in name else "x"
    count = pod_spec_value(accelerator["resourceCount"], params)
    kind = pod_spec_value(accelerator["resourceType"], params)
    assert (kind, count) == ("nvidia.com/gpu", "8") and quantity(count) == 8
    assert pod_spec_value(spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"][
        "resourceCpuLimit"], params) == "32"


# --- 3. /dev/shm ------------------------------------------------------------------------------------

def loader_shm_bytes(profile: str | None, procs: int) -> int:
    """What `procs` training processes' DataLoaders keep in /dev/shm at most: each worker holds
    prefetch_factor (2) float32 batches of 3 x input x input images; the train and the test loader
    of a process run one after the other."""
    cfg = load_config(ROOT / "params.yaml", profile)
    image = 3 * cfg.model.input_size**2 * 4
    per_process = max(cfg.train.workers * 2 * cfg.train.batch_size * image,
                      max(cfg.train.workers, cfg.evaluate.workers) * 2 * cfg.evaluate.batch_size * image)
    return procs * per_process


def test_train_and_evaluate_get_a_memory_backed_dev_shm_that_holds_the_profiles_loaders(executors):
    """kubeflow/pipelines 2.17.0 backend/src/v2/driver/k8s.go (the EmptyDirMounts loop): each
    `emptyDirMounts` entry becomes a pod volume with its medium and `resource.MustParse(sizeLimit)`
    and a mount in the main container; nothing else gives the pod more than the runtime's 64 MiB
    /dev/shm (Argo's executor template mounts none there: argocompiler/container.go)."""
    gpus = max(GPU_COUNTS)
    for name in ("train", "evaluate"):
        (mount,) = [m for m in executors[f"exec-{name}"].get("emptyDirMounts", []) if m["mountPath"] == "/dev/shm"]
        assert mount["medium"] == "Memory", name
        procs = gpus if name == "train" else 1
        for profile in [None, *PROFILES]:
            assert quantity(mount["sizeLimit"]) >= loader_shm_bytes(profile, procs), (name, profile)


# --- 4. retries: windows and policy -----------------------------------------------------------------

def argo_attempts(strategy: dict, timeout_s: float, ends: list[tuple[float, str]]) -> list[tuple[float, float]]:
    """argo-workflows v4.0.5 workflow/controller/operator.go, processNodeRetries, for one node:
    `ends[i]` = (seconds into attempt i when it ends, its phase "Failed" or "Error"). Returns each
    attempt's (start, seconds it ran). The window (`backoff.maxDuration`) runs from the first
    attempt's start; past it, or when a retry's wait would end after it, the node fails; otherwise
    it waits `duration * factor**(attempts-1)` (no cap: KFP sets none), and the retried pod's
    deadline is the window's end (opts.executionDeadline; workflowpod.go getDeadline takes the
    earlier of it and the workflow's), besides its own activeDeadlineSeconds. The retryPolicy
    decides which phases are retried (RetryPolicyActual: OnFailure when none is set)."""
    backoff = strategy["backoff"]
    window, duration, factor = (float(backoff[k]) for k in ("maxDuration", "duration", "factor"))
    policy = strategy.get("retryPolicy") or "OnFailure"
    retried = {"Always": {"Failed", "Error"}, "OnFailure": {"Failed"}, "OnError": {"Error"}}[policy]
    attempts: list[tuple[float, float]] = []
    start = 0.0
    for i, (after, phase) in enumerate(ends):
        allowed = timeout_s if i == 0 else min(timeout_s, window - start)
        ran = min(after, allowed)
        attempts.append((start, ran))
        now = start + ran
        if ran < after:  # killed at its deadline: Argo marks a deadline-exceeded pod Failed
            phase = "Failed"
        if now > window:
            break
        wait_until = now + duration * factor ** (len(attempts) - 1)
        if wait_until > window or phase not in retried or len(attempts) > int(strategy["limit"]):
            break
        start = wait_until
    return attempts


def compiled_retry_strategy(task: dict) -> dict:
    """The Argo retryStrategy KFP compiles from a task's retryPolicy (kubeflow/pipelines 2.17.0
    backend/src/v2/compiler/argocompiler/container.go, getTaskRetryParametersWithValues and
    getTaskRetryStrategyFromInput): seconds as strings, the factor as a string, no policy, no cap."""
    policy = task["retryPolicy"]
    factor = float(policy["backoffFactor"])
    assert factor.is_integer(), "Argo parses the factor with intstr.Int32: it must be a whole number"
    return {"limit": str(policy["maxRetryCount"]),
            "backoff": {"duration": policy["backoffDuration"].rstrip("s"), "factor": str(int(factor)),
                        "maxDuration": policy["backoffMaxDuration"].rstrip("s")}}


def test_each_retry_window_lets_every_attempt_run_to_its_own_deadline(spec, executors):
    """Today's meaning of `backoff_max_duration` (a window from the first attempt's start that also
    cuts each retried pod short), not the per-wait cap tests/test_pipeline.py once checked: a train
    task that fails after 3 days (or runs into its 7-day deadline) is still retried, and every
    retry gets its whole timeout."""
    tasks = tasks_of(spec)
    retrying = [name for name, t in tasks.items() if "retryPolicy" in t]
    assert {"train", "evaluate", "register", "promote", "validate", "preprocess", "cleanup"} <= set(retrying)
    for name in retrying:
        strategy = {**compiled_retry_strategy(tasks[name]), "retryPolicy": "Always"}
        timeout = int(executors[f"exec-{name}"]["activeDeadlineSeconds"])
        retries = int(strategy["limit"])
        for fail_at in (timeout - 1, timeout / 2, 3 * 24 * 3600):
            ends = [(min(fail_at, timeout - 1), "Failed")] * (retries + 1)
            attempts = argo_attempts(strategy, timeout, ends)
            assert len(attempts) == retries + 1, (name, fail_at, attempts)
        ran = [r for _, r in argo_attempts(strategy, timeout, [(float("inf"), "Failed")] * (retries + 1))]
        assert ran == [timeout] * (retries + 1), (name, ran)
    # `submit --wait` follows a run for as long as its tasks may retry
    assert runner.WAIT_TIMEOUT_S > sum(float(tasks[n]["retryPolicy"]["backoffMaxDuration"].rstrip("s"))
                                       for n in ("validate", "preprocess", "train", "evaluate", "register"))


KFP_ARGO_PATCH = ROOT / "infra" / "k8s" / "kfp-argo" / "workflow-defaults.yaml"


def template_defaults(path: Path = KFP_ARGO_PATCH) -> dict:
    """The Argo controller's workflowDefaults.spec.templateDefaults that infra/k8s/kfp-argo applies
    (KFP 2.17.0 ships the same in manifests/kustomize/third-party/argo/base/
    workflow-controller-configmap-patch.yaml)."""
    data = yaml.safe_load(path.read_text())["data"]
    return yaml.safe_load(data["workflowDefaults"])["spec"]["templateDefaults"]


def merged(defaults: dict, template: dict) -> dict:
    """argo-workflows v4.0.5 operator.go, mergedTemplateDefaultsInto: a strategic merge patch of the
    template onto the defaults (for these plain structs: the template's fields win, recursively)."""
    out = dict(defaults)
    for key, value in template.items():
        out[key] = merged(defaults[key], value) if isinstance(value, dict) and isinstance(
            defaults.get(key), dict) else value
    return out


def test_a_pod_lost_with_its_node_is_retried_where_a_retry_is_safe(spec, executors):
    """KFP compiles no retryPolicy (its RetryPolicy proto has a count and a backoff only), so Argo's
    controller decides which phases are retried: with none, RetryPolicyActual is OnFailure, and a
    pod deleted with its node (NodeError "pod deleted", operator.go podReconciliation) fails the
    run. infra/k8s/kfp-argo sets the template default KFP 2.17 installs, OnError: each task's own
    retryStrategy (its limit and window) merges onto it, so a lost train pod is retried and
    resumes from its checkpoint, while a task that failed on its own (bad data, a refused
    promotion) is not run again."""
    tasks = tasks_of(spec)
    defaults = template_defaults()
    assert defaults["retryStrategy"]["retryPolicy"] == "OnError"
    for name in ("train", "evaluate", "register", "gate", "promote", "preprocess", "validate", "cleanup"):
        strategy = merged(defaults, {"retryStrategy": compiled_retry_strategy(tasks[name])})["retryStrategy"]
        assert strategy["limit"] == str(tasks[name]["retryPolicy"]["maxRetryCount"])  # the task's own wins
        timeout = int(executors[f"exec-{name}"]["activeDeadlineSeconds"])
        lost = [(timeout * 0.4, "Error"), (timeout * 0.9, "Error"), (timeout - 1, "Error")]
        assert len(argo_attempts(strategy, timeout, lost)) == 3, name
        assert len(argo_attempts(strategy, timeout, [(60, "Failed"), (60, "Failed")])) == 1, name
        assert len(argo_attempts({k: v for k, v in strategy.items() if k != "retryPolicy"}, timeout, lost)) == 1
    plan = merged(defaults, {})["retryStrategy"]  # train-plan sets no retries of its own: the default's
    assert plan == {"limit": "2", "retryPolicy": "OnError"}


# --- 5. the exit task fits its memory ---------------------------------------------------------------

CLEANUP_IMPORTS = """
import re, sys
import kfp.dsl.executor_main  # what the task's command runs first
import components.cleanup
from tasn.jobspec import job_name
from tasn.launch import current_namespace, delete_job, kube_api
# this process's peak RSS (getrusage's ru_maxrss would count the forking pytest process: it survives execve)
peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024
print(sys.modules.get("torch") is not None, peak)
"""


def test_the_exit_task_imports_no_torch_and_fits_its_memory_limit(spec):
    """The cleanup component's body imports tasn.jobspec and tasn.launch (the kubernetes client);
    reaching torch through tasn.training.outputs took ~0.8 GiB, over its 512 MiB limit with KFP's
    launcher beside it, and a killed cleanup leaves the TrainJob holding its GPUs. A fresh
    interpreter, the imports the task's command makes, its peak RSS: under half the limit."""
    limit = quantity(spec["deploymentSpec"]["executors"]["exec-cleanup"]["container"]["resources"][
        "resourceMemoryLimit"])
    proc = subprocess.run([sys.executable, "-c", CLEANUP_IMPORTS], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    torch_loaded, peak = proc.stdout.split()
    assert torch_loaded == "False"
    assert int(peak) < limit / 2, (int(peak) / 2**20, limit / 2**20)


def test_no_door_leans_on_another_door():
    """components/ and pipelines/ are doors onto the library like tasn.commands: they import tasn's
    stages, never tasn.commands (REFUSED_EXIT belongs to the registry stage)."""
    for path in [*(ROOT / "components").glob("*.py"), *(ROOT / "pipelines").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("tasn.commands"), f"{path.name} imports {node.module}"
    assert REFUSED_EXIT == 3 and not hasattr(registry_commands, "REFUSED_EXIT")


# --- 6 and the version check: a fake KFP API server -------------------------------------------------

class FakeKFP(BaseHTTPRequestHandler):
    """Answers as kubeflow/pipelines 2.17.0's API server does for what upload and submit ask:
    healthz (backend/src/apiserver/main.go, newHealthzResponse: commit_sha, tag_name, multi_user);
    ListPipelines filtered by the request's namespace, "" meaning the shared ones
    (server/pipeline_server.go, listPipelines); an upload whose name exists in its namespace is
    refused (a pipeline's name is unique per namespace); upload_version; ListPipelineVersions."""

    state: dict = {}

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url, st = urlsplit(self.path), self.state
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/apis/v2beta1/healthz":
            return self._send(200, {"commit_sha": "abc", "tag_name": st["tag"], "multi_user": st["multi_user"]})
        if url.path == "/apis/v2beta1/pipelines":
            name = json.loads(query["filter"])["predicates"][0]["stringValue"] if "filter" in query else None
            found = [p for p in st["pipelines"] if p["namespace"] == query.get("namespace", "")
                     and name in (None, p["display_name"])]
            return self._send(200, {"pipelines": found, "total_size": len(found)})
        match = re.fullmatch(r"/apis/v2beta1/pipelines/([^/]+)/versions", url.path)
        if match:
            versions = [v for v in st["versions"] if v["pipeline_id"] == match[1]]
            return self._send(200, {"pipeline_versions": versions, "total_size": len(versions)})
        return self._send(404, {"error": url.path})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        url, st = urlsplit(self.path), self.state
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/apis/v2beta1/pipelines/upload":
            namespace = query.get("namespace", "")
            if any(p["namespace"] == namespace and p["display_name"] == query["name"] for p in st["pipelines"]):
                return self._send(409, {"error": f"pipeline {query['name']} already exists in {namespace!r}",
                                        "code": 6})
            pipeline = {"pipeline_id": f"p-{len(st['pipelines']) + 1}", "display_name": query["name"],
                        "namespace": namespace}
            st["pipelines"].append(pipeline)
            st["versions"].append({"pipeline_id": pipeline["pipeline_id"], "pipeline_version_id": "v-1",
                                   "display_name": query["name"]})
            return self._send(200, pipeline)
        if url.path == "/apis/v2beta1/pipelines/upload_version":
            version = {"pipeline_id": query["pipelineid"], "display_name": query["name"],
                       "pipeline_version_id": f"v-{len(st['versions']) + 1}"}
            st["versions"].append(version)
            return self._send(200, version)
        return self._send(404, {"error": url.path})


@pytest.fixture
def kfp_server():
    FakeKFP.state = {"tag": "2.17.0", "multi_user": True, "pipelines": [], "versions": []}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeKFP)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", FakeKFP.state
    httpd.shutdown()
    httpd.server_close()


def test_a_second_upload_finds_the_namespaces_own_pipeline_on_multi_user_kfp(kfp_server, monkeypatch):
    """`kfp.Client.get_pipeline_id(name)` sends no namespace, so a multi-user server lists the shared
    pipelines only; the pipeline uploaded into the profile namespace the first time is not found,
    and the second `submit --pipeline-name` uploads it again into a name that is taken there."""
    url, state = kfp_server
    state["pipelines"].append({"pipeline_id": "shared", "display_name": "tasn", "namespace": ""})  # a shared one
    monkeypatch.setattr(runner, "compile_to_text", COMPILED.read_text)  # the same text, without compiling again
    client = runner.connect(url, None, "kubeflow-user-jane")
    first = runner.upload(client, "tasn", "v1", namespace="kubeflow-user-jane")
    second = runner.upload(client, "tasn", "v2", namespace="kubeflow-user-jane")
    assert first["pipeline_id"] == second["pipeline_id"] != "shared"
    assert second["version"] == "v2" and [p["namespace"] for p in state["pipelines"]] == ["", "kubeflow-user-jane"]
    assert [v["display_name"] for v in state["versions"] if v["pipeline_id"] == first["pipeline_id"]] == ["tasn", "v2"]


def test_submit_checks_the_servers_version_against_what_the_compiled_pipeline_needs(kfp_server, capsys, monkeypatch):
    """The minimum is read off the compiled YAML: tasks retried inside the exit handler need a
    backend whose Argo compiler reads a nested task's RetryPolicy (2.14.0; 2.5.0's
    getTaskRetryPolicySpec in backend/src/v2/compiler/argocompiler/container.go looked in the root
    DAG only), parameterised Secret names 2.5.0 (driver: SecretNameParameter)."""
    url, state = kfp_server
    monkeypatch.setattr(runner, "compile_to_text", COMPILED.read_text)  # the same text, without compiling again
    monkeypatch.setattr(kfp.Client, "create_run_from_pipeline_func", lambda *a, **k: pytest.fail("sent a run"))
    state["tag"] = "2.5.0"
    with pytest.raises(TASNError, match=r"runs backend 2\.5\.0, but this pipeline needs 2\.14\.0 or later: "
                                        r"retries of tasks inside a sub-DAG"):
        runner.submit(url, None, "s3://b/raw", params=None, namespace="kubeflow-user-jane")
    docs = list(compiled())
    needed, features = server.required_backend(docs)
    assert needed == "2.14.0" and features[0].since == "2.14.0"
    assert {f.since for f in features} == {"2.14.0", "2.5.0", "2.4.0", "2.3.0"}
    state["tag"] = "2.17.0"
    with pytest.raises(TASNError, match="is multi-user: pass --namespace"):
        runner.submit(url, None, "s3://b/raw", params=None)
    client = runner.connect(url, None, "ns")
    assert server.server_info(client, url) == server.ServerInfo("2.17.0", True)
    assert runner.checked_client(url, None, "ns")[1] == COMPILED.read_text()
    state["tag"] = "unknown"  # a development build: said, not refused
    server.check_server(server.server_info(client, url), url, docs, "ns")
    assert "does not say its version" in capsys.readouterr().err
    with pytest.raises(ServiceError, match="did not answer its healthz"):
        server.server_info(runner.connect("http://127.0.0.1:9", None, "ns"), "http://127.0.0.1:9")


# --- 7. TrainJob resources --------------------------------------------------------------------------

def jobset_node_resources(runtime: dict, trainjob: dict) -> dict:
    """kubeflow/trainer v2.1.0 pkg/runtime/framework/plugins/jobset/builder.go (Trainer): the
    container `node` of the trainer's replicated job takes the TrainJob's resourcesPerNode whole
    (WithResources) when it has limits or requests; the runtime's resources are then gone."""
    (node,) = [c for rj in runtime["spec"]["template"]["spec"]["replicatedJobs"] if rj["name"] == "node"
               for c in rj["template"]["spec"]["template"]["spec"]["containers"] if c["name"] == "node"]
    per_node = trainjob["spec"]["trainer"].get("resourcesPerNode") or {}
    return per_node if per_node.get("limits") or per_node.get("requests") else node["resources"]


def test_a_trainjobs_nodes_get_the_pipelines_cpu_and_memory(spec, monkeypatch, tmp_path):
    """The train task hands `train_cpu`/`train_memory` to the TrainJob it launches: the compiled
    task's inputs, then the component's body as the pod runs it, then the object as the Trainer
    turns it into the node pods."""
    inputs = tasks_of(spec)["train"]["inputs"]["parameters"]
    assert inputs["node_cpu"] == {"componentInputParameter": "pipelinechannel--train_cpu"}
    assert inputs["node_memory"] == {"componentInputParameter": "pipelinechannel--train_memory"}
    seen = {}
    monkeypatch.setattr(launch, "run_trainjob", lambda spec_, **kw: seen.update(spec=spec_))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "metrics.json").write_text("{}")
    train.python_func(prepared=kfp.dsl.Dataset(uri="s3://b/kfp/prepared"), config="", image="img", num_nodes=2,
                      gpus_per_node=8, accelerator_type="nvidia.com/gpu", node_cpu="48", node_memory="384Gi",
                      work_uri="s3://b/runs", namespace="tasn", runtime="tasn-torch-distributed", job_kind="TrainJob",
                      kfp_run_id="run-1", mlflow_config_map="m", model=kfp.dsl.Model(uri=str(tmp_path / "model")),
                      metrics=kfp.dsl.Metrics(uri=str(tmp_path / "metrics")))
    body = jobspec.render_trainjob(seen["spec"], "tasn-train-x", environ={})
    runtime = yaml.safe_load((ROOT / "infra" / "k8s" / "base" / "training-runtime.yaml").read_text())
    resources = jobset_node_resources(runtime, body)
    assert resources["requests"] == {"cpu": "48", "memory": "384Gi", "nvidia.com/gpu": 8}
    assert resources["limits"] == {"memory": "384Gi", "nvidia.com/gpu": 8}


# --- 8. no credential in plain text -----------------------------------------------------------------

def test_submit_refuses_a_credential_in_any_argument_and_points_to_the_secret(monkeypatch):
    """A `-S tracking.uri=http://user:pw@host` used to reach `train_config`, `evaluate_config`,
    `register_config` (run arguments KFP stores, shows and puts on pod command lines) and the
    TrainJob's TASN_PARAMS_YAML env. Now nothing is sent; the message names the key and the Secret."""
    monkeypatch.setattr(runner, "connect", lambda *a: pytest.fail("connected with a credential to send"))
    with pytest.raises(ConfigError, match=r"tracking\.uri: a URI with a user or password.*the Secret "
                                          r"tasn-mlflow-credentials \(keys MLFLOW_TRACKING_USERNAME"):
        runner.submit("http://127.0.0.1:9", None, "s3://b/raw", params=ROOT / "params.yaml", namespace="ns",
                      overrides=["tracking.uri=http://jane:s3cr3t-pw@mlflow:5000"])
    with pytest.raises(ConfigError, match=r"work_uri: a URI with a user or password.*tasn-s3-credentials"):
        runner.submit("h", None, "s3://b/raw", params=None, work_uri="s3://AKIA:sekret@b/runs")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-longer")
    with pytest.raises(ConfigError, match=r"register\.model_name: the value of a secret environment variable"):
        runner.submit("h", None, "s3://b/raw", params=None, overrides=["register.model_name=hunter2-longer"])
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    for profile in [None, *PROFILES]:  # what ships is never taken for a credential
        args = runner.arguments("s3://b/raw", load_config(ROOT / "params.yaml", profile), image="reg/tasn:1",
                                s3_secret="tasn-s3-credentials", mlflow_secret="tasn-mlflow-credentials")
        assert stage_configs.credentials_in(args) == [], profile


def test_a_rendered_job_never_carries_a_credential_in_plain_text():
    """The TrainJob (and PyTorchJob) env and node args: TASN_PARAMS_YAML, `-S` overrides and the
    values forwarded from the launcher's environment; credentials go by secretKeyRef only."""
    base = dict(image="i", num_nodes=2, gpus_per_node=8, data_uri="s3://b/p", work_uri="s3://b/w")
    with pytest.raises(TASNError, match="TASN_PARAMS_YAML holds a credential"):
        jobspec.render_trainjob(jobspec.TrainJobSpec(**base, params_yaml="tracking: {uri: 'https://u:p@m'}\n"), "n")
    with pytest.raises(TASNError, match="tracking.password holds a credential"):
        jobspec.render_trainjob(jobspec.TrainJobSpec(**base, overrides=["tracking.password=abcdefgh"]), "n")
    with pytest.raises(TASNError, match="MLFLOW_TRACKING_URI holds a credential"):
        jobspec.render_job(jobspec.TrainJobSpec(**base, kind="PyTorchJob"), "n",
                           environ={"MLFLOW_TRACKING_URI": "http://u:pw@mlflow:5000"})
    body = jobspec.render_trainjob(jobspec.TrainJobSpec(**base), "n", environ={"MLFLOW_TRACKING_URI": "http://m:5000"})
    plain = [e for e in body["spec"]["trainer"]["env"] if "value" in e]
    assert all(not stage_configs.credentials_in({e["name"]: e["value"]}) for e in plain)


# --- 9. what the docs say -----------------------------------------------------------------------------

def test_the_docs_say_what_the_pipeline_does():
    """docs/pipeline.md's promote retries are the pipeline's; docs/cluster.md names the minimum
    backend the compiled YAML needs (not "2.x"), Argo as KFP installs it, the pinned Trainer."""
    pipeline_md = (ROOT / "docs" / "pipeline.md").read_text()
    assert f"{tasn_pipeline.PROMOTE_RETRIES} with today's {tasn_pipeline.LOCK_LEASE_S:g} s lease" in pipeline_md
    assert "5 with today's 600 s lease" not in pipeline_md
    cluster_md = (ROOT / "docs" / "cluster.md").read_text()
    needed, _ = server.required_backend(list(compiled()))
    assert f"Kubeflow Pipelines backend **{needed}** or later" in cluster_md
    assert "Kubeflow Pipelines 2.x for" not in cluster_md
    assert f"Trainer **{jobspec.TRAINER_VERSION}**" in cluster_md and "Argo Workflows v3.6.7" in cluster_md
    assert "kfp-launcher" in cluster_md and "OnError" in cluster_md and "maxDuration" in cluster_md
