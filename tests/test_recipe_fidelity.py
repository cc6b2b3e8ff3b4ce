"""What makes a GPU run of the authors' recipe mean what it says (issue 23): the global batch on any
number of processes, the ImageNet weights version, one evaluation precision, and NaN/Inf attention
counted rather than silently turned into a plain resize. All on CPU, with tiny models."""

from __future__ import annotations

import logging
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from tasn.config import ConfigError, ModelConfig, check, load_config
from tasn.distributed import Context
from tasn.model import TASN, build_loss, build_model
from tasn.model.backbones import imagenet_weights
from tasn.model.sampler import nonfinite_maps
from tasn.training import batch
from tasn.training.loop import Loop

ROOT = Path(__file__).resolve().parents[1]


def small_tasn() -> TASN:
    return TASN(3, backbone="resnet18-slim", att_backbone="resnet18-slim", att_head_channels=8, att_size=32,
                out_size=24)


# ------------------------------------------------------------------------------------------------
# The global batch
# ------------------------------------------------------------------------------------------------
def test_the_cub_recipe_states_its_batch_precision_and_weights():
    for name in ("cub", "cub336"):
        c = load_config(ROOT / "params.yaml", name)
        assert (c.train.batch_size, c.train.global_batch_size, c.train.accum_steps) == (12, 96, 1), name
        assert (c.train.amp, c.model.pretrained_weights) == (False, "IMAGENET1K_V1"), name


@pytest.mark.parametrize("world,accum,lr", [(8, 1, 0.1), (1, 8, 0.1), (2, 4, 0.1), (4, 2, 0.1)])
def test_the_global_batch_is_kept_by_accumulation_on_any_number_of_processes(world, accum, lr, caplog):
    cub = load_config(ROOT / "params.yaml", "cub").train
    with caplog.at_level(logging.WARNING):
        t = batch.for_world_size(cub, world)
    assert (t.accum_steps, t.lr) == (accum, pytest.approx(lr))
    assert t.batch_size * t.accum_steps * world == 96
    assert not caplog.records


@pytest.mark.parametrize("world,accum,used", [(3, 3, 108), (16, 1, 192), (5, 2, 120)])
def test_a_global_batch_that_cannot_be_met_scales_the_lr_and_warns(world, accum, used, caplog):
    cub = load_config(ROOT / "params.yaml", "cub").train
    t = batch.for_world_size(cub, world)
    assert (t.accum_steps, t.lr) == (accum, pytest.approx(0.1 * used / 96))
    assert f"gives {used} images per step" in caplog.text and "learning rate is scaled" in caplog.text


def test_without_a_global_batch_more_processes_warn_that_the_batch_grew(caplog):
    demo = load_config(ROOT / "params.yaml").train
    assert batch.for_world_size(demo, 1) == demo and not caplog.records
    assert batch.for_world_size(demo, 4) == demo
    assert "global_batch_size is not set" in caplog.text and "= 128 images" in caplog.text


def test_global_batch_and_accum_steps_together_is_a_config_error():
    with pytest.raises(ConfigError, match="accum_steps .* and global_batch_size .* are both set"):
        load_config(ROOT / "params.yaml", "cub", ["train.accum_steps=2"])


# ------------------------------------------------------------------------------------------------
# ImageNet weights version
# ------------------------------------------------------------------------------------------------
def test_pretrained_weights_picks_torchvisions_version(monkeypatch):
    """No download: torchvision's weights lookup is replaced by one that records the name asked for."""
    asked = []
    state = torchvision.models.resnet50(weights=None).state_dict()
    weights = types.SimpleNamespace(get_state_dict=lambda progress=True: state)
    monkeypatch.setattr(torchvision.models, "get_weight", lambda name: asked.append(name) or weights)
    cfg = ModelConfig(kind="baseline", backbone="resnet50", pretrained="imagenet", pretrained_weights="IMAGENET1K_V2")
    torch.testing.assert_close(build_model(cfg, num_classes=3).backbone.net.conv1.weight, state["conv1.weight"])
    assert asked == ["ResNet50_Weights.IMAGENET1K_V2"]
    assert ModelConfig().pretrained_weights == "IMAGENET1K_V1"  # the reproduction's default
    assert [imagenet_weights(a) for a in ("resnet18", "resnet34", "resnet50")] == [
        "ResNet18_Weights.IMAGENET1K_V1", "ResNet34_Weights.IMAGENET1K_V1", "ResNet50_Weights.IMAGENET1K_V1"]
    with pytest.raises(ConfigError, match="no IMAGENET1K_V2 weights for resnet18 .it has: IMAGENET1K_V1"):
        check(ModelConfig(backbone="resnet18", pretrained="imagenet", pretrained_weights="IMAGENET1K_V2"))


# ------------------------------------------------------------------------------------------------
# Non-finite attention
# ------------------------------------------------------------------------------------------------
def test_nonfinite_maps_are_the_ones_the_sampler_resizes_plainly():
    maps = torch.rand(5, 7, 7)
    maps[1, 3, 3] = float("nan")
    maps[2, 0, 0] = float("inf")
    maps[3] = 1e30  # finite, but its square overflows float32
    maps[4] = 0.0  # all zero: a plain resize by definition, not a fault
    assert nonfinite_maps(maps, 64, power=2.0).tolist() == [False, True, True, True, False]
    assert nonfinite_maps(maps, 64, power=1.0).tolist() == [False, True, True, False, False]


def _with_broken_attention(model: TASN, bad: list[int]) -> None:
    real = model.attention_maps

    def attention_maps(x):
        logits, maps = real(x)
        maps = maps.clone()
        maps[bad] = float("nan")
        return logits, maps

    model.attention_maps = attention_maps  # type: ignore[method-assign]


def test_tasn_counts_training_images_with_nonfinite_attention_and_samples_them_plainly():
    torch.manual_seed(0)
    model = small_tasn().train()
    _with_broken_attention(model, [1])
    x = torch.rand(3, 3, 64, 64)
    out, extras = model(x, return_extras=True)
    model(x)
    assert model.take_nonfinite_attention() == 2  # one image in each of two forward passes
    assert model.take_nonfinite_attention() == 0  # taken: reset
    resized = F.interpolate(x[1:2], size=(24, 24), mode="bilinear", align_corners=True)
    torch.testing.assert_close(extras.structure_images[1:2], resized)  # what the counter exposes
    model.eval()
    model(x)
    assert model.take_nonfinite_attention() == 0  # evaluation is not training


def test_a_high_power_of_a_map_of_large_values_is_sampled_not_resized_plainly():
    """Scaling a map moves no sample (the sampler normalises its powered profiles), so TASN divides
    each map by its peak before sampling: maps with peaks of 10^4 at the 12th power (10^48, past
    float32) zoom exactly as the same maps at peak 1, and none is counted or resized plainly."""
    torch.manual_seed(0)
    model = TASN(3, backbone="resnet18-slim", att_backbone="resnet18-slim", att_head_channels=8, att_size=32,
                 out_size=24, structure_power=12.0, detail_power=6.0).train()
    real, scale = model.attention_maps, [1.0]

    def attention_maps(x):
        logits, maps = real(x)
        return logits, maps * (scale[0] / maps.amax())

    model.attention_maps = attention_maps
    x = torch.rand(3, 3, 64, 64)
    images = []
    for scale[0] in (1.0, 1e4):
        torch.manual_seed(1)  # the same detail channel drawn in both passes
        images.append(model(x, return_extras=True)[1])
        assert model.take_nonfinite_attention() == 0
    for kind in ("structure_images", "detail_images"):  # up to the rounding of the scaling
        torch.testing.assert_close(getattr(images[1], kind), getattr(images[0], kind), atol=1e-4, rtol=0)
    resized = F.interpolate(x, size=(24, 24), mode="bilinear", align_corners=True)
    assert not torch.allclose(images[1].structure_images, resized, atol=1e-2)


def tiny_loop(model: TASN, **train) -> Loop:
    cfg = load_config(ROOT / "params.yaml", "smoke", [f"train.{k}={v}" for k, v in train.items()])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    return Loop(cfg, Context(), model, build_loss(cfg.model, cfg.loss), opt,
                torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0), ["a", "b", "c"], ckpt_dir="unused")


def test_the_training_metrics_count_nonfinite_attention_and_warn(caplog):
    torch.manual_seed(0)
    model = small_tasn()
    _with_broken_attention(model, [0, 2])
    loop = tiny_loop(model, log_every=1)
    data = [(torch.rand(3, 3, 64, 64), torch.tensor([0, 1, 2])) for _ in range(2)]
    loop.train_epoch(data, total_batches=2)
    assert [row["nonfinite_attention"] for row in loop.steps] == [2, 2]
    assert "2 training image(s) since the last log had NaN or Inf attention maps" in caplog.text


def test_evaluation_in_training_runs_in_float32_as_tasn_evaluate(monkeypatch):
    """Even where training runs under autocast, the per-epoch evaluation does not: a checkpoint has
    the one accuracy that `tasn evaluate` and the deployed model give it."""
    model = small_tasn()
    loop = tiny_loop(model)
    loop.amp_dtype = torch.bfloat16  # what `train.amp` gives on a GPU; CPU autocast takes it too
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(torch.is_autocast_enabled("cpu")))
    metrics = loop.evaluate([(torch.rand(3, 3, 64, 64), torch.tensor([0, 1, 2]))])
    assert seen == [False] and 0.0 <= metrics["master_aux_top1"] <= 1.0
    with torch.autocast("cpu", dtype=loop.amp_dtype):  # the check can tell: training's forward is under it
        model(torch.rand(3, 3, 64, 64))
    assert seen == [False, True]
