"""Chapter 17: hyperparameter search by grid, random sampling, Bayesian optimisation and CMA-ES.

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
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.linalg import cho_solve, solve_triangular
from scipy.stats import norm
from torch import nn

from dlarch_lib.core.data import Split, TensorBatches
from dlarch_lib.core.runtime import seeded
from dlarch_lib.core.train import accuracy, fit
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
