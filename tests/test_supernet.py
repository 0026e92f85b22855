"""Tests for dlarch_lib.supernet: sub-networks as slices, single-path training, the proxy table, rank fidelity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau

from dlarch_lib import nas
from dlarch_lib import supernet as sn
from dlarch_lib.core.data import load_digits_split
from dlarch_lib.core.runtime import seeded

SMALL = nas.SearchSpace.from_dict(
    {"depth": (1, 2, 3), "width": (4, 8), "activation": ("relu", "tanh"), "skip": (False, True), "lr": (1e-2, 3e-2)}
)
FAST = nas.EvalSettings(steps=3, batch_size=32)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: extra threads only add overhead


@pytest.fixture(scope="module")
def split():
    return load_digits_split(val_frac=FAST.val_frac, test_frac=FAST.test_frac, seed=FAST.seed)


def test_network_space_drops_training_settings():
    net = sn.network_space(SMALL)
    assert net.names == ("depth", "width", "activation", "skip") and len(net) == 3 * 2 * 2 * 2
    with pytest.raises(ValueError, match="lacks the network decisions"):
        sn.network_space(nas.SearchSpace.from_dict({"depth": (1, 2), "lr": (1e-2,)}))


def test_for_space_is_deepest_and_widest():
    net = sn.SuperNet.for_space(nas.DIGITS_ARCH_SPACE)
    assert (net.max_depth, net.max_width) == (3, 128)
    assert net.hidden[0].weight.shape == (128, 64) and net.hidden[2].weight.shape == (128, 128)
    assert net.head.weight.shape == (10, 128)


@pytest.mark.parametrize("arch", sn.network_space(SMALL).all())
def test_subnetwork_equals_extracted_standalone_network(arch):
    with seeded(0):
        supernet = sn.SuperNet.for_space(SMALL)
    config = sn.network_space(SMALL).decode(arch)
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    model = supernet.extract(config)
    assert type(model).__name__ == "Chain" and model.config.width == config["width"]
    torch.testing.assert_close(supernet(x, config), model(x))
    # the extracted copy has exactly the stand-alone network's parameter count
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(p.numel() for p in nas.build_network(config).parameters())


def test_slices_share_weights():
    """A narrow sub-network's weights are a corner of the wide one's: training one moves the other."""
    with seeded(0):
        supernet = sn.SuperNet(max_depth=2, max_width=8)
    narrow = {"depth": 2, "width": 4, "activation": "relu", "skip": False}
    wide = dict(narrow, width=8)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    before = supernet(x, wide).detach()
    supernet(x, narrow).pow(2).sum().backward()
    grad = supernet.hidden[1].weight.grad
    assert grad is not None and grad[:4, :4].abs().sum() > 0
    assert torch.all(grad[4:] == 0) and torch.all(grad[:, 4:] == 0)  # outside the slice: untouched
    with torch.no_grad():
        for p in supernet.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
    assert not torch.allclose(supernet(x, wide), before)


def test_skip_is_moot_at_depth_one_and_acts_deeper():
    with seeded(0):
        supernet = sn.SuperNet(max_depth=2, max_width=8)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    one = {"depth": 1, "width": 8, "activation": "tanh"}
    torch.testing.assert_close(supernet(x, dict(one, skip=True)), supernet(x, dict(one, skip=False)))
    two = dict(one, depth=2)
    assert not torch.allclose(supernet(x, dict(two, skip=True)), supernet(x, dict(two, skip=False)))


def test_supernet_rejects_bad_input():
    with pytest.raises(ValueError, match="max_width must be a positive int"):
        sn.SuperNet(max_width=0)
    supernet = sn.SuperNet(max_depth=2, max_width=8)
    x = torch.zeros(2, 64)
    good = {"depth": 2, "width": 8, "activation": "relu", "skip": False}
    with pytest.raises(ValueError, match="depth must be in 1..2"):
        supernet(x, dict(good, depth=3))
    with pytest.raises(ValueError, match="width must be in 1..8"):
        supernet(x, dict(good, width=16))
    with pytest.raises(ValueError, match="lacks"):
        supernet(x, {"depth": 1, "width": 8})
    with pytest.raises(ValueError, match="flatten to 64"):
        supernet(torch.zeros(2, 10), good)
    with pytest.raises(ValueError):
        supernet(x, dict(good, activation="swishy"))


def test_single_path_training_samples_uniformly_and_learns(split):
    log: list[dict] = []
    step = sn.single_path_step(SMALL, np.random.default_rng(0), log)
    with seeded(0):
        supernet = sn.SuperNet.for_space(SMALL)
    batch = (split.x_train[:32], split.y_train[:32])
    for _ in range(240):
        step(supernet, batch)
    depths = np.array([c["depth"] for c in log])
    assert set(log[0]) == {"depth", "width", "activation", "skip"}
    assert all(abs(np.mean(depths == d) - 1 / 3) < 0.1 for d in (1, 2, 3))  # uniform over the options
    with seeded(0):
        supernet = sn.SuperNet.for_space(SMALL)
    history = sn.train_supernet(supernet, SMALL, split, steps=150, lr=1e-2, seed=0)
    losses = history.loss
    assert len(losses) == 150 and np.mean(losses[-20:]) < 0.7 * np.mean(losses[:20])
    with pytest.raises(ValueError, match="steps and batch_size"):
        sn.train_supernet(supernet, SMALL, split, steps=0, lr=1e-2)
    with pytest.raises(ValueError, match="lr must be positive"):
        sn.train_supernet(supernet, SMALL, split, steps=1, lr=0.0)


def test_proxy_table_matches_extracted_networks(split):
    with seeded(0):
        supernet = sn.SuperNet.for_space(SMALL)
    sn.train_supernet(supernet, SMALL, split, steps=60, lr=1e-2, seed=0)
    proxy = sn.proxy_table(supernet, SMALL, split, FAST)
    net = sn.network_space(SMALL)
    assert proxy.space == net and proxy.val_acc.shape == (len(net),)
    for arch in net.all()[::5]:
        config = net.decode(arch)
        model = supernet.extract(config)
        with torch.no_grad():
            expected = (model(split.x_val).argmax(1) == split.y_val).float().mean().item()
        assert proxy(config) == pytest.approx(expected)
        assert proxy.params[net.index(arch)] == sum(p.numel() for p in model.parameters())
    # the proxy is a Table: the chapter's searches run on it unchanged
    result = nas.random_search(proxy, net, 5, mode="max", seed=0)
    assert result.best_value == max(result.values) and 0.0 < result.best_value <= 1.0


def test_restrict_picks_the_rows_of_fixed_settings(tmp_path):
    rng = np.random.default_rng(0)
    n = len(SMALL)
    table = nas.Table(SMALL, FAST, rng.random(n), rng.random(n), rng.random(n), cpu_seconds=1.0)
    column = sn.restrict(table, {"lr": 3e-2})
    net = sn.network_space(SMALL)
    for arch in net.all():
        config = net.decode(arch)
        assert column(config) == table({**config, "lr": 3e-2})
        assert column.test(config) == table.test({**config, "lr": 3e-2})
    with pytest.raises(ValueError, match="fix exactly"):
        sn.restrict(table, {})
    with pytest.raises(ValueError, match="fix exactly"):
        sn.restrict(table, {"lr": 1e-2, "depth": 1})


def test_distinct_mask_drops_skip_at_depth_one():
    net = sn.network_space(nas.DIGITS_ARCH_SPACE)
    mask = sn.distinct_mask(net)
    assert mask.shape == (72,) and mask.sum() == 72 - 4 * 3
    dropped = [net.decode(a) for a, keep in zip(net.all(), mask) if not keep]
    assert all(c["depth"] == 1 and c["skip"] for c in dropped)


def test_rank_fidelity_and_top_overlap():
    truth = np.array([0.1, 0.4, 0.35, 0.9, 0.7, 0.2, 0.8, 0.5])
    same = sn.rank_fidelity(2 * truth + 1, truth)  # a monotone transform ranks identically
    assert same == pytest.approx({"spearman": 1.0, "kendall": 1.0})
    assert sn.rank_fidelity(-truth, truth) == pytest.approx({"spearman": -1.0, "kendall": -1.0})
    # Kendall's tau by counting pairs (no ties): (concordant - discordant) / all pairs
    proxy = np.array([0.2, 0.1, 0.5, 0.7, 0.9, 0.3, 0.6, 0.4])
    pairs = [(i, j) for i in range(8) for j in range(i + 1, 8)]
    sign = [np.sign((proxy[i] - proxy[j]) * (truth[i] - truth[j])) for i, j in pairs]
    assert sn.rank_fidelity(proxy, truth)["kendall"] == pytest.approx(sum(sign) / len(pairs))
    assert sn.rank_fidelity(proxy, truth)["kendall"] == pytest.approx(kendalltau(proxy, truth).statistic)
    assert sn.top_overlap(truth, truth, 2) == 1.0  # the true top 2 lie in the top quarter
    assert sn.top_overlap(-truth, truth, 2) == 0.0
    assert sn.top_overlap(proxy, truth, 4) == 0.5  # proxy top 4: items 4, 3, 6, 2; top quarter: 3, 6
    with pytest.raises(ValueError, match="shape"):
        sn.rank_fidelity(truth, truth[:3])
    with pytest.raises(ValueError, match="k must be"):
        sn.top_overlap(truth, truth, 0)
    with pytest.raises(ValueError, match="quantile"):
        sn.top_overlap(truth, truth, 2, quantile=1.0)


def test_darts_hypergradient_matches_autograd_through_the_unrolled_step():
    g = torch.Generator().manual_seed(0)
    x_tr, x_va = (
        torch.randn(20, 3, 2, generator=g, dtype=torch.float64),
        torch.randn(15, 3, 2, generator=g, dtype=torch.float64),
    )
    y_tr, y_va = (
        torch.randn(20, 3, generator=g, dtype=torch.float64),
        torch.randn(15, 3, generator=g, dtype=torch.float64),
    )

    def loss(x, y):
        def f(w, alpha):  # a mixed operation: softmax(alpha) weighs two candidate features, w maps them
            mixed = (x * alpha.softmax(0)).sum(-1)  # (N, 3)
            return ((mixed * w - y) ** 2).mean() + 0.1 * (w**2).sum() * alpha.softmax(0)[0]

        return f

    train_loss, val_loss = loss(x_tr, y_tr), loss(x_va, y_va)
    w = torch.tensor([0.5, -0.3, 0.8], dtype=torch.float64)
    alpha = torch.tensor([0.2, -0.4], dtype=torch.float64)
    xi = 0.3
    # reference: differentiate L_val(w - xi grad_w L_train(w, alpha), alpha) through the step
    a = alpha.clone().requires_grad_(True)
    w_var = w.clone().requires_grad_(True)
    (g_w,) = torch.autograd.grad(train_loss(w_var, a), w_var, create_graph=True)
    (exact,) = torch.autograd.grad(val_loss(w - xi * g_w, a), a)
    torch.testing.assert_close(sn.darts_hypergradient(train_loss, val_loss, w, alpha, xi, eps=1e-4), exact)
    first_order = sn.darts_hypergradient(train_loss, val_loss, w, alpha, 0.0)
    (plain,) = torch.autograd.grad(val_loss(w, a), a)
    torch.testing.assert_close(first_order, plain)  # xi = 0: the gradient at the current weights
    assert not torch.allclose(first_order, exact)  # ... which the second-order term changes
    with pytest.raises(ValueError, match="flat"):
        sn.darts_hypergradient(train_loss, val_loss, w[None], alpha, xi)
    with pytest.raises(ValueError, match="xi >= 0"):
        sn.darts_hypergradient(train_loss, val_loss, w, alpha, -1.0)
