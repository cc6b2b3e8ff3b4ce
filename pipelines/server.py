"""What `tasn pipeline submit | upload` asks of the Kubeflow Pipelines server before sending anything.

- **Its version.** The compiled pipeline uses backend features of given KFP releases (each below
  with the upstream code that reads it); `required_backend` finds them in the compiled YAML itself,
  so the minimum follows the pipeline, and `check_server` compares it with the `tag_name` the
  server's healthz endpoint reports (`newHealthzResponse` in backend/src/apiserver/main.go). kfp
  2.17's `Client.get_kfp_healthz` returns the generated model, which keeps `multi_user` and drops
  `tag_name`, so this reads the same endpoint, through the same authenticated API client, raw.
- **The pipeline of a name, in a namespace.** `kfp.Client.get_pipeline_id(name)` lists without a
  namespace, which on multi-user KFP means the shared pipelines only (`listPipelines` in
  backend/src/apiserver/server/pipeline_server.go filters by the request's namespace); a
  namespace's own pipeline is then never found and its re-upload collides with it.
  `find_pipeline` lists in the namespace given.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import kfp

from tasn.errors import ServiceError, TASNError

HEALTHZ_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Feature:
    """A backend feature the compiled pipeline may use, and the first KFP release that reads it."""

    what: str
    since: str
    upstream: str  # the file and function of kubeflow/pipelines that reads it
    used: Callable[[dict, dict], bool]  # (pipeline spec, platforms.kubernetes executors) -> used?


def _nested_retry(spec: dict, _executors: dict) -> bool:
    """A task with a retry policy inside a sub-DAG (the exit handler's body, a condition)."""
    return any("retryPolicy" in task for name, comp in spec["components"].items() if "dag" in comp
               for task in comp["dag"]["tasks"].values())


def _executor_field(*fields: str) -> Callable[[dict, dict], bool]:
    def used(_spec: dict, executors: dict) -> bool:
        return any(_holds(cfg, fields) for cfg in executors.values())
    return used


def _holds(obj: Any, fields: tuple[str, ...]) -> bool:
    if isinstance(obj, dict):
        return any(k in fields for k in obj) or any(_holds(v, fields) for v in obj.values())
    if isinstance(obj, list):
        return any(_holds(v, fields) for v in obj)
    return False


def _runtime_resources(spec: dict, _executors: dict) -> bool:
    """Resources, an accelerator or the image given by a pipeline parameter or a task output."""
    containers = [e["container"] for e in spec["deploymentSpec"]["executors"].values() if "container" in e]
    return any("{{$" in json.dumps({k: c.get(k) for k in ("image", "resources")}) for c in containers)


FEATURES = (
    Feature("retries of tasks inside a sub-DAG (the exit handler's body)", "2.14.0",
            "backend/src/v2/compiler/argocompiler/container.go: addContainerExecutorTemplate reads the task's "
            "RetryPolicy (2.5.0's getTaskRetryPolicySpec looked in the root DAG only)", _nested_retry),
    Feature("ConfigMap and Secret names from pipeline parameters", "2.5.0",
            "backend/src/v2/driver: SecretNameParameter, ConfigMapNameParameter",
            _executor_field("secretNameParameter", "configMapNameParameter")),
    Feature("node selector and tolerations from a task's output", "2.5.0",
            "backend/src/v2/driver: NodeSelectorJson, TolerationJson",
            _executor_field("nodeSelectorJson", "tolerationJson")),
    Feature("image, CPU, memory and accelerator count from parameters", "2.4.0",
            "backend/src/v2/driver/resolve.go: resolvePodSpecInputRuntimeParameter", _runtime_resources),
    Feature("emptyDir mounts (a memory-backed /dev/shm)", "2.3.0",
            "backend/src/v2/driver: GetEmptyDirMounts", _executor_field("emptyDirMounts")),
)


def version_tuple(text: str) -> tuple[int, int, int] | None:
    """`2.17.0`, `v2.17.0`, `2.17.0-rc.1` -> (2, 17, 0); None for `unknown` and the like."""
    match = re.match(r"v?(\d+)\.(\d+)\.(\d+)", text.strip())
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def required_backend(docs: list[dict]) -> tuple[str, list[Feature]]:
    """The oldest KFP backend that runs the compiled pipeline (its two YAML documents), and the
    features that make it so (the newest first)."""
    spec, platform = docs[0], docs[1] if len(docs) > 1 else {}
    executors = platform.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {}).get("executors", {})
    used = sorted((f for f in FEATURES if f.used(spec, executors)), key=lambda f: _release(f.since), reverse=True)
    return (used[0].since if used else "2.0.0"), used


@dataclass(frozen=True)
class ServerInfo:
    tag_name: str  # the backend's release, or "unknown" (a development build)
    multi_user: bool


def server_info(client: kfp.Client, host: str) -> ServerInfo:
    """The server's healthz: its release tag and whether it is multi-user."""
    try:
        response = client._healthz_api.healthz_service_get_healthz(  # raw: see the module docstring
            _preload_content=False, _request_timeout=HEALTHZ_TIMEOUT_S)
        body = json.loads(response.data or b"{}")
    except Exception as exc:  # urllib3 connection errors, kfp_server_api.ApiException, a non-JSON answer
        raise ServiceError(f"Kubeflow Pipelines at {host} did not answer its healthz: "
                           f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                           ) from exc
    return ServerInfo(str(body.get("tag_name") or "unknown"), bool(body.get("multi_user")))


def check_server(info: ServerInfo, host: str, docs: list[dict], namespace: str | None) -> None:
    """Fail before anything is sent when the server (`info`, from `server_info`) is older than the
    compiled pipeline (`docs`) needs, or is multi-user and no namespace was given; a server that does
    not say its version gets a warning."""
    needed, features = required_backend(docs)
    have = version_tuple(info.tag_name)
    if have is None:
        print(f"warning: Kubeflow Pipelines at {host} does not say its version (tag_name {info.tag_name!r}); "
              f"this pipeline needs {needed} or later", file=sys.stderr)
    elif have < _release(needed):
        reasons = "; ".join(f"{f.what} (KFP {f.since})" for f in features if _release(f.since) > have)
        raise TASNError(f"Kubeflow Pipelines at {host} runs backend {info.tag_name}, but this pipeline needs "
                        f"{needed} or later: {reasons}. Upgrade KFP (docs/cluster.md, prerequisites)")
    if info.multi_user and not namespace:
        raise TASNError(f"Kubeflow Pipelines at {host} is multi-user: pass --namespace (your profile namespace, "
                        "e.g. kubeflow-user-example-com)")


def _release(text: str) -> tuple[int, int, int]:
    version = version_tuple(text)
    assert version is not None, text  # the releases in FEATURES are written out
    return version


def find_pipeline(client: kfp.Client, name: str, namespace: str | None) -> str | None:
    """The id of the pipeline `name` in `namespace` (None: the shared ones, as on single-user KFP)."""
    query = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
    found = client.list_pipelines(filter=query, namespace=namespace, page_size=2).pipelines or []
    if len(found) > 1:
        raise TASNError(f"several pipelines are named {name!r} in {namespace or 'the shared namespace'}")
    return found[0].pipeline_id if found else None
