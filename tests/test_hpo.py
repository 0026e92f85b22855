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
