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


def test_relu_loss_probability_closed_form():
    assert en.relu_loss_probability(2) == 0.75  # only the (+, +) sign pattern keeps a 2-D point
    assert en.relu_loss_probability(3) == 0.5
    assert en.relu_loss_probability(1, d=1) == 0.5
    assert en.relu_loss_probability(30) < 1e-7
    with pytest.raises(ValueError, match="n >= 1"):
        en.relu_loss_probability(0)


def test_relu_manifold_loss_matches_theory_and_linear_map_keeps_everything():
    theta = torch.linspace(0, 4 * math.pi, 300)
    spiral = torch.stack([theta * torch.cos(theta), theta * torch.sin(theta)], dim=1) + 0.1
    lost = {
        n: np.mean([en.relu_manifold_loss(spiral, n, torch.Generator().manual_seed(s))[0] for s in range(30)])
        for n in (2, 5)
    }
    assert abs(lost[2] - 0.75) < 0.06 and abs(lost[5] - en.relu_loss_probability(5)) < 0.06
    err_small = en.relu_manifold_loss(spiral, 2, torch.Generator().manual_seed(0))[1]
    err_large = en.relu_manifold_loss(spiral, 40, torch.Generator().manual_seed(0))[1]
    assert err_small > 0.3 and err_large < 0.05
    lost_lin, err_lin = en.relu_manifold_loss(spiral, 3, torch.Generator().manual_seed(0), relu=False)
    assert lost_lin == 0.0 and err_lin < 1e-10
    with pytest.raises(ValueError, match="points"):
        en.relu_manifold_loss(torch.zeros(5), 3, torch.Generator())
    with pytest.raises(ValueError, match="n must"):
        en.relu_manifold_loss(spiral, 0, torch.Generator())


def test_drop_path_identity_at_eval_and_p0_and_unbiased_in_training():
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(en.drop_path(x, 0.0, training=True), x)
    torch.testing.assert_close(en.drop_path(x, 0.5, training=False), x)
    g = torch.Generator().manual_seed(0)
    ones = torch.ones(20000, 3)
    out = en.drop_path(ones, 0.3, training=True, generator=g)
    per_sample = out[:, 0]
    values = torch.unique(per_sample)
    assert len(values) == 2 and values[0] == 0 and abs(values[1].item() - 1 / 0.7) < 1e-6  # dropped, or rescaled
    assert (out == out[:, :1]).all()  # one draw per sample, not per element
    assert abs((per_sample == 0).float().mean().item() - 0.3) < 0.02
    assert abs(out.mean().item() - 1.0) < 0.03  # E[drop_path(x)] = x
    with pytest.raises(ValueError, match="p must be"):
        en.drop_path(x, 1.0, training=True)


def test_mbconv_stochastic_depth_drops_whole_branches_in_training_only():
    torch.manual_seed(0)
    block = en.MBConv(4, 4, drop_path=0.5)
    block.eval()
    x = torch.randn(64, 4, 5, 5)
    eval_out = block(x)
    assert not torch.allclose(eval_out, x)
    block.train()
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()  # keep the branch deterministic: only stochastic depth differs from eval
    out = block(x)
    dropped = torch.isclose(out, x).flatten(1).all(dim=1)
    kept = torch.isclose(out, x + 2 * (eval_out - x), atol=1e-5).flatten(1).all(dim=1)
    assert (dropped ^ kept).all() and 10 < dropped.sum() < 54
    with pytest.raises(ValueError, match="drop_path"):
        en.MBConv(4, 4, drop_path=1.0)
    with pytest.raises(ValueError, match="drop_path"):
        en.EffNetConfig(drop_path=-0.1)
    ramp = [b.drop_prob for b in en.TinyEfficientNet(en.EffNetConfig(drop_path=0.2)).blocks]
    assert ramp[0] == 0.0 and ramp == sorted(ramp) and max(ramp) < 0.2


def test_random_shift_moves_content_and_pads_with_zeros():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 1.0
    g = torch.Generator().manual_seed(0)
    out = torch.cat([en.random_shift(x, 1, g) for _ in range(200)])  # (200, 1, 5, 5)
    assert out.shape == (200, 1, 5, 5) and (out.flatten(1).sum(1) == 1).all()  # the pixel moves, never lost
    rows, cols = out[:, 0].nonzero()[:, 1], out[:, 0].nonzero()[:, 2]
    assert set(rows.tolist()) == {1, 2, 3} and set(cols.tolist()) == {1, 2, 3}
    edge = torch.ones(3, 2, 4, 4)
    shifted = en.random_shift(edge, 2, torch.Generator().manual_seed(1))
    assert shifted.shape == edge.shape and (shifted <= 1).all() and (shifted.sum() < edge.sum())  # zeros come in
    torch.testing.assert_close(en.random_shift(edge, 0), edge)
    for b in range(3):  # each image is a pure translation of itself
        img = shifted[b, 0]
        assert img.sum().item() in {float(k * m) for k in (2, 3, 4) for m in (2, 3, 4)}
    with pytest.raises(ValueError, match="max_shift"):
        en.random_shift(edge, 4)
    with pytest.raises(ValueError, match="expects"):
        en.random_shift(torch.zeros(4, 4), 1)


def test_shift_augment_step_returns_a_loss_on_shifted_batch():
    torch.manual_seed(0)
    model = en.TinyEfficientNet()
    x, y = torch.rand(6, 1, 8, 8), torch.arange(6)
    loss = en.shift_augment_step(1, torch.Generator().manual_seed(0))(model, (x, y))
    plain = en.shift_augment_step(0, torch.Generator())(model, (x, y))
    torch.testing.assert_close(plain, F.cross_entropy(model(x), y))
    assert loss.ndim == 0 and torch.isfinite(loss) and not torch.isclose(loss, plain)
    with pytest.raises(ValueError, match="max_shift"):
        en.shift_augment_step(-1, torch.Generator())
