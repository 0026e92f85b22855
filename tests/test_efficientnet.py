"""Tests for dlarch_lib.efficientnet: SE, MBConv, conv costs, compound scaling, transfer tools."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlarch_lib import efficientnet as en
from dlarch_lib.core.measure import count_parameters, forward_flops


def test_se_gate_in_unit_interval_and_scaling_matches_manual():
    torch.manual_seed(0)
    se = en.SqueezeExcite(6, 2)
    x = torch.randn(3, 6, 5, 4)
    gate = se.gate(x)
    assert gate.shape == (3, 6) and (gate > 0).all() and (gate < 1).all()
    manual = torch.sigmoid(
        F.linear(
            F.silu(F.linear(x.mean(dim=(2, 3)), se.reduce.weight, se.reduce.bias)), se.expand.weight, se.expand.bias
        )
    )
    torch.testing.assert_close(gate, manual)
    torch.testing.assert_close(se(x), x * manual[:, :, None, None])


def test_se_rejects_bad_input():
    with pytest.raises(ValueError, match="channels"):
        en.SqueezeExcite(0, 1)
    with pytest.raises(ValueError, match="expects"):
        en.SqueezeExcite(4, 1)(torch.randn(2, 3, 4, 4))


def test_mbconv_shapes_and_residual():
    same, down = en.MBConv(8, 8), en.MBConv(8, 12, stride=2)
    assert same.use_residual and not down.use_residual
    assert same(torch.randn(2, 8, 7, 7)).shape == (2, 8, 7, 7)
    assert down(torch.randn(2, 8, 7, 7)).shape == (2, 12, 4, 4)
    assert isinstance(en.MBConv(4, 4, expand=1).expand_conv, nn.Identity)
    dw = same.depthwise[0]
    assert dw.groups == dw.in_channels == dw.out_channels == 32


def test_mbconv_residual_is_identity_when_branch_is_zero():
    block = en.MBConv(4, 4).eval()
    nn.init.zeros_(block.project[1].weight)  # BN gamma 0 and beta 0: the branch outputs zero
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(block(x), x)


def test_mbconv_rejects_bad_config_and_input():
    with pytest.raises(ValueError, match="kernel"):
        en.MBConv(4, 4, kernel=2)
    with pytest.raises(ValueError, match="se_ratio"):
        en.MBConv(4, 4, se_ratio=0.0)
    with pytest.raises(ValueError, match="bn_momentum"):
        en.MBConv(4, 4, bn_momentum=0.0)
    with pytest.raises(ValueError, match="expects"):
        en.MBConv(4, 4)(torch.randn(1, 5, 3, 3))


@pytest.mark.parametrize("c_in,c_out,k,h,w", [(8, 16, 3, 6, 5), (3, 7, 5, 9, 9), (1, 1, 1, 2, 3)])
def test_conv_cost_matches_counters(c_in, c_out, k, h, w):
    x = torch.zeros(1, c_in, h, w)
    standard = nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False)
    separable = nn.Sequential(
        nn.Conv2d(c_in, c_in, k, padding=k // 2, groups=c_in, bias=False), nn.Conv2d(c_in, c_out, 1, bias=False)
    )
    for module, sep in ((standard, False), (separable, True)):
        params, flops = en.conv_cost(c_in, c_out, k, h, w, separable=sep)
        assert params == count_parameters(module)
        assert flops == forward_flops(module, x)
    p_std, _ = en.conv_cost(c_in, c_out, k, h, w)
    p_sep, _ = en.conv_cost(c_in, c_out, k, h, w, separable=True)
    assert math.isclose(p_sep / p_std, 1 / c_out + 1 / k**2)


def test_conv_cost_rejects_bad_sizes():
    with pytest.raises(ValueError, match="sizes"):
        en.conv_cost(0, 4, 3, 8, 8)


def test_compound_multipliers():
    d, w, r = en.compound_multipliers(2.0)
    assert math.isclose(d, 1.44) and math.isclose(w, 1.21) and math.isclose(r, 1.15**2)
    assert en.compound_multipliers(0) == (1.0, 1.0, 1.0)
    assert abs(1.2 * 1.1**2 * 1.15**2 - 1.92) < 0.01
    with pytest.raises(ValueError, match="phi"):
        en.compound_multipliers(-1)
    with pytest.raises(ValueError, match="alpha"):
        en.compound_multipliers(1, alpha=0.9)


def test_scaled_config_grows_every_dimension():
    base = en.EffNetConfig()
    assert en.scaled_config(base, 0) == base
    big = en.scaled_config(base, 2)
    assert all(b >= a for a, b in zip(base.depths, big.depths)) and sum(big.depths) > sum(base.depths)
    assert all(b >= a for a, b in zip(base.widths, big.widths)) and big.widths[-1] > base.widths[-1]
    assert big.resolution == round(8 * 1.15**2) and all(c % 2 == 0 for c in big.widths)


def test_compound_scaling_flops_grow_about_two_per_phi():
    base = en.EffNetConfig(stem=16, widths=(16, 24, 40), depths=(3, 4, 4), resolution=16)
    x = torch.zeros(1, 1, 8, 8)
    f0 = forward_flops(en.TinyEfficientNet(base), x)
    f1 = forward_flops(en.TinyEfficientNet(en.scaled_config(base, 1)), x)
    assert 1.92 / 1.25 < f1 / f0 < 1.92 * 1.25


def test_effnet_config_validation():
    with pytest.raises(ValueError, match="same non-zero length"):
        en.EffNetConfig(widths=(8, 8), depths=(1,), strides=(1,))
    with pytest.raises(ValueError, match="num_classes"):
        en.EffNetConfig(num_classes=1)
    with pytest.raises(ValueError, match="bn_momentum"):
        en.EffNetConfig(bn_momentum=2.0)


def test_tiny_efficientnet_shapes_and_resize():
    cfg = en.EffNetConfig(resolution=11, num_classes=5)
    model = en.TinyEfficientNet(cfg)
    x = torch.randn(4, 1, 8, 8)
    assert model(x).shape == (4, 5) and model.features(x).shape == (4, model.num_features)
    assert model.num_features == cfg.widths[-1]
    with pytest.raises(ValueError, match="expects"):
        model(torch.randn(4, 3, 8, 8))


def test_few_shot_indices():
    labels = np.array([0, 1, 2] * 10)
    idx = en.few_shot_indices(labels, 3, seed=1)
    assert len(idx) == 9 and np.all(np.bincount(labels[idx]) == 3) and len(set(idx)) == 9
    np.testing.assert_array_equal(idx, en.few_shot_indices(torch.tensor(labels), 3, seed=1))
    with pytest.raises(ValueError, match="fewer"):
        en.few_shot_indices(labels, 11)
    with pytest.raises(ValueError, match="per_class"):
        en.few_shot_indices(labels, 0)


def test_replace_head_and_extract_features():
    torch.manual_seed(0)
    model = en.TinyEfficientNet(en.EffNetConfig(num_classes=5)).train()
    x = torch.randn(6, 1, 8, 8)
    feats = en.extract_features(model, x, batch_size=4)
    assert model.training  # mode restored
    torch.testing.assert_close(feats, model.eval().features(x))
    en.replace_head(model, 3)
    assert model(x).shape == (6, 3)
    with pytest.raises(TypeError, match="head"):
        en.replace_head(nn.Linear(2, 2), 3)
    with pytest.raises(TypeError, match="features"):
        en.extract_features(nn.Linear(2, 2), x)


def test_pareto_front():
    costs, scores = [1, 2, 3, 4, 2], [0.5, 0.7, 0.6, 0.9, 0.7]
    np.testing.assert_array_equal(en.pareto_front(costs, scores), [0, 1, 3, 4])
    np.testing.assert_array_equal(en.pareto_front([1, 1], [0.2, 0.3]), [1])
    with pytest.raises(ValueError, match="same length"):
        en.pareto_front([1, 2], [0.1])
