"""Tests for dlarch_lib.prune: hand-written masks against torch.nn.utils.prune, the seed's bugs, channel removal."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as tprune

from dlarch_lib import modular, prune
from dlarch_lib.cnn import SmallResNet
from dlarch_lib.core import measure


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return modular.build_model({"arch": "mlp", "width": 32, "depth": 2})


def cnn(norm: str = "none", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return modular.build_model({"arch": "cnn", "width": 8, "depth": 2, "norm": norm})


def train_steps(model: nn.Module, steps: int = 5, lr: float = 1e-2) -> None:
    torch.manual_seed(1)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_prunable_layers_and_sparsity():
    model = mlp()
    names = [name for name, _ in prune.prunable_layers(model)]
    assert len(names) == 3 and all(isinstance(m, nn.Linear) for _, m in prune.prunable_layers(model))
    assert prune.sparsity(model) == 0.0
    with torch.no_grad():
        first = prune.prunable_layers(model)[0][1]
        first.weight[:, :16] = 0.0  # a quarter of 64 inputs
    assert prune.layer_sparsities(model)[names[0]] == pytest.approx(0.25)
    total = sum(m.weight.numel() for _, m in prune.prunable_layers(model))
    assert prune.sparsity(model) == pytest.approx(0.25 * first.weight.numel() / total)
    with pytest.raises(ValueError, match="no Linear or Conv2d"):
        prune.prunable_layers(nn.ReLU())


@pytest.mark.parametrize("amount", [0.0, 0.3, 0.9])
def test_magnitude_masks_match_torch_prune(amount):
    model = mlp()
    layers = [m for _, m in prune.prunable_layers(model)]
    weights = [m.weight.detach().clone() for m in layers]
    layer_masks = prune.magnitude_masks(weights, amount, scope="layer")
    global_masks = prune.magnitude_masks(weights, amount, scope="global")
    ref_layer = copy.deepcopy(model)
    for m in [m for _, m in prune.prunable_layers(ref_layer)]:
        tprune.l1_unstructured(m, "weight", amount=amount)
    ref_global = copy.deepcopy(model)
    tprune.global_unstructured(
        [(m, "weight") for _, m in prune.prunable_layers(ref_global)], tprune.L1Unstructured, amount=amount
    )
    for ours, (_, ref) in zip(layer_masks, prune.prunable_layers(ref_layer)):
        assert torch.equal(ours, ref.weight_mask)
        assert (1 - ours.mean()).item() == pytest.approx(round(amount * ours.numel()) / ours.numel())
    for ours, (_, ref) in zip(global_masks, prune.prunable_layers(ref_global)):
        assert torch.equal(ours, ref.weight_mask)
    n = sum(w.numel() for w in weights)
    assert sum(int((m == 0).sum()) for m in global_masks) == round(amount * n)


def test_magnitude_masks_hand_case_and_errors():
    w = torch.tensor([[0.1, -3.0], [2.0, -0.5]])
    (mask,) = prune.magnitude_masks([w], 0.5)
    assert torch.equal(mask, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    small, big = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([5.0, 6.0, 7.0, 8.0])
    masks = prune.magnitude_masks([small, big], 0.5, scope="global")  # global takes all four small ones
    assert masks[0].sum() == 0 and masks[1].sum() == 4
    with pytest.raises(ValueError, match="amount"):
        prune.magnitude_masks([w], 1.0)
    with pytest.raises(ValueError, match="scope"):
        prune.magnitude_masks([w], 0.5, scope="network")
    with pytest.raises(ValueError, match="at least one"):
        prune.magnitude_masks([], 0.5)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_magnitude_prune_hits_target_and_keeps_zeros_while_training(scope):
    model = mlp()
    prune.magnitude_prune(model, 0.8, scope=scope)
    assert prune.sparsity(model) == pytest.approx(0.8, abs=1e-3)
    if scope == "layer":
        assert all(s == pytest.approx(0.8, abs=1e-2) for s in prune.layer_sparsities(model).values())
    masks = [m.weight_mask.clone() for _, m in prune.prunable_layers(model)]
    train_steps(model)
    for mask, (_, layer) in zip(masks, prune.prunable_layers(model)):
        assert torch.equal(layer.weight_mask, mask)
        assert torch.all(layer.weight[mask == 0] == 0)
    assert prune.sparsity(model) == pytest.approx(0.8, abs=1e-3)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_iterative_pruning_only_grows_masks(scope):
    model = mlp()
    schedule = prune.geometric_schedule(0.9, 3)
    previous = None
    for target in schedule:
        prune.magnitude_prune(model, target, scope=scope)
        assert prune.sparsity(model) == pytest.approx(target, abs=2e-3)
        masks = torch.cat([m.weight_mask.flatten() for _, m in prune.prunable_layers(model)])
        if previous is not None:
            assert torch.all(masks <= previous)  # once pruned, pruned for good
        previous = masks
        train_steps(model, steps=2)
    with pytest.raises(ValueError, match="masks only grow"):
        prune.magnitude_prune(model, 0.5, scope=scope)
    with pytest.raises(ValueError, match="scope"):
        prune.magnitude_prune(model, 0.95, scope="net")


def test_geometric_schedule():
    s = prune.geometric_schedule(0.96, 2)
    assert s == pytest.approx([0.8, 0.96])  # prune 80% of what is left, twice
    assert prune.geometric_schedule(0.5, 1) == pytest.approx([0.5])
    with pytest.raises(ValueError, match="steps"):
        prune.geometric_schedule(0.5, 0)
    with pytest.raises(ValueError, match="amount"):
        prune.geometric_schedule(1.2, 3)


def test_remove_masks_makes_zeros_permanent():
    model = mlp()
    x = torch.randn(4, 1, 8, 8)
    prune.magnitude_prune(model, 0.7)
    before = model(x)
    prune.remove_masks(model)
    assert not any(name.endswith("_mask") for name, _ in model.named_buffers())
    assert not any(name.endswith("_orig") for name, _ in model.named_parameters())
    torch.testing.assert_close(model(x), before)
    assert prune.sparsity(model) == pytest.approx(0.7, abs=1e-3)


def test_rewind_restores_initial_weights_under_the_mask():
    model = mlp()
    init = copy.deepcopy(model.state_dict())
    train_steps(model)
    prune.magnitude_prune(model, 0.5)
    prune.rewind(model, init)
    for name, layer in prune.prunable_layers(model):
        torch.testing.assert_close(layer.weight_orig, init[f"{name}.weight"])
        torch.testing.assert_close(layer.weight, init[f"{name}.weight"] * layer.weight_mask)
        torch.testing.assert_close(layer.bias, init[f"{name}.bias"])
    with pytest.raises(ValueError, match="no entry"):
        prune.rewind(model, {})
    bad = {k: v[..., :1] if v.ndim else v for k, v in init.items()}
    with pytest.raises(ValueError, match="shape"):
        prune.rewind(model, bad)


def test_seed_unstructured_pruning_regrows():
    model = mlp()
    prune.seed_unstructured_pruning(model, 0.8)
    assert prune.sparsity(model) == pytest.approx(0.8, abs=0.01)
    train_steps(model, steps=3)
    assert prune.sparsity(model) < 0.2  # Adam moves every zero weight that gets a gradient


def test_seed_structured_pruning_changes_nothing():
    model = cnn()
    before = copy.deepcopy(model.state_dict())
    out = prune.seed_structured_pruning(model, 0.5)
    assert out is model
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16]
    small = prune._seed_prune_channels(convs[0], torch.tensor([0, 2]))
    assert small.weight.shape == (2, 1, 3, 3) and torch.equal(small.weight, convs[0].weight[[0, 2]])


def test_filter_norms_and_keep_indices():
    w = torch.zeros(4, 2, 3, 3)
    for o, scale in enumerate([3.0, 1.0, 4.0, 2.0]):
        w[o] = scale
    assert torch.equal(prune.filter_l1_norms(w), torch.tensor([54.0, 18.0, 72.0, 36.0]))
    assert prune.channel_keep_indices(w, 0.5).tolist() == [0, 2]
    assert prune.channel_keep_indices(w, 0.0).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="all 4 channels"):
        prune.channel_keep_indices(w, 0.9)
    with pytest.raises(ValueError, match="out, in"):
        prune.filter_l1_norms(torch.ones(3))


@pytest.mark.parametrize("make", [mlp, cnn, lambda: cnn(norm="batch")], ids=["mlp", "cnn", "cnn-bn"])
@pytest.mark.parametrize("amount", [0.25, 0.5])
def test_prune_channels_equals_masked_model(make, amount):
    model = make()
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):  # give BN non-trivial statistics
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(16, 1, 8, 8))
    model.eval()
    x = torch.randn(8, 1, 8, 8)
    masked, small = prune.mask_channels(model, amount).eval(), prune.prune_channels(model, amount).eval()
    torch.testing.assert_close(small(x), masked(x), atol=1e-5, rtol=1e-5)
    assert measure.count_parameters(small) < measure.count_parameters(model)
    full_layers, small_layers = prune.prunable_layers(model), prune.prunable_layers(small)
    for (_, big), (_, little) in zip(full_layers[:-1], small_layers[:-1]):
        assert little.weight.shape[0] == big.weight.shape[0] - round(amount * big.weight.shape[0])
    assert small_layers[-1][1].weight.shape[0] == 10  # the output layer keeps every class
    assert prune.sparsity(small) == 0.0  # nothing masked: the zeros are gone, not stored


def test_mask_channels_matches_ln_structured_choice():
    model = cnn()
    masked = prune.mask_channels(model, 0.5)
    first = prune.prunable_layers(masked)[0][1]
    kept = first.weight_mask.flatten(1)[:, 0].nonzero().flatten()
    assert torch.equal(kept, prune.channel_keep_indices(prune.prunable_layers(model)[0][1].weight, 0.5))
    assert torch.all(first.bias[first.weight_mask.flatten(1)[:, 0] == 0] == 0)
    assert prune.prunable_layers(masked)[-1][1].weight.shape == prune.prunable_layers(model)[-1][1].weight.shape


def test_prune_channels_reduces_flops_quadratically():
    model = cnn()
    x = torch.randn(1, 1, 8, 8)
    small = prune.prune_channels(model, 0.5)
    convs = lambda m: [layer for _, layer in prune.prunable_layers(m)]
    assert [c.weight.shape for c in convs(small)] == [(4, 1, 3, 3), (8, 4, 3, 3), (10, 32)]
    # the middle conv loses half its inputs and half its outputs: a quarter of its FLOPs remain
    middle_big = 2 * 4 * 4 * 16 * 8 * 9
    assert measure.forward_flops(model, x) - measure.forward_flops(small, x) >= middle_big * 3 // 4


def test_prune_channels_errors():
    with pytest.raises(ValueError, match="ResBlock"):
        prune.prune_channels(SmallResNet(width=4), 0.5)
    with pytest.raises(ValueError, match="at least two"):
        prune.prune_channels(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), 0.5)
    with pytest.raises(ValueError, match="groups"):
        prune.prune_channels(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 1)), 0.5)
    with pytest.raises(ValueError, match="amount"):
        prune.prune_channels(mlp(), -0.1)
    with pytest.raises(ValueError, match="amount"):
        prune.mask_channels(mlp(), 1.0)


# --- N:M sparsity, SNIP, IMP with rewinding ----------------------------------------------------


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_nm_mask_keeps_the_n_largest_of_every_group(n, m):
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    mask = prune.nm_mask(w, n, m)
    groups, kept = w.abs().view(6, -1, m), mask.view(6, -1, m)
    assert torch.all(kept.sum(-1) == n)  # exactly n per group
    smallest_kept = torch.where(kept == 1, groups, torch.inf).amin(-1)
    largest_dropped = torch.where(kept == 0, groups, -torch.inf).amax(-1)
    assert torch.all(smallest_kept > largest_dropped)  # the kept ones are the largest
    assert prune.is_nm_sparse(w * mask, n, m) and not prune.is_nm_sparse(w, n, m)


def test_nm_mask_hand_case_conv_and_torch_reference():
    w = torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 1.5, -0.2, 0.0]])
    assert prune.nm_mask(w).tolist() == [[0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]]
    conv = torch.randn(4, 2, 2, 2)  # groups run along the flattened (in, k, k) axis
    torch.testing.assert_close(prune.nm_mask(conv), prune.nm_mask(conv.flatten(1)).view_as(conv))
    from torch.ao.pruning import WeightNormSparsifier

    model = nn.Sequential(nn.Linear(32, 8))
    sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}])
    sparsifier.step()
    ref = model[0].parametrizations.weight[0].mask
    assert torch.equal(prune.nm_mask(model[0].parametrizations.weight.original).bool(), ref)


def test_nm_mask_errors():
    with pytest.raises(ValueError, match="multiple of the group size"):
        prune.nm_mask(torch.randn(3, 10))
    with pytest.raises(ValueError, match="1 <= n <= m"):
        prune.nm_mask(torch.randn(3, 8), 5, 4)
    with pytest.raises(ValueError, match="ints"):
        prune.nm_mask(torch.randn(3, 8), 2.0, 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out, in"):
        prune.nm_mask(torch.randn(8))
    assert not prune.is_nm_sparse(torch.zeros(3, 10))  # 10 inputs do not split into groups of 4


def test_nm_prune_holds_during_training():
    model = mlp()
    prune.nm_prune(model)
    assert prune.sparsity(model) == pytest.approx(0.5)
    train_steps(model)
    assert all(prune.is_nm_sparse(layer.weight) for _, layer in prune.prunable_layers(model))
    with pytest.raises(ValueError, match="masks for"):
        prune.apply_masks(model, [torch.ones(1)])
    with pytest.raises(ValueError, match="shape"):
        prune.apply_masks(model, [torch.ones(2, 2)] * 3)


def test_snip_scores_are_the_mask_gradient():
    model = mlp()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    scores = prune.snip_scores(model, x, y)
    assert all(p.grad is None for p in model.parameters())  # .grad untouched
    # reference: differentiate the loss with respect to an all-ones mask c in w -> c * w
    names = [f"{name}.weight" for name, _ in prune.prunable_layers(model)]
    ones = {k: torch.ones_like(v, requires_grad=True) for k, v in model.named_parameters() if k in names}
    params = {k: ones[k] * v if k in ones else v for k, v in model.named_parameters()}
    loss = F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
    grads = torch.autograd.grad(loss, [ones[k] for k in names])
    for score, g in zip(scores, grads):
        torch.testing.assert_close(score, g.abs())
    assert [s.shape for s in scores] == [ones[k].shape for k in names]
    with pytest.raises(ValueError, match="labels"):
        prune.snip_scores(mlp(), x, y[:3])
    with pytest.raises(ValueError, match="unpruned"):
        prune.snip_scores(prune.nm_prune(mlp()), x, y)


def test_random_masks_count_and_seed():
    ws = [torch.randn(10, 20), torch.randn(5, 10)]
    a = prune.random_masks(ws, 0.6, torch.Generator().manual_seed(0))
    b = prune.random_masks(ws, 0.6, torch.Generator().manual_seed(0))
    c = prune.random_masks(ws, 0.6, torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], c[0])
    assert [int((m == 0).sum()) for m in a] == [120, 30]
    with pytest.raises(ValueError, match="amount"):
        prune.random_masks(ws, 1.5, torch.Generator())


def test_imp_with_rewinding():
    model = mlp()
    early = copy.deepcopy(model.state_dict())
    train_steps(model)
    trained_calls = []
    rounds = prune.imp_with_rewinding(model, early, [0.5, 0.8], lambda m: trained_calls.append(prune.clone(m)))
    assert len(rounds) == 2 and [prune.sparsity(r) for r in rounds] == pytest.approx([0.5, 0.8], abs=1e-3)
    first, second = (torch.cat([m.weight_mask.flatten() for _, m in prune.prunable_layers(r)]) for r in rounds)
    assert torch.all(second <= first)  # masks only grow
    for name, layer in prune.prunable_layers(trained_calls[0]):  # training starts from the rewound weights
        torch.testing.assert_close(layer.weight_orig, early[f"{name}.weight"])
    with pytest.raises(ValueError, match="increasing"):
        prune.imp_with_rewinding(mlp(), early, [0.8, 0.5], lambda m: None)
