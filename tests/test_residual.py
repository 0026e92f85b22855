import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import jacobian
from torch.testing import assert_close

from dlarch_lib.residual import (
    Block,
    ConnectionNet,
    DeepNet,
    DenseBlock,
    HighwayBlock,
    block_jacobians,
    dense_param_count,
    gradient_correlation,
    he_init_,
    jacobian_by_path_length,
    layer_grad_norms,
)


def test_block_matches_functional_reference_and_adds_the_skip():
    torch.manual_seed(0)
    plain, res = Block(5, residual=False), Block(5, residual=True)
    res.load_state_dict(plain.state_dict())
    h = torch.randn(3, 5)
    reference = F.linear(F.relu(h), plain.linear.weight, plain.linear.bias)
    assert_close(plain(h), reference)
    assert_close(res(h), h + reference)


def test_residual_block_jacobian_is_identity_plus_branch_jacobian():
    torch.manual_seed(0)
    block = Block(6, residual=True).double()
    h = torch.randn(6, dtype=torch.float64)
    full = jacobian(lambda v: block(v[None])[0], h)
    branch = jacobian(lambda v: block.branch(v[None])[0], h)
    assert_close(full, torch.eye(6, dtype=torch.float64) + branch)


def test_deepnet_shapes_and_same_weights_for_twins():
    torch.manual_seed(1)
    plain = DeepNet(64, 10, width=8, depth=4, residual=False)
    torch.manual_seed(1)
    res = DeepNet(64, 10, width=8, depth=4, residual=True)
    for (name, a), (_, b) in zip(plain.named_parameters(), res.named_parameters()):
        assert_close(a, b, msg=name)
    x = torch.rand(7, 1, 8, 8)
    assert plain(x).shape == res(x).shape == (7, 10)
    states = res.hidden_states(x)
    assert len(states) == 5 and all(s.shape == (7, 8) for s in states)
    assert not torch.allclose(plain(x), res(x))


def test_norm_option_adds_batchnorm():
    net = DeepNet(4, 3, width=6, depth=2, residual=False, norm=True)
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in net.modules()) == 3
    assert net(torch.randn(5, 4)).shape == (5, 3)


def test_bad_configs_and_shapes_raise():
    with pytest.raises(ValueError, match="depth"):
        DeepNet(4, 3, depth=0)
    with pytest.raises(ValueError, match="width"):
        DeepNet(4, 3, width=0)
    with pytest.raises(ValueError, match="width"):
        Block(0, residual=True)
    with pytest.raises(ValueError, match="input features"):
        DeepNet(4, 3, width=2, depth=1)(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"Block expects \(N, 3\)"):
        Block(3, residual=True)(torch.randn(2, 4))


def test_layer_grad_norms_match_backward_and_leave_grads_alone():
    torch.manual_seed(0)
    net = DeepNet(16, 4, width=8, depth=5, residual=True)
    x, y = torch.randn(10, 16), torch.randint(0, 4, (10,))
    norms = layer_grad_norms(net, x, y)
    assert norms.shape == (5,) and all(b.linear.weight.grad is None for b in net.blocks)
    assert norms.dtype == torch.float64 and norms.device.type == "cpu"
    F.cross_entropy(net(x), y).backward()
    assert_close(norms, torch.stack([b.linear.weight.grad.double().norm() for b in net.blocks]))
    assert layer_grad_norms(net, x, y, wrt="hidden").shape == (5,)
    with pytest.raises(ValueError, match="wrt"):
        layer_grad_norms(net, x, y, wrt="bias")


def test_plain_gradients_vanish_residual_ones_do_not():
    torch.manual_seed(0)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    ratios = {}
    for residual in (False, True):
        torch.manual_seed(0)
        g = layer_grad_norms(DeepNet(16, 4, width=32, depth=20, residual=residual), x, y, wrt="hidden")
        ratios[residual] = (g[0] / g[-1]).item()
    assert ratios[False] < 1e-5 and ratios[True] > 1.0


def test_tiny_gradients_do_not_underflow_to_zero():
    torch.manual_seed(0)
    net = DeepNet(16, 4, width=32, depth=70, residual=False)
    g = layer_grad_norms(net, torch.randn(64, 16), torch.randint(0, 4, (64,)), wrt="hidden")
    assert g.dtype == torch.float64 and bool((g > 0).all())


def test_path_expansion_sums_to_product_and_counts_paths():
    torch.manual_seed(0)
    jacs = [0.3 * torch.randn(4, 4, dtype=torch.float64) for _ in range(5)]
    product = torch.eye(4, dtype=torch.float64)
    for j in jacs:
        product = (torch.eye(4, dtype=torch.float64) + j) @ product
    terms = jacobian_by_path_length(jacs)
    assert terms.shape == (6, 4, 4)
    assert_close(terms.sum(0), product)
    assert_close(terms[0], torch.eye(4, dtype=torch.float64))
    assert_close(terms[1], sum(jacs))
    assert_close(terms[5], jacs[4] @ jacs[3] @ jacs[2] @ jacs[1] @ jacs[0])
    # with every J = I each path contributes I, so term k is C(5, k) I
    ones = jacobian_by_path_length([torch.eye(2)] * 5)
    assert ones[:, 0, 0].tolist() == [1, 5, 10, 10, 5, 1]
    with pytest.raises(ValueError, match="at least one"):
        jacobian_by_path_length([])
    with pytest.raises(ValueError, match="square"):
        jacobian_by_path_length([torch.eye(2), torch.zeros(2, 3)])


def test_block_jacobians_reproduce_the_stack_jacobian():
    torch.manual_seed(0)
    net = DeepNet(6, 3, width=5, depth=4, residual=True).double()
    x = torch.randn(6, dtype=torch.float64)
    jacs = block_jacobians(net, x)
    assert len(jacs) == 4 and all(j.shape == (5, 5) for j in jacs)
    h0 = net.stem(x[None])[0].detach()

    def stack(h: torch.Tensor) -> torch.Tensor:
        for block in net.blocks:
            h = block(h[None])[0]
        return h

    assert_close(jacobian(stack, h0), jacobian_by_path_length(jacs).sum(0))


def test_he_init_sets_variance_and_zero_bias():
    torch.manual_seed(0)
    net = DeepNet(4, 3, width=256, depth=3, residual=False)
    assert he_init_(net) is net
    for block in net.blocks:
        assert block.linear.bias.abs().max() == 0
        assert abs(block.linear.weight.var().item() * 256 / 2 - 1) < 0.05


def test_he_init_scale_shrinks_the_branch_and_rejects_bad_scale():
    torch.manual_seed(0)
    net = he_init_(DeepNet(4, 3, width=256, depth=2, residual=True), scale=0.5)
    assert abs(net.blocks[0].linear.weight.var().item() * 256 / (2 * 0.25) - 1) < 0.05
    with pytest.raises(ValueError, match="scale"):
        he_init_(net, scale=0.0)


def test_post_activation_block_puts_the_relu_after_the_addition():
    torch.manual_seed(0)
    post = Block(5, residual=True, order="post")
    plain_post = Block(5, residual=False, order="post")
    plain_post.load_state_dict(post.state_dict())
    h = torch.randn(4, 5)
    branch = F.linear(h, post.linear.weight, post.linear.bias)
    assert_close(post(h), F.relu(h + branch))
    assert_close(plain_post(h), F.relu(branch))
    normed = Block(5, residual=True, norm=True, order="post").eval()
    assert_close(normed(h), F.relu(h + normed.norm(F.linear(h, normed.linear.weight, normed.linear.bias))))
    net = DeepNet(8, 3, width=5, depth=3, order="post")
    assert all(b.order == "post" for b in net.block_list()) and net(torch.randn(2, 8)).shape == (2, 3)
    with pytest.raises(ValueError, match="order"):
        Block(5, residual=True, order="middle")


def test_highway_block_formula_and_gate_limits():
    torch.manual_seed(0)
    hw = HighwayBlock(6, gate_bias=-3.0)
    assert_close(hw.gate.bias, torch.full((6,), -3.0))
    h = torch.randn(4, 6)
    t = torch.sigmoid(F.linear(h, hw.gate.weight, hw.gate.bias))
    expected = t * F.linear(F.relu(h), hw.transform.weight, hw.transform.bias) + (1 - t) * h
    assert_close(hw(h), expected)
    assert sum(p.numel() for p in hw.parameters()) == 2 * (6 * 6 + 6)
    with torch.no_grad():  # gate shut: the identity; gate open: the transform alone
        hw.gate.weight.zero_()
        hw.gate.bias.fill_(-100.0)
        assert_close(hw(h), h)
        hw.gate.bias.fill_(100.0)
        assert_close(hw(h), hw.transform(F.relu(h)))
    with pytest.raises(ValueError, match="width"):
        HighwayBlock(0)
    with pytest.raises(ValueError, match=r"HighwayBlock expects \(N, 6\)"):
        hw(torch.randn(2, 5))


def test_dense_block_concatenates_and_follows_the_growth_formula():
    torch.manual_seed(0)
    block = DenseBlock(in_width=5, growth=3, layers=4)
    assert [layer.in_features for layer in block.layers] == [5, 8, 11, 14]
    assert block.out_width == 5 + 4 * 3
    assert sum(p.numel() for p in block.parameters()) == dense_param_count(5, 3, 4) == 4 * 3 * 5 + 9 * 6 + 12
    h = torch.randn(2, 5)
    out = block(h)
    assert out.shape == (2, 17)
    assert_close(out[:, :5], h)  # the input is passed on untouched
    first = block.layers[0](F.relu(h))
    assert_close(out[:, 5:8], first)
    assert_close(out[:, 8:11], block.layers[1](F.relu(torch.cat([h, first], dim=1))))
    with pytest.raises(ValueError, match="growth"):
        DenseBlock(5, 0, 2)
    with pytest.raises(ValueError, match="growth"):
        dense_param_count(5, 3, 0)
    with pytest.raises(ValueError, match=r"DenseBlock expects \(N, 5\)"):
        block(torch.randn(2, 4))


def test_connection_net_wraps_a_body():
    torch.manual_seed(0)
    dense = DenseBlock(8, 2, 3)
    net = ConnectionNet(64, 10, 8, dense, dense.out_width)
    assert net(torch.rand(3, 1, 8, 8)).shape == (3, 10)
    with pytest.raises(ValueError, match="input features"):
        net(torch.rand(3, 10))
    with pytest.raises(ValueError, match="body_out"):
        ConnectionNet(64, 10, 8, dense, 0)


class _Square(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x**2


class _NoisySlope(torch.nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("slope", torch.randn(n, 1, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.slope


def test_gradient_correlation_smooth_versus_noise():
    grid = torch.linspace(-2, 2, 200)
    square = _Square()
    assert gradient_correlation(square, grid) > 0.99  # f' = 2x: perfectly smooth
    table = _NoisySlope(200)
    assert abs(gradient_correlation(table, grid)) < 0.2  # f'(x_i) = independent noise
    with pytest.raises(ValueError, match="1-D"):
        gradient_correlation(square, grid[:, None])
    with pytest.raises(ValueError, match="output shape"):
        gradient_correlation(torch.nn.Linear(1, 2), grid)


def test_plain_gradients_shatter_residual_ones_do_not():
    torch.manual_seed(0)
    grid = torch.linspace(-2, 2, 128)
    plain = he_init_(DeepNet(1, 1, width=64, depth=80, residual=False))
    res = he_init_(DeepNet(1, 1, width=64, depth=80, residual=True), scale=80**-0.5)
    assert gradient_correlation(res, grid) > gradient_correlation(plain, grid) + 0.2
