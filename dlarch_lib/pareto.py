"""Chapter 16: search with two objectives, accuracy and latency (multi-objective NAS).

A deployed network is judged on more than accuracy. With several objectives, all *minimised*
(an error, a latency), one point **dominates** another when it is no worse in every objective
and better in one; the points no evaluated point dominates form the **Pareto front**, the menu of
best trade-offs. The module holds

- :func:`dominates`, :func:`pareto_mask` and :func:`non_dominated_sort` (the fronts of Deb et al.,
  2002), :func:`crowding_distance`, and the 2-D :func:`hypervolume`, the area a front dominates
  up to a reference point (larger is better; the measure the searches are compared by);
- :class:`ParetoResult`: what a multi-objective search evaluated, in order;
- three searches called the same way, ``search(objectives, space, budget, *, seed, ...)``:
  :func:`random_pareto_search`, :func:`nsga2` (non-dominated sorting, crowding, binary
  tournaments, uniform crossover and chapter 16's :func:`~dlarch_lib.nas.mutate`) and
  :func:`pareto_local_search` (Paquete et al., 2004: explore the one-change neighbours of the
  archive's members), and :func:`optuna_pareto_search`, optuna's ``NSGAIISampler`` on the same space;
- :func:`latency_ms`: the batch-1 latency of chapter 15's digits MLPs on a device, the second objective.

Every evaluation counts against the budget, repeats included, as in chapter 16's race.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dlarch_lib.core.measure import best_ms, inference_call
from dlarch_lib.core.runtime import seeded
from dlarch_lib.nas import (
    NETWORK_KEYS,
    Arch,
    Config,
    SearchSpace,
    build_network,
    canonical_config,
    check_budget,
    mutate,
)

Objectives = Callable[[Config], Sequence[float]]
"""Maps a configuration to the values a multi-objective search minimises, one per objective."""


def _check_values(values: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    f = np.asarray(values, dtype=np.float64)
    if f.ndim != 2 or f.shape[1] < 1:
        raise ValueError(f"objective values must be an (n, m) array with m >= 1, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("objective values must be finite")
    return f


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """Does ``a`` Pareto-dominate ``b`` (all minimised): no worse in every objective, better in one?"""
    fa, fb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if fa.shape != fb.shape or fa.ndim != 1:
        raise ValueError(f"a and b must be vectors of one length, got shapes {fa.shape} and {fb.shape}")
    return bool((fa <= fb).all() and (fa < fb).any())


def pareto_mask(values: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """``(n,)`` bool: which rows of ``values`` ``(n, m)`` no other row dominates (ties are all kept)."""
    f = _check_values(values)
    no_worse = (f[:, None, :] <= f[None, :, :]).all(-1)  # (n, n): row j no worse than row i, at [j, i]
    better = (f[:, None, :] < f[None, :, :]).any(-1)  # (n, n)
    return np.asarray(~(no_worse & better).any(0))


def non_dominated_sort(values: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """``(n,)`` int: the front of each row, 0 for the Pareto front, 1 for the front once 0 is removed, ...

    The fronts of NSGA-II (Deb et al., 2002), found by peeling off :func:`pareto_mask` repeatedly.
    """
    f = _check_values(values)
    rank = np.full(len(f), -1)
    left = np.arange(len(f))
    front = 0
    while len(left):
        on_front = pareto_mask(f[left])
        rank[left[on_front]] = front
        left = left[~on_front]
        front += 1
    return rank


def crowding_distance(values: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """``(n,)``: NSGA-II's crowding distance of each point of one front ``(n, m)``.

    For each objective, sort the front; the two extremes get infinity, every other point the gap
    between its two neighbours divided by the objective's range; sum over objectives. A large
    distance marks a point in a sparse part of the front, which selection prefers (diversity).
    """
    f = _check_values(values)
    n, m = f.shape
    distance = np.zeros(n)
    for k in range(m):
        order = np.argsort(f[:, k], kind="stable")
        span = f[order[-1], k] - f[order[0], k]
        distance[order[0]] = distance[order[-1]] = np.inf
        if span > 0 and n > 2:
            distance[order[1:-1]] += (f[order[2:], k] - f[order[:-2], k]) / span
    return distance


def hypervolume(values: np.ndarray | Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """The area that the points ``(n, 2)`` dominate and that ``reference`` ``(2,)`` bounds (both minimised).

    Points not strictly better than ``reference`` in both objectives add nothing. Sorting the front
    by the first objective makes the area a sum of rectangles:
    ``sum_i (x_{i+1} - x_i) * (r_y - y_i)``, with ``x_{n+1} = r_x``.
    """
    f = _check_values(values) if len(values) else np.zeros((0, 2))
    ref = np.asarray(reference, dtype=np.float64)
    if f.shape[1] != 2 or ref.shape != (2,):
        raise ValueError(f"hypervolume is the 2-D case: values (n, 2) and reference (2,), got {f.shape}, {ref.shape}")
    f = f[(f < ref).all(1)]
    if not len(f):
        return 0.0
    front = f[pareto_mask(f)]
    front = front[np.lexsort((front[:, 1], front[:, 0]))]  # by x, then y: y falls along the front
    x_next = np.append(front[1:, 0], ref[0])
    return float(((x_next - front[:, 0]) * (ref[1] - front[:, 1])).sum())


@dataclass
class ParetoResult:
    """What a multi-objective search evaluated, in order: ``points``, ``configs`` and ``values`` rows."""

    method: str = ""
    points: list[Arch] = field(default_factory=list)
    configs: list[Config] = field(default_factory=list)
    values: list[tuple[float, ...]] = field(default_factory=list)

    def evaluate(self, objectives: Objectives, space: SearchSpace, point: Sequence[int]) -> tuple[float, ...]:
        """Evaluate the objectives at ``point``, record it and return the values."""
        arch = tuple(int(t) for t in space.validate(point))
        config = space.decode(arch)
        values = tuple(float(v) for v in objectives(config))
        if self.values and len(values) != len(self.values[0]):
            raise ValueError(f"objectives returned {len(values)} values, earlier {len(self.values[0])}")
        self.points.append(arch)
        self.configs.append(config)
        self.values.append(values)
        return values

    @property
    def value_array(self) -> np.ndarray:
        """``(n, m)``: the values of every evaluation."""
        if not self.values:
            raise ValueError("the search has no evaluations")
        return np.asarray(self.values, dtype=np.float64)

    def front(self) -> list[int]:
        """Indices of the evaluations on the Pareto front of everything evaluated (first of repeats)."""
        mask = pareto_mask(self.value_array)
        seen: set[Arch] = set()
        keep = []
        for i in np.flatnonzero(mask):
            if self.points[i] not in seen:
                seen.add(self.points[i])
                keep.append(int(i))
        return keep

    def hypervolume_curve(self, reference: Sequence[float]) -> np.ndarray:
        """``(n,)``: the hypervolume of the first ``t + 1`` evaluations, for each ``t``."""
        f = self.value_array
        return np.array([hypervolume(f[: t + 1], reference) for t in range(len(f))])


def _one_change_neighbours(arch: Arch, space: SearchSpace) -> list[Arch]:
    """Every architecture that differs from ``arch`` in exactly one decision."""
    return [arch[:i] + (o,) + arch[i + 1 :] for i, n in enumerate(space.sizes) for o in range(n) if o != arch[i]]


def random_pareto_search(objectives: Objectives, space: SearchSpace, budget: int, *, seed: int = 0) -> ParetoResult:
    """``budget`` architectures drawn uniformly (with replacement): the baseline."""
    check_budget(budget)
    rng = np.random.default_rng(seed)
    result = ParetoResult("random")
    for _ in range(budget):
        result.evaluate(objectives, space, space.sample(rng))
    return result


def _environmental_selection(values: np.ndarray, size: int) -> np.ndarray:
    """Indices of the ``size`` rows NSGA-II keeps: whole fronts in order, the last by crowding distance."""
    rank = non_dominated_sort(values)
    keep: list[int] = []
    for front in range(rank.max() + 1):
        members = np.flatnonzero(rank == front)
        if len(keep) + len(members) <= size:
            keep += members.tolist()
        else:
            crowd = crowding_distance(values[members])
            keep += members[np.argsort(-crowd, kind="stable")[: size - len(keep)]].tolist()
            break
    return np.array(keep)


def _tournament(rank: np.ndarray, crowd: np.ndarray, rng: np.random.Generator) -> int:
    """NSGA-II's binary tournament: of two distinct members, the lower front wins, then the larger crowding."""
    i, j = (int(k) for k in rng.choice(len(rank), size=2, replace=False))
    return i if (rank[i], -crowd[i]) < (rank[j], -crowd[j]) else j


def nsga2(
    objectives: Objectives,
    space: SearchSpace,
    budget: int,
    *,
    seed: int = 0,
    population_size: int = 20,
    crossover_prob: float = 0.9,
) -> ParetoResult:
    """NSGA-II (Deb et al., 2002) on a space of choices, minimising every objective.

    Evaluate ``population_size`` random architectures. Each generation makes as many children:
    two parents by binary tournaments (lower front wins, then larger crowding distance), uniform
    crossover with probability ``crossover_prob``, then one :func:`~dlarch_lib.nas.mutate`. Parents
    and children together are cut back to ``population_size`` by :func:`non_dominated_sort` and, in
    the last front that fits only in part, :func:`crowding_distance`. Stops after ``budget`` evaluations.
    """
    check_budget(budget)
    if population_size < 2 or not 0 <= crossover_prob <= 1:
        raise ValueError(
            f"need population_size >= 2 and crossover_prob in [0, 1], got {population_size}, {crossover_prob}"
        )
    rng = np.random.default_rng(seed)
    result = ParetoResult("NSGA-II")
    population = [tuple(int(t) for t in space.sample(rng)) for _ in range(min(population_size, budget))]
    values = [result.evaluate(objectives, space, p) for p in population]
    while len(result.values) < budget:
        f = np.asarray(values)
        rank, crowd = non_dominated_sort(f), np.zeros(len(f))
        for front in range(rank.max() + 1):
            crowd[rank == front] = crowding_distance(f[rank == front])

        children = []
        for _ in range(min(population_size, budget - len(result.values))):
            a, b = population[_tournament(rank, crowd, rng)], population[_tournament(rank, crowd, rng)]
            take_b = rng.random(len(a)) < 0.5 if rng.random() < crossover_prob else np.zeros(len(a), bool)
            child = tuple(int(y if t else x) for x, y, t in zip(a, b, take_b, strict=True))
            children.append(mutate(child, space, rng))
        child_values = [result.evaluate(objectives, space, c) for c in children]
        pool, pool_values = population + children, values + child_values
        keep = _environmental_selection(np.asarray(pool_values), population_size)
        population, values = [pool[i] for i in keep], [pool_values[i] for i in keep]
    return result


def pareto_local_search(objectives: Objectives, space: SearchSpace, budget: int, *, seed: int = 0) -> ParetoResult:
    """Pareto local search (Paquete, Chiarandini & Stützle, 2004), the local-search baseline.

    Keep an archive of the non-dominated architectures found. Take an unexplored member at random
    and evaluate its one-change neighbours not yet evaluated, in random order, adding each that no
    archive member dominates or equals (and dropping the members it dominates). When every member is
    explored, the archive is a Pareto *local* optimum: restart from a random architecture.
    """
    check_budget(budget)
    rng = np.random.default_rng(seed)
    result = ParetoResult("Pareto local search")
    known: dict[Arch, tuple[float, ...]] = {}
    archive: dict[Arch, bool] = {}  # architecture -> explored?

    def consider(arch: Arch) -> None:
        if len(result.values) >= budget or arch in known:
            return
        v = known[arch] = result.evaluate(objectives, space, arch)
        if any(dominates(known[a], v) or known[a] == v for a in archive):
            return
        for a in [a for a in archive if dominates(v, known[a])]:
            del archive[a]
        archive[arch] = False

    while len(result.values) < budget:
        unexplored = [a for a, done in archive.items() if not done]
        if not unexplored:
            if len(known) == len(space):
                break  # everything is evaluated
            consider(tuple(int(t) for t in space.sample(rng)))
            continue
        arch = unexplored[int(rng.integers(len(unexplored)))]
        neighbours = _one_change_neighbours(arch, space)
        for i in rng.permutation(len(neighbours)):
            consider(neighbours[i])
        if arch in archive:
            archive[arch] = True
    return result


def optuna_pareto_search(
    objectives: Objectives,
    space: SearchSpace,
    budget: int,
    *,
    sampler: Any,
    n_objectives: int = 2,
    method: str = "optuna",
) -> ParetoResult:
    """Run an optuna study that minimises ``n_objectives`` objectives, with ``sampler``, for ``budget`` trials."""
    import optuna

    check_budget(budget)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    result = ParetoResult(method)
    names = space.names

    def trial_objectives(trial: optuna.Trial) -> tuple[float, ...]:
        arch = tuple(int(trial.suggest_categorical(n, list(range(k)))) for n, k in zip(names, space.sizes, strict=True))
        return result.evaluate(objectives, space, arch)

    study = optuna.create_study(directions=["minimize"] * n_objectives, sampler=sampler)
    study.optimize(trial_objectives, n_trials=budget)
    return result


def latency_ms(
    space: SearchSpace, *, device: torch.device | str, rounds: int = 20, batch_size: int = 1
) -> dict[tuple[Any, ...], float]:
    """Best-of-``rounds`` forward time (ms) of every network of ``space``, keyed by :func:`structure`.

    One untrained network per distinct structure (the learning rate does not change the network,
    nor does ``skip`` at depth 1),
    fed a ``(batch_size, 1, 8, 8)`` digit-shaped input; the networks are timed interleaved, round
    by round, so a burst of load hits all of them alike, and the minimum discards the slow rounds.
    """
    if rounds < 1 or batch_size < 1:
        raise ValueError(f"rounds and batch_size must be >= 1, got {rounds}, {batch_size}")
    missing = [k for k in NETWORK_KEYS if k not in space.names]
    if missing:
        raise ValueError(f"space lacks the network decisions {missing}")
    structures = sorted({tuple(canonical_config(space.decode(p))[k] for k in NETWORK_KEYS) for p in space.all()})
    x = torch.zeros(batch_size, 1, 8, 8, device=device)
    calls = {}
    for s in structures:
        with seeded(0):
            model = build_network(dict(zip(NETWORK_KEYS, s, strict=True))).to(device)
        calls[str(s)] = inference_call(model, x)
    best = best_ms(calls, rounds, warmup=3, device=device)
    return {s: best[str(s)] for s in structures}


def structure(config: Config) -> tuple[Any, ...]:
    """The key of :func:`latency_ms` for ``config``: its canonical ``NETWORK_KEYS`` values (no learning rate)."""
    canonical = canonical_config(config)
    return tuple(canonical[k] for k in NETWORK_KEYS)
