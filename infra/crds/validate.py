"""Validate Kubernetes manifests offline: Kubeflow CRD instances against the schemas kept in
infra/crds/, every other resource against the Kubernetes schema of the pinned version.

Why: a TrainJob or PyTorchJob with a misspelt field is accepted by `kubectl apply` on a cluster
without strict field validation and then silently ignored (the field is pruned); checking the
rendered YAML here catches it before a GPU node is booked.

    python infra/crds/validate.py FILE.yaml [...]        # '-' reads stdin
    kubectl kustomize infra/k8s/overlays/gpu | python infra/crds/validate.py -

Exit status 0 when every document is valid, 1 otherwise (each error names file, document,
kind/name and the field path). Importable: `validate_document(doc) -> list[str]`.
"""
from __future__ import annotations

import functools
import json
import sys
from importlib import resources
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml
from referencing import Registry, Resource

# The Kubernetes API version the manifests target (also the core types inside the CRD schemas).
KUBERNETES_VERSION = "1.34.0"
K8S_DEFS_ID = "https://kubernetes.io/api/_definitions.json"
HERE = Path(__file__).resolve().parent

# (apiVersion, kind) -> schema file in this folder
CRD_SCHEMAS = {
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainjob.schema.json",
    ("trainer.kubeflow.org/v1alpha1", "TrainingRuntime"): "trainingruntime.schema.json",
    ("trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime"): "clustertrainingruntime.schema.json",
    ("kubeflow.org/v1", "PyTorchJob"): "pytorchjob.schema.json",
}


@functools.lru_cache(maxsize=1)
def kubernetes_definitions() -> dict:
    """The strict Kubernetes type definitions for KUBERNETES_VERSION, as kubernetes-validate ships them."""
    root = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    path = root / f"v{KUBERNETES_VERSION}-local-strict" / "_definitions.json"
    return json.loads(path.read_text())


@functools.cache
def crd_validator(api_version: str, kind: str):
    """A jsonschema validator for one CRD kind, with the Kubernetes definitions resolvable."""

    schema = json.loads((HERE / CRD_SCHEMAS[(api_version, kind)]).read_text())
    registry = Registry().with_resource(K8S_DEFS_ID, Resource.from_contents(kubernetes_definitions()))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, registry=registry, format_checker=cls.FORMAT_CHECKER)


def _where(error) -> str:
    return "/".join(str(p) for p in error.absolute_path) or "(root)"


def validate_document(doc) -> list[str]:
    """Errors for one parsed manifest (empty when valid)."""
    if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
        return ["not a Kubernetes object (needs apiVersion and kind)"]
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        validator = crd_validator(*key)
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        return [f"{_where(e)}: {e.message}" for e in errors]

    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [exc.message]
    except kubernetes_validate.ValidationError as exc:
        return [f"{_where(exc)}: {exc.message}"]
    return []


def validate_stream(text: str, source: str) -> list[str]:
    """Errors for every document of one YAML stream, each prefixed with where it is."""

    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        return [f"{source}: not valid YAML: {exc}"]
    out = []
    for i, doc in enumerate(docs):
        name = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}" if isinstance(doc, dict) else "?"
        out += [f"{source} [document {i}, {name}] {msg}" for msg in validate_document(doc)]
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    errors = []
    for arg in args:
        if arg == "-":
            errors += validate_stream(sys.stdin.read(), "<stdin>")
            continue
        path = Path(arg)
        if not path.is_file():
            errors.append(f"{arg}: no such file")
            continue
        errors += validate_stream(path.read_text(), arg)
    for line in errors:
        print(line, file=sys.stderr)
    print(f"{'FAILED' if errors else 'ok'}: {len(errors)} error(s) in {len(args)} input(s)", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
