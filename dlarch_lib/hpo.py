"""Chapter 17: hyperparameter search by grid, random sampling, Bayesian optimisation and CMA-ES.

Every search *minimises* an objective ``f(config) -> float`` over a :class:`SearchSpace`.
The searches written here work in the unit cube ``[0, 1]^d``; the space maps a point of
the cube to a configuration (log scales, integer rounding) and back.

- :func:`grid_search` and :func:`random_search`: the two baselines.
- :class:`GaussianProcess` (RBF kernel, Cholesky posterior), :func:`fit_gp` (length scale and
  noise by marginal likelihood), :func:`expected_improvement` and :func:`gp_ei_search`:
  Bayesian optimisation from scratch.
- :class:`CMAES` and :func:`cma_es_search`: the covariance matrix adaptation evolution strategy.
- :func:`optuna_search`: any optuna sampler (TPE for real use) on the same space and budget.
- :class:`DigitsObjective`: the validation error of a small digits MLP after a short, seeded
  training run, the objective the chapter tunes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.linalg import cho_solve, solve_triangular
from scipy.stats import norm
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from dlarch_lib.core.data import Split
from dlarch_lib.core.train import accuracy, fit

Config = dict[str, Any]
Objective = Callable[[Config], float]


# ----------------------------------------------------------------------------- search space


@dataclass(frozen=True)
class Param:
    """One hyperparameter in ``[low, high]``; ``log`` searches its logarithm, ``integer`` rounds it."""

    name: str
    low: float
    high: float
    log: bool = False
    integer: bool = False

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ValueError(f"param {self.name!r}: need low < high, got [{self.low}, {self.high}]")
        if self.log and self.low <= 0:
            raise ValueError(f"param {self.name!r}: a log scale needs low > 0, got {self.low}")

    def decode(self, u: float) -> float | int:
        """The value at position ``u`` in ``[0, 1]`` (0 is ``low``, 1 is ``high``)."""
        u = min(max(float(u), 0.0), 1.0)
        if self.log:
            value = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        else:
            value = self.low + u * (self.high - self.low)
        return int(round(value)) if self.integer else value

    def encode(self, value: float) -> float:
        """Inverse of :meth:`decode`: the position of ``value`` in ``[0, 1]``."""
        if not self.low <= value <= self.high:
            raise ValueError(f"param {self.name!r}: {value} is outside [{self.low}, {self.high}]")
        if self.log:
            return (math.log(value) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return (value - self.low) / (self.high - self.low)


@dataclass(frozen=True)
class SearchSpace:
    """An ordered set of :class:`Param`; point ``u`` of ``[0, 1]^d`` <-> configuration dict."""

    params: tuple[Param, ...]

    def __post_init__(self) -> None:
        names = [p.name for p in self.params]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"a search space needs at least one param and unique names, got {names}")

    @property
    def dim(self) -> int:
        """Number of hyperparameters ``d``."""
        return len(self.params)

    @property
    def names(self) -> list[str]:
        """The parameter names, in order."""
        return [p.name for p in self.params]

    def decode(self, u: np.ndarray) -> Config:
        """Configuration at the point ``u`` of shape ``(d,)``."""
        u = np.asarray(u, dtype=float)
        if u.shape != (self.dim,):
            raise ValueError(f"expected a point of shape ({self.dim},), got {u.shape}")
        return {p.name: p.decode(ui) for p, ui in zip(self.params, u)}

    def encode(self, config: Config) -> np.ndarray:
        """The point ``(d,)`` of a configuration (inverse of :meth:`decode` up to rounding)."""
        missing = set(self.names) - set(config)
        if missing:
            raise ValueError(f"config lacks {sorted(missing)}")
        return np.array([p.encode(config[p.name]) for p in self.params])

    def suggest(self, trial: Any) -> Config:
        """Ask an optuna ``trial`` for a configuration of this space."""
        config: Config = {}
        for p in self.params:
            if p.integer:
                config[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log)
            else:
                config[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log)
        return config


@dataclass
class SearchResult:
    """What a search tried, in order: configurations, unit-cube points ``(n, d)``, values ``(n,)``."""

    method: str
    configs: list[Config] = field(default_factory=list)
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    values: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def best_so_far(self) -> np.ndarray:
        """``(n,)``: the lowest value among the first ``t + 1`` trials, for each ``t``."""
        return np.minimum.accumulate(self.values)

    @property
    def best_index(self) -> int:
        """Index of the best (lowest) trial; the first one on ties."""
        if len(self.values) == 0:
            raise ValueError("the search has no trials")
        return int(np.argmin(self.values))

    @property
    def best_value(self) -> float:
        """The lowest objective value found."""
        return float(self.values[self.best_index])

    @property
    def best_config(self) -> Config:
        """The configuration with the lowest value."""
        return self.configs[self.best_index]


def _check_budget(budget: int) -> None:
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget (number of trials) must be a positive int, got {budget!r}")


def evaluate_points(objective: Objective, space: SearchSpace, points: np.ndarray, method: str) -> SearchResult:
    """Evaluate ``objective`` at each row of ``points`` ``(n, d)`` and record the trials."""
    points = np.atleast_2d(np.asarray(points, dtype=float))
    if points.shape[1] != space.dim:
        raise ValueError(f"points must be (n, {space.dim}), got {points.shape}")
    configs = [space.decode(u) for u in points]
    values = np.array([float(objective(c)) for c in configs])
    return SearchResult(method, configs, points, values)


# ----------------------------------------------------------------------------- grid and random


def grid_levels(budget: int, dim: int) -> tuple[int, ...]:
    """Points per axis of the largest grid with at most ``budget`` points.

    Start from ``k = floor(budget^(1/d))`` on every axis, then give axes (first ones first)
    one more level while the product stays within the budget: ``grid_levels(24, 4) == (3, 2, 2, 2)``.
    """
    _check_budget(budget)
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
    """``(n, dim)`` points drawn uniformly from the unit cube (seeded)."""
    if n < 0 or dim < 1:
        raise ValueError(f"need n >= 0 and dim >= 1, got n={n}, dim={dim}")
    return np.random.default_rng(seed).random((n, dim))


def distinct_values(values: np.ndarray, decimals: int = 9) -> int:
    """Number of distinct entries of a 1-D array (after rounding to ``decimals``)."""
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(f"expected a 1-D array, got shape {values.shape}")
    return len(np.unique(np.round(values, decimals)))


def grid_search(objective: Objective, space: SearchSpace, budget: int) -> SearchResult:
    """Evaluate the grid of :func:`grid_levels` (at most ``budget`` trials)."""
    return evaluate_points(objective, space, grid_points(grid_levels(budget, space.dim)), "grid")


def random_search(objective: Objective, space: SearchSpace, budget: int, seed: int = 0) -> SearchResult:
    """Evaluate ``budget`` uniformly random points of the unit cube."""
    _check_budget(budget)
    return evaluate_points(objective, space, random_points(budget, space.dim, seed), "random")


# ----------------------------------------------------------------------------- Gaussian process


def rbf_kernel(a: np.ndarray, b: np.ndarray, lengthscale: float, variance: float = 1.0) -> np.ndarray:
    """``k(a_i, b_j) = variance * exp(-|a_i - b_j|^2 / (2 lengthscale^2))``; a ``(n, d)``, b ``(m, d)`` -> ``(n, m)``."""
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
        """Condition on observations x ``(n, d)``, y ``(n,)``: ``L L^T = K + noise I``, ``alpha = (K + noise I)^-1 y``."""
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
    seed: int = 0,
    n_init: int = 4,
    n_candidates: int = 2000,
    noises: Sequence[float] = (1e-6,),
) -> SearchResult:
    """Bayesian optimisation: ``n_init`` random trials, then each trial maximises EI over random candidates.

    Before each proposal a :class:`GaussianProcess` is refitted (:func:`fit_gp`) to all trials so far.
    """
    _check_budget(budget)
    if not 1 <= n_init <= budget:
        raise ValueError(f"need 1 <= n_init <= budget, got n_init={n_init}, budget={budget}")
    rng = np.random.default_rng(seed)
    result = evaluate_points(objective, space, rng.random((n_init, space.dim)), "GP-EI")
    points, values = list(result.points), list(result.values)
    while len(values) < budget:
        gp = fit_gp(np.array(points), np.array(values), noises=noises)
        candidates = rng.random((n_candidates, space.dim))  # (c, d)
        mean, std = gp.predict(candidates)
        u = candidates[np.argmax(expected_improvement(mean, std, min(values)))]
        config = space.decode(u)
        points.append(u)
        values.append(float(objective(config)))
        result.configs.append(config)
    result.points, result.values = np.array(points), np.array(values)
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
    seed: int = 0,
    sigma0: float = 0.3,
    popsize: int | None = None,
) -> SearchResult:
    """CMA-ES from the centre of the unit cube; out-of-cube samples are redrawn (up to 20 times), then clipped.

    The last generation is cut short when the budget runs out (its points are evaluated, not told).
    """
    _check_budget(budget)
    es = CMAES(np.full(space.dim, 0.5), sigma0, popsize=popsize, seed=seed)
    result = SearchResult("CMA-ES", [], np.zeros((0, space.dim)), np.zeros(0))
    while len(result.values) < budget:
        x = es.ask()
        for _ in range(20):  # resample the points that left the cube
            bad = ((x < 0) | (x > 1)).any(axis=1)
            if not bad.any():
                break
            x[bad] = es.ask()[: bad.sum()]
        x = np.clip(x, 0.0, 1.0)[: budget - len(result.values)]
        batch = evaluate_points(objective, space, x, "CMA-ES")
        result.configs += batch.configs
        result.points = np.vstack([result.points, batch.points])
        result.values = np.concatenate([result.values, batch.values])
        if len(x) == es.popsize:
            es.tell(x, batch.values)
    return result


# ----------------------------------------------------------------------------- optuna


def optuna_search(objective: Objective, space: SearchSpace, budget: int, sampler: Any, method: str) -> SearchResult:
    """Run an optuna study with ``sampler`` for ``budget`` trials on ``space`` (optuna's logging silenced)."""
    import optuna

    _check_budget(budget)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    study.optimize(lambda trial: objective(space.suggest(trial)), n_trials=budget)
    configs = [dict(t.params) for t in study.trials]
    values = np.array([t.value for t in study.trials], dtype=float)
    return SearchResult(method, configs, np.array([space.encode(c) for c in configs]), values)


# ----------------------------------------------------------------------------- test functions and the digits objective


def forrester(x: np.ndarray | float) -> np.ndarray:
    """Forrester et al.'s 1-D test function ``(6x - 2)^2 sin(12x - 4)`` on ``[0, 1]``; minimum -6.0207 at x = 0.7572."""
    x = np.asarray(x, dtype=float)
    return (6 * x - 2) ** 2 * np.sin(12 * x - 4)


DIGITS_SPACE = SearchSpace(
    (
        Param("lr", 1e-4, 1.0, log=True),
        Param("weight_decay", 1e-6, 1.0, log=True),
        Param("width", 8, 512, log=True, integer=True),
        Param("dropout", 0.0, 0.8),
    )
)
"""The chapter's search space for :class:`DigitsObjective` (AdamW learning rate and weight decay, MLP width, dropout)."""

DIGITS_DEFAULT: Config = {"lr": 1e-3, "weight_decay": 1e-2, "width": 64, "dropout": 0.0}
"""The configuration one would start from without tuning: AdamW's default lr and weight decay."""


def digits_mlp(width: int, dropout: float) -> nn.Sequential:
    """``(N, 1, 8, 8) -> (N, 10)``: flatten, Linear(64, width), ReLU, Dropout, Linear(width, 10)."""
    if int(width) < 1 or not 0.0 <= dropout < 1.0:
        raise ValueError(f"need width >= 1 and dropout in [0, 1), got width={width}, dropout={dropout}")
    width = int(width)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, 10))


class DigitsObjective:
    """Validation error of :func:`digits_mlp` after ``epochs`` of AdamW on the digits train split.

    Each call is a fresh, seeded training run, so the objective is a deterministic function of the
    configuration; results are cached, and ``calls`` / ``trainings`` count the work done.
    """

    def __init__(self, split: Split, epochs: int = 4, batch_size: int = 64, seed: int = 0):
        if epochs < 1 or batch_size < 1:
            raise ValueError(f"need epochs >= 1 and batch_size >= 1, got {epochs}, {batch_size}")
        self.split, self.epochs, self.batch_size, self.seed = split, epochs, batch_size, seed
        self.cache: dict[tuple, float] = {}
        self.calls = self.trainings = 0

    def train(self, config: Config) -> nn.Module:
        """Train a fresh model with ``config`` (keys ``lr``, ``weight_decay``, ``width``, ``dropout``)."""
        missing = {"lr", "weight_decay", "width", "dropout"} - set(config)
        if missing:
            raise ValueError(f"config lacks {sorted(missing)}")
        torch.manual_seed(self.seed)
        model = digits_mlp(config["width"], config["dropout"])
        data = TensorDataset(self.split.x_train, self.split.y_train)
        # Batches by index lists: one tensor gather per batch instead of per-sample collation.
        sampler = BatchSampler(
            RandomSampler(data, generator=torch.Generator().manual_seed(self.seed)), self.batch_size, drop_last=False
        )
        loader = DataLoader(data, batch_size=None, sampler=sampler)
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
        """Classification error of ``model`` on the ``"val"`` or ``"test"`` split."""
        if part not in ("val", "test"):
            raise ValueError(f"part must be 'val' or 'test', got {part!r}")
        x, y = (self.split.x_val, self.split.y_val) if part == "val" else (self.split.x_test, self.split.y_test)
        return 1.0 - accuracy(model(x), y)

    def __call__(self, config: Config) -> float:
        """Validation error of ``config`` (cached)."""
        self.calls += 1
        key = tuple(sorted((k, round(float(v), 12)) for k, v in config.items()))
        if key not in self.cache:
            self.trainings += 1
            self.cache[key] = self.error(self.train(config), "val")
        return self.cache[key]
