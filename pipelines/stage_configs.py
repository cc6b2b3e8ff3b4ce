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
