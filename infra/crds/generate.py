"""Regenerate the CRD JSON Schemas in infra/crds/ from Kubeflow's published API models.

Why generated, not copied: the CRD YAML files are 0.3-0.9 MB each because every embedded
Kubernetes type (PodSpec, Volume, EnvVar, ...) is inlined. Here the Kubeflow-specific types are
built from the API models Kubeflow publishes for the pinned releases (generated from the same Go
types as the CRDs), every embedded Kubernetes type becomes a `$ref` into the Kubernetes schema of
the pinned Kubernetes version (shipped by kubernetes-validate), and the validation markers that
only the CRD carries (minLength, the TrainJob name rule) are added from the CRD by hand (MARKERS).
Every Kubeflow object is closed (`additionalProperties: false`): that is what the API server's
strict field validation (`kubectl apply --validate=strict`) does with an unknown field.

Dev-time only; the tests read the committed JSON. To regenerate:
    pip install kubeflow-trainer-api==2.1.0 kubeflow-training==1.8.1
    python infra/crds/generate.py
"""
from __future__ import annotations

import datetime
import importlib
import inspect
import json
import re
import sys
import typing
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from validate import K8S_DEFS_ID, kubernetes_definitions  # noqa: E402

TRAINER_API = "kubeflow-trainer-api==2.1.0"
TRAINING_API = "kubeflow-training==1.8.1"

# Validation markers present in the CRD openAPIV3Schema but not in the API models, copied from
# kubeflow/manifests applications/trainer/upstream/base/crds/trainer.kubeflow.org_trainjobs.yaml
# (Trainer v2.1.0 sync, commit b94914bf1d85e98d3ac13011c36fa446a27a8a44).
MARKERS = {
    ("TrainerV1alpha1RuntimeRef", "name"): {"minLength": 1},
    ("TrainerV1alpha1PodTemplateOverrideTargetJob", "name"): {"minLength": 1},
    ("TrainerV1alpha1JobStatus", "name"): {"minLength": 1},
    **{("TrainerV1alpha1JobStatus", k): {"minimum": 0}
       for k in ("active", "failed", "ready", "succeeded", "suspended")},
}
# The TrainJob's x-kubernetes-validations on metadata.name (RFC 1035 label, at most 63 chars).
TRAINJOB_NAME = {"type": "string", "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}

# (output file, top-level model, apiVersion, kind, source package, extra metadata.name rule)
TARGETS = [
    ("trainjob.schema.json", "kubeflow_trainer_api.models:TrainerV1alpha1TrainJob",
     "trainer.kubeflow.org/v1alpha1", "TrainJob", TRAINER_API, TRAINJOB_NAME),
    ("trainingruntime.schema.json", "kubeflow_trainer_api.models:TrainerV1alpha1TrainingRuntime",
     "trainer.kubeflow.org/v1alpha1", "TrainingRuntime", TRAINER_API, None),
    ("clustertrainingruntime.schema.json",
     "kubeflow_trainer_api.models:TrainerV1alpha1ClusterTrainingRuntime",
     "trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime", TRAINER_API, None),
    ("pytorchjob.schema.json", "kubeflow.training.models:KubeflowOrgV1PyTorchJob",
     "kubeflow.org/v1", "PyTorchJob", TRAINING_API, None),
]


class Builder:
    """Turns one family of model classes into JSON Schema `$defs`."""

    def __init__(self, k8s_names: list[str]):
        self.defs: dict[str, dict] = {}
        self._k8s = {n.replace(".", "").lower(): n for n in k8s_names}

    # --- Kubernetes types: a $ref into the pinned Kubernetes schema -------------------------
    def k8s_ref(self, class_name: str) -> dict | None:
        key = class_name.lower()
        if key.startswith("k8sio"):  # kubeflow-training's K8sIoApiAutoscalingV2MetricSpec
            key = "iok8s" + key[len("k8sio"):]
        if key in self._k8s:
            return {"$ref": f"{K8S_DEFS_ID}#/$defs/{self._k8s[key]}"}
        if re.fullmatch(r"v\d\w+", key) or key == "quantity":  # kubernetes client: V1PodTemplateSpec
            hits = sorted(n for k, n in self._k8s.items() if k.endswith(key))
            preferred = [n for n in hits if n.startswith(("io.k8s.api.core.", "io.k8s.apimachinery."))]
            pick = (preferred or hits)
            if len(pick) >= 1:
                return {"$ref": f"{K8S_DEFS_ID}#/$defs/{pick[0]}"}
        return None

    def ref(self, cls) -> dict:
        found = self.k8s_ref(cls.__name__)
        if found is not None:
            return found
        if cls.__name__ not in self.defs:
            self.defs[cls.__name__] = {}  # placeholder: breaks recursion
            self.defs[cls.__name__] = self.model(cls)
        return {"$ref": f"#/$defs/{cls.__name__}"}

    def model(self, cls) -> dict:
        props, required = {}, []
        for name, (annotation, is_required, doc) in fields(cls).items():
            schema = self.annotation(annotation, cls.__module__)
            schema.update(MARKERS.get((cls.__name__, name), {}))
            if doc:
                schema = {"description": doc, **schema}
            props[name] = schema
            if is_required:
                required.append(name)
        out = {"type": "object", "properties": props, "additionalProperties": False}
        if cls.__doc__ and cls.__doc__.strip() and not cls.__doc__.strip().startswith("NOTE"):
            out = {"description": " ".join(cls.__doc__.split()).replace("# noqa: E501", "").strip(), **out}
        if required:
            out["required"] = sorted(required)
        return out

    def annotation(self, a, module: str) -> dict:
        if isinstance(a, str):  # kubeflow-training's openapi_types strings
            return self.type_string(a, module)
        origin, args = typing.get_origin(a), typing.get_args(a)
        if origin is typing.Annotated:
            return self.annotation(args[0], module)
        if origin is typing.Union:
            rest = [x for x in args if x is not type(None)]
            return self.annotation(rest[0], module)
        if origin is list:
            return {"type": "array", "items": self.annotation(args[0], module)}
        if origin is dict:
            return {"type": "object", "additionalProperties": self.annotation(args[1], module)}
        return self.scalar(a) or self.ref(a)

    def type_string(self, t: str, module: str) -> dict:
        m = re.fullmatch(r"list\[(.+)\]", t)
        if m:
            return {"type": "array", "items": self.type_string(m.group(1), module)}
        m = re.fullmatch(r"dict\(str, (.+)\)", t)
        if m:
            return {"type": "object", "additionalProperties": self.type_string(m.group(1), module)}
        scalar = {"str": str, "int": int, "bool": bool, "float": float, "datetime": datetime.datetime}
        if t in scalar:
            return self.scalar(scalar[t]) or {}
        found = self.k8s_ref(t)
        if found is not None:
            return found
        models = importlib.import_module(module.rsplit(".", 1)[0])
        return self.ref(getattr(models, t))

    @staticmethod
    def scalar(a) -> dict | None:
        table = {str: {"type": "string"}, int: {"type": "integer"}, bool: {"type": "boolean"},
                 float: {"type": "number"}, datetime.datetime: {"type": "string", "format": "date-time"},
                 object: {}}
        return table.get(a)


def fields(cls) -> dict[str, tuple]:
    """(annotation, required, description) per JSON field name, for either model flavour."""
    if hasattr(cls, "model_fields"):  # pydantic (kubeflow-trainer-api)
        return {(f.alias or n): (f.annotation, f.is_required(), f.description)
                for n, f in cls.model_fields.items()}
    out = {}  # openapi-generator classes (kubeflow-training): required = setter refuses None
    for attr, t in cls.openapi_types.items():
        setter = inspect.getsource(getattr(cls, attr).fset)
        out[cls.attribute_map[attr]] = (t, "must not be `None`" in setter, None)
    return out


def build(target) -> dict:
    filename, dotted, api_version, kind, source, name_rule = target
    module, cls_name = dotted.split(":")
    cls = getattr(importlib.import_module(module), cls_name)
    builder = Builder(list(kubernetes_definitions()["$defs"]))
    builder.ref(cls)
    top = builder.defs[cls_name]
    top["properties"]["apiVersion"] = {"const": api_version}
    top["properties"]["kind"] = {"const": kind}
    if name_rule:
        meta = top["properties"]["metadata"]
        top["properties"]["metadata"] = {"allOf": [meta, {"properties": {"name": name_rule}}]}
    top["required"] = sorted({"apiVersion", "kind", "metadata", "spec"})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"{kind} ({api_version})",
        "x-generated-from": f"{source} (see infra/crds/README.md); regenerate with infra/crds/generate.py",
        "$ref": f"#/$defs/{cls_name}",
        "$defs": dict(sorted(builder.defs.items())),
    }


def main() -> int:
    for target in TARGETS:
        schema = build(target)
        path = HERE / target[0]
        path.write_text(json.dumps(schema, indent=1, sort_keys=False) + "\n")
        print(f"wrote {path.relative_to(HERE.parent.parent)} ({len(schema['$defs'])} types)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
