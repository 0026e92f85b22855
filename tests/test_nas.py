"""Tests for dlarch_lib.nas: search space, networks, the cached table, the three searches, REINFORCE."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dlarch_lib import nas
from dlarch_lib.core.data import load_digits_split

TINY = nas.SearchSpace.from_dict(
    {"depth": (1, 2), "width": (8,), "activation": ("relu", "tanh"), "skip": (False, True), "lr": (1e-2,)}
)
FAST = nas.EvalSettings(steps=3, batch_size=32)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks and a tiny LSTM: extra threads only add overhead (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_table(tmp_path_factory):
    return nas.load_table(TINY, FAST, cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


def synthetic_table(space: nas.SearchSpace, seed: int = 0) -> nas.Table:
    """A table with a smooth, known landscape (no training), for the search tests."""
    rng = np.random.default_rng(seed)
    weights = [rng.normal(size=n) for n in space.sizes]
    val = np.array([sum(w[t] for w, t in zip(weights, arch)) for arch in space.all()])
    return nas.Table(space, nas.EvalSettings(), val, val, np.zeros(len(space)))


# --------------------------------------------------------------------------- space


def test_space_size_names_and_roundtrip():
    assert len(nas.DIGITS_SPACE) == 288 and nas.DIGITS_SPACE.sizes == (3, 4, 3, 2, 4)
    space = nas.DIGITS_SPACE
    archs = space.all()
    assert len(archs) == len(set(archs)) == len(space)
    for i in (0, 1, 17, 287):
        arch = space.arch_at(i)
        assert space.index(arch) == i and archs[i] == arch
        assert space.encode(space.decode(arch)) == arch
    assert space.decode((0, 3, 1, 1, 2)) == {"depth": 1, "width": 128, "activation": "tanh", "skip": True, "lr": 1e-2}


def test_space_bad_input():
    with pytest.raises(ValueError, match="tokens"):
        TINY.validate((0, 0))
    with pytest.raises(ValueError, match="must be in"):
        TINY.decode((2, 0, 0, 0, 0))
    with pytest.raises(ValueError, match="not an option"):
        TINY.encode({"depth": 7, "width": 8, "activation": "relu", "skip": False, "lr": 1e-2})
    with pytest.raises(ValueError, match="keys"):
        TINY.encode({"depth": 1})
    with pytest.raises(ValueError, match="unique"):
        nas.SearchSpace((("a", (1,)), ("a", (2,))))
    with pytest.raises(ValueError, match="non-empty"):
        nas.SearchSpace.from_dict({"a": ()})
    with pytest.raises(ValueError, match="index"):
        TINY.arch_at(len(TINY))


def test_sample_is_uniform_and_in_space():
    rng = np.random.default_rng(0)
    counts = np.zeros(len(TINY))
    for _ in range(4000):
        counts[TINY.index(TINY.sample(rng))] += 1
    assert np.all(np.abs(counts / 4000 - 1 / len(TINY)) < 0.03)


def test_mutate_changes_exactly_one_token():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        arch = nas.DIGITS_SPACE.sample(rng)
        child = nas.mutate(arch, nas.DIGITS_SPACE, rng)
        diff = [i for i, (a, b) in enumerate(zip(arch, child)) if a != b]
        assert len(diff) == 1
        seen.add(diff[0])
        nas.DIGITS_SPACE.validate(child)
    assert seen == set(range(5))
    # TINY's width and lr have one option: they are never mutated
    assert all(nas.mutate((0, 0, 0, 0, 0), TINY, rng)[i] == 0 for i in (1, 4) for _ in range(20))
    with pytest.raises(ValueError, match="single option"):
        nas.mutate((0,), nas.SearchSpace.from_dict({"a": (1,)}), rng)


# --------------------------------------------------------------------------- networks and evaluation


def test_network_shapes_skip_and_errors():
    x = torch.randn(5, 1, 8, 8)
    for depth, skip in ((1, True), (3, False), (3, True)):
        model = nas.build_network({"depth": depth, "width": 16, "activation": "tanh", "skip": skip})
        assert model(x).shape == (5, 10)
        assert model.skip == (skip and depth > 1)
    # the residual connection: h + layer(h), checked by hand
    model = nas.DigitsMLP(2, 16, "relu", skip=True)
    h = model.inp(x.flatten(1))
    torch.testing.assert_close(model(x), model.out(h + model.hidden[0](h)))
    with pytest.raises(ValueError, match="activation"):
        nas.DigitsMLP(1, 8, "swish")
    with pytest.raises(ValueError, match="depth"):
        nas.DigitsMLP(0, 8)
    with pytest.raises(ValueError, match="lacks"):
        nas.build_network({"depth": 1})
    assert nas.canonical_config({"depth": 1, "skip": True})["skip"] is False
    assert nas.canonical_config({"depth": 2, "skip": True})["skip"] is True


def test_train_and_evaluate_is_seeded_and_learns():
    split = load_digits_split(val_frac=0.25, test_frac=0.25)
    config = {"depth": 1, "width": 32, "activation": "relu", "skip": False, "lr": 1e-2}
    a = nas.train_and_evaluate(config, split, nas.EvalSettings(steps=30))
    b = nas.train_and_evaluate(config, split, nas.EvalSettings(steps=30))
    assert a == b
    assert a["val_acc"] > 0.6 and 0 < a["test_acc"] <= 1  # 30 steps: well above chance (0.1)
    assert a["params"] == 64 * 32 + 32 + 32 * 10 + 10
    with pytest.raises(ValueError, match="lr"):
        nas.train_and_evaluate({"depth": 1, "width": 8, "activation": "relu", "skip": False}, split)
    with pytest.raises(ValueError, match="steps"):
        nas.EvalSettings(steps=0)


def test_table_is_computed_cached_and_reloaded(tmp_path, monkeypatch):
    table = nas.load_table(TINY, FAST, cache_dir=tmp_path, progress=False)
    path = tmp_path / "nas" / f"table-{nas.table_key(TINY, FAST)}.json"
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    # the table agrees with evaluating each architecture directly
    split = load_digits_split(val_frac=FAST.val_frac, test_frac=FAST.test_frac, seed=FAST.seed)
    for arch in TINY.all():
        direct = nas.train_and_evaluate(nas.canonical_config(TINY.decode(arch)), split, FAST)
        assert table(arch) == pytest.approx(direct["val_acc"]) and table.test(arch) == pytest.approx(direct["test_acc"])
    # skip is moot at depth 1: both spellings share one evaluation
    assert table((0, 0, 0, 0, 0)) == table((0, 0, 0, 1, 0))
    # a second load reads the file instead of training (training is made to fail)
    monkeypatch.setattr(nas, "train_and_evaluate", lambda *a, **k: pytest.fail("recomputed a cached table"))
    again = nas.load_table(TINY, FAST, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(again.val_acc, table.val_acc)
    assert table.cpu_seconds > 0 and again.cpu_seconds == table.cpu_seconds  # the cost of computing it, stored with it
    # the cache directory follows $DLARCH_CACHE_DIR
    monkeypatch.setenv("DLARCH_CACHE_DIR", str(tmp_path))
    assert nas.default_cache_dir() == tmp_path
    np.testing.assert_array_equal(nas.load_table(TINY, FAST, progress=False).val_acc, table.val_acc)


def test_table_key_and_corrupt_cache(tmp_path):
    assert nas.table_key(TINY, FAST) == nas.table_key(TINY, nas.EvalSettings(steps=3, batch_size=32))
    assert nas.table_key(TINY, FAST) != nas.table_key(TINY, nas.EvalSettings(steps=4, batch_size=32))
    assert nas.table_key(TINY, FAST) != nas.table_key(nas.DIGITS_SPACE, FAST)
    path = tmp_path / "nas" / f"table-{nas.table_key(TINY, FAST)}.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    table = nas.load_table(TINY, FAST, cache_dir=tmp_path, progress=False)
    assert json.loads(path.read_text())["val_acc"] == table.val_acc.tolist()


def test_table_accessors(tiny_table):
    assert tiny_table.optimum == tiny_table(tiny_table.best_arch) == tiny_table.val_acc.max()
    assert tiny_table.fraction_better(tiny_table.optimum) == 0.0
    assert tiny_table.fraction_better(-1.0) == 1.0
    with pytest.raises(ValueError, match="shape"):
        nas.Table(TINY, FAST, np.zeros(3), np.zeros(3), np.zeros(3))


# --------------------------------------------------------------------------- searches


def test_best_so_far():
    np.testing.assert_array_equal(nas.best_so_far([0.1, 0.3, 0.2, 0.5]), [0.1, 0.3, 0.3, 0.5])
    with pytest.raises(ValueError, match="non-empty"):
        nas.best_so_far([])


def test_random_search_budget_and_determinism():
    table = synthetic_table(nas.DIGITS_SPACE)
    a = nas.random_search(nas.DIGITS_SPACE, table, 50, seed=3)
    b = nas.random_search(nas.DIGITS_SPACE, table, 50, seed=3)
    assert a.archs == b.archs and len(a.rewards) == 50
    assert a.rewards == [table(x) for x in a.archs]
    assert a.best_so_far[-1] == max(a.rewards) == table(a.best_arch)
    with pytest.raises(ValueError, match="budget"):
        nas.random_search(nas.DIGITS_SPACE, table, 0)


def test_regularized_evolution_ages_and_beats_random():
    space, table = nas.DIGITS_SPACE, synthetic_table(nas.DIGITS_SPACE, seed=1)
    calls = []
    result = nas.regularized_evolution(
        space, lambda a: calls.append(a) or table(a), 60, seed=0, population_size=10, sample_size=3
    )
    assert len(result.archs) == 60 and calls == result.archs
    # after the initial population, every child is one mutation away from an earlier member
    for i in range(10, 60):
        assert any(sum(x != y for x, y in zip(result.archs[i], p)) == 1 for p in result.archs[max(0, i - 10) : i])
    evo = np.median([nas.regularized_evolution(space, table, 100, s).best_so_far[-1] for s in range(10)])
    rnd = np.median([nas.random_search(space, table, 100, s).best_so_far[-1] for s in range(10)])
    assert evo >= rnd  # on an additive landscape, local moves help
    non_aging = nas.regularized_evolution(space, table, 100, 0, aging=False)
    assert len(non_aging.archs) == 100
    with pytest.raises(ValueError, match="sample_size"):
        nas.regularized_evolution(space, table, 10, sample_size=30, population_size=20)


def test_controller_distribution_and_log_probs():
    torch.manual_seed(0)
    controller = nas.Controller(nas.DIGITS_SPACE.sizes)
    probs = controller.distribution(nas.DIGITS_SPACE)
    np.testing.assert_allclose(probs, 1 / len(nas.DIGITS_SPACE), rtol=1e-5)  # zero heads: uniform start
    with torch.no_grad():  # make the policy non-uniform, then check it is still normalised
        for p in controller.parameters():
            p.add_(torch.randn_like(p))
    probs = controller.distribution(nas.DIGITS_SPACE)
    assert probs.sum() == pytest.approx(1.0, abs=1e-5) and probs.std() > 0
    actions, log_prob, entropy = controller(7, generator=torch.Generator().manual_seed(0))
    assert actions.shape == (7, 5) and log_prob.shape == entropy.shape == (7,)
    torch.testing.assert_close(log_prob, controller.log_prob(actions))
    assert log_prob.requires_grad and (entropy > 0).all()
    # the previous action is fed back: changing token 0 changes the distribution of token 1
    joint = probs.reshape(3, 4, -1).sum(-1)  # P(a_0, a_1)
    conditional = joint / joint.sum(1, keepdims=True)  # P(a_1 | a_0): one row per a_0
    assert np.abs(conditional[0] - conditional[1]).max() > 1e-3
    with pytest.raises(ValueError, match="shape"):
        controller(actions=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="must be in"):
        controller(actions=torch.tensor([[3, 0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="match"):
        controller.distribution(TINY)


def test_reinforce_search_learns_on_a_known_landscape():
    space, table = nas.DIGITS_SPACE, synthetic_table(nas.DIGITS_SPACE, seed=2)
    result = nas.reinforce_search(space, table, 120, seed=0)
    assert len(result.archs) == 120 and len(result.extra["baseline"]) == 30
    uniform = table.val_acc.mean()
    assert result.extra["expected_reward"] > uniform + 0.5 * (table.optimum - uniform)
    assert np.mean(result.rewards[-30:]) > np.mean(result.rewards[:30])
    again = nas.reinforce_search(space, table, 20, seed=0)
    assert again.archs == result.archs[:20]  # seeded
    with pytest.raises(ValueError, match="baseline_decay"):
        nas.reinforce_search(space, table, 10, baseline_decay=1.0)


# --------------------------------------------------------------------------- the policy gradient


def test_exact_policy_gradient_matches_autograd():
    logits = torch.randn(6, dtype=torch.float64, requires_grad=True)
    rewards = torch.randn(6, dtype=torch.float64)
    (grad,) = torch.autograd.grad((logits.softmax(0) * rewards).sum(), logits)
    torch.testing.assert_close(nas.exact_policy_gradient(logits.detach(), rewards), grad)
    with pytest.raises(ValueError, match="shape"):
        nas.exact_policy_gradient(logits.detach(), rewards[:3])


def test_reinforce_estimate_is_unbiased_and_baseline_reduces_variance():
    logits = torch.tensor([0.5, -1.0, 0.0, 1.0], dtype=torch.float64)
    rewards = torch.tensor([1.0, 2.0, 3.0, 2.5], dtype=torch.float64)
    exact = nas.exact_policy_gradient(logits, rewards)
    mean_reward = float((logits.softmax(0) * rewards).sum())
    gen = torch.Generator().manual_seed(0)
    plain, per_plain = nas.reinforce_estimate(logits, rewards, 100_000, generator=gen)
    based, per_based = nas.reinforce_estimate(logits, rewards, 100_000, baseline=mean_reward, generator=gen)
    torch.testing.assert_close(plain, exact, atol=0.02, rtol=0)
    torch.testing.assert_close(based, exact, atol=0.01, rtol=0)
    assert per_based.var(0).sum() < 0.2 * per_plain.var(0).sum()
    with pytest.raises(ValueError, match="samples"):
        nas.reinforce_estimate(logits, rewards, 0)
