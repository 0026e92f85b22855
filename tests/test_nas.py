"""Tests for dlarch_lib.nas: the search core (spaces, results, random search), networks, the cached table,
evolution and REINFORCE."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from dlarch_lib import modular, nas
from dlarch_lib.core.data import load_digits_split

TINY = nas.SearchSpace.from_dict(
    {"depth": (1, 2), "width": (8,), "activation": ("relu", "tanh"), "skip": (False, True), "lr": (1e-2,)}
)
FAST = nas.EvalSettings(steps=3, batch_size=32)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: extra threads only add overhead


@pytest.fixture(scope="module")
def tiny_table(tmp_path_factory):
    return nas.load_table(TINY, FAST, device="cpu", cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


def synthetic_table(space: nas.SearchSpace, seed: int = 0) -> nas.Table:
    """A table with a smooth, known landscape (no training), for the search tests."""
    rng = np.random.default_rng(seed)
    weights = [rng.normal(size=n) for n in space.sizes]
    val = np.array([sum(w[t] for w, t in zip(weights, arch)) for arch in space.all()])
    return nas.Table(space, nas.EvalSettings(), val, val, np.zeros(len(space)))


# --------------------------------------------------------------------------- the search core: spaces

BOX = nas.SearchSpace((nas.Param("lr", 1e-4, 1.0, log=True), nas.Param("width", 8, 512, log=True, integer=True)))


def test_space_size_names_and_roundtrip():
    assert len(nas.DIGITS_ARCH_SPACE) == 288 and nas.DIGITS_ARCH_SPACE.sizes == (3, 4, 3, 2, 4)
    space = nas.DIGITS_ARCH_SPACE
    archs = space.all()
    assert len(archs) == len(set(archs)) == len(space)
    for i in (0, 1, 17, 287):
        arch = space.point_at(i)
        assert space.index(arch) == i and archs[i] == arch
        assert space.encode(space.decode(arch)) == arch
    assert space.decode((0, 3, 1, 1, 2)) == {"depth": 1, "width": 128, "activation": "tanh", "skip": True, "lr": 1e-2}
    assert space.names == ("depth", "width", "activation", "skip", "lr") and space.ndim == 5


def test_space_bad_input():
    with pytest.raises(ValueError, match="coordinates"):
        TINY.validate((0, 0))
    with pytest.raises(ValueError, match="must be in"):
        TINY.decode((2, 0, 0, 0, 0))
    with pytest.raises(ValueError, match="not an option"):
        TINY.encode({"depth": 7, "width": 8, "activation": "relu", "skip": False, "lr": 1e-2})
    with pytest.raises(ValueError, match="keys"):
        TINY.encode({"depth": 1})
    with pytest.raises(ValueError, match="unique"):
        nas.SearchSpace((nas.Choice("a", (1,)), nas.Choice("a", (2,))))
    with pytest.raises(ValueError, match="non-empty"):
        nas.SearchSpace.from_dict({"a": ()})
    with pytest.raises(ValueError, match="index"):
        TINY.point_at(len(TINY))
    with pytest.raises(TypeError, match="Choice or a Param"):
        nas.SearchSpace((("a", (1, 2)),))  # type: ignore[arg-type]


def test_param_decode_encode_log_and_integer():
    lr = nas.Param("lr", 1e-4, 1.0, log=True)
    assert lr.decode(0.0) == pytest.approx(1e-4) and lr.decode(1.0) == pytest.approx(1.0)
    assert lr.decode(0.5) == pytest.approx(1e-2)  # the geometric midpoint
    assert lr.encode(1e-3) == pytest.approx(0.25)
    width = nas.Param("width", 8, 512, log=True, integer=True)
    assert width.decode(0.5) == 64 and isinstance(width.decode(0.3), int)
    assert nas.Param("p", 0.0, 0.8).decode(2.0) == pytest.approx(0.8)  # clipped into the range
    with pytest.raises(ValueError, match="low < high"):
        nas.Param("x", 1.0, 1.0)
    with pytest.raises(ValueError, match="log scale needs low > 0"):
        nas.Param("x", 0.0, 1.0, log=True)
    with pytest.raises(ValueError, match="outside"):
        nas.Param("x", 0.0, 1.0).encode(1.5)


def test_a_box_of_params_and_a_mixed_space():
    config = BOX.decode((0.5, 0.5))
    assert config == {"lr": pytest.approx(1e-2), "width": 64}
    np.testing.assert_allclose(BOX.encode(config), (0.5, 0.5))
    assert BOX.validate(np.array([0.25, 0.75])) == (0.25, 0.75)  # plain floats
    with pytest.raises(ValueError, match="not finite"):
        len(BOX)
    with pytest.raises(ValueError, match="lacks"):
        BOX.encode({"lr": 0.1})
    mixed = nas.SearchSpace((nas.Choice("act", ("relu", "tanh")), nas.Param("lr", 1e-3, 1e-1, log=True)))
    point = mixed.sample(np.random.default_rng(0))
    assert isinstance(point[0], int) and 0.0 <= point[1] < 1.0
    assert mixed.encode(mixed.decode(point)) == pytest.approx(point)


def test_suggest_asks_optuna_for_every_dimension():
    optuna = pytest.importorskip("optuna")
    mixed = nas.SearchSpace((nas.Choice("act", ("relu", "tanh")), *BOX.dimensions))
    fixed = optuna.trial.FixedTrial({"act": "tanh", "lr": 0.01, "width": 64})
    assert mixed.suggest(fixed) == {"act": "tanh", "lr": 0.01, "width": 64}


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
        arch = nas.DIGITS_ARCH_SPACE.sample(rng)
        child = nas.mutate(arch, nas.DIGITS_ARCH_SPACE, rng)
        diff = [i for i, (a, b) in enumerate(zip(arch, child)) if a != b]
        assert len(diff) == 1
        seen.add(diff[0])
        nas.DIGITS_ARCH_SPACE.validate(child)
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
        residuals = [b for b in model.blocks if isinstance(b, modular.Residual)]
        assert len(residuals) == (depth - 1 if skip else 0)
    # the residual connection: h + layer(h), checked by hand
    model = nas.build_network({"depth": 2, "width": 16, "activation": "sigmoid", "skip": True})
    flat, first, second, head = model.blocks
    h = first(flat(x))
    torch.testing.assert_close(model(x), head(h + second.block(h)))
    assert isinstance(first[2], nn.Sigmoid)
    with pytest.raises(ValueError, match="activation"):
        nas.build_network({"depth": 1, "width": 8, "activation": "swish", "skip": False})
    with pytest.raises(ValueError, match="depth"):
        nas.build_network({"depth": 0, "width": 8, "activation": "relu", "skip": False})
    with pytest.raises(ValueError, match="lacks"):
        nas.build_network({"depth": 1})
    assert nas.canonical_config({"depth": 1, "skip": True})["skip"] is False
    assert nas.canonical_config({"depth": 2, "skip": True})["skip"] is True


def test_train_and_evaluate_is_seeded_and_learns():
    split = load_digits_split(val_frac=0.25, test_frac=0.25)
    config = {"depth": 1, "width": 32, "activation": "relu", "skip": False, "lr": 1e-2}
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = nas.train_and_evaluate(config, split, nas.EvalSettings(steps=30), device="cpu")
    b = nas.train_and_evaluate(config, split, nas.EvalSettings(steps=30), device="cpu")
    assert a == b and torch.equal(torch.get_rng_state(), before)  # seeded, and the caller's stream is untouched
    assert a["val_acc"] > 0.6 and 0 < a["test_acc"] <= 1  # 30 steps: well above chance (0.1)
    assert a["params"] == 64 * 32 + 32 + 32 * 10 + 10
    with pytest.raises(ValueError, match="lr"):
        nas.train_and_evaluate({"depth": 1, "width": 8, "activation": "relu", "skip": False}, split, device="cpu")
    with pytest.raises(ValueError, match="steps"):
        nas.EvalSettings(steps=0)


def test_table_is_computed_cached_and_reloaded(tmp_path, monkeypatch):
    table = nas.load_table(TINY, FAST, device="cpu", cache_dir=tmp_path, progress=False)
    path = tmp_path / "nas" / f"table-{nas.table_key(TINY, FAST)}.json"
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    # the table agrees with evaluating each architecture directly
    split = load_digits_split(val_frac=FAST.val_frac, test_frac=FAST.test_frac, seed=FAST.seed)
    for arch in TINY.all():
        config = TINY.decode(arch)
        direct = nas.train_and_evaluate(nas.canonical_config(config), split, FAST, device="cpu")
        assert table(config) == pytest.approx(direct["val_acc"])
        assert table.test(config) == pytest.approx(direct["test_acc"])
    # skip is moot at depth 1: both spellings share one evaluation
    assert table(TINY.decode((0, 0, 0, 0, 0))) == table(TINY.decode((0, 0, 0, 1, 0)))
    # a second load reads the file instead of training (training is made to fail)
    monkeypatch.setattr(nas, "train_and_evaluate", lambda *a, **k: pytest.fail("recomputed a cached table"))
    again = nas.load_table(TINY, FAST, device="cpu", cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(again.val_acc, table.val_acc)
    assert table.cpu_seconds > 0 and again.cpu_seconds == table.cpu_seconds  # the cost of computing it, stored with it
    # the cache directory follows $DLARCH_CACHE_DIR
    monkeypatch.setenv("DLARCH_CACHE_DIR", str(tmp_path))
    assert nas.default_cache_dir() == tmp_path
    np.testing.assert_array_equal(nas.load_table(TINY, FAST, device="cpu", progress=False).val_acc, table.val_acc)


def test_table_key_and_corrupt_cache(tmp_path):
    assert nas.table_key(TINY, FAST) == nas.table_key(TINY, nas.EvalSettings(steps=3, batch_size=32))
    assert nas.table_key(TINY, FAST) != nas.table_key(TINY, nas.EvalSettings(steps=4, batch_size=32))
    assert nas.table_key(TINY, FAST) != nas.table_key(nas.DIGITS_ARCH_SPACE, FAST)
    path = tmp_path / "nas" / f"table-{nas.table_key(TINY, FAST)}.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    table = nas.load_table(TINY, FAST, device="cpu", cache_dir=tmp_path, progress=False)
    assert json.loads(path.read_text())["val_acc"] == table.val_acc.tolist()


def test_table_accessors(tiny_table):
    assert tiny_table.optimum == tiny_table(tiny_table.best_config) == tiny_table.val_acc.max()
    assert tiny_table.fraction_better(tiny_table.optimum) == 0.0
    assert tiny_table.fraction_better(-1.0) == 1.0
    with pytest.raises(ValueError, match="shape"):
        nas.Table(TINY, FAST, np.zeros(3), np.zeros(3), np.zeros(3))


# --------------------------------------------------------------------------- searches


def test_search_result_reads_values_in_its_mode():
    values = [3.0, 1.0, 2.0, 0.5, 0.5, 4.0]
    results = {mode: nas.SearchResult(mode, "test") for mode in ("max", "min")}
    for result in results.values():
        for i, v in enumerate(values):
            result.add((i,), {"i": i}, v)
    np.testing.assert_array_equal(results["max"].best_so_far, [3.0, 3.0, 3.0, 3.0, 3.0, 4.0])
    np.testing.assert_array_equal(results["min"].best_so_far, [3.0, 1.0, 1.0, 0.5, 0.5, 0.5])
    assert results["min"].best_index == 3 and results["min"].best_value == 0.5  # the first on ties
    assert results["min"].best_config == {"i": 3} and results["min"].best_point == (3,)
    assert results["max"].best_value == 4.0 and results["max"].best_config == {"i": 5}
    with pytest.raises(ValueError, match="no evaluations"):
        nas.SearchResult("max").best_so_far
    with pytest.raises(ValueError, match="no evaluations"):
        nas.SearchResult("min").best_index
    with pytest.raises(ValueError, match="mode"):
        nas.SearchResult("best")


def test_random_search_budget_determinism_and_mode():
    table = synthetic_table(nas.DIGITS_ARCH_SPACE)
    a = nas.random_search(table, nas.DIGITS_ARCH_SPACE, 50, mode="max", seed=3)
    b = nas.random_search(table, nas.DIGITS_ARCH_SPACE, 50, mode="max", seed=3)
    assert a.points == b.points and len(a.values) == 50 and a.method == "random"
    assert a.values == [table(c) for c in a.configs] and a.configs == [
        nas.DIGITS_ARCH_SPACE.decode(p) for p in a.points
    ]
    assert a.best_so_far[-1] == max(a.values) == table(a.best_config)
    low = nas.random_search(table, nas.DIGITS_ARCH_SPACE, 50, mode="min", seed=3)
    assert low.points == a.points and low.best_value == min(a.values)  # same draws, read the other way
    with pytest.raises(ValueError, match="budget"):
        nas.random_search(table, nas.DIGITS_ARCH_SPACE, 0, mode="max")
    with pytest.raises(ValueError, match="mode"):
        nas.random_search(table, nas.DIGITS_ARCH_SPACE, 5, mode="maximise")


def test_random_search_on_a_box():
    objective = lambda c: (np.log10(c["lr"]) + 2) ** 2 + (c["width"] - 64) ** 2 / 1e4
    result = nas.random_search(objective, BOX, 40, mode="min", seed=0)
    np.testing.assert_array_equal(np.array(result.points), np.random.default_rng(0).random((40, 2)))
    assert result.best_value == min(result.values) < 0.1


def test_regularized_evolution_ages_and_beats_random():
    space, table = nas.DIGITS_ARCH_SPACE, synthetic_table(nas.DIGITS_ARCH_SPACE, seed=1)
    calls = []
    result = nas.regularized_evolution(
        lambda c: calls.append(c) or table(c), space, 60, mode="max", seed=0, population_size=10, sample_size=3
    )
    assert len(result.points) == 60 and calls == result.configs
    # after the initial population, every child is one mutation away from an earlier member
    for i in range(10, 60):
        assert any(sum(x != y for x, y in zip(result.points[i], p)) == 1 for p in result.points[max(0, i - 10) : i])
    evo = np.median([nas.regularized_evolution(table, space, 100, mode="max", seed=s).best_value for s in range(10)])
    rnd = np.median([nas.random_search(table, space, 100, mode="max", seed=s).best_value for s in range(10)])
    assert evo >= rnd  # on an additive landscape, local moves help
    non_aging = nas.regularized_evolution(table, space, 100, mode="max", seed=0, aging=False)
    assert len(non_aging.points) == 100
    # minimising the negated table is maximising the table: the same search, step for step
    negated = nas.regularized_evolution(lambda c: -table(c), space, 60, mode="min", seed=0, population_size=10)
    assert negated.points == nas.regularized_evolution(table, space, 60, mode="max", seed=0, population_size=10).points
    with pytest.raises(ValueError, match="sample_size"):
        nas.regularized_evolution(table, space, 10, mode="max", sample_size=30, population_size=20)


def test_controller_distribution_and_log_probs():
    torch.manual_seed(0)
    controller = nas.Controller(nas.DIGITS_ARCH_SPACE.sizes)
    probs = controller.distribution(nas.DIGITS_ARCH_SPACE)
    np.testing.assert_allclose(probs, 1 / len(nas.DIGITS_ARCH_SPACE), rtol=1e-5)  # zero heads: uniform start
    with torch.no_grad():  # make the policy non-uniform, then check it is still normalised
        for p in controller.parameters():
            p.add_(torch.randn_like(p))
    probs = controller.distribution(nas.DIGITS_ARCH_SPACE)
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
    space, table = nas.DIGITS_ARCH_SPACE, synthetic_table(nas.DIGITS_ARCH_SPACE, seed=2)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    result = nas.reinforce_search(table, space, 120, mode="max", device="cpu", seed=0)
    assert torch.equal(torch.get_rng_state(), before)  # seeded without touching the caller's stream
    history = result.extra["history"]
    assert len(result.points) == 120 and history.steps == 30 and len(history.logs["baseline"]) == 30
    uniform = table.val_acc.mean()
    assert result.extra["expected_reward"] > uniform + 0.5 * (table.optimum - uniform)
    assert np.mean(result.values[-30:]) > np.mean(result.values[:30])
    again = nas.reinforce_search(table, space, 22, mode="max", device="cpu", seed=0)
    assert again.points[:20] == result.points[:20] and again.extra["history"].steps == 6  # seeded; last batch of 2
    # minimising the negated table: the same rewards, the same controller, the same samples
    negated = nas.reinforce_search(lambda c: -table(c), space, 40, mode="min", device="cpu", seed=0)
    assert negated.points == result.points[:40]
    with pytest.raises(ValueError, match="baseline_decay"):
        nas.reinforce_search(table, space, 10, mode="max", device="cpu", baseline_decay=1.0)


def test_reinforce_step_descends_the_surrogate_loss():
    space = nas.SearchSpace.from_dict({"a": (0, 1, 2)})
    result = nas.SearchResult("max")
    step = nas.reinforce_step(lambda c: float(c["a"] == 2), space, result, baseline_decay=0.5)
    torch.manual_seed(0)
    controller = nas.Controller(space.sizes)
    out = step(controller, 8)
    assert len(result.values) == 8 and out["baseline"] == pytest.approx(np.mean(result.values))  # first batch
    (grad,) = torch.autograd.grad(out["loss"], controller.heads[0].bias)
    assert grad[2] < 0  # descending the loss raises the logit of the rewarded option


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
