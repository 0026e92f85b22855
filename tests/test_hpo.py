"""Tests for dlarch_lib.hpo: grid points and search, the GP and EI, CMA-ES, optuna, the digits objective.

The search core it shares with chapter 15 (spaces, results, random search) is tested in test_nas.py.
"""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest
import torch

from dlarch_lib import hpo, nas
from dlarch_lib.core.data import load_digits_split

LINE = nas.SearchSpace((nas.Param("x", 0.0, 1.0),))


def _quadratic(config: dict) -> float:
    return (config["a"] - 0.3) ** 2 + (config["b"] - 0.6) ** 2


SPACE2 = nas.SearchSpace((nas.Param("a", 0.0, 1.0), nas.Param("b", 0.0, 1.0)))


# ----------------------------------------------------------------------------- the chapter's space


def test_digits_space_roundtrip_and_suggest():
    u = np.array([0.2, 0.7, 0.5, 0.25])
    config = hpo.DIGITS_HPARAM_SPACE.decode(u)
    assert list(config) == ["lr", "weight_decay", "width", "dropout"]
    np.testing.assert_allclose(np.array(hpo.DIGITS_HPARAM_SPACE.encode(config))[[0, 1, 3]], u[[0, 1, 3]])
    fixed = optuna.trial.FixedTrial(hpo.DIGITS_DEFAULT)
    assert hpo.DIGITS_HPARAM_SPACE.suggest(fixed) == hpo.DIGITS_DEFAULT
    with pytest.raises(ValueError, match=r"4 coordinates"):
        hpo.DIGITS_HPARAM_SPACE.decode(np.zeros(3))


def test_unit_cube_searches_refuse_choices():
    choices = nas.SearchSpace.from_dict({"a": (1, 2, 3)})
    with pytest.raises(ValueError, match="Choice"):
        hpo.grid_search(lambda c: c["a"], choices, 3, mode="min")
    with pytest.raises(ValueError, match="Choice"):
        hpo.gp_ei_search(lambda c: c["a"], choices, 3, mode="min", n_init=2)


# ----------------------------------------------------------------------------- grid and random


def test_grid_levels_and_points():
    assert hpo.grid_levels(16, 4) == (2, 2, 2, 2)
    assert hpo.grid_levels(24, 4) == (3, 2, 2, 2)
    assert hpo.grid_levels(9, 2) == (3, 3) and hpo.grid_levels(10, 1) == (10,)
    g = hpo.grid_points((3, 2))
    assert g.shape == (6, 2)
    np.testing.assert_allclose(np.unique(g[:, 0]), [1 / 6, 1 / 2, 5 / 6])  # cell centres
    with pytest.raises(ValueError, match="positive int"):
        hpo.grid_levels(0, 2)
    with pytest.raises(ValueError, match="levels"):
        hpo.grid_points((2, 0))


def test_random_points_and_distinct_values():
    a, b = hpo.random_points(9, 2, seed=3), hpo.random_points(9, 2, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (9, 2) and a.min() >= 0 and a.max() < 1
    # the point of random search: 9 random points give 9 distinct values per axis, a 3x3 grid only 3
    assert hpo.distinct_values(a[:, 0]) == 9
    assert hpo.distinct_values(hpo.grid_points((3, 3))[:, 0]) == 3
    with pytest.raises(ValueError, match="1-D"):
        hpo.distinct_values(a)


def test_grid_search_spends_the_budget_and_random_search_tries_random_points():
    calls = []
    grid = hpo.grid_search(lambda c: calls.append(c) or _quadratic(c), SPACE2, 10, mode="min")
    assert len(calls) == 9 and len(grid.values) == 9 and grid.method == "grid" and grid.mode == "min"
    np.testing.assert_allclose(np.array(grid.points), hpo.grid_points((3, 3)))
    rand = nas.random_search(_quadratic, SPACE2, 12, mode="min", seed=0)
    np.testing.assert_array_equal(np.array(rand.points), hpo.random_points(12, 2, seed=0))
    assert rand.best_value == pytest.approx(_quadratic(rand.best_config)) == min(rand.values)
    with pytest.raises(ValueError, match="budget"):
        hpo.grid_search(_quadratic, SPACE2, 0, mode="min")
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        hpo.evaluate_points(_quadratic, SPACE2, np.zeros((3, 3)), mode="min", method="x")


# ----------------------------------------------------------------------------- Gaussian process


def test_rbf_kernel_values_and_errors():
    a = np.array([[0.0], [1.0]])
    k = hpo.rbf_kernel(a, a, lengthscale=0.5, variance=2.0)
    np.testing.assert_allclose(k, [[2.0, 2.0 * math.exp(-2.0)], [2.0 * math.exp(-2.0), 2.0]])
    assert hpo.rbf_kernel(np.zeros((3, 2)), np.zeros((5, 2)), 1.0).shape == (3, 5)
    with pytest.raises(ValueError, match="same number of columns"):
        hpo.rbf_kernel(np.zeros((3, 2)), np.zeros((3, 1)), 1.0)
    with pytest.raises(ValueError, match="> 0"):
        hpo.rbf_kernel(a, a, 0.0)


def _data(n: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(seed).random((n, 2))
    return x, np.sin(3 * x[:, 0]) + x[:, 1] ** 2


def test_gp_matches_the_direct_inverse_formulas():
    x, y = _data()
    xs = np.random.default_rng(1).random((20, 2))
    gp = hpo.GaussianProcess(0.4, variance=1.5, noise=1e-3, normalize=False).fit(x, y)
    mean, std = gp.predict(xs)
    K_inv = np.linalg.inv(hpo.rbf_kernel(x, x, 0.4, 1.5) + 1e-3 * np.eye(len(x)))
    k_star = hpo.rbf_kernel(x, xs, 0.4, 1.5)
    np.testing.assert_allclose(mean, k_star.T @ K_inv @ y, atol=1e-8)
    np.testing.assert_allclose(std**2, 1.5 - np.einsum("nm,nk,km->m", k_star, K_inv, k_star), atol=1e-8)


def test_gp_matches_sklearn():
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF

    x, y = _data()
    xs = np.random.default_rng(1).random((30, 2))
    gp = hpo.GaussianProcess(0.3, noise=1e-4).fit(x, y)
    ref = GaussianProcessRegressor(RBF(0.3), alpha=1e-4, optimizer=None, normalize_y=True).fit(x, y)
    ref_mean, ref_std = ref.predict(xs, return_std=True)
    mean, std = gp.predict(xs)
    np.testing.assert_allclose(mean, ref_mean, atol=1e-8)
    np.testing.assert_allclose(std, ref_std, atol=1e-8)
    assert gp.log_marginal_likelihood() == pytest.approx(ref.log_marginal_likelihood_value_)


def test_gp_interpolates_and_reverts_to_the_prior():
    x, y = _data()
    gp = hpo.GaussianProcess(0.3, noise=1e-10).fit(x, y)
    mean, std = gp.predict(x)
    np.testing.assert_allclose(mean, y, atol=1e-5)  # passes through the data ...
    assert std.max() < 1e-3  # ... with (almost) no uncertainty there
    far_mean, far_std = gp.predict(np.array([[50.0, 50.0]]))
    assert far_mean[0] == pytest.approx(y.mean()) and far_std[0] == pytest.approx(y.std())  # the prior


def test_gp_errors():
    with pytest.raises(RuntimeError, match="fit"):
        hpo.GaussianProcess(1.0).predict(np.zeros((1, 1)))
    with pytest.raises(ValueError, match=r"y \(n,\)"):
        hpo.GaussianProcess(1.0).fit(np.zeros((3, 1)), np.zeros(2))
    with pytest.raises(ValueError, match="lengthscale"):
        hpo.GaussianProcess(-1.0)


def test_fit_gp_maximises_the_marginal_likelihood():
    x, y = _data(12)
    grid = (0.05, 0.1, 0.3, 1.0)
    best = hpo.fit_gp(x, y, lengthscales=grid, noises=(1e-6, 1e-2))
    for ls in grid:
        for noise in (1e-6, 1e-2):
            lml = hpo.GaussianProcess(ls, noise=noise).fit(x, y).log_marginal_likelihood()
            assert best.log_marginal_likelihood() >= lml - 1e-12


# ----------------------------------------------------------------------------- expected improvement


def test_expected_improvement_matches_monte_carlo():
    mean, std, best = np.array([0.0, 1.0, -0.5]), np.array([1.0, 0.5, 2.0]), 0.3
    f = mean + std * np.random.default_rng(0).standard_normal((400_000, 3))
    gain = np.maximum(best - f, 0.0)  # (samples, 3)
    standard_error = gain.std(0) / math.sqrt(len(gain))
    assert np.all(np.abs(hpo.expected_improvement(mean, std, best) - gain.mean(0)) < 4 * standard_error)


def test_expected_improvement_limits_and_errors():
    np.testing.assert_allclose(hpo.expected_improvement(np.array([0.0, 2.0]), np.zeros(2), 1.0), [1.0, 0.0])
    assert hpo.expected_improvement(np.array([0.0]), np.array([1.0]), 0.0)[0] == pytest.approx(
        1 / math.sqrt(2 * math.pi)
    )
    ei = hpo.expected_improvement(np.zeros(3), np.array([0.1, 1.0, 3.0]), 0.0)
    assert np.all(np.diff(ei) > 0)  # more uncertainty, more expected improvement
    with pytest.raises(ValueError, match="same shape"):
        hpo.expected_improvement(np.zeros(2), np.ones(3), 0.0)
    with pytest.raises(ValueError, match=">= 0"):
        hpo.expected_improvement(np.zeros(1), -np.ones(1), 0.0)


def test_gp_ei_finds_the_forrester_minimum():
    assert hpo.forrester(0.7572) == pytest.approx(-6.0207, abs=1e-3)
    r = hpo.gp_ei_search(lambda c: float(hpo.forrester(c["x"])), LINE, 10, mode="min", seed=0, n_init=3)
    assert len(r.values) == 10 and r.method == "GP-EI"
    assert abs(r.best_config["x"] - 0.7572) < 0.01
    # maximising -f is the same search: the same points, the values negated
    m = hpo.gp_ei_search(lambda c: -float(hpo.forrester(c["x"])), LINE, 10, mode="max", seed=0, n_init=3)
    assert m.points == r.points and m.best_config == r.best_config
    with pytest.raises(ValueError, match="n_init"):
        hpo.gp_ei_search(_quadratic, SPACE2, 3, mode="min", n_init=5)


# ----------------------------------------------------------------------------- CMA-ES


def test_cmaes_converges_on_a_sphere():
    es = hpo.CMAES(np.full(5, 2.0), 1.0, seed=0)
    assert es.popsize == 8 and es.mu == 4 and es.weights.sum() == pytest.approx(1.0)
    for _ in range(150):
        x = es.ask()
        es.tell(x, (x**2).sum(1))
    assert (es.mean**2).sum() < 1e-8


def test_cmaes_learns_the_inverse_hessian_shape():
    es = hpo.CMAES(np.array([3.0, -2.0]), 1.0, seed=0)
    for _ in range(60):
        x = es.ask()
        es.tell(x, x[:, 0] ** 2 + 100 * x[:, 1] ** 2)  # Hessian diag(2, 200)
    assert 30 < es.C[0, 0] / es.C[1, 1] < 300  # C ~ H^-1: about 100 times wider along x_0


def test_cmaes_errors_and_bounded_search():
    es = hpo.CMAES(np.zeros(3), 0.5, seed=0)
    with pytest.raises(ValueError, match="expected x"):
        es.tell(np.zeros((2, 3)), np.zeros(2))
    with pytest.raises(ValueError, match="sigma > 0"):
        hpo.CMAES(np.zeros(3), 0.0)
    r = hpo.cma_es_search(_quadratic, SPACE2, 23, mode="min", seed=0)
    points = np.array(r.points)
    assert len(r.values) == 23 and points.min() >= 0 and points.max() <= 1
    assert r.best_value < 0.01
    m = hpo.cma_es_search(lambda c: -_quadratic(c), SPACE2, 23, mode="max", seed=0)
    assert m.points == r.points and m.best_value == -r.best_value


# ----------------------------------------------------------------------------- optuna


def test_optuna_search_records_every_trial():
    sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=5)
    r = hpo.optuna_search(_quadratic, SPACE2, 15, mode="min", sampler=sampler, method="TPE")
    assert r.method == "TPE" and len(r.values) == 15 and np.array(r.points).shape == (15, 2)
    assert r.best_value == pytest.approx(_quadratic(r.best_config))
    assert r.best_value < 0.05
    best = hpo.optuna_search(
        lambda c: -_quadratic(c), SPACE2, 15, mode="max", sampler=optuna.samplers.TPESampler(seed=0)
    )
    assert best.mode == "max" and best.best_value == max(best.values)


# ----------------------------------------------------------------------------- digits objective


def test_digits_objective_is_deterministic_and_cached():
    split = load_digits_split(val_frac=0.2, test_frac=0.2, seed=0)
    objective = hpo.DigitsObjective(split, device="cpu", epochs=2, batch_size=128)
    good = {"lr": 0.03, "weight_decay": 1e-4, "width": 64, "dropout": 0.0}
    torch.manual_seed(5)
    before = torch.get_rng_state()
    model = objective.train(good)
    assert torch.equal(torch.get_rng_state(), before)  # seeded without touching the caller's stream
    assert [type(b).__name__ for b in model.blocks] == ["Flatten", "Sequential", "Linear"]  # MLPConfig, depth 1
    assert model(torch.rand(5, 1, 8, 8)).shape == (5, 10)
    first = objective(good)
    assert first == objective.error(model, "val")  # seeded: a second training run gives the same model
    assert objective(good) == first and objective.calls == 2 and objective.trainings == 1  # cached
    dropped = {**good, "dropout": 0.5}  # dropout draws inside the seeded run too
    assert objective(dropped) == hpo.DigitsObjective(split, device="cpu", epochs=2, batch_size=128)(dropped)
    assert 0.0 <= first < 0.25  # two epochs at a good learning rate already learn the digits
    assert 0.0 <= objective.error(model, "test") < 0.25
    assert objective({**good, "lr": 1e-4}) > first + 0.2  # a tiny learning rate has not learned yet
    with pytest.raises(ValueError, match="lacks"):
        objective({"lr": 0.1})
    with pytest.raises(ValueError, match="part"):
        objective.error(model, "train")
    with pytest.raises(ValueError, match="dropout"):
        objective({**good, "dropout": 1.0})
    with pytest.raises(ValueError, match="epochs"):
        hpo.DigitsObjective(split, device="cpu", epochs=0)


# ----------------------------------------------------------------------------- multi-fidelity search


def _counting(log: list) -> hpo.FidelityObjective:
    """A cheap fidelity objective: (x - 0.3)^2 plus a bias that shrinks with the fidelity; logs each call."""

    def f(config: dict, fidelity: int) -> float:
        log.append((config["x"], fidelity))
        return (config["x"] - 0.3) ** 2 + 0.5 / fidelity

    return f


def test_halving_rungs_and_cost_formula():
    assert hpo.halving_rungs(27, 1, 3) == [(27, 1), (9, 3), (3, 9), (1, 27)]
    assert hpo.halving_rungs(27, 2, 3, rungs=2) == [(27, 2), (9, 6)]
    assert hpo.halving_rungs(10, 1, 2) == [(10, 1), (5, 2), (2, 4), (1, 8)]
    for n, r0, eta, rungs in ((27, 3, 3, 3), (16, 1, 2, 5), (81, 2, 3, 4)):  # n a multiple of eta^s: equality
        assert hpo.bracket_cost(hpo.halving_rungs(n, r0, eta, rungs)) == n * r0 * rungs
    assert hpo.bracket_cost(hpo.halving_rungs(10, 1, 2)) == 10 + 10 + 8 + 8 < 10 * 4  # floors: below the bound
    with pytest.raises(ValueError, match="rungs"):
        hpo.halving_rungs(8, 1, 3, rungs=3)  # floor(8 / 9) = 0 configurations in the last rung
    with pytest.raises(ValueError, match="eta"):
        hpo.halving_rungs(8, 1, 1)
    with pytest.raises(ValueError, match="min_fidelity"):
        hpo.halving_rungs(8, 0, 2)
    with pytest.raises(ValueError, match="budget"):
        hpo.halving_rungs(0, 1, 2)


def test_hyperband_brackets_match_li_et_al():
    brackets = hpo.hyperband_brackets(81, 1, 3)  # Li et al. (2018), Table 1
    assert [b[0] for b in brackets] == [(81, 1), (34, 3), (15, 9), (8, 27), (5, 81)]
    assert [len(b) for b in brackets] == [5, 4, 3, 2, 1] and all(b[-1][1] == 81 for b in brackets)
    assert [hpo.bracket_cost(b) for b in brackets] == [405, 363, 351, 378, 405]
    assert hpo.hyperband_brackets(27, 3, 3) == [[(9, 3), (3, 9), (1, 27)], [(5, 9), (1, 27)], [(3, 27)]]
    assert hpo.hyperband_brackets(5, 5, 3) == [[(1, 5)]]  # R = r_min: one bracket, random search
    with pytest.raises(ValueError, match="min_fidelity \\* eta"):
        hpo.hyperband_brackets(30, 3, 3)


def test_successive_halving_keeps_the_best_and_spends_the_formula():
    log: list = []
    r = hpo.successive_halving(_counting(log), LINE, 27, mode="min", seed=0, min_fidelity=1, eta=3)
    assert [f for _, f in log].count(1) == 27 and [f for _, f in log].count(27) == 1
    assert r.extra["cost"] == sum(f for _, f in log) == 27 * 1 * 4
    assert len(r.values) == 1 and r.method == "SH"
    xs = np.array([x for x, f in log if f == 1])  # rung 0: the 27 sampled points
    assert abs(r.best_config["x"] - 0.3) == np.abs(xs - 0.3).min()  # the bias is equal within a rung: the best wins
    rung1 = sorted(x for x, f in log if f == 3)
    assert rung1 == sorted(xs[np.argsort(np.abs(xs - 0.3))[:9]])  # the best 9 of rung 0 moved up
    maxed = hpo.successive_halving(
        lambda c, f: -_counting([])(c, f), LINE, 27, mode="max", seed=0, min_fidelity=1, eta=3
    )
    assert maxed.best_config == r.best_config  # maximising -f picks the same points
    assert len(r.extra["evaluations"]) == 27 + 9 + 3 + 1 and r.extra["brackets"] == [hpo.halving_rungs(27, 1, 3)]
    with pytest.raises(ValueError, match="mode"):
        hpo.successive_halving(_counting([]), LINE, 9, mode="best")


def test_hyperband_spends_the_sum_of_its_brackets_at_full_fidelity():
    log: list = []
    r = hpo.hyperband(_counting(log), LINE, 27, mode="min", seed=1, min_fidelity=3, eta=3)
    plan = hpo.hyperband_brackets(27, 3, 3)
    assert r.extra["cost"] == sum(f for _, f in log) == sum(hpo.bracket_cost(b) for b in plan) == 234
    assert len(r.values) == sum(b[-1][0] for b in plan) == 5  # the last rung of each bracket, all at R
    at_full = {(tuple(p), v) for p, _, f, v in r.extra["evaluations"] if f == 27}
    assert {(tuple(p), v) for p, v in zip(r.points, r.values)} == at_full  # the result: every run that reached R
    assert r.best_value == pytest.approx((r.best_config["x"] - 0.3) ** 2 + 0.5 / 27)
    with pytest.raises(ValueError, match="max_fidelity"):
        hpo.hyperband(_counting([]), LINE, 20, mode="min", min_fidelity=3, eta=3)


def test_spearman_matches_scipy_and_handles_ties():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a, b = rng.random(20), rng.random(20)
    assert hpo.spearman(a, b) == pytest.approx(spearmanr(a, b)[0], abs=1e-12)
    t = np.array([1.0, 2.0, 2.0, 3.0, 1.0])
    np.testing.assert_allclose(hpo.ranks(t), [1.5, 3.5, 3.5, 5.0, 1.5])
    assert hpo.spearman(t, b[:5]) == pytest.approx(spearmanr(t, b[:5])[0], abs=1e-12)
    assert hpo.spearman(a, a**3) == pytest.approx(1.0) and hpo.spearman(a, -a) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="constant"):
        hpo.spearman(a, np.ones(20))
    with pytest.raises(ValueError, match="one length"):
        hpo.spearman(a, b[:5])
    with pytest.raises(ValueError, match="1-D"):
        hpo.ranks(np.zeros((2, 2)))


@pytest.fixture(scope="module")
def digits_split():
    return load_digits_split(val_frac=0.2, test_frac=0.2, seed=0)


def test_digits_fidelity_objective_curve_is_a_prefix_and_counts_steps(digits_split):
    objective = hpo.DigitsFidelityObjective(digits_split, device="cpu", batch_size=128)
    good = {"lr": 0.03, "weight_decay": 1e-4, "width": 32, "dropout": 0.2}
    curve = objective.curve(good, [2, 6, 18])
    assert objective.steps == 18 and objective.runs == 1
    assert objective(good, 6) == curve[1] and objective.steps == 24  # a short run is a prefix of a long one
    assert curve[2] < curve[0] and curve[2] < 0.3
    stopped = objective.curve(good, [2, 6, 18], report=lambda r, v: r == 6)
    assert stopped == curve[:2] and objective.steps == 24 + 6
    with pytest.raises(ValueError, match="increasing"):
        objective.curve(good, [6, 2])
    with pytest.raises(ValueError, match="lacks"):
        objective({"lr": 0.1}, 3)
    with pytest.raises(ValueError, match="batch_size"):
        hpo.DigitsFidelityObjective(digits_split, device="cpu", batch_size=0)


def test_optuna_pruned_search_prunes_and_respects_the_budget(digits_split):
    objective = hpo.DigitsFidelityObjective(digits_split, device="cpu", batch_size=128)
    r = hpo.optuna_pruned_search(
        objective.curve,
        hpo.DIGITS_HPARAM_SPACE,
        60,
        mode="min",
        fidelities=[2, 6, 18],
        sampler=optuna.samplers.RandomSampler(seed=0),
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=2, reduction_factor=3),
    )
    assert r.extra["cost"] == objective.steps <= 60 and r.extra["cost"] > 60 - 2
    assert r.extra["pruned"] >= 1 and len(r.values) >= 1  # the first trial always goes on (ASHA)
    assert sorted(r.values) == sorted(v for _, _, f, v in r.extra["evaluations"] if f == 18)  # completed = reached 18
    with pytest.raises(ValueError, match="increasing"):
        hpo.optuna_pruned_search(
            objective.curve, hpo.DIGITS_HPARAM_SPACE, 10, mode="min", fidelities=[3, 3], sampler=None, pruner=None
        )


# ----------------------------------------------------------------------------- population-based training


def _member(lr: float, seed: int) -> hpo.Member:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(seed))
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return hpo.Member(
        model,
        torch.optim.AdamW(model.parameters(), lr=1.0),
        {"lr": lr},
        hpo.endless_batches(x, y, batch_size=8, seed=0),
    )


def test_exploit_copies_exactly_without_sharing_and_explore_perturbs():
    from dlarch_lib.core.train import fit

    src, dst = _member(0.05, 0), _member(0.001, 1)
    assert dst.optimizer.param_groups[0]["lr"] == 0.001  # Member writes its hparams into the optimizer
    for m in (src, dst):
        fit(m.model, m.data, steps=3, optimizer=m.optimizer, progress=False)
    src.schedule = [{"lr": 0.05}]
    hpo.exploit(dst, src)
    for a, b in zip(src.model.state_dict().values(), dst.model.state_dict().values()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    sa = [t for p in src.model.parameters() for t in src.optimizer.state[p].values()]
    sb = [t for p in dst.model.parameters() for t in dst.optimizer.state[p].values()]
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() for a, b in zip(sa, sb))
    assert dst.hparams == {"lr": 0.05} and dst.schedule == [{"lr": 0.05}] and dst.schedule is not src.schedule
    hpo.explore(dst, np.random.default_rng(0), factors=(2.0,), bounds={"lr": (0.0, 0.08)})
    assert dst.hparams["lr"] == 0.08 and dst.optimizer.param_groups[0]["lr"] == 0.08  # doubled, then clipped
    assert src.hparams["lr"] == 0.05
    with pytest.raises(ValueError, match="itself"):
        hpo.exploit(src, src)
    with pytest.raises(ValueError, match="positive"):
        hpo.explore(dst, np.random.default_rng(0), factors=(0.0,))
    with pytest.raises(ValueError, match="setting"):
        hpo.Member(src.model, src.optimizer, {"momentum_x": 0.9}, src.data)


def test_pbt_round_replaces_the_worst_with_the_best():
    population = [_member(lr, k) for k, lr in enumerate([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])]
    scores = [5.0, 1.0, 7.0, 2.0, 8.0, 3.0, 4.0, 6.0]  # minimised: best are members 1 and 3, worst 4 and 2
    copies = hpo.pbt_round(population, scores, mode="min", rng=np.random.default_rng(0), factors=(1.0,))
    assert sorted(d for d, _ in copies) == [2, 4] and all(s in (1, 3) for _, s in copies)
    for d, s in copies:
        assert population[d].hparams == population[s].hparams
    assert len(population) == 8
    with pytest.raises(ValueError, match="fraction"):
        hpo.pbt_round(population, scores, mode="min", rng=np.random.default_rng(0), fraction=0.9)
    with pytest.raises(ValueError, match="one score per member"):
        hpo.pbt_round(population, scores[:3], mode="min", rng=np.random.default_rng(0))


def test_population_based_training_keeps_the_population_and_records_schedules():
    population = [_member(lr, k) for k, lr in enumerate([1e-3, 1e-2, 3e-2, 0.1])]

    def score(m: hpo.Member) -> float:
        with torch.no_grad():
            x = torch.randn(64, 4, generator=torch.Generator().manual_seed(9))
            y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
            return float(torch.nn.functional.cross_entropy(m.model(x), y))

    r = hpo.population_based_training(population, score, intervals=4, steps=5, mode="min", seed=0)
    assert r.scores.shape == (4, 4) and r.hparams["lr"].shape == (4, 4)
    assert r.population_sizes == [4, 4, 4, 4] and len(r.copies) == 3 and all(len(c) == 1 for c in r.copies)
    assert all(len(m.schedule) == 4 for m in population)
    assert (
        r.best_score == r.scores[-1].min()
        and population[r.best_member].schedule[-1] == population[r.best_member].hparams
    )
    fixed = [_member(lr, k) for k, lr in enumerate([1e-3, 1e-2, 3e-2, 0.1])]
    f = hpo.population_based_training(fixed, score, intervals=4, steps=5, mode="min", adapt=False)
    assert f.copies == [] and np.all(f.hparams["lr"] == [[1e-3, 1e-2, 3e-2, 0.1]] * 4)
    with pytest.raises(ValueError, match="intervals"):
        hpo.population_based_training(population, score, intervals=0, steps=5, mode="min")
