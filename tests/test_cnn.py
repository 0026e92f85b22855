import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlarch_lib.cnn import (
    BLOCK_KINDS,
    BlockNet,
    BottleneckBlock,
    ConvNeXtBlock,
    PlainBlock,
    ResBlock,
    SeparableBlock,
    SmallResNet,
    block_cost,
    conv2d,
    conv_output_size,
    depthwise_conv2d,
    fit_digits_classifier,
    grouped_conv2d_by_slices,
    grouped_conv_cost,
    make_block,
    measured_receptive_field,
    receptive_field,
    train_digits_classifier,
)
from dlarch_lib.core.data import load_digits_split
from dlarch_lib.core.measure import forward_flops


def random_config(rng: random.Random) -> dict:
    groups = rng.choice([1, 1, 2, 3])
    kh, kw = rng.randint(1, 4), rng.randint(1, 4)
    dilation = (rng.randint(1, 3), rng.randint(1, 3))
    padding = (rng.randint(0, 2), rng.randint(0, 2))
    stride = (rng.randint(1, 3), rng.randint(1, 3))
    h = dilation[0] * (kh - 1) + 1 + rng.randint(0, 6)
    w = dilation[1] * (kw - 1) + 1 + rng.randint(0, 6)
    return dict(
        n=rng.randint(1, 3),
        c=groups * rng.randint(1, 3),
        o=groups * rng.randint(1, 3),
        groups=groups,
        kh=kh,
        kw=kw,
        h=h,
        w=w,
        stride=stride,
        padding=padding,
        dilation=dilation,
    )


def test_conv2d_matches_torch_over_random_configs():
    rng = random.Random(0)
    torch.manual_seed(0)
    for _ in range(100):
        cfg = random_config(rng)
        x = torch.randn(cfg["n"], cfg["c"], cfg["h"], cfg["w"], dtype=torch.float64)
        weight = torch.randn(cfg["o"], cfg["c"] // cfg["groups"], cfg["kh"], cfg["kw"], dtype=torch.float64)
        bias = torch.randn(cfg["o"], dtype=torch.float64) if rng.random() < 0.5 else None
        kwargs = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], groups=cfg["groups"])
        torch.testing.assert_close(conv2d(x, weight, bias, **kwargs), F.conv2d(x, weight, bias, **kwargs))


def test_conv2d_int_arguments_and_gradients():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 9, 7, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    ours = conv2d(x, weight, stride=2, padding=1, dilation=2, groups=2)
    ref = F.conv2d(x, weight, stride=2, padding=1, dilation=2, groups=2)
    torch.testing.assert_close(ours, ref)
    g_ours = torch.autograd.grad(ours.square().sum(), (x, weight))
    g_ref = torch.autograd.grad(ref.square().sum(), (x, weight))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)
    w_t = torch.randn(6, 3, 3, 4, dtype=torch.float64).transpose(2, 3)  # non-contiguous (6, 3, 4, 3)
    x3 = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(conv2d(x3, w_t, padding=(1, 0)), F.conv2d(x3, w_t, padding=(1, 0)))


def test_conv2d_errors():
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="x must be"):
        conv2d(x[0], torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="weight must be"):
        conv2d(x, torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="must divide"):
        conv2d(x, torch.randn(3, 2, 3, 3), groups=2)
    with pytest.raises(ValueError, match="input channels"):
        conv2d(x, torch.randn(2, 3, 3, 3))
    with pytest.raises(ValueError, match="bias must have shape"):
        conv2d(x, torch.randn(2, 4, 3, 3), bias=torch.randn(3))
    with pytest.raises(ValueError, match="stride must be"):
        conv2d(x, torch.randn(2, 4, 3, 3), stride=0)
    with pytest.raises(ValueError, match="larger than the padded input"):
        conv2d(x, torch.randn(2, 4, 3, 3), dilation=4)
    with pytest.raises(ValueError, match="groups must be"):
        conv2d(x, torch.randn(2, 4, 3, 3), groups=0)


def test_conv_output_size_matches_nn_conv2d():
    for size in (5, 8, 13):
        for kernel in (1, 2, 3, 5):
            for stride in (1, 2, 3):
                for padding in (0, 1, 2):
                    for dilation in (1, 2):
                        if size + 2 * padding < dilation * (kernel - 1) + 1:
                            continue
                        conv = nn.Conv2d(1, 1, kernel, stride, padding, dilation)
                        out = conv(torch.zeros(1, 1, size, size)).shape[-1]
                        assert conv_output_size(size, kernel, stride, padding, dilation) == out


def test_conv_output_size_errors():
    with pytest.raises(ValueError, match="need size"):
        conv_output_size(8, 3, stride=0)
    with pytest.raises(ValueError, match="larger than the padded input"):
        conv_output_size(2, 5)


def test_receptive_field_formula_and_measurement():
    assert receptive_field([(3, 1), (3, 1)]) == 5
    assert receptive_field([(3, 2), (3, 2), (3, 1)]) == 1 + 2 + 2 * 2 + 2 * 4
    assert receptive_field([(3, 1, 1), (3, 1, 2), (3, 1, 4)]) == 15
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, 2), nn.ReLU(), nn.Conv2d(2, 2, 3, 1, dilation=2), nn.MaxPool2d(2), nn.Conv2d(2, 1, 5)
    )
    expected = receptive_field([(3, 2), (3, 1, 2), (2, 2), (5, 1)])
    assert measured_receptive_field(model, size=64) == expected


def test_receptive_field_errors():
    with pytest.raises(ValueError, match="layer 1 must be"):
        receptive_field([(3, 1), (3,)])
    with pytest.raises(ValueError, match="must be >= 1"):
        receptive_field([(0, 1)])
    with pytest.raises(ValueError, match="border"):
        measured_receptive_field(nn.Conv2d(1, 1, 9), size=9)
    with pytest.raises(ValueError, match="feature maps"):
        measured_receptive_field(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), size=8)


def test_resblock_shapes_shortcut_and_no_bias_before_bn():
    torch.manual_seed(0)
    same = ResBlock(8, 8)
    assert isinstance(same.shortcut, nn.Identity)
    assert same(torch.randn(2, 8, 8, 8)).shape == (2, 8, 8, 8)
    down = ResBlock(8, 16, stride=2)
    assert isinstance(down.shortcut, nn.Sequential) and down.shortcut[0].kernel_size == (1, 1)
    assert down(torch.randn(2, 8, 7, 7)).shape == (2, 16, 4, 4)
    assert all(m.bias is None for m in down.modules() if isinstance(m, nn.Conv2d))
    assert (down(torch.randn(2, 8, 8, 8)) >= 0).all()
    with pytest.raises(ValueError, match="ResBlock expects"):
        down(torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match="need in_channels"):
        ResBlock(8, 8, stride=0)


def test_small_resnet_shapes_and_errors():
    model = SmallResNet(num_classes=10, width=8, blocks=(2, 1))
    x = torch.rand(5, 1, 8, 8)
    assert model(x).shape == (5, 10)
    assert model.features(x).shape == (5, 16) and model.num_features == 16
    assert len(model.stages) == 3
    with pytest.raises(ValueError, match="SmallResNet expects"):
        model(torch.rand(5, 8, 8))
    with pytest.raises(ValueError, match="blocks must be"):
        SmallResNet(blocks=(1, 0))
    with pytest.raises(ValueError, match="num_classes"):
        SmallResNet(num_classes=1)


def test_fit_digits_classifier_learns_a_two_class_problem():
    torch.manual_seed(0)
    split = load_digits_split(classes=(0, 1))
    model = SmallResNet(num_classes=2, width=4)
    history, acc = fit_digits_classifier(model, split, epochs=2, batch_size=16)
    assert history.epochs == 2 and not model.training
    assert acc > 0.9


def test_train_digits_classifier_reaches_98_percent():
    model, acc = train_digits_classifier(device="cpu")
    assert isinstance(model, SmallResNet) and not model.training
    assert acc >= 0.98


def test_depthwise_and_grouped_convolutions_match_torch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 7, 9, generator=g, dtype=torch.float64)
    w_dw = torch.randn(6, 1, 3, 3, generator=g, dtype=torch.float64)
    for padding in (0, 1, 2):
        torch.testing.assert_close(depthwise_conv2d(x, w_dw, padding), F.conv2d(x, w_dw, padding=padding, groups=6))
    w_g = torch.randn(9, 2, 3, 3, generator=g, dtype=torch.float64)
    b_g = torch.randn(9, generator=g, dtype=torch.float64)
    torch.testing.assert_close(grouped_conv2d_by_slices(x, w_g, 3, b_g, 1), F.conv2d(x, w_g, b_g, padding=1, groups=3))
    # changing one group's input channels leaves the other groups' outputs untouched
    x2 = x.clone()
    x2[:, :2] += 1.0
    y, y2 = grouped_conv2d_by_slices(x, w_g, 3), grouped_conv2d_by_slices(x2, w_g, 3)
    torch.testing.assert_close(y[:, 3:], y2[:, 3:])
    assert not torch.allclose(y[:, :3], y2[:, :3])


def test_depthwise_and_grouped_errors():
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(ValueError, match="weight must be"):
        depthwise_conv2d(x, torch.randn(4, 2, 3, 3))
    with pytest.raises(ValueError, match="x must be"):
        depthwise_conv2d(x[0], torch.randn(4, 1, 3, 3))
    with pytest.raises(ValueError, match="padding"):
        depthwise_conv2d(x, torch.randn(4, 1, 3, 3), padding=-1)
    with pytest.raises(ValueError, match="must divide"):
        grouped_conv2d_by_slices(x, torch.randn(6, 1, 3, 3), 3)
    with pytest.raises(ValueError, match="input channels"):
        grouped_conv2d_by_slices(x, torch.randn(4, 1, 3, 3), 2)
    with pytest.raises(ValueError, match="groups must be"):
        grouped_conv2d_by_slices(x, torch.randn(4, 4, 3, 3), 0)


def test_conv_cost_matches_parameters_and_flop_counter():
    for c_in, c_out, k, groups in [(8, 16, 3, 1), (8, 16, 3, 4), (12, 12, 5, 12), (6, 9, 1, 3)]:
        conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=True)
        params, macs = grouped_conv_cost(c_in, c_out, k, 6, groups=groups, bias=True)
        assert params == sum(p.numel() for p in conv.parameters())
        assert 2 * 3 * macs == forward_flops(conv, torch.zeros(3, c_in, 6, 6))  # batch 3, 2 FLOPs per MAC
    with pytest.raises(ValueError, match="must divide"):
        grouped_conv_cost(6, 8, 3, 4, groups=4)
    with pytest.raises(ValueError, match="need channels"):
        grouped_conv_cost(0, 8, 3, 4)


@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_block_cost_matches_blocks(kind):
    for channels in (8, 16):
        block = make_block(kind, channels)
        params, macs = block_cost(kind, channels, 5)
        assert params == sum(p.numel() for p in block.parameters())
        assert 2 * 2 * macs == forward_flops(block, torch.zeros(2, channels, 5, 5))
        assert block(torch.randn(2, channels, 5, 5)).shape == (2, channels, 5, 5)


def test_block_cost_orders_and_errors():
    # per pixel at C = 64: plain 18 C^2, separable 2 C^2 + 18 C, bottleneck (2/4 + 9/16) C^2
    assert block_cost("plain", 64, 1)[1] == 18 * 64**2
    assert block_cost("separable", 64, 1)[1] == 2 * 64**2 + 18 * 64
    assert block_cost("bottleneck", 64, 1)[1] == 2 * 64 * 16 + 9 * 16**2
    assert block_cost("convnext", 64, 1)[1] == 49 * 64 + 8 * 64**2
    with pytest.raises(ValueError, match="kind must be"):
        block_cost("dense", 8, 4)
    with pytest.raises(ValueError, match="reduction"):
        block_cost("bottleneck", 6, 4)
    with pytest.raises(ValueError, match="kind must be"):
        make_block("dense", 8)


def test_preactivation_blocks_keep_the_identity_path_clean():
    torch.manual_seed(0)
    x = -torch.rand(2, 8, 5, 5)  # negative: a ReLU after the addition would zero it
    for kind in BLOCK_KINDS:
        block = make_block(kind, 8)
        last = [m for m in block.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][-1]
        with torch.no_grad():
            last.weight.zero_()
            if last.bias is not None:
                last.bias.zero_()
        torch.testing.assert_close(block(x), x)
    with pytest.raises(ValueError, match="PlainBlock expects"):
        PlainBlock(8)(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match="ConvNeXtBlock expects"):
        ConvNeXtBlock(8)(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match="reduction"):
        BottleneckBlock(6, reduction=4)
    with pytest.raises(ValueError, match="odd kernel"):
        ConvNeXtBlock(8, kernel=4)
    with pytest.raises(ValueError, match="channels must be"):
        SeparableBlock(0)


def test_convnext_pointwise_linear_equals_1x1_conv():
    torch.manual_seed(0)
    block = ConvNeXtBlock(6)
    y = torch.randn(2, 6, 4, 4)
    as_linear = block.pw1(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    as_conv = F.conv2d(y, block.pw1.weight[:, :, None, None], block.pw1.bias)
    torch.testing.assert_close(as_linear, as_conv)


def test_block_net_shapes_training_and_errors():
    torch.manual_seed(0)
    for kind in BLOCK_KINDS:
        assert BlockNet(kind, width=8)(torch.rand(3, 1, 8, 8)).shape == (3, 10)
    split = load_digits_split(classes=(0, 1))
    model = BlockNet("separable", width=8, num_classes=2)
    _, acc = fit_digits_classifier(model, split, epochs=3, batch_size=16)
    assert acc > 0.9
    with pytest.raises(ValueError, match="BlockNet expects"):
        model(torch.rand(3, 2, 8, 8))
    with pytest.raises(ValueError, match="need width"):
        BlockNet("plain", width=0)
