"""The TASN network: head shapes, map selection, and where gradients flow (and don't)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock

from tasn.config import ModelConfig
from tasn.model import TASN, Baseline, TASNLoss, build_model
from tasn.model.attention import AttentionNet, trilinear_attention
from tasn.model.backbones import build_resnet
from tasn.model.sampler import attention_sample


def small_tasn(num_classes: int = 5) -> TASN:
    return TASN(num_classes, backbone="resnet18-slim", att_backbone="resnet18-slim", att_head_channels=16,
                att_size=64, out_size=48)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 3, 96, 96, generator=g), torch.tensor([0, 2, 4])


def test_every_head_has_the_right_shape(batch):
    torch.manual_seed(0)
    model = small_tasn()
    out, extras = model(batch[0], return_extras=True)
    assert out._fields == ("attention", "part", "master", "part_aux", "master_aux")
    for head in out:
        assert head.shape == (3, 5)
    assert extras.structure_map.shape == (3, 8, 8) and extras.detail_map.shape == (3, 8, 8)
    assert extras.structure_images.shape == extras.detail_images.shape == (3, 3, 48, 48)
    assert model.primary_head == "master_aux"


def test_structure_and_detail_images_follow_the_definition(batch):
    torch.manual_seed(0)
    model = small_tasn().eval()
    x = batch[0]
    with torch.no_grad():
        _, extras = model(x, return_extras=True)
        _, feats = model.attention_net(F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=True))
        maps = trilinear_attention(feats)
    summed = maps.sum(1)
    torch.testing.assert_close(extras.structure_map, summed)
    torch.testing.assert_close(extras.detail_map, summed)  # evaluation: the deterministic sum
    peaked = summed / summed.amax(dim=(1, 2), keepdim=True)  # over its peak: no sample moves (test_recipe_fidelity)
    up = F.interpolate(peaked.unsqueeze(1), size=(96, 96), mode="bilinear", align_corners=True).squeeze(1)
    torch.testing.assert_close(extras.structure_images, attention_sample(x, up**2, 48), atol=1e-5, rtol=0)
    torch.testing.assert_close(extras.detail_images, attention_sample(x, up, 48), atol=1e-5, rtol=0)


def test_map_powers_reach_the_two_samplers(batch):
    """`structure_power` and `detail_power` raise the upsampled maps before sampling; checked against
    the sampler fed the powered map (a power of the profile is the profile of the power)."""
    torch.manual_seed(0)
    model = TASN(5, backbone="resnet18-slim", att_backbone="resnet18-slim", att_head_channels=16, att_size=64,
                 out_size=48, structure_power=5.0, detail_power=3.0).eval()
    x = batch[0]
    with torch.no_grad():
        _, extras = model(x, return_extras=True)
    peaked = extras.structure_map / extras.structure_map.amax(dim=(1, 2), keepdim=True)
    up = F.interpolate(peaked.unsqueeze(1), size=(96, 96), mode="bilinear", align_corners=True).squeeze(1)
    torch.testing.assert_close(extras.structure_images, attention_sample(x, up**5, 48), atol=1e-5, rtol=0)
    torch.testing.assert_close(extras.detail_images, attention_sample(x, up**3, 48), atol=1e-5, rtol=0)
    assert not torch.allclose(extras.structure_images, attention_sample(x, up**2, 48), atol=1e-3)


def test_training_detail_map_is_one_channel_per_sample():
    torch.manual_seed(3)
    model = small_tasn().train()
    maps = torch.rand(4, 16, 8, 8)
    _, detail = model.select_maps(maps)
    for i in range(4):
        assert any(torch.equal(detail[i], maps[i, c]) for c in range(16))


def test_training_draws_the_detail_channel_for_each_sample_on_its_own():
    """Channel c of sample i is the constant 100 i + c, so each detail map says which channel was
    drawn for it: over 256 samples the draws differ (one draw for the whole batch would not), and
    every channel comes up."""
    torch.manual_seed(0)
    model = small_tasn().train()
    n, channels = 256, 16
    value = 100 * torch.arange(n).view(n, 1, 1, 1) + torch.arange(channels).view(1, channels, 1, 1)
    maps = value.float().expand(n, channels, 8, 8)
    structure, detail = model.select_maps(maps)
    torch.testing.assert_close(structure, maps.sum(1))
    picked = detail[:, 0, 0] - 100 * torch.arange(n)
    assert torch.all(detail == detail[:, :1, :1])  # a whole channel, not a mix
    assert set(picked.long().tolist()) == set(range(channels))  # misses one: p ~ 1e-6


def test_sampling_branches_send_no_gradient_into_the_attention_net(batch):
    torch.manual_seed(0)
    model = small_tasn()
    out = model(batch[0])
    terms = TASNLoss()(out, batch[1])[1]
    sampled_only = terms["part"] + terms["master"] + terms["part_aux"] + terms["master_aux"] + terms["distill"]
    sampled_only.backward(retain_graph=True)
    for name, p in model.attention_net.named_parameters():
        assert p.grad is None or p.grad.abs().sum() == 0, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())

    model.zero_grad(set_to_none=True)
    terms["attention"].backward()
    grads = [p.grad for p in model.attention_net.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in model.backbone.parameters())


def test_build_model_from_config_and_baseline_shape():
    cfg = ModelConfig(kind="baseline", backbone="resnet18-slim", out_size=32)
    model = build_model(cfg, num_classes=4)
    assert isinstance(model, Baseline) and model.primary_head == "logits"
    assert model(torch.randn(2, 3, 64, 64)).logits.shape == (2, 4)
    tasn = build_model(ModelConfig(backbone="resnet18-slim", att_backbone="resnet18-slim", att_head_channels=8,
                                   att_size=32, out_size=32), num_classes=3)
    assert isinstance(tasn, TASN)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        build_model(cfg, num_classes=1)


def test_local_pretrained_weights_load_and_bad_paths_fail(tmp_path):
    src = build_resnet("resnet18-slim")
    torch.save(src.state_dict(), tmp_path / "w.pth")
    loaded = build_resnet("resnet18-slim", str(tmp_path / "w.pth"))
    torch.testing.assert_close(loaded.conv1.weight, src.conv1.weight)
    with pytest.raises(FileNotFoundError, match="no file at"):
        build_resnet("resnet18-slim", str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="do not fit resnet18"):
        build_resnet("resnet18", str(tmp_path / "w.pth"))
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_resnet("resnet18-slim", "imagenet")


def test_attention_net_sees_an_align_corners_resize_as_mxnets_bilinearresize2d(batch):
    model = small_tasn().eval()
    seen = []
    model.attention_net.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    model(batch[0])
    want = F.interpolate(batch[0], size=(64, 64), mode="bilinear", align_corners=True)
    assert torch.equal(seen[0], want)
    assert not torch.allclose(seen[0], F.interpolate(batch[0], size=(64, 64), mode="bilinear", align_corners=False))


@pytest.mark.parametrize("stride", [8, 16])
def test_attention_net_output_stride_is_the_asked_one_and_the_weights_the_same(stride):
    """Stride 8 is the authors' surgery (stages 2 and 4 at stride 1), 16 leaves stage 2 alone; a
    stride changes no weight, so one state dict fits both."""
    torch.manual_seed(0)
    net = AttentionNet(5, "resnet18-slim", 16, stride=stride)
    logits, feats = net(torch.randn(2, 3, 96, 96))
    assert logits.shape == (2, 5) and feats.shape == (2, 16, 96 // stride, 96 // stride)
    stages = net.trunk[5:8]  # stages 2, 3, 4 (after the stem and stage 1)
    assert [(b[0].conv1.stride[0], b[0].downsample[0].stride[0]) for b in stages] == {
        8: [(1, 1), (2, 2), (1, 1)], 16: [(2, 2), (2, 2), (1, 1)]}[stride]
    other = AttentionNet(5, "resnet18-slim", 16, stride=24 - stride)
    other.load_state_dict(net.state_dict())
    with pytest.raises(ValueError, match="output stride must be one of"):
        AttentionNet(5, "resnet18-slim", 16, stride=32)


def test_new_layers_get_the_authors_init():
    """Head convs MSRA-PReLU (std sqrt(2 / (1 + 0.25^2) / mean fan)), classifiers He-normal
    (std sqrt(2 / fan_in)), biases zero: their MXNet initializers, measured on wide layers."""
    torch.manual_seed(0)
    model = TASN(100, backbone="resnet18-slim", att_backbone="resnet18-slim", att_head_channels=256,
                 att_size=32, out_size=32)
    conv = model.attention_net.head.conv_a  # 128 -> 256, 3x3
    fan_in, fan_out = 128 * 9, 256 * 9
    assert conv.weight.std().item() == pytest.approx((2 / (1 + 0.25**2) / ((fan_in + fan_out) / 2)) ** 0.5, rel=0.03)
    for fc in (model.attention_net.fc, model.fc, model.fc_part, model.fc_master):
        assert fc.weight.std().item() == pytest.approx((2 / fc.in_features) ** 0.5, rel=0.05)
        assert not fc.bias.any()
    assert not conv.bias.any() and not model.attention_net.head.conv_b.bias.any()


@pytest.mark.parametrize("arch", ["resnet18-slim", "resnet18"])
def test_zero_init_residual_starts_every_block_as_the_identity(arch):
    blocks = [m for m in build_resnet(arch, zero_init_residual=True).modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 8 and all(not b.bn2.weight.any() for b in blocks)
    plain = build_resnet(arch)
    assert all(m.bn2.weight.eq(1).all() for m in plain.modules() if hasattr(m, "bn2"))
    cfg = ModelConfig(kind="baseline", backbone=arch, zero_init_residual=True)
    assert not build_model(cfg, 3).backbone.net.layer1[0].bn2.weight.any()  # reaches build_model
