"""Typed configuration: one source of truth for every stage.

`params.yaml` holds one section per stage (DVC reads it for `params:` dependencies, the CLI reads
it here). A profile (`profiles.<name>` in the same file) is a partial overlay for a setting such as
the authors' CUB recipe; command-line overrides (`--set train.lr=0.05`) go on top. Every key is
checked against the dataclasses below, so a misspelt key or a value of the wrong type fails before
any work starts, with the key named.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tasn.errors import TASNError


class ConfigError(TASNError, ValueError):
    """A configuration value or key is wrong; the message names it."""


@dataclass
class SynthConfig:
    """The embedded procedurally generated fine-grained sample (`tasn data synth`)."""

    classes: int = 12
    train_per_class: int = 30
    test_per_class: int = 10
    min_side: int = 300
    max_side: int = 700
    seed: int = 0
    jpeg_quality: int = 90


@dataclass
class DataConfig:
    raw: str = "data/raw"
    validated: str = "data/validated"
    prepared: str = "data/prepared"
    synth: SynthConfig = field(default_factory=SynthConfig)


@dataclass
class ValidateConfig:
    """Bounds of the great-expectations suite run by `tasn validate`."""

    min_side: int = 64
    min_images_per_class: int = 1
    max_class_imbalance: float = 10.0  # largest class / smallest class, per split
    test_fraction_min: float = 0.05
    test_fraction_max: float = 0.6
    workers: int = 0  # 0 = one per core


@dataclass
class PreprocessConfig:
    size: int = 512  # shorter side after resizing; TASN crops `model.input_size` from it
    jpeg_quality: int = 95
    workers: int = 0


@dataclass
class ModelConfig:
    """The network. Defaults are the authors' CUB run (TASN.md); `demo` shrinks it for a CPU."""

    kind: str = "tasn"  # tasn | baseline (the plain backbone on the image resized to out_size)
    num_classes: int = 0  # 0 = taken from the data
    backbone: str = "resnet50"  # shared part/master net: resnet18 | resnet34 | resnet50 | resnet18-slim
    att_backbone: str = "resnet18"
    att_head_channels: int = 512
    input_size: int = 512
    att_size: int = 224
    out_size: int = 224
    dense: float = 4.0
    iters: int = 5
    pretrained: str = "none"  # none | imagenet | local path / s3:// URI of a state dict
    att_pretrained: str = "none"


@dataclass
class LossConfig:
    temperature: float = 10.0
    w_attention: float = 1.0
    w_part: float = 0.5
    w_master: float = 0.5
    w_part_aux: float = 0.5
    w_master_aux: float = 0.5
    w_distill: float = 1.0


@dataclass
class TrainConfig:
    epochs: int = 300
    batch_size: int = 12  # per process; the authors ran 8 x 12 = 96
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    milestones: list[int] = field(default_factory=lambda: [100, 200])
    gamma: float = 0.1
    accum_steps: int = 1
    workers: int = 4
    seed: int = 0
    deterministic: bool = False
    amp: bool = True  # bf16 autocast, on CUDA only
    channels_last: bool = True  # on CUDA only
    checkpoint_every: int = 0  # steps; 0 = only at epoch ends
    checkpoint_dir: str = ""  # "" = <out>/checkpoints; may be s3://bucket/prefix
    keep_checkpoints: int = 2  # newest step checkpoints kept; older ones are deleted
    batchnorm: str = "local"  # local (per process) | sync (SyncBatchNorm, CUDA) | frozen (running stats)
    resume: str = "auto"  # auto | never | a checkpoint path or URI
    max_steps: int = 0  # 0 = no limit (for smoke runs)
    log_every: int = 10
    picture_images: int = 4  # fixed validation images drawn each epoch
    jitter: float = 0.4
    rotation: float = 30.0


@dataclass
class EvaluateConfig:
    batch_size: int = 16
    topk: int = 5
    timing_batches: int = 3
    workers: int = 2


@dataclass
class RegisterConfig:
    model_name: str = "tasn"
    primary_metric: str = "master_aux_top1"
    alias: str = "staging"


@dataclass
class TrackingConfig:
    """MLflow. Empty uri = MLFLOW_TRACKING_URI if set, else sqlite `mlflow.db` in the project."""

    uri: str = ""
    experiment: str = "tasn"
    s3_endpoint: str = ""  # else MLFLOW_S3_ENDPOINT_URL / AWS_ENDPOINT_URL from the environment
    system_metrics: bool = True
    enabled: bool = True  # false: no MLflow at all (offline runs, mechanical tests)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """`section.key` -> value, for MLflow params and DVC-style display."""
        return dict(_flatten(self.to_dict()))


CHOICES = {
    "model.kind": ("tasn", "baseline"),
    "model.backbone": ("resnet18", "resnet34", "resnet50", "resnet18-slim"),
    "model.att_backbone": ("resnet18", "resnet34", "resnet18-slim"),
}


def _flatten(d: dict[str, Any], prefix: str = ""):
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, name + ".")
        else:
            yield name, value


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check `value` against the annotation `tp`; accept ints for floats; return the value."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if tp in (int, float, str) and (not isinstance(value, tp) or isinstance(value, bool)):
        raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!s}; known keys of {prefix.rstrip('.') or 'config'}: "
            + ", ".join(sorted(known))
        )
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        name = prefix + key
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, name + ".")
        else:
            kwargs[key] = _coerce(value, tp, name)
    return cls(**kwargs)


def _merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=0.05` -> (["train", "lr"], 0.05); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if len(path) < 2:
        raise ConfigError(f"override {text!r}: the key must name a section, e.g. train.lr=0.05")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return path, value


def _validate(cfg: Config) -> None:
    """Cross-field checks that a type alone cannot express."""
    m = cfg.model
    for name, allowed in CHOICES.items():
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(allowed)}")
    if m.dense <= 0:
        raise ConfigError(f"model.dense: must be > 0, got {m.dense}")
    if m.iters < 1:
        raise ConfigError(f"model.iters: must be >= 1, got {m.iters}")
    for key in ("input_size", "att_size", "out_size"):
        if getattr(m, key) < 2:
            raise ConfigError(f"model.{key}: must be >= 2, got {getattr(m, key)}")
    if m.input_size > cfg.preprocess.size:
        raise ConfigError(
            f"model.input_size ({m.input_size}) is larger than preprocess.size "
            f"({cfg.preprocess.size}): the crop would not fit the preprocessed images"
        )
    t = cfg.train
    if t.batch_size < 1 or t.epochs < 0 or t.accum_steps < 1:
        raise ConfigError("train.batch_size and train.accum_steps must be >= 1, train.epochs >= 0")
    if t.lr <= 0:
        raise ConfigError(f"train.lr: must be > 0, got {t.lr}")
    if cfg.loss.temperature <= 0:
        raise ConfigError(f"loss.temperature: must be > 0, got {cfg.loss.temperature}")


def load_config(
    path: str | os.PathLike | None = "params.yaml",
    profile: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Config:
    """Defaults <- params.yaml top-level sections <- `profiles.<profile>` <- overrides.

    A missing params.yaml is fine (defaults are used) unless a profile was asked for.
    """
    raw: dict[str, Any] = {}
    if path is not None and Path(path).exists():
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections")
    profiles = raw.pop("profiles", {}) or {}
    if profile:
        if profile not in profiles:
            known = ", ".join(sorted(profiles)) or "none"
            raise ConfigError(f"profile {profile!r} is not in {path} (profiles: {known})")
        raw = _merge(raw, profiles[profile])
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k} is not a section")
        node[keys[-1]] = value
    cfg = _build(Config, raw, "")
    _validate(cfg)
    return cfg
