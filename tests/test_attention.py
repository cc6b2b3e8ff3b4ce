"""Trilinear attention and the attention net, against explicit computations."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from tasn.model.attention import AttentionNet, MultiDilationHead, trilinear_attention


def loop_trilinear(x: torch.Tensor, scale: float = 7.0) -> torch.Tensor:
    """M = N(N(X) X^T) X, one sample, channel and position at a time (docs/method.md step 2)."""
    n, c, h, w = x.shape
    out = torch.zeros(n, c, h * w, dtype=torch.float64)
    for b in range(n):
        xf = x[b].reshape(c, h * w).tolist()
        n1 = []
        for i in range(c):
            e = [math.exp(scale * v) for v in xf[i]]
            n1.append([v / sum(e) for v in e])
        rel = [[sum(n1[i][s] * xf[j][s] for s in range(h * w)) for j in range(c)] for i in range(c)]
        for i in range(c):
            e = [math.exp(v) for v in rel[i]]
            r = [v / sum(e) for v in e]
            for s in range(h * w):
                out[b, i, s] = sum(r[j] * xf[j][s] for j in range(c))
    return out.reshape(n, c, h, w)


def test_trilinear_attention_matches_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 5, 3, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(trilinear_attention(x), loop_trilinear(x), atol=1e-12, rtol=1e-10)


def test_trilinear_attention_matches_einsum_in_float32():
    g = torch.Generator().manual_seed(1)
    x = torch.relu(torch.randn(3, 16, 7, 7, generator=g))
    xf = x.flatten(2)
    n1 = torch.softmax(7 * xf, dim=-1)
    rel = torch.softmax(torch.einsum("bis,bjs->bij", n1, xf), dim=-1)
    want = torch.einsum("bij,bjs->bis", rel, xf).reshape_as(x)
    torch.testing.assert_close(trilinear_attention(x), want, atol=1e-5, rtol=1e-5)


def test_multi_dilation_head_equals_separate_dilated_convs_with_shared_weights():
    g = torch.Generator().manual_seed(2)
    head = MultiDilationHead(6, 4)
    x = torch.randn(2, 6, 9, 9, generator=g)

    def conv_like(src: nn.Conv2d, d: int) -> nn.Conv2d:
        conv = nn.Conv2d(src.in_channels, src.out_channels, 3, padding=d, dilation=d)
        conv.load_state_dict(src.state_dict())
        return conv

    a = sum(torch.relu(conv_like(head.conv_a, d)(x)) for d in (1, 2))
    want = sum(torch.relu(conv_like(head.conv_b, d)(a)) for d in (1, 2, 3))
    torch.testing.assert_close(head(x), want)


def test_attention_net_is_output_stride_8_with_its_own_classifier():
    net = AttentionNet(num_classes=7, arch="resnet18", head_channels=512).eval()
    with torch.no_grad():
        logits, feats = net(torch.randn(1, 3, 224, 224))
    assert logits.shape == (1, 7)
    assert feats.shape == (1, 512, 28, 28)  # docs/method.md: 224 -> 28 x 28, 512 channels
    assert (feats >= 0).all()  # a sum of ReLUs: non-negative


def test_attention_net_slim_variant_keeps_the_geometry():
    net = AttentionNet(num_classes=3, arch="resnet18-slim", head_channels=32)
    logits, feats = net(torch.randn(2, 3, 112, 112))
    assert logits.shape == (2, 3) and feats.shape == (2, 32, 14, 14)
