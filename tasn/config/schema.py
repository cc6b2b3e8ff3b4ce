"""The configuration's sections: every knob, its type, its rule and its default, in one place.

The defaults are the embedded CPU demo: what `make run` / `dvc repro` trains on the synthetic
sample, and what a user gets with no params file at all. params.yaml spells out exactly these values
(DVC reads it; a test keeps the two equal). Profiles (profiles/NAME.yaml) overlay them, e.g. `cub`,
the authors' CUB-200-2011 recipe. The model classes keep their own constructor defaults, the
authors' constants (`TASN(num_classes)` is ResNet-50 + ResNet-18 at 512 -> 224), for use without
any config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from tasn.choices import AttentionBackbone, Backbone, BatchNormMode, ModelKind
from tasn.config.rules import Range

MAX_SIDE = 8192  # largest image side any knob may ask for: 16x the authors' 512, 200 MB decoded
MAX_WORKERS = 512
MAX_SEED = 2**31 - 1  # every RNG the stages seed (python, numpy, torch) takes it
DEFAULT_MAX_PIXELS = 90_000_000  # per image: ~270 MB as 8-bit RGB, in each worker (about Pillow's own default)
MAX_PIXELS = 20_000 * 20_000  # the largest pixel limit a config may set
JPEG_MAX_SIDE = 65_500  # libjpeg cannot write a longer side

Workers = Annotated[int, Range(ge=0, le=MAX_WORKERS)]  # 0 = one per core
Seed = Annotated[int, Range(ge=0, le=MAX_SEED)]
Side = Annotated[int, Range(ge=2, le=MAX_SIDE)]
JpegQuality = Annotated[int, Range(ge=1, le=100)]
LossWeight = Annotated[float, Range(ge=0, le=1000)]
Steps = Annotated[int, Range(ge=0, le=10**9)]


@dataclass
class SynthConfig:
    """The embedded procedurally generated fine-grained sample (`tasn data synth`)."""

    classes: Annotated[int, Range(ge=2, le=1000)] = 12
    train_per_class: Annotated[int, Range(ge=1, le=100_000)] = 30
    test_per_class: Annotated[int, Range(ge=1, le=100_000)] = 10
    min_side: Annotated[int, Range(ge=64, le=MAX_SIDE)] = 300
    max_side: Annotated[int, Range(ge=64, le=MAX_SIDE)] = 700
    seed: Seed = 0
    jpeg_quality: JpegQuality = 90

    def relations(self) -> Iterator[str]:
        if self.min_side > self.max_side:
            yield f"min_side ({self.min_side}) is larger than max_side ({self.max_side})"


@dataclass
class DataConfig:
    raw: str = "data/raw"
    validated: str = "data/validated"
    prepared: str = "data/prepared"
    synth: SynthConfig = field(default_factory=SynthConfig)


@dataclass
class ValidateConfig:
    """Bounds of the great-expectations suite run by `tasn validate`."""

    min_side: Annotated[int, Range(ge=1, le=MAX_SIDE)] = 64
    min_images_per_class: Annotated[int, Range(ge=1, le=10**6)] = 1
    max_class_imbalance: Annotated[float, Range(ge=1, le=10**6)] = 10.0  # largest / smallest class, per split
    test_fraction_min: Annotated[float, Range(ge=0, le=1)] = 0.05
    test_fraction_max: Annotated[float, Range(ge=0, le=1)] = 0.6
    workers: Workers = 0
    max_pixels: Annotated[int, Range(ge=1, le=MAX_PIXELS)] = DEFAULT_MAX_PIXELS  # larger images are not decoded
    max_aspect_ratio: Annotated[float, Range(ge=1, le=1000)] = 10.0  # longer side / shorter side

    def relations(self) -> Iterator[str]:
        if self.test_fraction_min > self.test_fraction_max:
            yield (f"test_fraction_min ({self.test_fraction_min}) is larger than "
                   f"test_fraction_max ({self.test_fraction_max})")


@dataclass
class PreprocessConfig:
    size: Annotated[int, Range(ge=8, le=MAX_SIDE)] = 256  # shorter side after resizing; TASN crops model.input_size
    jpeg_quality: JpegQuality = 95
    workers: Workers = 0
    max_pixels: Annotated[int, Range(ge=1, le=MAX_PIXELS)] = DEFAULT_MAX_PIXELS  # larger images are refused


@dataclass
class ModelConfig:
    """The network: slim ResNets from random weights for a CPU; `--profile cub` is the authors'."""

    kind: ModelKind = "tasn"  # baseline: the plain backbone on the image resized to out_size
    num_classes: Annotated[int, Range(ge=0, le=10**6)] = 0  # 0 = taken from the data
    backbone: Backbone = "resnet18-slim"  # the shared part/master net
    att_backbone: AttentionBackbone = "resnet18-slim"
    att_head_channels: Annotated[int, Range(ge=1, le=8192)] = 128
    input_size: Side = 224
    att_size: Side = 112
    out_size: Side = 112
    dense: Annotated[float, Range(gt=0, le=1000)] = 4.0
    iters: Annotated[int, Range(ge=1, le=100)] = 5
    pretrained: str = "none"  # none | imagenet | local path / s3:// URI of a state dict
    att_pretrained: str = "none"


@dataclass
class LossConfig:
    temperature: Annotated[float, Range(gt=0, le=1000)] = 10.0
    w_attention: LossWeight = 1.0
    w_part: LossWeight = 0.5
    w_master: LossWeight = 0.5
    w_part_aux: LossWeight = 0.5
    w_master_aux: LossWeight = 0.5
    w_distill: LossWeight = 1.0


@dataclass
class TrainConfig:
    epochs: Annotated[int, Range(ge=0, le=100_000)] = 10
    batch_size: Annotated[int, Range(ge=1, le=65_536)] = 16  # per process; the authors ran 8 x 12 = 96
    lr: Annotated[float, Range(gt=0, le=100)] = 0.05
    momentum: Annotated[float, Range(ge=0, le=1)] = 0.9
    weight_decay: Annotated[float, Range(ge=0, le=1)] = 0.0001
    milestones: list[Annotated[int, Range(ge=0, le=100_000)]] = field(default_factory=lambda: [7])  # epochs
    gamma: Annotated[float, Range(gt=0, le=1)] = 0.1
    accum_steps: Annotated[int, Range(ge=1, le=1024)] = 1
    workers: Workers = 1
    seed: Seed = 0
    deterministic: bool = False
    amp: bool = True  # bf16 autocast, on CUDA only
    channels_last: bool = True  # on CUDA only
    checkpoint_every: Steps = 0  # steps; 0 = only at epoch ends
    checkpoint_dir: str = ""  # "" = <out>/checkpoints; may be s3://bucket/prefix
    keep_checkpoints: Annotated[int, Range(ge=0, le=10**6)] = 2  # newest step checkpoints kept; 0 = all
    batchnorm: BatchNormMode = "local"
    resume: str = "auto"  # auto | never | a checkpoint path or URI
    force_resume: bool = False  # resume even from a checkpoint of another config or data (its fingerprint differs)
    max_steps: Steps = 0  # 0 = no limit (for smoke runs)
    log_every: Annotated[int, Range(ge=1, le=10**9)] = 5  # optimizer steps
    picture_images: Annotated[int, Range(ge=0, le=64)] = 4  # fixed validation images drawn each epoch
    jitter: Annotated[float, Range(ge=0, le=1)] = 0.4
    rotation: Annotated[float, Range(ge=0, le=180)] = 30.0  # degrees


@dataclass
class EvaluateConfig:
    batch_size: Annotated[int, Range(ge=1, le=65_536)] = 16
    topk: Annotated[int, Range(ge=1, le=1000)] = 5
    timing_batches: Annotated[int, Range(ge=0, le=10_000)] = 3
    workers: Workers = 1


@dataclass
class RegisterConfig:
    model_name: str = "tasn"
    primary_metric: str = "master_aux_top1"
    alias: str = "staging"
    # `tasn register --promote` (the dvc.yaml stage) runs the staging gate; false: register only.
    # A DVC experiment (`dvc exp run`) never runs it, whatever this says.
    promote: bool = True


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

    def relations(self) -> Iterator[str]:
        if self.model.input_size > self.preprocess.size:
            yield (f"model.input_size ({self.model.input_size}) is larger than preprocess.size "
                   f"({self.preprocess.size}): the crop would not fit the preprocessed images")
        if self.preprocess.size * self.validate.max_aspect_ratio > JPEG_MAX_SIDE:
            yield (f"preprocess.size ({self.preprocess.size}) x validate.max_aspect_ratio "
                   f"({self.validate.max_aspect_ratio:g}) is more than {JPEG_MAX_SIDE} px: an image validate accepts "
                   "could be resized past JPEG's longest side")
        if self.preprocess.max_pixels < self.validate.max_pixels:
            yield (f"preprocess.max_pixels ({self.preprocess.max_pixels}) is smaller than validate.max_pixels "
                   f"({self.validate.max_pixels}): preprocess would refuse images validate accepts")


def _flatten(d: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, name + ".")
        else:
            yield name, value
