"""Infrastructure: the kustomize overlays build, core resources pass kubernetes-validate --strict
for the pinned Kubernetes version, Kubeflow CRD instances validate against the schemas kept in
infra/crds/, and policy checks over what a cluster would receive: Pod Security "restricted" for
every pod template (kustomize output, examples, the launcher's rendered jobs), NetworkPolicies
that let each pod reach exactly the services its configuration names, MLflow behind basic auth,
secrets only by reference and never in argv, images pinned by digest, the lock file current.

The tools these tests drive (kubectl, hadolint, kubernetes-validate, the Kubeflow API models) are
dev extras that `make test` installs; a missing one fails the test. TASN_ALLOW_MISSING_TOOLS=1 turns
that into a skip, for a machine that deliberately lacks them.
"""
from __future__ import annotations

import copy
import importlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
sys.path.insert(0, str(INFRA / "crds"))
import validate as crds  # noqa: E402  (infra/crds/validate.py)

from pipelines.tasn_pipeline import S3_SECRET, S3_SECRET_KEYS  # noqa: E402  (what the tasks read S3 with)
from tasn import jobspec  # noqa: E402  (its rendered jobs are pod templates too)

OVERLAYS = ["local", "gpu"]
EXAMPLES = sorted((INFRA / "k8s" / "examples").glob("*.yaml"))
KUBERNETES_VERSION = crds.KUBERNETES_VERSION  # the version every manifest is checked against
CRD_KINDS = {kind for _, kind in crds.CRD_SCHEMAS}
BIN = Path(sys.executable).parent
DOCKERFILES = {"cuda": INFRA / "docker" / "Dockerfile", "cpu": INFRA / "docker" / "Dockerfile.cpu"}


ALLOW_MISSING = os.environ.get("TASN_ALLOW_MISSING_TOOLS") == "1"


def _missing(what: str) -> NoReturn:
    message = f"{what} is not installed; `make install` brings it (pyproject dev extras)"
    if ALLOW_MISSING:
        pytest.skip(message + " [TASN_ALLOW_MISSING_TOOLS=1]")
    pytest.fail(message + " (or set TASN_ALLOW_MISSING_TOOLS=1 to skip)")


def _tool(name: str) -> str:
    """A command from this interpreter's environment (dev extras), else from PATH."""
    path = str(BIN / name) if (BIN / name).exists() else shutil.which(name)
    if path is None:
        _missing(name)
    return path


def _import(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        _missing(f"the Python module {module}")


def kustomize(path: Path) -> list[dict]:
    proc = subprocess.run([_tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: kustomize(INFRA / "k8s" / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(scope="module")
def profile() -> list[dict]:
    """infra/k8s/kfp-profile as committed (profile kubeflow-user-example-com)."""
    return kustomize(INFRA / "k8s" / "kfp-profile")


def _load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _by(docs, kind, name):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _pod_specs(doc):
    """Every pod spec inside a manifest, wherever the kind nests it (Deployment, JobSet, PyTorchJob)."""
    if isinstance(doc, dict):
        if isinstance(doc.get("containers"), list):
            yield doc
        for v in doc.values():
            yield from _pod_specs(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _pod_specs(v)


def _workloads(rendered):
    for overlay, docs in rendered.items():
        yield from ((overlay, d) for d in docs)
    for path in EXAMPLES:
        yield from (("examples", d) for d in _load(path))


# --- builds and schemas -------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_with_the_whole_stack(rendered, overlay):
    docs = rendered[overlay]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for expected in [("Namespace", "tasn"), ("Deployment", "mlflow"), ("Service", "mlflow"),
                     ("StatefulSet", "postgres"), ("Service", "postgres"), ("ConfigMap", "tasn-s3-config"),
                     ("ServiceAccount", "tasn-pipeline-runner"), ("Role", "tasn-pipeline-runner"),
                     ("RoleBinding", "tasn-pipeline-runner"), ("TrainingRuntime", "tasn-torch-distributed"),
                     ("NetworkPolicy", "default-deny-all")]:
        assert expected in kinds, f"overlays/{overlay} lacks {expected}"
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == "tasn", f"{d['kind']}/{d['metadata']['name']} not in tasn"
    assert not any(d["metadata"]["name"] in ("tasn-network-params", "tasn-kfp-profile") for d in docs), \
        "local-config parameters must not reach the cluster"
    pvc = _by(docs, "StatefulSet", "postgres")["spec"]["volumeClaimTemplates"][0]
    assert pvc["spec"]["resources"]["requests"]["storage"]


def test_overlays_differ_where_they_should(rendered):
    def image(docs):
        return _by(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["image"]

    def runtime_limits(docs):
        rt = _by(docs, "TrainingRuntime", "tasn-torch-distributed")
        return next(_pod_specs(rt))["containers"][0]["resources"]["limits"]

    local, gpu = rendered["local"], rendered["gpu"]
    assert image(local).endswith("-cpu") and "cuda" in image(gpu)
    assert "nvidia.com/gpu" in runtime_limits(gpu) and "nvidia.com/gpu" not in runtime_limits(local)
    gpu_pod = next(_pod_specs(_by(gpu, "TrainingRuntime", "tasn-torch-distributed")))
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu_pod["tolerations"]) and gpu_pod["nodeSelector"]
    assert ("Deployment", "minio") in {(d["kind"], d["metadata"]["name"]) for d in local}
    endpoint = {o: _by(d, "ConfigMap", "tasn-s3-config")["data"]["AWS_ENDPOINT_URL"] for o, d in rendered.items()}
    assert "minio" in endpoint["local"] and "minio" not in endpoint["gpu"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_resources_pass_kubernetes_validate_strict(rendered, profile, overlay, tmp_path):
    core = [d for d in rendered[overlay] + profile if d["kind"] not in CRD_KINDS]
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all(core))
    proc = subprocess.run([_tool("kubernetes-validate"), "--strict", "--quiet",
                           "-k", KUBERNETES_VERSION, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_kubernetes_validate_catches_a_misspelt_field(rendered, tmp_path):
    deploy = copy.deepcopy(_by(rendered["gpu"], "Deployment", "mlflow"))
    deploy["spec"]["template"]["spec"]["containers"][0]["resources"]["limit"] = {"cpu": "1"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(deploy))
    proc = subprocess.run([_tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "limit" in proc.stdout + proc.stderr


def test_crd_instances_validate_against_kept_schemas(rendered):
    instances = [d for docs in rendered.values() for d in docs if d["kind"] in CRD_KINDS]
    instances += [d for path in EXAMPLES for d in _load(path)]
    assert {d["kind"] for d in instances} >= {"TrainingRuntime", "TrainJob", "PyTorchJob"}
    for d in instances:
        assert crds.validate_document(d) == [], f"{d['kind']}/{d['metadata']['name']}"


def _example(kind):
    return next(d for p in EXAMPLES for d in _load(p) if d["kind"] == kind)


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["spec"]["trainer"].update(numProcsPerNode=8), "numProcsPerNode"),
    (lambda d: d["spec"]["trainer"].update(numNodes="two"), "'two' is not of type 'integer'"),
    (lambda d: d["spec"].pop("runtimeRef"), "'runtimeRef' is a required property"),
    (lambda d: d["spec"]["runtimeRef"].update(name=""), "should be non-empty"),
    (lambda d: d["metadata"].update(name="Tasn_Train"), "does not match"),
    (lambda d: d["spec"]["trainer"]["env"][0].update(valu="x"), "valu"),  # a core type nested inside
    (lambda d: d["spec"]["trainer"]["resourcesPerNode"].update(limit={}), "limit"),
    (lambda d: d.update(apiVersion="trainer.kubeflow.org/v1"), "trainer.kubeflow.org/v1"),
])
def test_trainjob_schema_rejects_mistakes(mutate, expected):
    doc = copy.deepcopy(_example("TrainJob"))
    mutate(doc)
    errors = crds.validate_document(doc)
    assert errors and any(expected in e for e in errors), errors


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["spec"].pop("pytorchReplicaSpecs"), "'pytorchReplicaSpecs' is a required property"),
    (lambda d: d["spec"]["pytorchReplicaSpecs"]["Worker"].update(replica=2), "replica"),
    (lambda d: d["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"].update(tolerations="x"), "tolerations"),
])
def test_pytorchjob_schema_rejects_mistakes(mutate, expected):
    doc = copy.deepcopy(_example("PyTorchJob"))
    mutate(doc)
    errors = crds.validate_document(doc)
    assert errors and any(expected in e for e in errors), errors


def test_trainingruntime_schema_rejects_a_misplaced_field(rendered):
    rt = copy.deepcopy(_by(rendered["gpu"], "TrainingRuntime", "tasn-torch-distributed"))
    rt["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["securityContext"] = {}
    errors = crds.validate_document(rt)
    assert any("securityContext" in e for e in errors), errors


def test_examples_describe_n_nodes_by_g_gpus_with_s3_checkpoints():
    tj, pj = _example("TrainJob"), _example("PyTorchJob")
    trainer = tj["spec"]["trainer"]
    assert trainer["numNodes"] >= 2 and int(trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"]) >= 1
    assert trainer["numProcPerNode"] == int(trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"])
    assert "s3://" in trainer["args"][trainer["args"].index("--work-uri") + 1]
    assert tj["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                        "name": "tasn-torch-distributed"}
    replicas = sum(r["replicas"] for r in pj["spec"]["pytorchReplicaSpecs"].values())
    assert replicas == trainer["numNodes"]


def test_validate_cli_reports_file_and_field(tmp_path):
    bad = _example("TrainJob")
    bad["spec"]["trainer"]["nodes"] = 2
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(bad))
    proc = subprocess.run([sys.executable, str(INFRA / "crds" / "validate.py"), str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and str(path) in proc.stderr and "nodes" in proc.stderr
    ok = subprocess.run([sys.executable, str(INFRA / "crds" / "validate.py"), *map(str, EXAMPLES)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr


def test_schemas_match_the_pinned_api_models():
    """Regenerating from kubeflow-trainer-api / kubeflow-training gives the committed files."""
    _import("kubeflow_trainer_api")
    _import("kubeflow.training")
    import generate

    for target in generate.TARGETS:
        committed = (INFRA / "crds" / target[0]).read_text()
        assert json.loads(committed) == generate.build(target), target[0]


# --- policy over what the cluster receives ------------------------------------------------------

def test_every_container_is_locked_down_and_sized(rendered):
    checked = 0
    for where, doc in _workloads(rendered):
        for pod in _pod_specs(doc):
            pod_sc = pod.get("securityContext", {})
            assert pod_sc.get("runAsNonRoot") is True, f"{where} {doc['kind']}: pod runAsNonRoot"
            assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
            assert pod.get("automountServiceAccountToken") is False, \
                f"{where} {doc['kind']}/{doc['metadata']['name']}: no API token for pods that need none"
            mounts_of = {v["name"]: v for v in pod.get("volumes", [])}
            for c in pod["containers"] + pod.get("initContainers", []):
                name = f"{where} {doc['kind']}/{doc['metadata']['name']}:{c['name']}"
                sc = c.get("securityContext", {})
                assert sc.get("allowPrivilegeEscalation") is False, name
                assert sc.get("capabilities", {}).get("drop") == ["ALL"], name
                assert "add" not in sc.get("capabilities", {}), name
                assert sc.get("runAsNonRoot") is True, name
                assert sc.get("readOnlyRootFilesystem") is True, name
                assert not sc.get("privileged"), name
                tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
                assert tmp and "emptyDir" in mounts_of[tmp[0]["name"]], f"{name}: writable /tmp"
                res = c.get("resources", {})
                for key in ("cpu", "memory"):
                    assert key in res.get("requests", {}), f"{name}: requests.{key}"
                assert "memory" in res.get("limits", {}), f"{name}: limits.memory"
                assert "cpu" in res.get("limits", {}), f"{name}: limits.cpu"
                checked += 1
    assert checked >= 8


def test_services_have_probes(rendered):
    for overlay, docs in rendered.items():
        for d in docs:
            if d["kind"] in ("Deployment", "StatefulSet"):
                for c in d["spec"]["template"]["spec"]["containers"]:
                    assert "readinessProbe" in c and "livenessProbe" in c, f"{overlay} {d['metadata']['name']}"


SECRET_NAME = re.compile(r"(KEY|PASSWORD|SECRET|TOKEN)", re.I)


def _env_vars(doc):
    for pod in _pod_specs(doc):
        for c in pod["containers"] + pod.get("initContainers", []):
            yield from c.get("env", [])
    if doc.get("kind") == "TrainJob":
        yield from doc["spec"].get("trainer", {}).get("env", [])


def test_no_secret_material_in_manifests(rendered):
    for where, doc in _workloads(rendered):
        assert doc["kind"] != "Secret", f"{where}: a Secret in the manifests ({doc['metadata']['name']})"
        for var in _env_vars(doc):
            if SECRET_NAME.search(var["name"]):
                assert "value" not in var and "secretKeyRef" in var.get("valueFrom", {}), \
                    f"{where} {doc['kind']}: {var['name']} must come from a Secret"
        if doc["kind"] == "ConfigMap":
            assert not any(SECRET_NAME.search(k) for k in doc.get("data", {})), doc["metadata"]["name"]
    for example in (INFRA / "k8s" / "secrets").glob("*.example"):
        for line in example.read_text().splitlines():
            if "=" in line and not line.startswith("#") and SECRET_NAME.search(line.split("=")[0]):
                assert line.split("=", 1)[1] == "change-me", f"{example.name}: {line}"
    ignored = subprocess.run(["git", "check-ignore", "-q", "infra/k8s/secrets/s3.env"], cwd=ROOT)
    assert ignored.returncode == 0, "infra/k8s/secrets/*.env must be git-ignored"


def test_rbac_is_namespaced_and_least_privilege(rendered):
    for overlay, docs in rendered.items():
        kinds = {d["kind"] for d in docs}
        assert not kinds & {"ClusterRole", "ClusterRoleBinding", "ClusterTrainingRuntime"}, overlay
        role = _by(docs, "Role", "tasn-pipeline-runner")
        grants = {}
        for rule in role["rules"]:
            for part in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[part], f"wildcard in {part}"
            for group in rule["apiGroups"]:
                for res in rule["resources"]:
                    grants[(group, res)] = set(rule["verbs"])
        job_verbs = {"create", "get", "list", "watch", "delete"}
        assert grants[("trainer.kubeflow.org", "trainjobs")] == job_verbs
        assert grants[("kubeflow.org", "pytorchjobs")] == job_verbs
        assert grants[("", "pods")] == {"get", "list", "watch"} and grants[("", "pods/log")] == {"get"}
        assert not any(res in ("secrets", "roles", "rolebindings") for _, res in grants)
        binding = _by(docs, "RoleBinding", "tasn-pipeline-runner")
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": "tasn-pipeline-runner"}


# --- every pod template the cluster would run -----------------------------------------------------


NAMESPACE = "tasn"
PROFILE_NS = "kubeflow-user-example-com"  # infra/k8s/kfp-profile/profile.yaml as committed


@dataclass
class Pod:
    """One pod template as the API server would admit it: namespace, labels, annotations, spec."""

    where: str
    namespace: str
    labels: dict
    spec: dict
    annotations: dict = field(default_factory=dict)

    def containers(self):
        return [c for key in ("initContainers", "containers", "ephemeralContainers")
                for c in self.spec.get(key) or []]


def _templates_in(doc):
    """(metadata, spec) of every PodTemplateSpec nested in a manifest (Deployment, StatefulSet, Job,
    the JobSet inside a TrainingRuntime, PyTorchJob replicas)."""
    if isinstance(doc, dict):
        spec = doc.get("spec")
        if isinstance(spec, dict) and isinstance(spec.get("containers"), list):
            yield doc.get("metadata") or {}, spec
            return
        for v in doc.values():
            yield from _templates_in(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _templates_in(v)


def _trainjob_pod(job: dict, runtimes: dict[str, dict], where: str) -> Pod:
    """The node pod a TrainJob gets on Kubeflow Trainer v2.1: the runtime's pod template, the
    trainer's image/command/args/env/resources on the `node` container, then each
    podTemplateOverride for `node` merged in (labels and annotations merged, lists appended,
    containers merged by name)."""
    runtime = runtimes[job["spec"]["runtimeRef"]["name"]]
    (rjob,) = [r for r in runtime["spec"]["template"]["spec"]["replicatedJobs"] if r["name"] == jobspec.NODE_JOB]
    template = copy.deepcopy(rjob["template"]["spec"]["template"])
    meta, spec = template.setdefault("metadata", {}), template["spec"]
    node = next(c for c in spec["containers"] if c["name"] == jobspec.NODE_JOB)
    trainer = job["spec"].get("trainer", {})
    node.update({k: trainer[k] for k in ("image", "command", "args") if k in trainer})
    if "resourcesPerNode" in trainer:
        node["resources"] = trainer["resourcesPerNode"]
    env = {e["name"]: e for e in node.get("env", [])}
    env.update({e["name"]: e for e in trainer.get("env", [])})
    node["env"] = list(env.values())
    for override in job["spec"].get("podTemplateOverrides", []):
        if jobspec.NODE_JOB not in {t["name"] for t in override["targetJobs"]}:
            continue
        for key in ("labels", "annotations"):
            meta.setdefault(key, {}).update((override.get("metadata") or {}).get(key, {}))
        for key, value in (override.get("spec") or {}).items():
            if key in ("containers", "initContainers"):
                for patch in value:
                    target = next((c for c in spec.setdefault(key, []) if c["name"] == patch["name"]), None)
                    if target is None:
                        spec[key].append(copy.deepcopy(patch))
                        continue
                    for field_, items in patch.items():
                        if isinstance(items, list):
                            target[field_] = target.get(field_, []) + items
            elif isinstance(value, list):
                spec[key] = spec.get(key, []) + value
            else:
                spec[key] = value
    return Pod(where, job["metadata"].get("namespace", NAMESPACE), meta.get("labels", {}), spec,
               meta.get("annotations", {}))


def _runtimes(docs) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "TrainingRuntime"}


def _configmaps(docs, namespace: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d.get("data", {}) for d in docs
            if d["kind"] == "ConfigMap" and d["metadata"].get("namespace") == namespace}


LAUNCHER_SPECS = {  # what the pipeline's train task renders, on the overlay whose nodes fit it
    "gpu": [("TrainJob", 3, 8), ("PyTorchJob", 2, 8), ("PyTorchJob", 1, 4)],
    "local": [("TrainJob", 2, 0), ("PyTorchJob", 3, 0)],
}


def _launcher_jobs(overlay: str, docs) -> list[dict]:
    """The jobs tasn/launch.py renders, given the environment the train task has in a cluster
    (the client ConfigMaps of the namespace, as kfp-kubernetes injects them)."""
    configs = _configmaps(docs, NAMESPACE)
    environ = {**configs["tasn-s3-config"], **configs["tasn-mlflow-config"]}
    jobs = []
    for kind, nodes, gpus in LAUNCHER_SPECS[overlay]:
        spec = jobspec.TrainJobSpec(image="registry.example.com/ml/tasn:test", num_nodes=nodes, gpus_per_node=gpus,
                                   data_uri="s3://tasn/prepared/cub", work_uri="s3://tasn/runs/x", kind=kind)
        job = jobspec.render_job(spec, jobspec.job_name(f"{kind}{nodes}{gpus}"), environ=environ)
        job["metadata"]["namespace"] = NAMESPACE
        jobs.append(job)
    return jobs


def _pods(rendered) -> list[Pod]:
    """Every pod template of every overlay's output, of the examples (on the gpu overlay's
    runtime) and of the launcher's rendered TrainJobs and PyTorchJobs."""
    pods = []
    sources = {o: [("", d) for d in docs] + [("launcher ", j) for j in _launcher_jobs(o, docs)]
               for o, docs in rendered.items()}
    sources["gpu"] += [("example ", d) for path in EXAMPLES for d in _load(path)]
    for overlay, docs in sources.items():
        runtimes = _runtimes(rendered[overlay])
        for origin, doc in docs:
            where = f"{overlay} {origin}{doc['kind']}/{doc['metadata']['name']}"
            if doc["kind"] == "TrainJob":
                pods.append(_trainjob_pod(doc, runtimes, where))
                continue
            for meta, spec in _templates_in(doc):
                pods.append(Pod(where, doc["metadata"].get("namespace", NAMESPACE), meta.get("labels", {}), spec,
                                meta.get("annotations", {})))
    return pods


# --- Pod Security Standards: "restricted" ---------------------------------------------------------
# Written from https://kubernetes.io/docs/concepts/security/pod-security-standards/ (the baseline
# controls, which "restricted" includes, then the restricted ones), as Pod Security admission
# checks them at `enforce-version: latest`. Every rule names its control, so a failure says which.

BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def restricted_violations(pod: Pod) -> list[str]:
    """The Pod Security "restricted" controls `pod` breaks (empty: admitted)."""
    spec, found = pod.spec, []
    pod_sc = spec.get("securityContext") or {}

    def bad(control, where=""):
        found.append(f"{control}{' (' + where + ')' if where else ''}")

    # baseline
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            bad("Host Namespaces", key)
    for key, value in (pod.annotations or {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and \
                value != "runtime/default" and not value.startswith("localhost/"):
            bad("AppArmor", key)
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl["name"] not in SAFE_SYSCTLS:
            bad("Sysctls", sysctl["name"])
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if "hostPath" in kinds:
            bad("HostPath Volumes", volume["name"])
        elif not kinds <= RESTRICTED_VOLUMES:
            bad("Volume Types", f"{volume['name']}: {', '.join(sorted(kinds - RESTRICTED_VOLUMES))}")
    for where, sc in [("pod", pod_sc)] + [(c["name"], c.get("securityContext") or {}) for c in pod.containers()]:
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            bad("HostProcess", where)
        selinux = sc.get("seLinuxOptions") or {}
        if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
            bad("SELinux", where)
        if (sc.get("appArmorProfile") or {}).get("type", "RuntimeDefault") not in ("RuntimeDefault", "Localhost"):
            bad("AppArmor", where)
        if sc.get("runAsUser") == 0:
            bad("Running as Non-root user", where)
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            bad("Seccomp", where)
    for c in pod.containers():
        sc, name = c.get("securityContext") or {}, c["name"]
        if sc.get("privileged"):
            bad("Privileged Containers", name)
        if any(p.get("hostPort") for p in c.get("ports") or []):
            bad("Host Ports", name)
        if sc.get("procMount", "Default") != "Default":
            bad("/proc Mount Type", name)
        caps = sc.get("capabilities") or {}
        if not set(caps.get("add") or []) <= BASELINE_CAPABILITIES:
            bad("Capabilities (baseline)", name)
        # restricted
        if sc.get("allowPrivilegeEscalation") is not False:
            bad("Privilege Escalation", name)
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            bad("Running as Non-root", name)
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad("Seccomp", name)
        if "ALL" not in (caps.get("drop") or []) or not set(caps.get("add") or []) <= {"NET_BIND_SERVICE"}:
            bad("Capabilities", name)
    return found


def _compliant_pod() -> Pod:
    return Pod("reference", NAMESPACE, {}, {
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{"name": "c", "image": "x", "securityContext": {
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}],
        "volumes": [{"name": "tmp", "emptyDir": {}}, {"name": "cfg", "configMap": {"name": "x"}}],
    })


def _container_sc(pod):
    return pod.spec["containers"][0]["securityContext"]


@pytest.mark.parametrize("mutate, control", [
    (lambda p: p.spec.update(hostNetwork=True), "Host Namespaces"),
    (lambda p: p.spec.update(hostPID=True), "Host Namespaces"),
    (lambda p: _container_sc(p).update(privileged=True), "Privileged Containers"),
    (lambda p: _container_sc(p)["capabilities"].update(add=["SYS_ADMIN"]), "Capabilities (baseline)"),
    (lambda p: _container_sc(p)["capabilities"].update(add=["CHOWN"]), "Capabilities"),
    (lambda p: _container_sc(p)["capabilities"].update(drop=["NET_RAW"]), "Capabilities"),
    (lambda p: p.spec["volumes"].append({"name": "host", "hostPath": {"path": "/"}}), "HostPath Volumes"),
    (lambda p: p.spec["volumes"].append({"name": "n", "nfs": {"server": "s", "path": "/"}}), "Volume Types"),
    (lambda p: p.spec["containers"][0].update(ports=[{"containerPort": 80, "hostPort": 80}]), "Host Ports"),
    (lambda p: _container_sc(p).update(procMount="Unmasked"), "/proc Mount Type"),
    (lambda p: _container_sc(p).update(seLinuxOptions={"type": "spc_t"}), "SELinux"),
    (lambda p: _container_sc(p).update(appArmorProfile={"type": "Unconfined"}), "AppArmor"),
    (lambda p: p.annotations.update({"container.apparmor.security.beta.kubernetes.io/c": "unconfined"}), "AppArmor"),
    (lambda p: p.spec["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]), "Sysctls"),
    (lambda p: _container_sc(p).pop("allowPrivilegeEscalation"), "Privilege Escalation"),
    (lambda p: p.spec["securityContext"].pop("runAsNonRoot"), "Running as Non-root"),
    (lambda p: _container_sc(p).update(runAsNonRoot=False), "Running as Non-root"),
    (lambda p: _container_sc(p).update(runAsUser=0), "Running as Non-root user"),
    (lambda p: p.spec["securityContext"].pop("seccompProfile"), "Seccomp"),
    (lambda p: _container_sc(p).update(seccompProfile={"type": "Unconfined"}), "Seccomp"),
    (lambda p: _container_sc(p).update(windowsOptions={"hostProcess": True}), "HostProcess"),
    (lambda p: p.spec.update(initContainers=[{"name": "init", "image": "x"}]), "Privilege Escalation"),
])
def test_restricted_checker_flags_each_control(mutate, control):
    pod = _compliant_pod()
    assert restricted_violations(pod) == []
    mutate(pod)
    found = restricted_violations(pod)
    assert any(v == control or v.startswith(control + " (") for v in found), found


def test_every_pod_template_meets_pod_security_restricted(rendered):
    pods = _pods(rendered)
    failures = {p.where: v for p in pods if (v := restricted_violations(p))}
    assert not failures, failures
    wheres = " ".join(p.where for p in pods)
    for expected in ("Deployment/mlflow", "StatefulSet/postgres", "Deployment/minio", "Job/minio-make-buckets",
                     "TrainingRuntime/tasn-torch-distributed", "example TrainJob", "example PyTorchJob",
                     "launcher TrainJob", "launcher PyTorchJob"):
        assert expected in wheres, f"no pod template from {expected}"


def test_launcher_jobs_are_hardened_themselves():
    """A PyTorchJob has no runtime to inherit from: its own pods must be admitted as rendered, and
    a TrainJob's override must not weaken the runtime (v2.1 overrides cannot set a securityContext)."""
    spec = jobspec.TrainJobSpec(image="r/tasn:1", num_nodes=2, gpus_per_node=8, data_uri="s3://b/d", work_uri="s3://b/w",
                               kind="PyTorchJob")
    job = jobspec.render_job(spec, "n", environ={})
    pods = [Pod(f"PyTorchJob {r}", NAMESPACE, m.get("labels", {}), s, m.get("annotations", {}))
            for r, (m, s) in zip(job["spec"]["pytorchReplicaSpecs"], _templates_in(job))]
    assert len(pods) == 2 and all(restricted_violations(p) == [] for p in pods)
    assert all(p.spec["automountServiceAccountToken"] is False for p in pods)
    tj = jobspec.render_job(jobspec.TrainJobSpec(**{**spec.__dict__, "kind": "TrainJob"}), "n", environ={})
    (override,) = tj["spec"]["podTemplateOverrides"]
    assert "securityContext" not in override["spec"] and override["metadata"]["labels"] == jobspec.POD_LABELS


# --- NetworkPolicies: each pod reaches what its configuration names, nothing else ----------------

@dataclass(frozen=True)
class Peer:
    """A pod (namespace + labels) or an address outside the cluster (namespace None + cidr)."""

    namespace: str | None
    labels: tuple = ()
    cidr: str | None = None

    @classmethod
    def pod(cls, namespace, labels):
        return cls(namespace, tuple(sorted(labels.items())))


def _selects(selector, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _peer_matches(rule_peer: dict, policy_ns: str, peer: Peer) -> bool:
    if "ipBlock" in rule_peer:
        if peer.cidr is None:
            return False
        block, addr = ipaddress.ip_network(rule_peer["ipBlock"]["cidr"]), ipaddress.ip_network(peer.cidr)
        if addr.version != block.version:
            return False
        # mypy cannot narrow the (IPv4Network, IPv6Network) pair by `version`
        return addr.subnet_of(block) and not any(addr.overlaps(ipaddress.ip_network(e))  # type: ignore[arg-type]
                                                 for e in rule_peer["ipBlock"].get("except", []))
    if peer.namespace is None:
        return False
    if "namespaceSelector" in rule_peer:
        ns_ok = _selects(rule_peer["namespaceSelector"], {"kubernetes.io/metadata.name": peer.namespace})
    else:
        ns_ok = peer.namespace == policy_ns
    return ns_ok and _selects(rule_peer.get("podSelector") or {}, dict(peer.labels))


def _permits(policies, direction: str, subject: Peer, other: Peer, port: int, protocol: str) -> bool:
    """NetworkPolicy semantics: a pod no policy of its namespace selects for `direction` is open;
    otherwise some rule of a selecting policy must match the peer and the port."""
    if subject.namespace is None:
        return True
    selecting = [p for p in policies if p["metadata"]["namespace"] == subject.namespace
                 and direction in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], dict(subject.labels))]
    if not selecting:
        return True
    peer_key = "to" if direction == "Egress" else "from"
    for p in selecting:
        for rule in p["spec"].get(direction.lower()) or []:
            peers = rule.get(peer_key)
            ports = rule.get("ports")
            peer_ok = peers is None or any(_peer_matches(x, p["metadata"]["namespace"], other) for x in peers)
            port_ok = ports is None or any(x.get("protocol", "TCP") == protocol and x.get("port") in (None, port)
                                           for x in ports)
            if peer_ok and port_ok:
                return True
    return False


def _allowed(policies, src: Peer, dst: Peer, port: int, protocol: str = "TCP") -> bool:
    """Whether `src` may open `port` on `dst`: egress from src and ingress to dst both allow it."""
    return (_permits(policies, "Egress", src, dst, port, protocol)
            and _permits(policies, "Ingress", dst, src, port, protocol))


DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432}
S3_ENDPOINT_VARS = ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")


def _env_of(pod: Pod, configmaps: dict[str, dict]) -> dict[str, str]:
    """The plain values a pod's containers get (value, envFrom and configMapKeyRef; secrets are not
    destinations), as the kubelet would resolve them in the pod's namespace."""
    env = {}
    for c in pod.containers():
        for source in c.get("envFrom") or []:
            env.update(configmaps.get((source.get("configMapRef") or {}).get("name", ""), {}))
        for var in c.get("env") or []:
            ref = (var.get("valueFrom") or {}).get("configMapKeyRef")
            if "value" in var:
                env[var["name"]] = var["value"]
            elif ref:
                env[var["name"]] = configmaps.get(ref["name"], {}).get(ref["key"], "")
    return env


def _destinations(pod: Pod, docs, params: dict) -> list[tuple[str, Peer, int]]:
    """(what, peer, port) for every server a pod's configuration names: URLs whose host is a
    Service resolve to that Service's pods and target port; the S3 endpoint outside the cluster
    resolves to the overlay's s3Cidr (the address range the operator declares for it)."""
    configmaps = _configmaps(docs, pod.namespace)
    out = []
    for name, value in _env_of(pod, configmaps).items():
        url = urlsplit(value)
        if url.scheme not in DEFAULT_PORTS or not url.hostname:
            continue
        parts = url.hostname.split(".")
        svc_ns = parts[1] if len(parts) > 1 else pod.namespace
        services = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == parts[0]
                    and d["metadata"].get("namespace") == svc_ns]
        port = url.port or DEFAULT_PORTS[url.scheme]
        if not services:
            assert name in S3_ENDPOINT_VARS, f"{pod.where}: {name}={value} names no Service and is not the S3 endpoint"
            out.append((name, Peer(None, cidr=params["s3Cidr"]), port))
            assert port == int(params["s3Port"]), f"{pod.where}: {name} port {port} but s3Port {params['s3Port']}"
            continue
        (svc,) = services
        sport = next(p for p in svc["spec"]["ports"] if p["port"] == port)
        selector = {"matchLabels": svc["spec"]["selector"]}
        targets = [t for t in _pods_of(docs) if t.namespace == svc_ns and _selects(selector, t.labels)]
        assert targets, f"{pod.where}: Service {svc_ns}/{parts[0]} selects no pod"
        for target in targets:
            target_port = sport.get("targetPort", port)
            if isinstance(target_port, str):
                target_port = next(p["containerPort"] for c in target.containers() for p in c.get("ports") or []
                                   if p.get("name") == target_port)
            out.append((f"{name} -> {target.where}", Peer.pod(svc_ns, target.labels), target_port))
    return out


def _pods_of(docs) -> list[Pod]:
    return [Pod(f"{d['kind']}/{d['metadata']['name']}", d["metadata"].get("namespace", NAMESPACE),
                m.get("labels", {}), s) for d in docs if d["kind"] != "TrainJob" for m, s in _templates_in(d)]


def _params(overlay: str) -> dict:
    return yaml.safe_load((INFRA / "k8s" / "overlays" / overlay / "params.yaml").read_text())["data"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_pod_reaches_every_server_its_configuration_names(rendered, profile, overlay):
    """Computed, not listed: for every pod template (overlay output, examples, the launcher's
    jobs), each URL in its environment (MLflow, S3, Postgres, MinIO) must be allowed by the
    NetworkPolicies, egress from the pod and ingress at the server."""
    docs = rendered[overlay] + (profile if overlay == "gpu" else [])
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    params = _params(overlay)
    checked = set()
    for pod in _pods(rendered):
        if not pod.where.startswith(overlay + " "):
            continue
        for what, peer, port in _destinations(pod, docs, params):
            assert _allowed(policies, Peer.pod(pod.namespace, pod.labels), peer, port), \
                f"{pod.where} cannot reach {what} on {port}: labels {pod.labels}"
            checked.add((pod.where.split()[-1], what.split()[0]))
    names = {w for w, _ in checked}
    assert {"Deployment/mlflow", "TrainingRuntime/tasn-torch-distributed"} <= names
    for kind in ("TrainJob", "PyTorchJob"):
        assert any(w.startswith(f"{kind}/tasn-train-") for w in names), f"the launcher's {kind}s were checked"
    assert {v for _, v in checked} >= {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "MLFLOW_BACKEND_STORE_URI"}


def test_profile_pipeline_pods_reach_mlflow_only_with_the_label(rendered, profile):
    """A KFP task in the profile namespace that carries the label reaches MLflow; the same pod
    without it, or with it in any other namespace, does not."""
    docs = rendered["gpu"] + profile
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    mlflow = Peer.pod(NAMESPACE, _by(docs, "Deployment", "mlflow")["spec"]["template"]["metadata"]["labels"])
    task = Pod("kfp task", PROFILE_NS, {"tasn/mlflow-client": "true"},
               {"containers": [{"name": "main", "envFrom": [{"configMapRef": {"name": "tasn-mlflow-config"}}]}]})
    ((what, peer, port),) = [d for d in _destinations(task, docs, _params("gpu"))
                             if d[0].startswith("MLFLOW_TRACKING_URI")]
    assert peer == mlflow and port == 5000
    assert _allowed(policies, Peer.pod(PROFILE_NS, task.labels), mlflow, 5000)
    assert not _allowed(policies, Peer.pod(PROFILE_NS, {}), mlflow, 5000)
    assert not _allowed(policies, Peer.pod("kubeflow-user-mallory", task.labels), mlflow, 5000)
    assert not _allowed(policies, Peer.pod(PROFILE_NS, task.labels), mlflow, 22)
    assert not _allowed(policies, Peer.pod("kubeflow", task.labels), mlflow, 5000)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_refuse_everything_else(rendered, profile, overlay):
    docs = rendered[overlay] + profile
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    deny = _by(docs, "NetworkPolicy", "default-deny-all")["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny

    def pod(kind, name):
        return Peer.pod(NAMESPACE, _by(docs, kind, name)["spec"]["template"]["metadata"]["labels"])

    mlflow, postgres = pod("Deployment", "mlflow"), pod("StatefulSet", "postgres")
    runtime = _by(docs, "TrainingRuntime", "tasn-torch-distributed")
    trainer = Peer.pod(NAMESPACE, next(_templates_in(runtime))[0]["labels"])
    runner = Peer.pod(NAMESPACE, {"app.kubernetes.io/component": "pipeline-runner", "tasn/mlflow-client": "true"})
    stranger = Peer.pod(NAMESPACE, {"app.kubernetes.io/name": "something-else"})
    dns = Peer.pod("kube-system", {"k8s-app": "kube-dns"})
    params = _params(overlay)
    s3, api = Peer(None, cidr=params["s3Cidr"]), Peer(None, cidr=params["apiServerCidr"])
    internet = Peer(None, cidr="8.8.8.8/32")
    assert _allowed(policies, trainer, trainer, 29500)  # torch rendezvous between nodes
    assert _allowed(policies, runner, api, int(params["apiServerPort"]))
    for src in (trainer, mlflow, runner, stranger, postgres):
        assert _allowed(policies, src, dns, 53, "UDP") and _allowed(policies, src, dns, 53, "TCP")
        assert not _allowed(policies, src, internet, 443), f"{src} reaches the internet"
        assert not _allowed(policies, src, internet, 80)
    for src in (trainer, mlflow, runner):
        assert _allowed(policies, src, s3, int(params["s3Port"]))
    for src in (trainer, mlflow, stranger, postgres):
        assert not _allowed(policies, src, api, int(params["apiServerPort"])), f"{src} reaches the API server"
    assert not _allowed(policies, stranger, s3, int(params["s3Port"])) and not _allowed(policies, postgres, s3, 443)
    assert not _allowed(policies, trainer, postgres, 5432)
    assert not _allowed(policies, stranger, mlflow, 5000)
    assert not _allowed(policies, postgres, mlflow, 5000)
    assert not _allowed(policies, mlflow, postgres, 22)
    assert not _allowed(policies, Peer.pod("other", {"tasn/mlflow-client": "true"}), mlflow, 5000)
    for p in policies:
        for rule in p["spec"].get("egress", []) + p["spec"].get("ingress", []):
            for peer in rule.get("to", []) + rule.get("from", []):
                if "ipBlock" in peer:
                    net = ipaddress.ip_network(peer["ipBlock"]["cidr"])  # also: a valid CIDR, not a placeholder
                    assert net.prefixlen > 0, f"{p['metadata']['name']}: {net} is everything"
    if overlay == "local":
        minio = pod("Deployment", "minio")
        assert not _allowed(policies, stranger, minio, 9000)


def test_network_params_drive_the_egress_policies(tmp_path):
    """Changing params.yaml moves the S3 and API server rules (the kustomize component works)."""
    tree = tmp_path / "k8s"
    shutil.copytree(INFRA / "k8s", tree)
    params = tree / "overlays" / "gpu" / "params.yaml"
    text = params.read_text()
    for key, value in {"s3Cidr": "10.20.30.0/24", "s3Port": "9443", "apiServerCidr": "10.0.0.1/32",
                       "apiServerPort": "443", "dnsServiceCidr": "10.43.0.10/32"}.items():
        text = re.sub(rf"^  {key}: .*$", f"  {key}: \"{value}\"", text, flags=re.M)
    params.write_text(text)
    docs = kustomize(tree / "overlays" / "gpu")
    s3 = _by(docs, "NetworkPolicy", "s3-egress")["spec"]["egress"][0]
    api = _by(docs, "NetworkPolicy", "pipeline-runner-egress-to-apiserver")["spec"]["egress"][0]
    assert s3["to"] == [{"ipBlock": {"cidr": "10.20.30.0/24"}}] and s3["ports"] == [{"protocol": "TCP", "port": 9443}]
    assert api["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}] and api["ports"] == [{"protocol": "TCP", "port": 443}]
    dns = _by(docs, "NetworkPolicy", "allow-dns")["spec"]["egress"][0]
    assert dns["to"][0] == {"ipBlock": {"cidr": "10.43.0.10/32"}}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_resolves_names_with_nodelocal_dnscache_too(rendered, overlay):
    """NodeLocal DNSCache (kubernetes/dns, k8s-app: node-local-dns) runs with hostNetwork, so no
    podSelector matches it; pods reach it at its link-local address 169.254.20.10 or, in its
    default iptables mode, at the kube-dns ClusterIP it answers without DNAT. Port 53 only."""
    policies = [d for d in rendered[overlay] if d["kind"] == "NetworkPolicy"]
    cluster_ip = Peer(None, cidr=_params(overlay)["dnsServiceCidr"])
    node_local = Peer(None, cidr="169.254.20.10/32")
    for pod in [p for p in _pods(rendered) if p.where.startswith(overlay + " ")]:
        src = Peer.pod(pod.namespace, pod.labels)
        for dns in (cluster_ip, node_local, Peer.pod("kube-system", {"k8s-app": "kube-dns"})):
            assert _allowed(policies, src, dns, 53, "UDP") and _allowed(policies, src, dns, 53, "TCP"), pod.where
            assert not _allowed(policies, src, dns, 443), pod.where


# --- the Kubeflow profile namespace ---------------------------------------------------------------

def test_profile_gets_the_client_config_and_tasn_admits_it(rendered, profile):
    in_profile = {d["metadata"]["name"]: d for d in profile if d["metadata"].get("namespace") == PROFILE_NS}
    in_tasn = {(d["kind"], d["metadata"]["name"]): d for d in profile if d["metadata"].get("namespace") == NAMESPACE}
    assert set(in_profile) == {"tasn-s3-config", "tasn-mlflow-config", "kfp-launcher"}
    assert set(in_tasn) == {("NetworkPolicy", f"mlflow-ingress-from-profile.{PROFILE_NS}"),
                            ("RoleBinding", f"tasn-pipeline-runner.{PROFILE_NS}")}
    tasn_side = _configmaps(rendered["gpu"], NAMESPACE)
    for name in ("tasn-s3-config", "tasn-mlflow-config"):
        assert in_profile[name]["data"] == tasn_side[name], f"{name} differs between the profile and tasn"
    binding = in_tasn[("RoleBinding", f"tasn-pipeline-runner.{PROFILE_NS}")]
    assert binding["roleRef"]["name"] == "tasn-pipeline-runner" and binding["roleRef"]["kind"] == "Role"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "default-editor", "namespace": PROFILE_NS}]


def s3_session(providers_text: str, path: str) -> dict[str, str]:
    """kubeflow/pipelines 2.17.0 backend/src/v2/config/env.go (Config.getBucketProviders, a YAML
    `providers` key of the ConfigMap kfp-launcher) and config/s3.go (S3ProviderConfig.
    ProvideSessionInfo): the session the driver gives the launcher for an s3:// pipeline root.
    No provider, or no default: fromEnv, i.e. the pod's own environment."""
    s3 = (yaml.safe_load(providers_text) or {}).get("s3") or {}
    bucket, _, prefix = path.removeprefix("s3://").partition("/")
    default, overrides = s3.get("default"), s3.get("overrides") or s3.get("Overrides")
    if default is None and overrides is None:
        return {"fromEnv": "true"}
    assert default and default.get("credentials"), "invalid provider config: missing default credentials"
    params = {"endpoint": default.get("endpoint", ""), "region": default.get("region", ""),
              "disableSSL": str(default.get("disableSSL", False)).lower(),
              "forcePathStyle": str(default.get("forcePathStyle", True)).lower(),
              "fromEnv": str(default["credentials"].get("fromEnv", False)).lower()}
    if params["fromEnv"] == "false":
        ref = default["credentials"]["secretRef"]
        params.update(secretName=ref["secretName"], accessKeyKey=ref["accessKeyKey"], secretKeyKey=ref["secretKeyKey"])
    for override in overrides or []:
        assert not (override["bucketName"] == bucket and prefix.startswith(override.get("keyPrefix", ""))), \
            "an override applies: extend this port before relying on it"
    return params


def test_the_launcher_opens_the_pipeline_root_with_the_profiles_s3_secret(profile):
    """Without `providers` an s3:// root is opened fromEnv, i.e. with keys only some tasks' pods have
    (backend/src/v2/objectstore/object_store.go, createS3BucketSession). The profile's kfp-launcher
    gives every task's launcher the S3 endpoint and region of tasn-s3-config and the keys of the
    Secret the pipeline's tasks use, for the default root, in the bucket the data lives in."""
    (launcher,) = [d for d in profile if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "kfp-launcher"]
    assert launcher["metadata"]["namespace"] == PROFILE_NS  # the driver reads its own namespace's (env.go)
    client = _configmaps(profile, PROFILE_NS)["tasn-s3-config"]
    root = launcher["data"]["defaultPipelineRoot"]
    assert root.startswith(f"s3://{client['TASN_S3_BUCKET']}/") and client["TASN_WORK_URI"].startswith(
        f"s3://{client['TASN_S3_BUCKET']}/")
    session = s3_session(launcher["data"]["providers"], root)
    assert session["fromEnv"] == "false"
    assert (session["endpoint"], session["region"]) == (client["AWS_ENDPOINT_URL"], client["AWS_DEFAULT_REGION"])
    assert session["disableSSL"] == str(client["AWS_ENDPOINT_URL"].startswith("http://")).lower()
    assert session["secretName"] == S3_SECRET
    assert {session["accessKeyKey"], session["secretKeyKey"]} == set(S3_SECRET_KEYS) <= _secret_templates()[S3_SECRET]
    assert s3_session("", root) == {"fromEnv": "true"}  # what the profile had before


def test_profile_namespace_is_one_parameter(tmp_path):
    tree = tmp_path / "k8s"
    shutil.copytree(INFRA / "k8s", tree)
    (tree / "profiles" / "jane").mkdir(parents=True)
    (tree / "profiles" / "jane" / "kustomization.yaml").write_text(
        (tree / "kfp-profile" / "kustomization.yaml").read_text().replace("../components/", "../../components/"))
    (tree / "profiles" / "jane" / "profile.yaml").write_text(
        (tree / "kfp-profile" / "profile.yaml").read_text().replace(PROFILE_NS, "kubeflow-user-jane"))
    docs = kustomize(tree / "profiles" / "jane")
    text = yaml.safe_dump_all(docs)
    assert PROFILE_NS not in text and "PROFILE" not in text and "SERVICE_ACCOUNT" not in text
    assert {d["metadata"]["namespace"] for d in docs if d["kind"] == "ConfigMap"} == {"kubeflow-user-jane"}
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    assert policy["metadata"]["namespace"] == NAMESPACE
    assert policy["metadata"]["name"] == "mlflow-ingress-from-profile.kubeflow-user-jane"
    assert policy["spec"]["ingress"][0]["from"] == [{
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubeflow-user-jane"}},
        "podSelector": {"matchLabels": {"tasn/mlflow-client": "true"}}}]




# --- MLflow: authenticated, no secret in argv -----------------------------------------------------

def _container(docs, kind, name, container):
    spec = _by(docs, kind, name)["spec"]["template"]["spec"]
    return spec, next(c for c in spec["containers"] if c["name"] == container)


def _secret_env(container) -> set[str]:
    return {e["name"] for e in container.get("env", []) if "secretKeyRef" in (e.get("valueFrom") or {})}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_runs_the_basic_auth_app_with_its_secrets(rendered, overlay, tmp_path, monkeypatch):
    docs = rendered[overlay]
    pod, c = _container(docs, "Deployment", "mlflow", "mlflow")
    args = c["command"] + c["args"]
    assert "--app-name=basic-auth" in args
    assert not any(a.startswith("--backend-store-uri") for a in args), "the store URI travels in the environment"
    env = _env_of(Pod("mlflow", NAMESPACE, {}, pod), _configmaps(docs, NAMESPACE))
    secrets = _secret_env(c)
    assert {"MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
            "PGUSER", "PGPASSWORD"} <= secrets
    store = urlsplit(env["MLFLOW_BACKEND_STORE_URI"])
    assert store.scheme == "postgresql" and store.password is None and store.username is None
    assert env["PGSSLMODE"] in ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
    # the auth config file: mounted from a ConfigMap where MLFLOW_AUTH_CONFIG_PATH says, read by
    # MLflow's own reader, pointing at a Postgres database without credentials in the URI
    path = Path(env["MLFLOW_AUTH_CONFIG_PATH"])
    mount = next(m for m in c["volumeMounts"] if path.parent == Path(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    ini = _configmaps(docs, NAMESPACE)[volume["configMap"]["name"]][path.name]
    (tmp_path / path.name).write_text(ini)
    _import("flask_wtf")  # mlflow[auth]: the basic-auth package imports it
    from mlflow.server.auth.config import read_auth_config

    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(tmp_path / path.name))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "from-the-secret")
    config = read_auth_config()
    auth_db = urlsplit(config.database_uri)
    assert auth_db.scheme == "postgresql" and auth_db.password is None and auth_db.path == "/mlflow_auth"
    assert config.admin_password == "from-the-secret" and "admin_password" not in ini
    from mlflow.server.auth.permissions import get_permission

    assert get_permission(config.default_permission).can_update is False, "default permission must not write"
    init = _configmaps(docs, NAMESPACE)["tasn-postgres-init"]
    assert any("CREATE DATABASE mlflow_auth" in sql for sql in init.values())
    # the image can run what this asks: the auth app's Flask-WTF, SQLAlchemy 2.1's postgresql:// driver
    assert {"flask-wtf", "psycopg", "psycopg-binary"} <= set(_locked())


def _all_docs(rendered, profile):
    for overlay, docs in rendered.items():
        yield from ((overlay, d) for d in docs + _launcher_jobs(overlay, docs))
    yield from (("profile", d) for d in profile)
    yield from (("example", d) for path in EXAMPLES for d in _load(path))


def test_no_secret_is_expanded_into_argv(rendered, profile):
    """A secret-sourced variable referenced in command/args ($(VAR), $VAR, ${VAR}) ends up in the
    process list and the pod spec: secrets reach processes only through their environment."""
    for where, doc in _all_docs(rendered, profile):
        containers = [c for _, spec in _templates_in(doc) for c in spec["containers"]]
        if doc["kind"] == "TrainJob":
            containers.append({"name": "trainer", **doc["spec"]["trainer"]})
        for c in containers:
            argv = " ".join(c.get("command", []) + c.get("args", []))
            for name in _secret_env(c) | {"AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "PGPASSWORD",
                                          "POSTGRES_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD"}:
                assert not re.search(rf"\$\(?\{{?{name}\b", argv), \
                    f"{where} {doc['kind']}:{c['name']} puts {name} in argv"


def _secret_templates() -> dict[str, set[str]]:
    """Secret name -> keys, from infra/k8s/secrets/*.env.example and the `kubectl create secret`
    line each one documents."""
    out: dict[str, set[str]] = {}
    for example in (INFRA / "k8s" / "secrets").glob("*.env.example"):
        text = example.read_text()
        keys = {line.split("=", 1)[0] for line in text.splitlines() if "=" in line and not line.startswith("#")}
        names = re.findall(r"create secret generic (\S+) --from-env-file=infra/k8s/secrets/(\S+)", text)
        assert names, f"{example.name} says how to create its Secret"
        for name, env_file in names:
            assert env_file == example.name.removesuffix(".example"), f"{example.name}: {env_file}"
            out.setdefault(name, set()).update(keys)
    return out


def test_every_secret_reference_has_a_template(rendered, profile):
    templates = _secret_templates()
    refs = set()
    for where, doc in _all_docs(rendered, profile):
        for var in _env_vars(doc):
            ref = (var.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                refs.add((ref["name"], ref["key"]))
                assert ref["key"] in templates.get(ref["name"], set()), \
                    f"{where} {doc['kind']}: Secret {ref['name']} key {ref['key']} has no infra/k8s/secrets template"
    assert {name for name, _ in refs} == set(templates), "a template no manifest uses, or the reverse"


# --- images pinned by digest, installed from a hashed lock ----------------------------------------

DIGEST = re.compile(r"^[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}$")  # name:tag@sha256:<digest>
PROJECT_IMAGES = ("tasn", "registry.example.com/ml/tasn")  # built from this repository


def test_every_third_party_image_is_pinned_by_digest(rendered):
    images = set()
    for where, doc in _workloads(rendered):
        for _, spec in _templates_in(doc):
            for c in spec["containers"] + spec.get("initContainers", []):
                images.add((where, c["image"]))
    third_party = {(w, i) for w, i in images if i.split("@")[0].rsplit(":", 1)[0] not in PROJECT_IMAGES}
    assert {i.split(":")[0] for _, i in third_party} >= {"postgres", "minio/minio", "minio/mc"}
    for where, image in third_party:
        assert DIGEST.match(image), f"{where}: {image} is not pinned as name:tag@sha256:digest"
    for path in DOCKERFILES.values():
        lines = path.read_text().splitlines()
        syntax = r"^# syntax=docker/dockerfile:[\d.]+@sha256:[0-9a-f]{64}$"
        assert re.match(syntax, lines[0]), f"{path.name}: {lines[0]}"
        stages = set()
        defaults = {}
        for ins, args in _instructions(path):
            if ins == "ARG" and "=" in args:
                defaults.update([args.split("=", 1)])
            if ins == "FROM":
                ref, *rest = args.split()
                arg = re.fullmatch(r"\$\{(\w+)\}", ref)
                if arg:  # a base given as a build argument: one of this repository's images by default
                    assert defaults[arg.group(1)].rsplit(":", 1)[0] in PROJECT_IMAGES, f"{path.name}: FROM {ref}"
                else:
                    assert ref in stages or DIGEST.match(ref), f"{path.name}: FROM {ref}"
                stages.update(rest[1:2])
            if ins == "COPY" and "--from=" in args:
                ref = re.search(r"--from=(\S+)", args).group(1)
                assert ref in stages or DIGEST.match(ref), f"{path.name}: COPY --from={ref}"


LOCK = ROOT / "requirements.lock"
IMAGE_REQUIREMENTS = INFRA / "docker" / "image-requirements.in"


def _locked() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) from requirements.lock (pip's hash-checking format)."""
    text = re.sub(r"\\\n\s*", " ", LOCK.read_text())
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==(\S+)(.*)$", line)
        if m:
            hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", m.group(3))
            out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = (m.group(2), hashes)
    return out


def test_lock_is_current_with_pyproject_and_fully_hashed():
    """Every direct dependency (pyproject.toml [project].dependencies, the image's extras) is pinned
    in requirements.lock within its range, and every pin carries hashes (pip --require-hashes)."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = {**default_environment(), "python_version": "3.11", "python_full_version": "3.11.0",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}
    direct = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    direct += [line.split("#")[0].strip() for line in IMAGE_REQUIREMENTS.read_text().splitlines()
               if line.split("#")[0].strip()]
    locked = _locked()
    assert len(locked) > len(direct)
    stale = []
    for spec in map(Requirement, direct):
        if spec.marker and not spec.marker.evaluate(env):
            continue
        name = re.sub(r"[-_.]+", "-", spec.name).lower()
        if name not in locked or not spec.specifier.contains(locked[name][0], prereleases=True):
            stale.append(f"{spec} (locked: {locked.get(name, ('missing',))[0]})")
    header = LOCK.read_text().split("\n", 3)[:3]
    assert not stale, (f"requirements.lock is stale for {stale}; regenerate it with the command at its top:\n"
                       + "\n".join(header))
    assert all(hashes for _, hashes in locked.values()), [n for n, (_, h) in locked.items() if not h]
    assert any("uv pip compile" in line and "--generate-hashes" in line for line in header), header


# --- Dockerfiles ---------------------------------------------------------------------------------

def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                       if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def _stages(path: Path) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in _instructions(path):
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def test_hadolint_passes():
    proc = subprocess.run([_tool("hadolint"), *map(str, DOCKERFILES.values())], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_dockerfile_key_facts(variant):
    stages = _stages(DOCKERFILES[variant])
    final = stages[-1]
    users = [a for i, a in final if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "final stage must run as a non-root user"
    assert not any(i == "HEALTHCHECK" for s in stages for i, _ in s)
    assert any(i == "LABEL" and "org.opencontainers.image.title" in a for i, a in final)
    runs = [a for s in stages for i, a in s if i == "RUN"]
    # dependencies only from hash-checked lists, no resolver; then the project without deps
    installs = [a for a in runs if re.search(r"\bpip install\b", a)]
    if variant == "cpu":  # the CUDA image is built on it
        assert any("--require-hashes" in a and "--no-deps" in a and "-r requirements.lock" in a
                   and "--build-constraints requirements.lock" in a for a in installs), installs
    assert installs and all(
        ("--require-hashes" in a and "--no-deps" in a)
        or ("--no-deps" in a and a.rstrip().split("&&")[0].split()[-1] == ".") for a in installs
    ), f"an install that neither uses a hashed list nor skips dependencies: {installs}"
    assert not any("--index-url" in a or "--extra-index-url" in a for a in installs)
    assert _locked()["torch"][0] == "2.14.1" and _locked()["torchvision"][0] == "0.29.1"
    # the git commit: build arg -> env in the image that runs
    assert any(i == "ARG" and a.startswith("GIT_COMMIT") for i, a in final)
    assert any(i == "ENV" and "TASN_GIT_COMMIT=${GIT_COMMIT}" in a for i, a in final)
    assert any(i == "LABEL" and 'org.opencontainers.image.revision="${GIT_COMMIT}"' in a for i, a in final)
    for s in stages:
        for i, a in s:
            if i in ("ENV", "ARG"):
                assert not SECRET_NAME.search(a.split("=")[0]), f"secret-looking {i}: {a}"
    if variant == "cuda":
        build = next(s for s in stages if "AS ops-build" in s[0][1])
        build_runs = " ".join(a for i, a in build if i == "RUN")
        arch = re.search(r'python -m tasn\.ops\.build --arch "([^"]+)"', build_runs)
        assert arch and {"8.0", "9.0"} <= set(arch.group(1).split(";")), "CUDA sampler built ahead of time"
        assert "-r /tmp/cuda-toolchain.txt" in build_runs  # nvcc from PyPI's wheels, hash-checked
        toolchain = re.sub(r"\\\n\s*", " ", (INFRA / "docker" / "cuda-toolchain.txt").read_text())
        pins = [line for line in toolchain.splitlines() if re.match(r"^[a-z]", line)]
        assert pins and all(re.search(r"==\S+ +--hash=sha256:[0-9a-f]{64}", p) for p in pins), pins
        assert {"nvidia-cuda-nvcc", "nvidia-cuda-runtime"} <= {p.split("==")[0] for p in pins}
        assert final[0][1].split()[0] == "${BASE_IMAGE}", "the runtime is the CPU image, not the build stage"
        assert not any("cuda-toolchain" in a for i, a in final), "the compiler stays in the build stage"
        assert any(i == "COPY" and "--from=ops-build /opt/tasn-ops" in a for i, a in final), "AOT build copied"
        assert any(i == "ENV" and "TASN_OPS_PREBUILT=/opt/tasn-ops" in a for i, a in final)
        assert "ninja" in _locked(), "the AOT build's ninja comes from the lock"


def test_dockerignore_sends_only_what_the_build_copies():
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "**", "deny everything first, then allow"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for path in DOCKERFILES.values():
        for ins, args in _instructions(path):
            if ins == "COPY" and "--from" not in args:
                for src in args.split()[:-1]:
                    assert src.rstrip("/") in allowed, f"{path.name} copies {src}, which .dockerignore excludes"
                    assert (ROOT / src).exists(), f"{path.name} copies missing {src}"
    assert not allowed & {".venv", "data", "outputs", "mlruns", "infra"}
