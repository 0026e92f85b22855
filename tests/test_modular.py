import io
import json

import pytest
import torch
from torch import nn

from dlarch_lib import modular
from dlarch_lib.core.measure import count_parameters, forward_flops
from dlarch_lib.modular import (
    Chain,
    CNNConfig,
    LinearConfig,
    MLPConfig,
    Registry,
    build_model,
    config_from_dict,
    config_to_dict,
    conv_block,
    mlp_block,
    mlp_parameter_count,
    unregistered_modules,
)


def test_chain_matches_sequential_and_returns_all():
    torch.manual_seed(0)
    blocks = [nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)]
    chain, seq = Chain(blocks), nn.Sequential(*blocks)
    x = torch.randn(5, 4)
    torch.testing.assert_close(chain(x), seq(x))
    outs = chain(x, return_all=True)
    assert [o.shape for o in outs] == [(5, 8), (5, 8), (5, 2)]
    torch.testing.assert_close(outs[-1], seq(x))
    assert count_parameters(chain) == count_parameters(seq) == 4 * 8 + 8 + 8 * 2 + 2


def test_chain_rejects_bad_blocks():
    with pytest.raises(ValueError, match="at least one block"):
        Chain([])
    with pytest.raises(TypeError, match="block 1 is a str"):
        Chain([nn.ReLU(), "relu"])


def test_count_parameters_trainable_only():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    model[0].weight.requires_grad_(False)
    assert count_parameters(model) == 8 + 3
    assert count_parameters(model, trainable_only=True) == 2 + 3


def test_unregistered_modules_finds_lists_and_dicts():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [nn.Linear(2, 2)]
            self.heads = {"a": nn.Linear(2, 1)}
            self.scale = (nn.Parameter(torch.ones(1)),)
            self.ok = nn.ModuleList([nn.Linear(2, 2)])
            self.names = ["not", "a", "module"]

    bad = Bad()
    assert unregistered_modules(bad) == ["layers[0]", "heads['a']", "scale[0]"]
    outer = nn.Sequential(bad)
    assert unregistered_modules(outer) == ["0.layers[0]", "0.heads['a']", "0.scale[0]"]
    assert unregistered_modules(build_model({"arch": "cnn", "norm": "batch"})) == []


def test_registry_register_get_and_errors():
    reg: Registry[int] = Registry("widget")
    reg.register("alpha")(1)
    reg.register("beta")(2)
    assert reg.get("alpha") == 1 and reg.names() == ["alpha", "beta"] and "beta" in reg
    assert reg.name_of(2) == "beta"
    with pytest.raises(ValueError, match="already registered"):
        reg.register("alpha")(3)
    with pytest.raises(ValueError, match="unknown widget 'alpah'; known: alpha, beta; did you mean 'alpha'"):
        reg.get("alpah")
    with pytest.raises(ValueError, match="must be identifiers"):
        reg.register("a-b")
    with pytest.raises(ValueError, match="not a registered widget"):
        reg.name_of(99)


def test_blocks_shapes_and_norms():
    x = torch.randn(4, 6)
    assert mlp_block(6, 5, norm="layer", activation="gelu", dropout=0.1)(x).shape == (4, 5)
    assert isinstance(mlp_block(6, 5, norm="batch")[1], nn.BatchNorm1d)
    img = torch.randn(2, 3, 8, 8)
    block = conv_block(3, 7, norm="layer")
    assert block(img).shape == (2, 7, 4, 4)
    assert isinstance(block[1], nn.GroupNorm) and block[1].num_groups == 1
    # layer norm over (C, H, W) for maps equals GroupNorm with one group
    torch.testing.assert_close(
        modular.NORMS.get("layer")(3, 2)(img), nn.functional.layer_norm(img, img.shape[1:]), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="unknown norm 'bn'"):
        mlp_block(2, 2, norm="bn")


@pytest.mark.parametrize(
    "spec, out",
    [
        ({"arch": "linear"}, (3, 10)),
        ({"arch": "mlp", "width": 16, "depth": 3, "norm": "batch"}, (3, 10)),
        ({"arch": "cnn", "width": 4, "depth": 3, "num_classes": 5}, (3, 5)),
    ],
)
def test_build_model_shapes_and_round_trip(spec, out):
    model = build_model(spec)
    assert model(torch.rand(3, 1, 8, 8)).shape == out
    full = config_to_dict(model.config)
    assert {k: full[k] for k in spec} == spec
    assert config_from_dict(full) == model.config
    assert json.loads(json.dumps(full)) == full


def test_checkpoint_round_trip_through_json_and_state_dict():
    torch.manual_seed(0)
    model = build_model({"arch": "cnn", "width": 4, "norm": "batch"})
    model(torch.rand(16, 1, 8, 8))  # update running statistics
    model.eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    clone = build_model(json.loads(json.dumps(config_to_dict(model.config))))
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    clone.eval()
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown model 'mpl'.*did you mean 'mlp'"):
        build_model({"arch": "mpl"})
    with pytest.raises(ValueError, match="'arch' key"):
        config_from_dict({"width": 3})
    with pytest.raises(ValueError, match="unknown field 'widht' for 'mlp'.*did you mean 'width'"):
        config_from_dict({"arch": "mlp", "widht": 3})
    with pytest.raises(ValueError, match="field 'width' of 'mlp' must be int, got '64'"):
        config_from_dict({"arch": "mlp", "width": "64"})
    with pytest.raises(ValueError, match="must be int, got True"):
        config_from_dict({"arch": "mlp", "depth": True})
    with pytest.raises(ValueError, match="unknown norm 'batchnorm'"):
        config_from_dict({"arch": "mlp", "norm": "batchnorm"})
    with pytest.raises(ValueError, match="not divisible by 16"):
        CNNConfig(depth=4)
    with pytest.raises(ValueError, match="dropout must be in"):
        MLPConfig(dropout=1.0)
    with pytest.raises(ValueError, match="width must be >= 1"):
        MLPConfig(width=0)
    with pytest.raises(ValueError, match="not a registered model"):
        build_model(object())


def test_int_is_accepted_for_float_fields():
    config = config_from_dict({"arch": "mlp", "dropout": 0})
    assert config.dropout == 0.0 and isinstance(config.dropout, float)


@pytest.mark.parametrize("norm", ["none", "batch", "layer"])
@pytest.mark.parametrize("width, depth", [(1, 1), (8, 2), (33, 4)])
def test_mlp_parameter_count_closed_form(norm, width, depth):
    config = MLPConfig(width=width, depth=depth, norm=norm)
    assert mlp_parameter_count(config) == count_parameters(build_model(config))


def test_forward_flops_counts_matmuls():
    model = build_model(MLPConfig(width=16, depth=2))
    assert forward_flops(model, torch.rand(3, 1, 8, 8)) == 2 * 3 * (64 * 16 + 16 * 16 + 16 * 10)
    assert forward_flops(build_model(LinearConfig()), torch.rand(1, 1, 8, 8)) == 2 * 64 * 10


def test_config_built_models_train():
    from dlarch_lib.core.data import load_digits_split
    from dlarch_lib.core.train import evaluate, fit

    torch.manual_seed(0)
    split = load_digits_split()
    train, _, test = split.loaders(batch_size=64)
    model = build_model({"arch": "mlp", "width": 32, "depth": 1, "norm": "batch"})
    fit(model, train, epochs=4, lr=3e-3, progress=False)
    assert evaluate(model, test)["acc"] > 0.85


def test_staged_cnn_template():
    net = modular.staged_cnn([8, 16], [2, 1], stem_width=4)
    assert net(torch.rand(3, 1, 8, 8)).shape == (3, 10)
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8, 8, 16]  # stem, stage 1 (two blocks), stage 2
    assert [c.stride[0] for c in convs] == [1, 2, 1, 2]  # each stage's first block halves the resolution
    with pytest.raises(ValueError, match="one depth per stage"):
        modular.staged_cnn([8, 16], [1])
    with pytest.raises(ValueError, match=">= 1"):
        modular.staged_cnn([8, 0], [1, 1])
