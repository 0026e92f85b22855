import math

import pytest
import torch
from torch import nn

from dlarch_lib import approx
from dlarch_lib.approx import (
    count_linear_pieces,
    fit_one_hidden_layer,
    five_tuple,
    interpolating_relu_net,
    is_activation,
    one_hidden_layer,
    sawtooth_net,
    spread_kinks_,
    sup_error,
)

f = lambda x: torch.sin(2 * math.pi * x)


def test_five_tuple_reads_layers_activations_parameters_and_optimizer():
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2), nn.Tanh())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    t = five_tuple(model, opt)
    assert t.layers == ["0: Linear", "2: Linear"]
    assert t.activations == ["1: ReLU", "3: Tanh"]
    assert t.weights == {"0.weight": (5, 3), "2.weight": (2, 5)}
    assert t.biases == {"0.bias": (5,), "2.bias": (2,)}
    assert t.optimizer["class"] == "SGD" and t.optimizer["lr"] == 0.1
    assert t.num_parameters == sum(p.numel() for p in model.parameters())
    with pytest.raises(TypeError, match="nn.Module"):
        five_tuple("not a model")


def test_activations_are_recognised_by_where_pytorch_defines_them():
    class Swish(nn.SiLU):  # a subclass of a PyTorch activation is one
        pass

    class Square(nn.Module):  # an activation of one's own is not (there is no table to extend)
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * x

    for layer in (nn.ReLU(), nn.GELU(), nn.SiLU(), nn.Mish(), nn.Hardswish(), nn.Softplus(), nn.PReLU(), Swish()):
        assert is_activation(layer), layer
    not_activations = (nn.Linear(2, 2), nn.Dropout(), nn.BatchNorm1d(2), nn.Flatten(), nn.Identity(), Square())
    for layer in (*not_activations, nn.MultiheadAttention(4, 2)):
        assert not is_activation(layer), layer
    model = nn.Sequential(nn.Linear(3, 4), nn.Mish(), nn.Dropout(0.1), nn.Linear(4, 4), nn.Hardswish(), nn.Linear(4, 1))
    assert five_tuple(model).activations == ["1: Mish", "4: Hardswish"]


def test_interpolating_net_hits_the_knots_and_is_piecewise_linear():
    net = interpolating_relu_net(f, 10)
    knots = torch.linspace(0, 1, 11, dtype=torch.float64)[:, None]
    with torch.no_grad():
        torch.testing.assert_close(net(knots), f(knots))
    assert net[0].out_features == 10
    assert count_linear_pieces(interpolating_relu_net(torch.exp, 10)) == 10  # convex: every kink is real


def test_interpolation_error_follows_h_squared_over_8_bound():
    for n in (8, 32):
        h = 1 / n
        bound = h**2 / 8 * (2 * math.pi) ** 2  # max |f''| = (2 pi)^2
        assert sup_error(f, interpolating_relu_net(f, n)) <= bound + 1e-12


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="n_pieces"):
        interpolating_relu_net(f, 0)
    with pytest.raises(ValueError, match="lo < hi"):
        interpolating_relu_net(f, 3, lo=1.0, hi=0.0)
    with pytest.raises(ValueError, match="width"):
        one_hidden_layer(0)
    with pytest.raises(ValueError, match="depth"):
        sawtooth_net(0)


def test_sawtooth_doubles_pieces_per_layer():
    assert [count_linear_pieces(sawtooth_net(k)) for k in (1, 2, 3, 4)] == [2, 4, 8, 16]


def test_spread_kinks_puts_every_kink_inside_the_domain():
    torch.manual_seed(0)
    model = spread_kinks_(one_hidden_layer(64))
    kinks = -model[0].bias / model[0].weight[:, 0]
    assert bool(((kinks >= 0) & (kinks <= 1)).all())


def test_training_reduces_error():
    torch.manual_seed(0)
    untrained = sup_error(f, one_hidden_layer(32))
    trained = sup_error(f, fit_one_hidden_layer(f, 32, steps=400, device="cpu"))
    assert trained < 0.5 * untrained


def test_fit_one_hidden_layer_is_seeded_and_leaves_the_callers_stream_alone():
    torch.manual_seed(3)
    before = torch.get_rng_state()
    a = fit_one_hidden_layer(f, 8, steps=20, seed=1, device="cpu")
    assert torch.equal(torch.get_rng_state(), before)
    b = fit_one_hidden_layer(f, 8, steps=20, seed=1, device=torch.device("cpu"))
    c = fit_one_hidden_layer(f, 8, steps=20, seed=2, device="cpu")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a[0].weight, c[0].weight)
    assert a[0].weight.device.type == "cpu"
    with pytest.raises(ValueError, match="steps"):
        fit_one_hidden_layer(f, 8, steps=0, device="cpu")


def test_line_arrangement_hand_cases():
    cross = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # x = 0.1 and y = -0.2: four quadrants
    assert approx.line_arrangement_regions(cross, torch.tensor([-0.1, 0.2])) == 4
    assert approx.line_arrangement_regions(cross, torch.tensor([-5.0, 0.2])) == 2  # x = 5 misses the square
    three = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # plus x + y = 0.05: 1 + 3 + 3 crossings
    assert approx.line_arrangement_regions(three, torch.tensor([-0.1, 0.2, -0.05])) == 7
    with pytest.raises(ValueError, match="weight"):
        approx.line_arrangement_regions(torch.zeros(3, 3), torch.zeros(3))


def test_activation_regions_of_one_layer_match_the_arrangement():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 12), nn.ReLU(), nn.Linear(12, 1))
    exact = approx.line_arrangement_regions(net[0].weight, net[0].bias)
    counted = approx.activation_regions(net, n=600)
    assert 0.9 * exact <= counted <= exact
    with pytest.raises(ValueError, match="2 inputs"):
        approx.activation_regions(nn.Sequential(nn.Linear(3, 4), nn.ReLU()))
    with pytest.raises(ValueError, match="no ReLU"):
        approx.activation_regions(nn.Sequential(nn.Linear(2, 4)))


def test_ridge_net_meets_the_interpolation_bound():
    f = lambda x: torch.sin(math.pi * x[:, 0]) * torch.cos(math.pi * x[:, 1])
    g = lambda u: 0.5 * torch.sin(math.pi * u)  # f = g(x + y) + g(x - y)
    net = approx.ridge_relu_net(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), [g, g], 16, [(0.0, 2.0), (-1.0, 1.0)])
    xs = torch.linspace(0, 1, 101, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(xs, xs, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        err = (net(grid)[:, 0] - f(grid)).abs().max().item()
    assert err <= 2 * (2 / 16) ** 2 * (math.pi**2 / 2) / 8 + 1e-12
    assert net[0].out_features == 32
    with pytest.raises(ValueError, match="directions"):
        approx.ridge_relu_net(torch.ones(2, 2), [g], 4, [(0.0, 1.0)])
