"""The configuration's sections: every knob, its type, its rule and its default, in one place.

The defaults are the embedded CPU demo: what `make run` / `dvc repro` trains on the embedded
Fashion-MNIST-in-clutter set with the from-scratch recipe, and what a user gets with no params
file. params.yaml spells out exactly these values (DVC reads it; a test keeps the two equal).
Profiles (profiles/NAME.yaml) overlay them, e.g. `cub`, the authors' CUB-200-2011 recipe. The
model classes keep their own constructor defaults, the authors' constants (`TASN(num_classes)`
is ResNet-50 + ResNet-18 at 512 -> 224), for use without any config.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, get_args

from tasn.choices import (
    IMAGENET_WEIGHTS,
    AttentionBackbone,
    AttentionStride,
    Backbone,
    BatchNormMode,
    DetailsCue,
    DistillTeacher,
    FashionLabel,
    ModelKind,
    Optimizer,
    PretrainedWeights,
    RegisterWhen,
    Schedule,
)
from tasn.config.rules import Range
from tasn.errors import shown

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
# Powers above a few make every map one hot cell; far above, a map of ordinary values overflows
MapPower = Annotated[float, Range(gt=0, le=16)]
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


FASHION_CROP_MARGIN = 12  # px kept clear at each canvas edge, so a random input_size crop keeps the card


@dataclass
class FashionConfig:
    """The embedded default: Fashion-MNIST garments placed small in cluttered canvases (`tasn data fashion`)."""

    source: str = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
    classes: list[FashionLabel] = field(default_factory=lambda: list(get_args(FashionLabel)))
    train_per_class: Annotated[int, Range(ge=1, le=6000)] = 240  # Fashion-MNIST has 6,000 per label
    test_per_class: Annotated[int, Range(ge=1, le=1000)] = 60  # and 1,000 in its test file
    side: Annotated[int, Range(ge=64, le=MAX_SIDE)] = 192  # canvases are side x side px
    item_min: Annotated[int, Range(ge=8, le=1024)] = 28  # garment size in px (Fashion-MNIST's own is 28)
    item_max: Annotated[int, Range(ge=8, le=1024)] = 36
    seed: Seed = 0
    jpeg_quality: JpegQuality = 80

    def relations(self) -> Iterator[str]:
        if len(set(self.classes)) < 2 or len(set(self.classes)) != len(self.classes):
            yield f"classes: need at least 2 distinct names, got {shown(self.classes)}"
        if self.item_min > self.item_max:
            yield f"item_min ({self.item_min}) is larger than item_max ({self.item_max})"
        if self.side < 2 * (FASHION_CROP_MARGIN + 1.2 * self.item_max) + 2:
            yield f"side: {self.side} px is too small for garments of {self.item_max} px on their cards"


DETAILS_TEXTURES = 8  # texture kinds of `tasn data details` (tasn.data.details.TEXTURES)
DETAILS_SHAPES = 4  # part outlines of its `shape` cue (tasn.data.details.SHAPES)


@dataclass
class DetailsConfig:
    """A details set (`tasn data details`): the class is the texture of one part, and, with the
    `shape` cue, the part's outline too. Sizes are in pixels of the `side` x `side` canvas, which at
    preprocess.size = side are pixels of the model's input."""

    classes: Annotated[int, Range(ge=2, le=DETAILS_TEXTURES * DETAILS_SHAPES)] = 8
    train_per_class: Annotated[int, Range(ge=1, le=100_000)] = 112
    test_per_class: Annotated[int, Range(ge=1, le=100_000)] = 38
    side: Annotated[int, Range(ge=64, le=MAX_SIDE)] = 192
    period: Annotated[float, Range(ge=1.5, le=64)] = 4.0  # texture period, px
    part_share: Annotated[float, Range(ge=0.002, le=0.25)] = 0.05  # the part's area / the canvas's
    cue: DetailsCue = "card"
    seed: Seed = 0
    jpeg_quality: JpegQuality = 95

    def relations(self) -> Iterator[str]:
        most = DETAILS_TEXTURES * (DETAILS_SHAPES if self.cue == "shape" else 1)
        if self.classes > most:
            yield (f"classes: {self.classes} is more than the {most} the {self.cue!r} cue can tell apart "
                   f"({DETAILS_TEXTURES} textures{f' x {DETAILS_SHAPES} outlines' if self.cue == 'shape' else ''})")
        if self.period * 3 > self.side:
            yield f"period: {self.period:g} px is more than a third of side ({self.side} px)"


@dataclass
class DataConfig:
    raw: str = "data/raw"
    validated: str = "data/validated"
    prepared: str = "data/prepared"
    fashion: FashionConfig = field(default_factory=FashionConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    details: DetailsConfig = field(default_factory=DetailsConfig)


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
    size: Annotated[int, Range(ge=8, le=MAX_SIDE)] = 192  # shorter side after resizing; TASN crops model.input_size
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
    att_head_channels: Annotated[int, Range(ge=1, le=8192)] = 64
    input_size: Side = 168
    # Where to zoom is read from the whole input (a fine texture survives no resize), at output stride 16
    # to pay for it; the authors: 224 of a 512 input at stride 8 (docs/training.md)
    att_size: Side = 168
    att_stride: AttentionStride = 16
    out_size: Side = 56
    dense: Annotated[float, Range(gt=0, le=1000)] = 4.0
    iters: Annotated[int, Range(ge=1, le=100)] = 5
    # Sharper maps than the authors' (2 and 1): a from-scratch attention net's maps are broad, and
    # squared they magnify a small part 1.8x where a fine texture needs 2.4x (docs/training.md)
    structure_power: MapPower = 12.0
    detail_power: MapPower = 6.0
    pretrained: str = "none"  # none | imagenet | local path / s3:// URI of a state dict
    att_pretrained: str = "none"
    # torchvision's ImageNet weights for `imagenet` (the shared backbone; ResNet-18/34 have V1 only):
    # V1, the classic recipe, is the reproduction's; the authors' MXNet ResNet-50 is of that kind
    pretrained_weights: PretrainedWeights = "IMAGENET1K_V1"
    zero_init_residual: bool = True  # last BN of each residual block starts at 0 (random init only)

    def relations(self) -> Iterator[str]:
        if self.pretrained == "imagenet" and self.pretrained_weights not in IMAGENET_WEIGHTS.get(self.backbone, ()):
            have = ", ".join(IMAGENET_WEIGHTS.get(self.backbone, ())) or "none"
            yield (f"pretrained_weights: torchvision has no {self.pretrained_weights} weights for "
                   f"{self.backbone} (it has: {have})")


@dataclass
class LossConfig:
    temperature: Annotated[float, Range(gt=0, le=1000)] = 10.0
    w_attention: LossWeight = 1.0
    w_part: LossWeight = 0.5
    w_master: LossWeight = 0.5
    w_part_aux: LossWeight = 0.5
    w_master_aux: LossWeight = 0.5
    w_distill: LossWeight = 1.0
    # authors: the gradient reaches the part head through its soft targets (their code); detached: constants
    distill_teacher: DistillTeacher = "authors"


@dataclass
class TrainConfig:
    epochs: Annotated[int, Range(ge=0, le=100_000)] = 8
    # at least this many optimizer steps: a set too small to reach them in `epochs` is trained for more
    # epochs (step milestones stretched alike); 0 = exactly `epochs`
    min_steps: Steps = 1200
    batch_size: Annotated[int, Range(ge=1, le=65_536)] = 32  # per process (one forward pass; BatchNorm's batch)
    # images per optimizer step over all processes; 0 = batch_size x accum_steps x processes, whatever
    # that is. Set (the authors': 96 = 8 GPUs x 12), accum_steps follows the number of processes
    # (tasn.training.batch), so the recipe is the same on 1 GPU or 8
    global_batch_size: Annotated[int, Range(ge=0, le=10**7)] = 0
    optimizer: Optimizer = "sgd"
    lr: Annotated[float, Range(gt=0, le=100)] = 0.1
    momentum: Annotated[float, Range(ge=0, le=1)] = 0.9  # sgd only
    weight_decay: Annotated[float, Range(ge=0, le=1)] = 0.0005
    schedule: Schedule = "cosine"  # step: x gamma at each milestone epoch; cosine: to 0 at the last step
    milestones: list[Annotated[int, Range(ge=0, le=100_000)]] = field(default_factory=list)  # epochs (step)
    gamma: Annotated[float, Range(gt=0, le=1)] = 0.1
    warmup_epochs: Annotated[float, Range(ge=0, le=100_000)] = 1.0  # linear warm-up, per optimizer step
    # TASN: share of the step budget during which only the attention net learns (the sampling
    # branches' terms weigh 0), so the backbone first sees zooms the maps chose, not random ones
    attention_first: Annotated[float, Range(ge=0, lt=1)] = 0.25
    label_smoothing: Annotated[float, Range(ge=0, lt=1)] = 0.1  # of every cross-entropy term
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
    # share of the step budget after which a training loss still at its chance value is reported (0 = never)
    chance_check: Annotated[float, Range(ge=0, le=1)] = 0.5
    log_every: Annotated[int, Range(ge=1, le=10**9)] = 5  # optimizer steps
    picture_images: Annotated[int, Range(ge=0, le=64)] = 4  # fixed validation images drawn each epoch
    jitter: Annotated[float, Range(ge=0, le=1)] = 0.0  # the authors': 0.4
    rotation: Annotated[float, Range(ge=0, le=180)] = 0.0  # degrees, of the whole image before the crop (theirs: 30)
    lighting: Annotated[float, Range(ge=0, le=10)] = 0.0  # PCA lighting noise (the authors': 0.1)

    def relations(self) -> Iterator[str]:
        if self.global_batch_size and self.accum_steps != 1:
            yield (f"accum_steps ({self.accum_steps}) and global_batch_size ({self.global_batch_size}) are both "
                   "set: with a global batch the accumulation follows the number of processes; leave accum_steps at 1")
        if self.warmup_epochs > self.epochs:
            yield f"warmup_epochs ({self.warmup_epochs:g}) is more than epochs ({self.epochs})"


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
    # Which runs become versions (tasn.registry.stage.registers): auto = all but a DVC experiment's,
    # which registers only when asked (`dvc exp run -S register.enabled=true`); true; false.
    enabled: RegisterWhen = "auto"

    def relations(self) -> Iterator[str]:
        """The names MLflow's registry refuses, refused here before any work (its own rules)."""
        if not self.model_name.strip() or any(c in self.model_name for c in "/:"):
            yield f"model_name: {shown(self.model_name)} is not a registered model name (not blank, no '/' or ':')"
        if not re.fullmatch(r"[\w\-]{1,255}", self.alias) or self.alias.lower() == "latest" or re.fullmatch(
                r"[vV]\d+", self.alias):
            yield (f"alias: {shown(self.alias)} is not an alias MLflow takes (letters, digits, '_' and '-'; "
                   "not 'latest' or v<number>, which MLflow reserves)")


@dataclass
class TrackingConfig:
    """MLflow. Empty uri = MLFLOW_TRACKING_URI if set, else sqlite `mlflow.db` in the project."""

    uri: str = ""
    experiment: str = "tasn"
    s3_endpoint: str = ""  # else MLFLOW_S3_ENDPOINT_URL / AWS_ENDPOINT_URL from the environment
    system_metrics: bool = True
    enabled: bool = True  # false: no MLflow at all (offline runs, mechanical tests)
    # MLflow's HTTP client (MLFLOW_HTTP_REQUEST_TIMEOUT / _MAX_RETRIES, unless the environment sets them):
    # a server that is down costs one call at most about (retries + 1) x timeout + 7 s of backoff (~90 s)
    request_timeout: Annotated[int, Range(ge=1, le=600)] = 20  # seconds per request
    request_retries: Annotated[int, Range(ge=0, le=10)] = 3  # of a failed connection, 429 or 5xx (never a 4xx)


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
