"""What each pipeline task is told of the configuration: the sections its stage reads, resolved on
the caller's side.

`tasn pipeline submit` and `run-local` resolve params.yaml <- profile <- `-S` overrides once, where
the user is (so a profile is the caller's, never whatever the image carries under that name), and
hand each task only its stage's sections as a small params file: the pipeline parameters
`<stage>_config`. A KFP task's cache key is its inputs, so this is what makes caching per stage
work: `-S train.lr=0.1` changes `train_config` and nothing upstream of train, so validate and
preprocess come from the cache; a changed `preprocess.size` reruns preprocess and what follows it.
"""

from __future__ import annotations

from typing import Any

import yaml

from tasn.config import Config
from tasn.errors import ConfigError
from tasn.redact import find_credential

# Dotted keys: a whole section, or one key of a section another of the stage's rules reads.
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "validate": ("validate",),
    "preprocess": ("preprocess", "model.input_size"),  # Config.relations: the crop must fit the images
    "train": ("preprocess", "model", "loss", "train", "evaluate", "tracking"),
    "evaluate": ("loss", "evaluate", "tracking"),
    "register": ("register", "tracking"),  # the register, gate and promote tasks
}


def parameter(stage: str) -> str:
    """The pipeline parameter that carries `stage`'s config."""
    return f"{stage}_config"


def stage_sections(cfg: Config, stage: str) -> dict[str, Any]:
    """The part of `cfg` that `stage` reads, as nested mappings."""
    full = cfg.to_dict()
    out: dict[str, Any] = {}
    for key in STAGE_KEYS[stage]:
        section, _, name = key.partition(".")
        if name:
            out.setdefault(section, {})[name] = full[section][name]
        else:
            out[section] = full[section]
    return out


def stage_configs(cfg: Config) -> dict[str, str]:
    """`<stage>_config -> YAML text` for every stage: the pipeline arguments."""
    return {parameter(stage): yaml.safe_dump(stage_sections(cfg, stage), sort_keys=True) for stage in STAGE_KEYS}


def credentials_in(arguments: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, why) for every argument, or key inside a `<stage>_config`, that holds a credential;
    a config key as its dotted name, e.g. `tracking.uri`."""
    found = []
    for name, value in arguments.items():
        stage = name.removesuffix("_config")
        if stage in STAGE_KEYS and isinstance(value, str) and value:
            leaves = _leaves(yaml.safe_load(value) or {})
            found += [(key, why) for key, leaf in leaves if (why := find_credential(key.rsplit(".", 1)[-1], leaf))]
        elif why := find_credential(name, value, by_name=False):  # `s3_secret` holds a Secret's name
            found.append((name, why))
    return sorted(set(found))


def refuse_credentials(arguments: dict[str, Any], namespace: str | None, s3_secret: str,
                       mlflow_secret: str) -> None:
    """A ConfigError naming each argument that holds a credential and the Secret it belongs in."""
    found = credentials_in(arguments)
    if not found:
        return
    where = f"namespace {namespace}" if namespace else "the namespace the pipeline runs in"
    lines = []
    for key, why in found:
        if key.startswith("tracking."):
            home = f"the Secret {mlflow_secret} (keys MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD)"
        else:
            home = f"a Secret the tasks read ({s3_secret} for S3 keys, {mlflow_secret} for MLflow)"
        lines.append(f"  {key}: {why}; give it without the credential and put that in {home} in {where}")
    raise ConfigError(
        "refusing to send credentials as pipeline arguments: Kubeflow Pipelines stores a run's arguments, "
        "shows them in its UI and passes them on the tasks' command lines\n" + "\n".join(lines) +
        "\n(create the Secrets with `kubectl -n NAMESPACE create secret generic ... --from-env-file=...`, "
        "docs/cluster.md step 2)")


def _leaves(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        return [leaf for k, v in obj.items() for leaf in _leaves(v, f"{prefix}{k}.")]
    if isinstance(obj, list):
        return [leaf for v in obj for leaf in _leaves(v, prefix)]
    return [(prefix.rstrip("."), obj)]
