"""Chapter 17: hyperparameter search by grid, random sampling, Bayesian optimisation, CMA-ES, multi-fidelity
methods and population-based training.

The searches share chapter 15's search core (:mod:`dlarch_lib.nas`): an objective
``f(config) -> float``, a :class:`~dlarch_lib.nas.SearchSpace`, a ``mode`` (``"min"`` for the
validation error this chapter tunes) and a :class:`~dlarch_lib.nas.SearchResult`; every search is
called ``search(objective, space, budget, *, mode, ...)``, and ``nas.random_search`` is the baseline.
The searches written here work in the unit cube ``[0, 1]^d`` of a space of
:class:`~dlarch_lib.nas.Param` s, which maps a point of the cube to a configuration (log scales,
integer rounding) and back.

- :func:`grid_search`: the other baseline; :func:`grid_points`, :func:`random_points` and
  :func:`distinct_values` show why random points beat a grid when few hyperparameters matter.
- :class:`GaussianProcess` (RBF kernel, Cholesky posterior), :func:`fit_gp` (length scale and
  noise by marginal likelihood), :func:`expected_improvement` and :func:`gp_ei_search`:
  Bayesian optimisation from scratch.
- :class:`CMAES` and :func:`cma_es_search`: the covariance matrix adaptation evolution strategy.
- :func:`optuna_search`: any optuna sampler (TPE for real use) on the same space and budget.
- :class:`DigitsObjective`: the validation error of chapter 2's digits MLP after a short, seeded
  training run with ``train.fit``, the objective the chapter tunes (:data:`DIGITS_HPARAM_SPACE`).
- Multi-fidelity search, with an objective ``f(config, fidelity)``: :func:`successive_halving`
  (rungs from :func:`halving_rungs`), :func:`hyperband` (brackets from :func:`hyperband_brackets`,
  costs from :func:`bracket_cost`), :func:`optuna_pruned_search` (optuna's pruners on a budget of
  training steps), :func:`spearman` (do short runs rank like long ones?) and
  :class:`DigitsFidelityObjective` (the digits MLP after a number of steps, with learning curves).
- Population-based training: :class:`Member`, :func:`exploit`, :func:`explore`, :func:`pbt_round`
  and :func:`population_based_training`.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.linalg import cho_solve, solve_triangular
from scipy.stats import norm
from torch import nn

from dlarch_lib.core.data import Split, TensorBatches
from dlarch_lib.core.runtime import seeded
from dlarch_lib.core.train import accuracy, fit, make_optimizer
from dlarch_lib.modular import MLPConfig, build_model
from dlarch_lib.nas import Config, Objective, Param, SearchResult, SearchSpace, check_budget, check_mode

# ----------------------------------------------------------------------------- points of the unit cube


def _check_box(space: SearchSpace) -> None:
    """Raise unless every dimension of ``space`` is a :class:`Param` (the searches here work in the unit cube)."""
    for dim in space.dimensions:
        if not isinstance(dim, Param):
            raise ValueError(f"this search works in the unit cube of a space of Params; {dim.name!r} is a Choice")


def evaluate_points(
    objective: Objective, space: SearchSpace, points: np.ndarray, *, mode: str, method: str
) -> SearchResult:
    """Evaluate ``objective`` at each row of ``points`` ``(n, d)`` (positions in the unit cube); record the trials."""
    points = np.atleast_2d(np.asarray(points, dtype=float))
    if points.shape[1] != space.ndim:
        raise ValueError(f"points must be (n, {space.ndim}), got {points.shape}")
    result = SearchResult(mode, method)
    for u in points:
        result.evaluate(objective, space, u)
    return result


# ----------------------------------------------------------------------------- grid


def grid_levels(budget: int, dim: int) -> tuple[int, ...]:
    """Points per axis of the largest grid with at most ``budget`` points.

    Start from ``k = floor(budget^(1/d))`` on every axis, then give axes (first ones first)
    one more level while the product stays within the budget: ``grid_levels(24, 4) == (3, 2, 2, 2)``.
    """
    check_budget(budget)
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    k = max(1, int(math.floor(budget ** (1.0 / dim) + 1e-9)))
    levels = [k] * dim
    for i in range(dim):
        if math.prod(levels) // levels[i] * (levels[i] + 1) <= budget:
            levels[i] += 1
    return tuple(levels)


def grid_points(levels: Sequence[int]) -> np.ndarray:
    """The full grid ``(prod(levels), d)`` with ``k`` cell centres ``(i + 1/2) / k`` per axis."""
    if not levels or any(int(k) < 1 for k in levels):
        raise ValueError(f"levels must be positive ints, got {levels!r}")
    axes = [(np.arange(k) + 0.5) / k for k in levels]
    return np.array(list(itertools.product(*axes)), dtype=float)


def random_points(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """``(n, dim)`` points drawn uniformly from the unit cube (seeded): the points ``nas.random_search`` tries."""
    if n < 0 or dim < 1:
        raise ValueError(f"need n >= 0 and dim >= 1, got n={n}, dim={dim}")
    return np.random.default_rng(seed).random((n, dim))


def distinct_values(values: np.ndarray, decimals: int = 9) -> int:
    """Number of distinct entries of a 1-D array (after rounding to ``decimals``)."""
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(f"expected a 1-D array, got shape {values.shape}")
    return len(np.unique(np.round(values, decimals)))


def grid_search(objective: Objective, space: SearchSpace, budget: int, *, mode: str) -> SearchResult:
    """Evaluate the grid of :func:`grid_levels` (at most ``budget`` trials)."""
    _check_box(space)
    return evaluate_points(objective, space, grid_points(grid_levels(budget, space.ndim)), mode=mode, method="grid")


# ----------------------------------------------------------------------------- Gaussian process


def rbf_kernel(a: np.ndarray, b: np.ndarray, lengthscale: float, variance: float = 1.0) -> np.ndarray:
    """``k(a_i, b_j) = variance * exp(-|a_i - b_j|^2 / (2 lengthscale^2))``; a (n, d), b (m, d) -> (n, m)."""
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b need the same number of columns, got {a.shape} and {b.shape}")
    if lengthscale <= 0 or variance <= 0:
        raise ValueError(f"lengthscale and variance must be > 0, got {lengthscale}, {variance}")
    sq = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2.0 * a @ b.T  # (n, m) squared distances
    return variance * np.exp(-np.maximum(sq, 0.0) / (2.0 * lengthscale**2))


class GaussianProcess:
    """GP regression with an RBF kernel and Gaussian noise, solved by a Cholesky factorisation.

    With ``normalize=True`` the targets are standardised before fitting and predictions are
    mapped back (as ``sklearn``'s ``normalize_y``), so ``variance=1`` suits any scale of ``y``.
    """

    def __init__(self, lengthscale: float, variance: float = 1.0, noise: float = 1e-6, normalize: bool = True):
        if lengthscale <= 0 or variance <= 0 or noise < 0:
            raise ValueError(f"need lengthscale, variance > 0 and noise >= 0, got {lengthscale}, {variance}, {noise}")
        self.lengthscale, self.variance, self.noise, self.normalize = lengthscale, variance, noise, normalize
        self.x: np.ndarray | None = None

    def fit(self, x: np.ndarray, y: np.ndarray) -> GaussianProcess:
        """Condition on x ``(n, d)``, y ``(n,)``: ``L L^T = K + noise I``, ``alpha = (K + noise I)^-1 y``."""
        x, y = np.atleast_2d(np.asarray(x, float)), np.asarray(y, float)
        if y.ndim != 1 or len(y) != len(x) or len(y) == 0:
            raise ValueError(f"expected x (n, d) and y (n,) with n >= 1, got {x.shape} and {y.shape}")
        self.y_mean = float(y.mean()) if self.normalize else 0.0
        self.y_std = float(y.std()) if self.normalize and y.std() > 0 else 1.0
        self.x, self.y = x, (y - self.y_mean) / self.y_std
        K = rbf_kernel(x, x, self.lengthscale, self.variance) + self.noise * np.eye(len(x))  # (n, n)
        self.L = np.linalg.cholesky(K)  # lower triangular
        self.alpha = cho_solve((self.L, True), self.y)  # (n,)
        return self

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and standard deviation of the latent function at x ``(m, d)``, each ``(m,)``."""
        if self.x is None:
            raise RuntimeError("call fit() before predict()")
        x = np.atleast_2d(np.asarray(x, float))
        k_star = rbf_kernel(self.x, x, self.lengthscale, self.variance)  # (n, m)
        mean = k_star.T @ self.alpha
        v = solve_triangular(self.L, k_star, lower=True)  # (n, m): L v = k_*
        var = np.maximum(self.variance - (v**2).sum(0), 0.0)  # k(x, x) - k_*^T (K + noise I)^-1 k_*
        return self.y_mean + self.y_std * mean, self.y_std * np.sqrt(var)

    def log_marginal_likelihood(self) -> float:
        """``log p(y | x)`` of the (standardised) targets: ``-y^T alpha / 2 - sum log L_ii - n log(2 pi) / 2``."""
        if self.x is None:
            raise RuntimeError("call fit() first")
        n = len(self.y)
        return float(-0.5 * self.y @ self.alpha - np.log(np.diag(self.L)).sum() - 0.5 * n * math.log(2 * math.pi))


def fit_gp(
    x: np.ndarray,
    y: np.ndarray,
    lengthscales: Sequence[float] = tuple(np.geomspace(0.03, 1.0, 12)),
    noises: Sequence[float] = (1e-6,),
) -> GaussianProcess:
    """The :class:`GaussianProcess` whose (lengthscale, noise) on the given grids maximises the marginal likelihood."""
    best, best_lml = None, -math.inf
    for ls, noise in itertools.product(lengthscales, noises):
        try:
            gp = GaussianProcess(ls, noise=noise).fit(x, y)
        except np.linalg.LinAlgError:  # a too-long length scale with tiny noise: K not numerically SPD
            continue
        lml = gp.log_marginal_likelihood()
        if lml > best_lml:
            best, best_lml = gp, lml
    if best is None:
        raise ValueError("no (lengthscale, noise) pair gave a positive-definite kernel matrix; add noise")
    return best


def expected_improvement(mean: np.ndarray, std: np.ndarray, best: float) -> np.ndarray:
    """``E[max(best - f, 0)]`` for ``f ~ N(mean, std^2)`` (minimisation), elementwise.

    ``(best - mean) Phi(z) + std phi(z)`` with ``z = (best - mean) / std``; ``max(best - mean, 0)`` where ``std = 0``.
    """
    mean, std = np.asarray(mean, float), np.asarray(std, float)
    if mean.shape != std.shape:
        raise ValueError(f"mean and std must have the same shape, got {mean.shape} and {std.shape}")
    if np.any(std < 0):
        raise ValueError("std must be >= 0")
    gap = best - mean
    safe = np.where(std > 0, std, 1.0)
    z = gap / safe
    ei = gap * norm.cdf(z) + safe * norm.pdf(z)
    return np.where(std > 0, ei, np.maximum(gap, 0.0))


def gp_ei_search(
    objective: Objective,
    space: SearchSpace,
    budget: int,
    *,
    mode: str,
    seed: int = 0,
    n_init: int = 4,
    n_candidates: int = 2000,
    noises: Sequence[float] = (1e-6,),
) -> SearchResult:
    """Bayesian optimisation: ``n_init`` random trials, then each trial maximises EI over random candidates.

    Before each proposal a :class:`GaussianProcess` is refitted (:func:`fit_gp`) to all trials so far.
    The GP models the loss to minimise: the value itself (``mode="min"``) or its negative (``"max"``).
    """
    check_budget(budget)
    check_mode(mode)
    _check_box(space)
    if not 1 <= n_init <= budget:
        raise ValueError(f"need 1 <= n_init <= budget, got n_init={n_init}, budget={budget}")
    sign = 1.0 if mode == "min" else -1.0
    rng = np.random.default_rng(seed)
    result = evaluate_points(objective, space, rng.random((n_init, space.ndim)), mode=mode, method="GP-EI")
    while len(result.values) < budget:
        losses = sign * np.array(result.values)  # (n,)
        gp = fit_gp(np.array(result.points), losses, noises=noises)
        candidates = rng.random((n_candidates, space.ndim))  # (c, d)
        mean, std = gp.predict(candidates)
        result.evaluate(objective, space, candidates[np.argmax(expected_improvement(mean, std, losses.min()))])
    return result


# ----------------------------------------------------------------------------- CMA-ES


class CMAES:
    """The (mu/mu_w, lambda)-CMA-ES of Hansen's tutorial, with an ask/tell interface (minimisation).

    Each generation samples ``lambda`` points ``x = m + sigma * B D z``, ``z ~ N(0, I)`` (``C = B D^2 B^T``),
    moves the mean to the weighted average of the ``mu`` best, and adapts ``C`` (rank-one update
    along the evolution path ``p_c`` plus rank-mu update) and ``sigma`` (path length control on ``p_sigma``).
    """

    def __init__(self, mean: np.ndarray, sigma: float, popsize: int | None = None, seed: int = 0):
        self.mean = np.asarray(mean, dtype=float).copy()
        if self.mean.ndim != 1 or len(self.mean) < 1 or sigma <= 0:
            raise ValueError(f"need a 1-D mean and sigma > 0, got shape {self.mean.shape}, sigma={sigma}")
        n = self.dim = len(self.mean)
        self.sigma, self.rng = float(sigma), np.random.default_rng(seed)
        self.popsize = popsize or 4 + int(3 * math.log(n))
        if self.popsize < 2:
            raise ValueError(f"popsize must be >= 2, got {self.popsize}")
        self.mu = self.popsize // 2
        w = math.log(self.mu + 0.5) - np.log(np.arange(1, self.mu + 1))
        self.weights = w / w.sum()  # (mu,), positive, decreasing, sum 1
        self.mueff = 1.0 / (self.weights**2).sum()
        self.cc = (4 + self.mueff / n) / (n + 4 + 2 * self.mueff / n)
        self.cs = (self.mueff + 2) / (n + self.mueff + 5)
        self.c1 = 2 / ((n + 1.3) ** 2 + self.mueff)
        self.cmu = min(1 - self.c1, 2 * (self.mueff - 2 + 1 / self.mueff) / ((n + 2) ** 2 + self.mueff))
        self.damps = 1 + 2 * max(0.0, math.sqrt((self.mueff - 1) / (n + 1)) - 1) + self.cs
        self.chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n**2))  # E|N(0, I)|
        self.pc, self.ps = np.zeros(n), np.zeros(n)
        self.C = np.eye(n)
        self.generation = 0

    def ask(self) -> np.ndarray:
        """``(lambda, d)`` candidate points ``m + sigma * C^(1/2) z``."""
        eigval, B = np.linalg.eigh(self.C)
        self._B, self._D = B, np.sqrt(np.maximum(eigval, 1e-20))
        z = self.rng.standard_normal((self.popsize, self.dim))
        return self.mean + self.sigma * (z * self._D) @ B.T

    def tell(self, x: np.ndarray, values: np.ndarray) -> None:
        """Update mean, paths, covariance and step size from evaluated points x ``(lambda, d)``."""
        x, values = np.asarray(x, float), np.asarray(values, float)
        if x.shape != (self.popsize, self.dim) or values.shape != (self.popsize,):
            raise ValueError(
                f"expected x ({self.popsize}, {self.dim}) and values ({self.popsize},), "
                f"got {x.shape} and {values.shape}"
            )
        n, old = self.dim, self.mean
        elite = x[np.argsort(values)[: self.mu]]  # (mu, d), best first
        self.mean = self.weights @ elite
        y = (self.mean - old) / self.sigma  # the mean's step in sigma units
        c_inv_sqrt = self._B @ np.diag(1 / self._D) @ self._B.T
        self.ps = (1 - self.cs) * self.ps + math.sqrt(self.cs * (2 - self.cs) * self.mueff) * c_inv_sqrt @ y
        self.generation += 1
        ps_norm = np.linalg.norm(self.ps) / math.sqrt(1 - (1 - self.cs) ** (2 * self.generation))
        hsig = float(ps_norm / self.chi_n < 1.4 + 2 / (n + 1))  # stall the rank-one path when sigma grows fast
        self.pc = (1 - self.cc) * self.pc + hsig * math.sqrt(self.cc * (2 - self.cc) * self.mueff) * y
        steps = (elite - old) / self.sigma  # (mu, d)
        rank_mu = (steps * self.weights[:, None]).T @ steps
        delta = (1 - hsig) * self.cc * (2 - self.cc)
        self.C = (
            (1 - self.c1 - self.cmu) * self.C
            + self.c1 * (np.outer(self.pc, self.pc) + delta * self.C)
            + self.cmu * rank_mu
        )
        self.C = (self.C + self.C.T) / 2
        self.sigma *= math.exp((self.cs / self.damps) * (np.linalg.norm(self.ps) / self.chi_n - 1))


def cma_es_search(
    objective: Objective,
    space: SearchSpace,
    budget: int,
    *,
    mode: str,
    seed: int = 0,
    sigma0: float = 0.3,
    popsize: int | None = None,
) -> SearchResult:
    """CMA-ES from the centre of the unit cube; out-of-cube samples are redrawn (up to 20 times), then clipped.

    The last generation is cut short when the budget runs out (its points are evaluated, not told).
    CMA-ES minimises the value itself (``mode="min"``) or its negative (``"max"``).
    """
    check_budget(budget)
    check_mode(mode)
    _check_box(space)
    sign = 1.0 if mode == "min" else -1.0
    es = CMAES(np.full(space.ndim, 0.5), sigma0, popsize=popsize, seed=seed)
    result = SearchResult(mode, "CMA-ES")
    while len(result.values) < budget:
        x = es.ask()
        for _ in range(20):  # resample the points that left the cube
            bad = ((x < 0) | (x > 1)).any(axis=1)
            if not bad.any():
                break
            x[bad] = es.ask()[: bad.sum()]
        x = np.clip(x, 0.0, 1.0)[: budget - len(result.values)]
        values = [result.evaluate(objective, space, u) for u in x]
        if len(x) == es.popsize:
            es.tell(x, sign * np.array(values))
    return result


# ----------------------------------------------------------------------------- optuna


def optuna_search(
    objective: Objective, space: SearchSpace, budget: int, *, mode: str, sampler: Any, method: str = "optuna"
) -> SearchResult:
    """Run an optuna study with ``sampler`` for ``budget`` trials on ``space`` (optuna's logging silenced)."""
    import optuna

    check_budget(budget)
    check_mode(mode)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize", sampler=sampler)
    study.optimize(lambda trial: objective(space.suggest(trial)), n_trials=budget)
    result = SearchResult(mode, method)
    for trial in study.trials:
        if trial.value is None:
            raise RuntimeError(f"optuna trial {trial.number} ended without a value ({trial.state})")
        config = dict(trial.params)
        result.add(space.encode(config), config, trial.value)
    return result


# ----------------------------------------------------------------------------- test functions and the digits objective


def forrester(x: np.ndarray | float) -> np.ndarray:
    """Forrester et al.'s 1-D test function ``(6x - 2)^2 sin(12x - 4)`` on ``[0, 1]``; minimum -6.0207 at x = 0.7572."""
    x = np.asarray(x, dtype=float)
    return (6 * x - 2) ** 2 * np.sin(12 * x - 4)


DIGITS_HPARAM_SPACE = SearchSpace(
    (
        Param("lr", 1e-4, 1.0, log=True),
        Param("weight_decay", 1e-6, 1.0, log=True),
        Param("width", 8, 512, log=True, integer=True),
        Param("dropout", 0.0, 0.8),
    )
)
"""Chapter 17's space for :class:`DigitsObjective`: AdamW learning rate and weight decay, MLP width, dropout."""

DIGITS_DEFAULT: Config = {"lr": 1e-3, "weight_decay": 1e-2, "width": 64, "dropout": 0.0}
"""The configuration one would start from without tuning: AdamW's default lr and weight decay."""

HPARAM_KEYS = ("lr", "weight_decay", "width", "dropout")


class DigitsObjective:
    """Validation error of a one-hidden-layer digits MLP after ``epochs`` of AdamW, trained on ``device``.

    The model is chapter 2's ``MLPConfig(width=..., depth=1, dropout=...)``: flatten, ``Linear(64,
    width)``, ReLU, dropout, ``Linear(width, 10)``. Each call is a fresh training run seeded by ``seed``
    (initialisation, shuffling, dropout), so the objective is a deterministic function of the
    configuration; results are cached, and ``calls`` / ``trainings`` count the work done.
    """

    def __init__(
        self, split: Split, *, device: torch.device | str, epochs: int = 4, batch_size: int = 64, seed: int = 0
    ) -> None:
        if epochs < 1 or batch_size < 1:
            raise ValueError(f"need epochs >= 1 and batch_size >= 1, got {epochs}, {batch_size}")
        self.split, self.epochs, self.batch_size, self.seed = split, epochs, batch_size, seed
        self.device = torch.device(device)
        self.train_data = (split.x_train.to(self.device), split.y_train.to(self.device))  # (N, 1, 8, 8), (N,)
        self.cache: dict[tuple, float] = {}
        self.calls = self.trainings = 0

    def train(self, config: Config) -> nn.Module:
        """Train a fresh model with ``config`` (keys ``lr``, ``weight_decay``, ``width``, ``dropout``); eval mode."""
        missing = set(HPARAM_KEYS) - set(config)
        if missing:
            raise ValueError(f"config lacks {sorted(missing)}")
        mlp = MLPConfig(width=int(config["width"]), depth=1, dropout=float(config["dropout"]))
        with seeded(self.seed):  # initialisation and dropout
            model = build_model(mlp).to(self.device)
            loader = TensorBatches(
                *self.train_data, batch_size=self.batch_size, generator=torch.Generator().manual_seed(self.seed)
            )
            fit(
                model,
                loader,
                epochs=self.epochs,
                lr=config["lr"],
                optimizer="adamw",
                weight_decay=config["weight_decay"],
                progress=False,
            )
        return model.eval()

    @torch.no_grad()
    def error(self, model: nn.Module, part: str = "val") -> float:
        """Classification error of ``model`` (on ``device``) on the ``"val"`` or ``"test"`` split."""
        if part not in ("val", "test"):
            raise ValueError(f"part must be 'val' or 'test', got {part!r}")
        x, y = (self.split.x_val, self.split.y_val) if part == "val" else (self.split.x_test, self.split.y_test)
        model.eval()
        return 1.0 - accuracy(model(x.to(self.device)), y.to(self.device))

    def __call__(self, config: Config) -> float:
        """Validation error of ``config`` (cached)."""
        self.calls += 1
        key = tuple(sorted((k, round(float(v), 12)) for k, v in config.items()))
        if key not in self.cache:
            self.trainings += 1
            self.cache[key] = self.error(self.train(config), "val")
        return self.cache[key]


# ----------------------------------------------------------------------------- multi-fidelity search

FidelityObjective = Callable[[Config, int], float]
"""``f(config, fidelity) -> float``: the objective after a training run of ``fidelity`` resource units (steps)."""

CurveObjective = Callable[[Config, Sequence[int], Callable[[int, float], bool] | None], list[float]]
"""``curve(config, fidelities, report) -> values``: one training run evaluated at each (increasing) fidelity;
``report(fidelity, value)`` is called after each evaluation and stops the run early by returning ``True``."""


def _check_eta(eta: int, min_fidelity: int) -> None:
    """Raise unless the reduction factor is an int >= 2 and the smallest fidelity an int >= 1."""
    if isinstance(eta, bool) or not isinstance(eta, int) or eta < 2:
        raise ValueError(f"eta (the reduction factor) must be an int >= 2, got {eta!r}")
    if isinstance(min_fidelity, bool) or not isinstance(min_fidelity, int) or min_fidelity < 1:
        raise ValueError(f"min_fidelity must be an int >= 1, got {min_fidelity!r}")


def halving_rungs(n: int, min_fidelity: int, eta: int, rungs: int | None = None) -> list[tuple[int, int]]:
    """The rungs ``[(n_i, r_i)]`` of successive halving: ``n_i = floor(n / eta^i)`` configurations at fidelity
    ``r_i = min_fidelity * eta^i``, for ``i = 0 .. rungs - 1``.

    ``rungs`` defaults to ``floor(log_eta n) + 1``, the most rungs that keep at least one configuration.
    The cost of the bracket is ``sum_i n_i r_i``: ``n * min_fidelity * rungs`` when ``n`` is a power of ``eta``.
    """
    check_budget(n)
    _check_eta(eta, min_fidelity)
    most = 1
    while n // eta**most >= 1:
        most += 1
    rungs = most if rungs is None else rungs
    if isinstance(rungs, bool) or not isinstance(rungs, int) or not 1 <= rungs <= most:
        raise ValueError(
            f"rungs must be an int in 1..{most} for n={n}, eta={eta} (each rung keeps >= 1), got {rungs!r}"
        )
    return [(n // eta**i, min_fidelity * eta**i) for i in range(rungs)]


def hyperband_brackets(max_fidelity: int, min_fidelity: int, eta: int) -> list[list[tuple[int, int]]]:
    """Li et al.'s brackets, most aggressive first: bracket ``s = s_max .. 0`` is successive halving with
    ``n_s = ceil((s_max + 1) eta^s / (s + 1))`` configurations from fidelity ``R eta^-s`` over ``s + 1`` rungs.

    ``R = max_fidelity`` must be ``min_fidelity * eta^s_max`` for an int ``s_max >= 0``.
    """
    _check_eta(eta, min_fidelity)
    s_max, r = 0, min_fidelity
    while r < max_fidelity:
        r, s_max = r * eta, s_max + 1
    if r != max_fidelity:
        raise ValueError(
            f"max_fidelity must be min_fidelity * eta^k; got max_fidelity={max_fidelity}, "
            f"min_fidelity={min_fidelity}, eta={eta}"
        )
    brackets = []
    for s in range(s_max, -1, -1):
        n = -(-(s_max + 1) * eta**s // (s + 1))  # ceil, in integers
        brackets.append(halving_rungs(n, max_fidelity // eta**s, eta, rungs=s + 1))
    return brackets


def bracket_cost(rungs: Sequence[tuple[int, int]]) -> int:
    """Resource units a bracket spends when every run starts from scratch: ``sum_i n_i r_i``."""
    return sum(n * r for n, r in rungs)


def _halving(
    objective: FidelityObjective,
    space: SearchSpace,
    rungs: Sequence[tuple[int, int]],
    rng: np.random.Generator,
    sign: float,
    result: SearchResult,
) -> None:
    """Run one bracket: sample ``rungs[0][0]`` points, evaluate each rung, keep the best ``n_{i+1}``.

    The evaluations at the last rung go to ``result``; every evaluation goes to ``result.extra``.
    """
    points = [space.validate(space.sample(rng)) for _ in range(rungs[0][0])]
    for i, (n, r) in enumerate(rungs):
        values = []
        for p in points[:n]:
            config = space.decode(p)
            value = float(objective(config, r))
            values.append(value)
            result.extra["evaluations"].append((p, config, r, value))
            result.extra["cost"] += r
            if i == len(rungs) - 1:
                result.add(p, config, value)
        order = sorted(range(len(values)), key=lambda k: (-sign * values[k], k))  # best first, stable on ties
        points = [points[k] for k in order]


def _multifidelity_result(mode: str, method: str) -> SearchResult:
    result = SearchResult(mode, method)
    result.extra.update(evaluations=[], cost=0, brackets=[])
    return result


def successive_halving(
    objective: FidelityObjective,
    space: SearchSpace,
    budget: int,
    *,
    mode: str,
    seed: int = 0,
    min_fidelity: int = 1,
    eta: int = 3,
    rungs: int | None = None,
) -> SearchResult:
    """Successive halving (Jamieson & Talwalkar, 2016) of ``budget`` random configurations.

    Rung ``i`` trains the ``floor(budget / eta^i)`` best configurations of the previous rung, each from
    scratch, at fidelity ``min_fidelity * eta^i`` (see :func:`halving_rungs`). ``objective(config, fidelity)``
    returns the value after that much training. The result's trials are those of the last rung (one
    fidelity, so their values compare); ``extra["evaluations"]`` holds every ``(point, config, fidelity,
    value)``, ``extra["cost"]`` the fidelity spent and ``extra["brackets"]`` the rungs.
    """
    check_mode(mode)
    plan = halving_rungs(budget, min_fidelity, eta, rungs)
    result = _multifidelity_result(mode, "SH")
    result.extra["brackets"].append(plan)
    _halving(objective, space, plan, np.random.default_rng(seed), 1.0 if mode == "max" else -1.0, result)
    return result


def hyperband(
    objective: FidelityObjective,
    space: SearchSpace,
    max_fidelity: int,
    *,
    mode: str,
    seed: int = 0,
    min_fidelity: int = 1,
    eta: int = 3,
) -> SearchResult:
    """Hyperband (Li et al., 2018): successive halving over the brackets of :func:`hyperband_brackets`.

    Every bracket ends at ``max_fidelity``, so the result's trials (the last rung of each bracket) compare.
    ``extra`` is as in :func:`successive_halving`, with one entry per bracket in ``extra["brackets"]``.
    """
    check_mode(mode)
    plan = hyperband_brackets(max_fidelity, min_fidelity, eta)
    result = _multifidelity_result(mode, "Hyperband")
    rng = np.random.default_rng(seed)
    for rungs in plan:
        result.extra["brackets"].append(rungs)
        _halving(objective, space, rungs, rng, 1.0 if mode == "max" else -1.0, result)
    return result


def optuna_pruned_search(
    curve: CurveObjective,
    space: SearchSpace,
    total_fidelity: int,
    *,
    mode: str,
    fidelities: Sequence[int],
    sampler: Any,
    pruner: Any,
    method: str = "optuna+pruner",
) -> SearchResult:
    """An optuna study whose trials report at each of ``fidelities`` and stop when ``pruner`` says so.

    Trials run one after another until ``total_fidelity`` resource units are spent; a trial whose next
    segment would exceed what is left is stopped there and counts as pruned. The result's trials are the
    completed ones (value at ``fidelities[-1]``); ``extra["cost"]`` is the fidelity spent,
    ``extra["pruned"]`` the number of pruned trials and ``extra["evaluations"]`` every reported value.
    """
    import optuna

    check_budget(total_fidelity)
    check_mode(mode)
    fidelities = [int(r) for r in fidelities]
    if not fidelities or fidelities[0] < 1 or any(b <= a for a, b in zip(fidelities, fidelities[1:])):
        raise ValueError(f"fidelities must be increasing positive ints, got {fidelities}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    result = _multifidelity_result(mode, method)
    result.extra["pruned"] = 0
    study = optuna.create_study(  # a fixed name: HyperbandPruner assigns trials to brackets by hashing it
        study_name=method, direction="maximize" if mode == "max" else "minimize", sampler=sampler, pruner=pruner
    )

    def run(trial: Any) -> float:
        config = space.suggest(trial)
        state = {"spent": 0, "pruned": False}

        def report(fidelity: int, value: float) -> bool:
            state["spent"] = fidelity
            result.extra["evaluations"].append((space.encode(config), config, fidelity, value))
            if fidelity == fidelities[-1]:
                return False
            trial.report(value, fidelity)
            nxt = fidelities[fidelities.index(fidelity) + 1]
            if trial.should_prune() or result.extra["cost"] + nxt > total_fidelity:
                state["pruned"] = True
                return True
            return False

        values = curve(config, fidelities, report)
        result.extra["cost"] += state["spent"]
        if state["pruned"]:
            result.extra["pruned"] += 1
            raise optuna.TrialPruned()
        result.add(space.encode(config), config, values[-1])
        return values[-1]

    while result.extra["cost"] + fidelities[0] <= total_fidelity:
        study.optimize(run, n_trials=1)
    return result


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks ``1 .. n`` of a 1-D array (smallest first); tied entries share the mean of their ranks."""
    x = np.asarray(x, dtype=float)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"expected a non-empty 1-D array, got shape {x.shape}")
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):  # ties: the average of the ranks they occupy
        tied = x == value
        r[tied] = r[tied].mean()
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation: the Pearson correlation of the ranks of ``a`` and ``b`` (each ``(n,)``)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"need two 1-D arrays of one length >= 2, got shapes {a.shape} and {b.shape}")
    ra, rb = ranks(a) - (len(a) + 1) / 2, ranks(b) - (len(b) + 1) / 2  # centred ranks
    denom = math.sqrt(float((ra**2).sum() * (rb**2).sum()))
    if denom == 0:
        raise ValueError("spearman is undefined when one of the arrays is constant")
    return float((ra * rb).sum() / denom)


# ----------------------------------------------------------------------------- population-based training


@dataclass
class Member:
    """One member of a PBT population: a model, its optimizer, its hyperparameters and its own data stream.

    ``hparams`` are the optimizer's settings (keys of its param groups, e.g. ``lr``); ``schedule`` lists
    the hyperparameters of every interval trained so far, inherited from the member it copied on exploit.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    hparams: dict[str, float]
    data: Iterator[Any]
    schedule: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.apply()

    def apply(self) -> None:
        """Write ``hparams`` into every param group of the optimizer (each key must be a group setting)."""
        for group in self.optimizer.param_groups:
            for name, value in self.hparams.items():
                if name not in group:
                    raise ValueError(f"{name!r} is not a setting of the optimizer's param groups")
                group[name] = float(value)


def exploit(dst: Member, src: Member) -> None:
    """``dst`` becomes a copy of ``src``: weights, optimizer state (deep-copied, so they share no tensor),
    hyperparameters and schedule. ``dst`` keeps its own data stream."""
    if dst is src:
        raise ValueError("a member cannot exploit itself")
    dst.model.load_state_dict(src.model.state_dict())  # copies into dst's own parameters
    dst.optimizer.load_state_dict(copy.deepcopy(src.optimizer.state_dict()))  # the optimizer would alias tensors
    dst.hparams = dict(src.hparams)
    dst.schedule = [dict(h) for h in src.schedule]
    dst.apply()


def explore(
    member: Member,
    rng: np.random.Generator,
    factors: Sequence[float] = (0.8, 1.25),
    bounds: dict[str, tuple[float, float]] | None = None,
) -> None:
    """Multiply each hyperparameter by a factor drawn uniformly from ``factors``, clip it into ``bounds``."""
    if not factors or any(f <= 0 for f in factors):
        raise ValueError(f"factors must be positive, got {factors}")
    for name in sorted(member.hparams):
        value = member.hparams[name] * float(factors[int(rng.integers(len(factors)))])
        if bounds and name in bounds:
            value = min(max(value, bounds[name][0]), bounds[name][1])
        member.hparams[name] = value
    member.apply()


def pbt_round(
    population: Sequence[Member],
    scores: Sequence[float],
    *,
    mode: str,
    rng: np.random.Generator,
    fraction: float = 0.25,
    factors: Sequence[float] = (0.8, 1.25),
    bounds: dict[str, tuple[float, float]] | None = None,
) -> list[tuple[int, int]]:
    """Truncation selection: each of the worst ``k = max(1, floor(fraction * N))`` members exploits a
    member drawn uniformly from the best ``k``, then explores. Returns the ``(dst, src)`` pairs."""
    check_mode(mode)
    n = len(population)
    if len(scores) != n or n < 2:
        raise ValueError(f"need one score per member and >= 2 members, got {len(scores)} scores, {n} members")
    if not 0 < fraction <= 0.5:
        raise ValueError(f"fraction must be in (0, 0.5], got {fraction}")
    k = max(1, int(fraction * n))
    sign = 1.0 if mode == "max" else -1.0
    order = sorted(range(n), key=lambda i: (-sign * float(scores[i]), i))  # best first
    copies = []
    for dst in order[n - k :]:
        src = order[int(rng.integers(k))]
        exploit(population[dst], population[src])
        explore(population[dst], rng, factors, bounds)
        copies.append((dst, src))
    return copies


@dataclass
class PBTResult:
    """What :func:`population_based_training` recorded, one row per interval: ``scores`` ``(T, N)`` after
    training, ``hparams[name]`` ``(T, N)`` used during it, and the ``(dst, src)`` copies made after it."""

    mode: str
    scores: np.ndarray
    hparams: dict[str, np.ndarray]
    copies: list[list[tuple[int, int]]]
    population_sizes: list[int]

    @property
    def best_member(self) -> int:
        """Index of the best member after the last interval."""
        last = self.scores[-1]
        return int(np.argmax(last) if self.mode == "max" else np.argmin(last))

    @property
    def best_score(self) -> float:
        """The best member's score after the last interval."""
        return float(self.scores[-1, self.best_member])


def population_based_training(
    population: Sequence[Member],
    score: Callable[[Member], float],
    *,
    intervals: int,
    steps: int,
    mode: str,
    seed: int = 0,
    fraction: float = 0.25,
    factors: Sequence[float] = (0.8, 1.25),
    bounds: dict[str, tuple[float, float]] | None = None,
    adapt: bool = True,
) -> PBTResult:
    """PBT (Jaderberg et al., 2017): train every member ``steps`` steps (``train.fit`` on its data stream),
    score it, and between intervals let :func:`pbt_round` replace the worst by perturbed copies of the best.

    With ``adapt=False`` no member is ever replaced: the same compute with fixed hyperparameters.
    """
    check_mode(mode)
    if intervals < 1 or steps < 1:
        raise ValueError(f"need intervals >= 1 and steps >= 1, got {intervals}, {steps}")
    rng = np.random.default_rng(seed)
    names = sorted(population[0].hparams)
    scores = np.zeros((intervals, len(population)))
    hparams = {name: np.zeros((intervals, len(population))) for name in names}
    copies: list[list[tuple[int, int]]] = []
    sizes = []
    for t in range(intervals):
        for i, member in enumerate(population):
            for name in names:
                hparams[name][t, i] = member.hparams[name]
            member.schedule.append(dict(member.hparams))
            fit(member.model, member.data, steps=steps, optimizer=member.optimizer, progress=False)
            scores[t, i] = score(member)
        sizes.append(len(population))
        if adapt and t < intervals - 1:
            copies.append(
                pbt_round(population, scores[t], mode=mode, rng=rng, fraction=fraction, factors=factors, bounds=bounds)
            )
    return PBTResult(mode, scores, hparams, copies, sizes)


# ----------------------------------------------------------------------------- the digits MLP at a fidelity


def endless_batches(
    x: torch.Tensor, y: torch.Tensor, *, batch_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Shuffled mini-batches of ``(x, y)`` without end: pass after pass of :class:`TensorBatches`."""
    loader = TensorBatches(x, y, batch_size=batch_size, generator=torch.Generator().manual_seed(seed))
    while True:
        yield from loader


class DigitsFidelityObjective:
    """:class:`DigitsObjective` with a fidelity: the validation error after ``fidelity`` AdamW *steps*.

    One run of ``r`` steps is the first ``r`` steps of a longer run (same initialisation, batches and
    dropout draws, constant learning rate), so :meth:`curve` reads a whole learning curve from one run.
    ``steps`` counts the optimizer steps actually taken and ``runs`` the training runs started.
    """

    def __init__(self, split: Split, *, device: torch.device | str, batch_size: int = 128, seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.device = torch.device(device)
        self.train_data = (split.x_train.to(self.device), split.y_train.to(self.device))  # (N, 1, 8, 8), (N,)
        self.val_data = (split.x_val.to(self.device), split.y_val.to(self.device))
        self.steps = self.runs = 0

    def curve(
        self, config: Config, fidelities: Sequence[int], report: Callable[[int, float], bool] | None = None
    ) -> list[float]:
        """Validation errors after each of the increasing ``fidelities`` (steps) of one training run.

        ``report(fidelity, error)`` is called after each evaluation; if it returns ``True`` the run stops.
        """
        missing = set(HPARAM_KEYS) - set(config)
        if missing:
            raise ValueError(f"config lacks {sorted(missing)}")
        fids = [int(r) for r in fidelities]
        if not fids or fids[0] < 1 or any(b <= a for a, b in zip(fids, fids[1:])):
            raise ValueError(f"fidelities must be increasing positive ints, got {list(fidelities)}")
        mlp = MLPConfig(width=int(config["width"]), depth=1, dropout=float(config["dropout"]))
        values: list[float] = []
        self.runs += 1
        with seeded(self.seed):  # initialisation and dropout
            model = build_model(mlp).to(self.device)
            optimizer = make_optimizer(model, "adamw", float(config["lr"]), float(config["weight_decay"]))
            data = endless_batches(*self.train_data, batch_size=self.batch_size, seed=self.seed)
            done = 0
            for r in fids:
                self.steps += fit(model, data, steps=r - done, optimizer=optimizer, progress=False).steps
                done = r
                with torch.no_grad():
                    model.eval()
                    values.append(1.0 - accuracy(model(self.val_data[0]), self.val_data[1]))
                if report is not None and report(r, values[-1]):
                    break
        return values

    def __call__(self, config: Config, fidelity: int) -> float:
        """Validation error after a fresh run of ``fidelity`` steps."""
        return self.curve(config, [fidelity])[0]
