"""`tasn register` and the champion/challenger gate as KFP components.

Registration and promotion are separate tasks so the DAG shows the decision: `gate` asks
`tasn promote --dry-run` whether the candidate beats the current alias holder, and the pipeline
runs `promote` only inside `dsl.If(gate.outputs["Output"] == True)`.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from components import TASN_IMAGE


@dsl.component(base_image=TASN_IMAGE, install_kfp_package=False)
def register(
    model: Input[Model],
    evaluation: Input[Artifact],
    params_yaml: str,
    profile: str,
    overrides: list,
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
        params_yaml, profile, overrides,
    )
    record = read_json(f"{registration.path}/{REGISTRATION}")
    Registered = namedtuple("Registered", ["name", "version"])
    return Registered(str(record["name"]), str(record["version"]))


@dsl.component(base_image=TASN_IMAGE, install_kfp_package=False)
def gate(
    name: str,
    version: str,
    params_yaml: str,
    profile: str,
    overrides: list,
    decision: Output[Artifact],
) -> bool:
    """The champion/challenger decision, without changing the registry: True = promote.

    The reason (both metric values) is in the `decision` artifact and the task log. A single
    unnamed output keeps the `dsl.If` on it resolvable by kfp.local as well as by the backend.
    """
    from components.runtime import read_json, run_tasn

    run_tasn(["promote", "--name", name, "--version", version, "--dry-run", "--decision-file", decision.path],
             params_yaml, profile, overrides)
    record = read_json(decision.path)
    print(f"gate: promote={record['promote']}: {record.get('reason', '')}", flush=True)
    return bool(record["promote"])


@dsl.component(base_image=TASN_IMAGE, install_kfp_package=False)
def promote(name: str, version: str, params_yaml: str, profile: str, overrides: list):
    """Move the alias (default `staging`) to the version the gate accepted."""
    from components.runtime import run_tasn

    run_tasn(["promote", "--name", name, "--version", version], params_yaml, profile, overrides)
