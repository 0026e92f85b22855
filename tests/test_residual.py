import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import jacobian
from torch.testing import assert_close

from dlarch_lib.residual import Block, DeepNet, block_jacobians, he_init_, jacobian_by_path_length, layer_grad_norms


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
