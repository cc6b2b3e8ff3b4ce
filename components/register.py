"""`tasn register` and the champion/challenger gate as KFP components.

Registration and promotion are separate tasks so the DAG shows the decision: `gate` asks
`tasn promote --dry-run` whether the candidate beats the current alias holder, and the pipeline
runs `promote` only inside `dsl.If(gate.outputs["Output"] == True)`.

All three are safe to retry: a retried register finds the version it registered for the run
before (tasn.registry.versions), the gate changes nothing, and a retried promote finds the alias
already on its version ("unchanged") or waits for the promotion lock.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from components import TASN_IMAGE


@dsl.component(base_image=TASN_IMAGE, install_kfp_package=False)
def register(
    model: Input[Model],
    evaluation: Input[Artifact],
    config: str,
    kfp_run_id: str,
    mlflow_config_map: str,
    registration: Output[Artifact],
) -> NamedTuple("Registered", name=str, version=str):  # type: ignore[valid-type]  # KFP's output form
    """Register the run's model in the MLflow registry (no promotion here)."""
    from collections import namedtuple

    from components.runtime import read_json, run_tasn
    from tasn.evaluate import METRICS
    from tasn.registry import REGISTRATION
    from tasn.training.outputs import RUN

    run_tasn(
        ["register", "--run-json", f"{model.path}/{RUN}", "--metrics", f"{evaluation.path}/{METRICS}",
         "--out", registration.path],
        config, kfp_run_id=kfp_run_id, mlflow_config_map=mlflow_config_map,
    )
    record = read_json(f"{registration.path}/{REGISTRATION}")
    Registered = namedtuple("Registered", ["name", "version"])
    return Registered(str(record["name"]), str(record["version"]))


@dsl.component(base_image=TASN_IMAGE, install_kfp_package=False)
def gate(
    name: str,
    version: str,
    config: str,
    kfp_run_id: str,
    mlflow_config_map: str,
    decision: Output[Artifact],
) -> bool:
    """The champion/challenger decision, without changing the registry: True = promote.

    The reason (both metric values) is in the `decision` artifact and the task log. A single
    unnamed output keeps the `dsl.If` on it resolvable by kfp.local as well as by the backend.
    """
    from components.runtime import read_json, run_tasn

    run_tasn(["promote", "--name", name, "--version", version, "--dry-run", "--decision-file", decision.path],
             config, kfp_run_id=kfp_run_id, mlflow_config_map=mlflow_config_map)
    record = read_json(decision.path)
    print(f"gate: promote={record['promote']}: {record.get('reason', '')}", flush=True)
    return bool(record["promote"])


@dsl.component(base_image=TASN_IMAGE, install_kfp_package=False)
def promote(name: str, version: str, config: str, kfp_run_id: str, mlflow_config_map: str):
    """Move the alias (default `staging`) to the version the gate accepted.

    A refusal here means another run's better version took the alias after this run's gate: an
    outcome the log reports, not a failure to retry.
    """
    from components.runtime import run_tasn
    from tasn.registry import REFUSED_EXIT

    code = run_tasn(["promote", "--name", name, "--version", version], config, kfp_run_id=kfp_run_id,
                    mlflow_config_map=mlflow_config_map, ok=(0, REFUSED_EXIT))
    if code == REFUSED_EXIT:
        print(f"promote: version {version} was refused after all (the alias moved since the gate ran)", flush=True)
