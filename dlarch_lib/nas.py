"""Chapters 15 and 16: architecture search, on top of the book's one search core (chapters 15-17).

**The search core** (used again by chapter 17's :mod:`dlarch_lib.hpo`). A search evaluates an
objective ``f(config) -> float`` at the points it chooses and keeps the best, maximising or
minimising (``mode="max"`` or ``"min"``); every search is called the same way,
``search(objective, space, budget, *, mode, seed, ...)``, and returns a :class:`SearchResult`.

- :class:`SearchSpace`: a product of named dimensions, each a :class:`Choice` among a tuple of
  options (its coordinate is the option's index, a *token*) or a numeric range :class:`Param`
  (its coordinate is a position in ``[0, 1]``, mapped onto the range on a linear or log scale).
  ``space.decode(point)`` is the configuration ``{name: value}`` the objective sees.
- :class:`SearchResult`: the points, configurations and values a search evaluated, in order;
  ``best_so_far``, ``best_value``, ``best_config`` read them in the result's ``mode``.
- :func:`random_search`: uniform samples, the baseline every method must beat.

**Chapter 15.** An architecture is a point of a space of choices (:data:`DIGITS_ARCH_SPACE`:
depth, width, activation, skip connections, learning rate). :func:`train_and_evaluate` trains
one such network (chapter 2's ``MLPConfig``) briefly with ``train.fit`` and returns its accuracy.
:func:`load_table` evaluates the whole space once and caches the result on disk, so that a search
only *looks up* rewards and many searches over many seeds fit in a CPU budget (the idea of
NAS-Bench-101/201). :func:`reinforce_search` trains an LSTM :class:`Controller`, which samples
token by token, feeding back the embedding of its previous action, with REINFORCE and a
moving-average baseline (Zoph & Le, 2017); :func:`reinforce_step` is its training step.

**Chapter 16.** :func:`regularized_evolution`: tournament selection, :func:`mutate` and aging
(Real et al., 2019).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dlarch_lib.core.data import Split, load_digits_split
from dlarch_lib.core.measure import count_parameters
from dlarch_lib.core.runtime import seeded
from dlarch_lib.core.train import Step, accuracy, fit
from dlarch_lib.modular import Chain, MLPConfig, build_model

Config = dict[str, Any]
"""A configuration: ``{dimension name: value}``, what an objective is evaluated at."""

Point = tuple[Any, ...]
"""A point of a space: one coordinate per dimension (an option's index, or a position in ``[0, 1]``)."""

Arch = tuple[int, ...]
"""An architecture: a point of a space of choices, one token (option index) per decision."""

Objective = Callable[[Config], float]
"""Maps a configuration to the number a search maximises (a reward) or minimises (an error)."""

MODES = ("max", "min")
TABLE_FORMAT = 2  # bump when the stored table layout or the evaluation procedure changes (2: cpu_seconds)


def check_mode(mode: str) -> None:
    """Raise unless ``mode`` is ``"max"`` or ``"min"``."""
    if mode not in MODES:
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")


def check_budget(budget: int) -> None:
    """Raise unless ``budget`` (the number of evaluations) is a positive int."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget (the number of evaluations) must be a positive int, got {budget!r}")


def _sign(mode: str) -> float:
    """``+1`` when larger values are better (``"max"``), ``-1`` when smaller are (``"min"``)."""
    check_mode(mode)
    return 1.0 if mode == "max" else -1.0


# --------------------------------------------------------------------------- the search space


@dataclass(frozen=True)
class Choice:
    """A decision among ``options``; its coordinate is the index of the chosen option (a token)."""

    name: str
    options: tuple[Any, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.options, tuple) or len(self.options) == 0:
            raise ValueError(f"decision {self.name!r} needs a non-empty tuple of options, got {self.options!r}")

    def decode(self, token: int) -> Any:
        """The option at index ``token``."""
        if not 0 <= int(token) < len(self.options):
            raise ValueError(f"token for {self.name!r} must be in 0..{len(self.options) - 1}, got {token}")
        return self.options[int(token)]

    def encode(self, value: Any) -> int:
        """The index of the option ``value`` (inverse of :meth:`decode`)."""
        if value not in self.options:
            raise ValueError(f"{self.name}={value!r} is not an option; options are {self.options}")
        return self.options.index(value)


@dataclass(frozen=True)
class Param:
    """A number in ``[low, high]``; ``log`` searches its logarithm, ``integer`` rounds it.

    Its coordinate is a position ``u`` in ``[0, 1]``: 0 is ``low``, 1 is ``high``.
    """

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
        """The value at position ``u`` in ``[0, 1]`` (clipped into the range)."""
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


Dimension = Choice | Param


@dataclass(frozen=True)
class SearchSpace:
    """A product of named dimensions: ``point`` (one coordinate each) <-> configuration ``{name: value}``.

    ``SearchSpace.from_dict({"depth": (1, 2), "lr": (1e-3, 1e-2)})`` is a space of choices with
    4 points; the point ``(1, 0)`` means depth 2 and learning rate 1e-3. A space of choices is
    finite: it has a size, an order (:meth:`index`) and can list every point (:meth:`all`).
    ``SearchSpace((Param("lr", 1e-4, 1.0, log=True), ...))`` is a box: its points are the unit cube.
    """

    dimensions: tuple[Dimension, ...]

    def __post_init__(self) -> None:
        if not self.dimensions:
            raise ValueError("a search space needs at least one dimension")
        for dim in self.dimensions:
            if not isinstance(dim, (Choice, Param)):
                raise TypeError(f"a dimension is a Choice or a Param, got {type(dim).__name__}")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"dimension names must be unique, got {list(self.names)}")

    @classmethod
    def from_dict(cls, choices: dict[str, Sequence[Any]]) -> SearchSpace:
        """A space of choices from ``{name: options}`` (the order of the dict is the order of the tokens)."""
        return cls(tuple(Choice(name, tuple(options)) for name, options in choices.items()))

    @property
    def names(self) -> tuple[str, ...]:
        """Dimension names, in coordinate order."""
        return tuple(dim.name for dim in self.dimensions)

    @property
    def ndim(self) -> int:
        """Number of dimensions (coordinates of a point)."""
        return len(self.dimensions)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of options of each decision (the controller's vocabulary per step); choices only."""
        sizes = []
        for dim in self.dimensions:
            if not isinstance(dim, Choice):
                raise ValueError(f"dimension {dim.name!r} is a continuous Param: the space is not finite")
            sizes.append(len(dim.options))
        return tuple(sizes)

    def __len__(self) -> int:
        """Number of points of a space of choices."""
        return math.prod(self.sizes)

    def __bool__(self) -> bool:  # a box has no len(); a space is never empty
        return True

    def validate(self, point: Sequence[Any]) -> Point:
        """``point`` as a tuple (ints for choices, floats for params), or ``ValueError`` if it is not in the space."""
        point = tuple(point)
        if len(point) != self.ndim:
            raise ValueError(f"a point has {self.ndim} coordinates {self.names}, got {len(point)}: {point}")
        coords: list[Any] = []
        for dim, coordinate in zip(self.dimensions, point):
            if isinstance(dim, Choice):
                dim.decode(coordinate)  # range check
                coords.append(int(coordinate))
            else:
                coords.append(float(coordinate))
        return tuple(coords)

    def decode(self, point: Sequence[Any]) -> Config:
        """Point -> ``{name: value}``."""
        return {dim.name: dim.decode(c) for dim, c in zip(self.dimensions, self.validate(point))}

    def encode(self, config: Config) -> Point:
        """``{name: value}`` -> point (inverse of :meth:`decode`, up to a param's rounding)."""
        if set(config) != set(self.names):
            missing, extra = sorted(set(self.names) - set(config)), sorted(set(config) - set(self.names))
            raise ValueError(f"config keys must be {sorted(self.names)}; it lacks {missing} and has extra {extra}")
        return tuple(dim.encode(config[dim.name]) for dim in self.dimensions)

    def index(self, point: Sequence[int]) -> int:
        """Position of a point of a space of choices in :meth:`all` (mixed radix, last token fastest)."""
        index = 0
        for token, size in zip(self.validate(point), self.sizes):
            index = index * size + token
        return index

    def point_at(self, index: int) -> Arch:
        """The point at position ``index`` of :meth:`all`."""
        if not 0 <= index < len(self):
            raise ValueError(f"index must be in 0..{len(self) - 1}, got {index}")
        return tuple(int(t) for t in np.unravel_index(index, self.sizes))

    def all(self) -> list[Arch]:
        """Every point of a space of choices, in index order."""
        return list(itertools.product(*(range(n) for n in self.sizes)))

    def sample(self, rng: np.random.Generator) -> Point:
        """One point drawn uniformly at random: a uniform option of each choice, a uniform position of each param."""
        return tuple(
            int(rng.integers(len(dim.options))) if isinstance(dim, Choice) else float(rng.random())
            for dim in self.dimensions
        )

    def suggest(self, trial: Any) -> Config:
        """Ask an optuna ``trial`` for a configuration of this space."""
        config: Config = {}
        for dim in self.dimensions:
            if isinstance(dim, Choice):
                config[dim.name] = trial.suggest_categorical(dim.name, dim.options)
            elif dim.integer:
                config[dim.name] = trial.suggest_int(dim.name, int(dim.low), int(dim.high), log=dim.log)
            else:
                config[dim.name] = trial.suggest_float(dim.name, dim.low, dim.high, log=dim.log)
        return config

    def to_json(self) -> list[list[Any]]:
        """A JSON-ready description (used in the cache key of a :class:`Table`)."""
        return [
            [dim.name, list(dim.options)] if isinstance(dim, Choice) else [dim.name, asdict(dim)]
            for dim in self.dimensions
        ]


# --------------------------------------------------------------------------- results and random search


@dataclass
class SearchResult:
    """What a search evaluated, in order: ``points``, their ``configs`` and the objective's ``values``.

    ``mode`` says which values are better: ``"max"`` (rewards, accuracies) or ``"min"`` (errors).
    ``extra`` holds whatever else a search returns (a trained controller, its training history).
    """

    mode: str
    method: str = ""
    points: list[Point] = field(default_factory=list)
    configs: list[Config] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_mode(self.mode)

    def add(self, point: Point, config: Config, value: float) -> None:
        """Record one evaluation."""
        self.points.append(point)
        self.configs.append(config)
        self.values.append(float(value))

    def evaluate(self, objective: Objective, space: SearchSpace, point: Sequence[Any]) -> float:
        """Evaluate ``objective`` at the configuration of ``point``, record it and return its value."""
        point = space.validate(point)
        config = space.decode(point)
        value = float(objective(config))
        self.add(point, config, value)
        return value

    @property
    def best_so_far(self) -> np.ndarray:
        """``(n,)``: the best value among the first ``t + 1`` evaluations, for each ``t``."""
        values = np.asarray(self.values, dtype=np.float64)
        if len(values) == 0:
            raise ValueError("the search has no evaluations")
        return np.maximum.accumulate(values) if self.mode == "max" else np.minimum.accumulate(values)

    @property
    def best_index(self) -> int:
        """Index of the best evaluation (the first one on ties)."""
        if not self.values:
            raise ValueError("the search has no evaluations")
        values = np.asarray(self.values)
        return int(np.argmax(values) if self.mode == "max" else np.argmin(values))

    @property
    def best_value(self) -> float:
        """The best value found."""
        return self.values[self.best_index]

    @property
    def best_point(self) -> Point:
        """The point of the best value."""
        return self.points[self.best_index]

    @property
    def best_config(self) -> Config:
        """The configuration of the best value."""
        return self.configs[self.best_index]


def random_search(objective: Objective, space: SearchSpace, budget: int, *, mode: str, seed: int = 0) -> SearchResult:
    """Evaluate ``budget`` points drawn uniformly (with replacement): the baseline every search must beat."""
    check_budget(budget)
    rng = np.random.default_rng(seed)
    result = SearchResult(mode, "random")
    for _ in range(budget):
        result.evaluate(objective, space, space.sample(rng))
    return result


# --------------------------------------------------------------------------- chapter 15: the digits space

DIGITS_ARCH_SPACE = SearchSpace.from_dict(
    {
        "depth": (1, 2, 3),  # hidden layers
        "width": (16, 32, 64, 128),  # units per hidden layer
        "activation": ("relu", "tanh", "sigmoid"),
        "skip": (False, True),  # residual connections between hidden layers
        "lr": (1e-3, 3e-3, 1e-2, 3e-2),  # Adam learning rate
    }
)
"""Chapters 15-16's space of digits MLPs: 3 * 4 * 3 * 2 * 4 = 288 architectures."""


NETWORK_KEYS = ("depth", "width", "activation", "skip")


def mutate(arch: Sequence[int], space: SearchSpace, rng: np.random.Generator) -> Arch:
    """Change one uniformly chosen decision to a different option (the evolution's mutation)."""
    tokens = list(space.validate(arch))
    mutable = [i for i, n in enumerate(space.sizes) if n > 1]
    if not mutable:
        raise ValueError("cannot mutate: every decision of the space has a single option")
    i = mutable[int(rng.integers(len(mutable)))]
    new = int(rng.integers(space.sizes[i] - 1))
    tokens[i] = new if new < tokens[i] else new + 1  # uniform over the *other* options
    return tuple(tokens)


def build_network(config: Config) -> Chain:
    """The digits MLP of a decoded architecture: chapter 2's :class:`~dlarch_lib.modular.MLPConfig`.

    ``depth`` hidden layers of ``width`` units; with ``skip`` every hidden layer after the first
    adds its input back (``h + act(W h)``). Keys ``depth, width, activation, skip``; others are ignored.
    """
    missing = [k for k in NETWORK_KEYS if k not in config]
    if missing:
        raise ValueError(f"architecture config lacks {missing}; it has {sorted(config)}")
    return build_model(
        MLPConfig(
            width=int(config["width"]),
            depth=int(config["depth"]),
            activation=str(config["activation"]),
            skip=bool(config["skip"]),
        )
    )


def canonical_config(config: Config) -> Config:
    """The config with decisions that change nothing normalised (``skip`` is moot at depth 1).

    Two architectures with the same canonical config build the same network and, trained
    with the same seed, give the same numbers, so the table trains only one of them.
    """
    config = dict(config)
    if config.get("depth") == 1:
        config["skip"] = False
    return config


@dataclass(frozen=True)
class EvalSettings:
    """How one architecture is evaluated: ``steps`` Adam steps on mini-batches, one seed.

    The split holds ``val_frac`` of the digits for the reward and ``test_frac`` for a final,
    untouched test accuracy.
    """

    steps: int = 20
    batch_size: int = 128
    seed: int = 0
    val_frac: float = 0.25
    test_frac: float = 0.25

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")


def random_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless mini-batches ``(x[i], y[i])``, each ``i`` drawn with replacement: ``(B, ...)``, ``(B,)``."""
    while True:
        i = torch.randint(len(y), (batch_size,), generator=generator)  # (B,) on the CPU
        yield x[i], y[i]


def train_and_evaluate(
    config: Config, split: Split, settings: EvalSettings = EvalSettings(), *, device: torch.device | str
) -> dict[str, float]:
    """Build the network of ``config`` on ``device``, train it for ``settings.steps`` steps; return its accuracies.

    Returns ``{"val_acc", "test_acc", "params"}``. Seeded: the same config, split and settings
    give the same numbers (on the same machine).
    """
    if "lr" not in config:
        raise ValueError(f"architecture config lacks 'lr'; it has {sorted(config)}")
    with seeded(settings.seed):
        model = build_network(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(config["lr"]), fused=True)  # fused: faster on tiny nets
    x, y = split.x_train.to(device), split.y_train.to(device)  # (N, 1, 8, 8), (N,)
    batches = random_batches(x, y, settings.batch_size, torch.Generator().manual_seed(settings.seed))
    fit(model, batches, steps=settings.steps, optimizer=optimizer, progress=False)
    model.eval()
    with torch.no_grad():
        val_acc = accuracy(model(split.x_val.to(device)), split.y_val.to(device))
        test_acc = accuracy(model(split.x_test.to(device)), split.y_test.to(device))
    return {"val_acc": val_acc, "test_acc": test_acc, "params": float(count_parameters(model))}


# --------------------------------------------------------------------------- the table


@dataclass
class Table:
    """Evaluations of every architecture of a space, indexed by :meth:`SearchSpace.index`.

    Calling the table is the search objective (``mode="max"``): ``table(config)`` is the
    validation accuracy of the architecture with that configuration.
    """

    space: SearchSpace
    settings: EvalSettings
    val_acc: np.ndarray  # (len(space),)
    test_acc: np.ndarray  # (len(space),)
    params: np.ndarray  # (len(space),)
    cpu_seconds: float = float("nan")  # CPU time compute_table spent on the whole space (stored with the table)

    def __post_init__(self) -> None:
        for name in ("val_acc", "test_acc", "params"):
            values = np.asarray(getattr(self, name), dtype=np.float64)
            if values.shape != (len(self.space),):
                raise ValueError(f"{name} must have shape ({len(self.space)},), got {values.shape}")
            setattr(self, name, values)

    def _index(self, config: Config) -> int:
        return self.space.index(self.space.encode(config))

    def __call__(self, config: Config) -> float:
        return float(self.val_acc[self._index(config)])

    def test(self, config: Config) -> float:
        """Test accuracy of ``config`` (report it only for the architecture a search returns)."""
        return float(self.test_acc[self._index(config)])

    @property
    def best_config(self) -> Config:
        """The configuration with the highest validation accuracy (first one on ties)."""
        return self.space.decode(self.space.point_at(int(np.argmax(self.val_acc))))

    @property
    def optimum(self) -> float:
        """The highest validation accuracy in the space."""
        return float(self.val_acc.max())

    def fraction_better(self, value: float) -> float:
        """Fraction of the space whose validation accuracy is strictly above ``value`` (0 = optimal)."""
        return float((self.val_acc > value).mean())

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict with everything needed to rebuild the table."""
        return {
            "format": TABLE_FORMAT,
            "space": self.space.to_json(),
            "settings": asdict(self.settings),
            "val_acc": self.val_acc.tolist(),
            "test_acc": self.test_acc.tolist(),
            "params": self.params.tolist(),
            "cpu_seconds": self.cpu_seconds,
        }


def table_key(space: SearchSpace, settings: EvalSettings) -> str:
    """A short hash of everything that changes the table's numbers (space, settings, format)."""
    blob = json.dumps({"format": TABLE_FORMAT, "space": space.to_json(), "settings": asdict(settings)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    """``$DLARCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/dlarch``, else ``~/.cache/dlarch``."""
    if os.environ.get("DLARCH_CACHE_DIR"):
        return Path(os.environ["DLARCH_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dlarch"


def compute_table(
    space: SearchSpace, settings: EvalSettings = EvalSettings(), *, device: torch.device | str, progress: bool = True
) -> Table:
    """Train and evaluate every architecture of ``space`` on ``device`` (each network is tiny).

    Architectures with the same :func:`canonical_config` are trained once. The table records the
    CPU time of this process spent computing it (``cpu_seconds``), a cost that other programs on
    a busy machine do not inflate as they inflate wall time.
    """
    start = time.process_time()
    split = load_digits_split(val_frac=settings.val_frac, test_frac=settings.test_frac, seed=settings.seed)
    done: dict[str, dict[str, float]] = {}
    rows = []
    for arch in tqdm(space.all(), desc="evaluating the space", disable=not progress, mininterval=0.5):
        config = canonical_config(space.decode(arch))
        key = json.dumps(config, sort_keys=True)
        if key not in done:
            done[key] = train_and_evaluate(config, split, settings, device=device)
        rows.append(done[key])
    val_acc, test_acc, params = (np.array([r[k] for r in rows]) for k in ("val_acc", "test_acc", "params"))
    return Table(space, settings, val_acc, test_acc, params, cpu_seconds=time.process_time() - start)


def load_table(
    space: SearchSpace = DIGITS_ARCH_SPACE,
    settings: EvalSettings = EvalSettings(),
    *,
    device: torch.device | str,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Table:
    """The table of ``space`` under ``settings``: read from the cache, or computed on ``device`` and cached.

    The file is ``<cache_dir>/nas/table-<table_key>.json``; it is written atomically, so two
    notebooks computing the same table at once cannot leave a half-written file.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / "nas" / f"table-{table_key(space, settings)}.json"
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            if (
                stored["format"] == TABLE_FORMAT
                and stored["space"] == space.to_json()
                and stored["settings"] == asdict(settings)
            ):
                return Table(
                    space,
                    settings,
                    stored["val_acc"],
                    stored["test_acc"],
                    stored["params"],
                    float(stored["cpu_seconds"]),
                )
        except (ValueError, KeyError):
            pass  # unreadable or foreign file: recompute and overwrite it
    table = compute_table(space, settings, device=device, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
        json.dump(table.to_json(), tmp)
    os.replace(tmp.name, path)
    return table


# --------------------------------------------------------------------------- chapter 16: evolution


def regularized_evolution(
    objective: Objective,
    space: SearchSpace,
    budget: int,
    *,
    mode: str,
    seed: int = 0,
    population_size: int = 20,
    sample_size: int = 5,
    aging: bool = True,
) -> SearchResult:
    """Regularized (aging) evolution (Real et al., 2019) over a space of choices.

    Start from ``population_size`` random architectures. Then repeat: draw ``sample_size``
    members at random (a tournament), mutate the best of them, evaluate the child, add it and
    remove the *oldest* member (``aging=True``) or the *worst* (``aging=False``, classic
    tournament evolution). Every evaluation, the initial ones included, counts toward ``budget``.
    """
    check_budget(budget)
    sign = _sign(mode)
    if not 1 <= sample_size <= population_size:
        raise ValueError(f"need 1 <= sample_size <= population_size, got {sample_size}, {population_size}")
    rng = np.random.default_rng(seed)
    result = SearchResult(mode, "regularized evolution" if aging else "evolution, remove worst")
    population: deque[tuple[Point, float]] = deque()  # oldest on the left
    while len(population) < population_size and len(result.values) < budget:
        arch = space.sample(rng)
        population.append((arch, result.evaluate(objective, space, arch)))
    while len(result.values) < budget:
        contenders = rng.choice(len(population), size=sample_size, replace=False)
        parent = max((population[i] for i in contenders), key=lambda member: sign * member[1])
        child = mutate(parent[0], space, rng)
        population.append((child, result.evaluate(objective, space, child)))
        if aging:
            population.popleft()  # the oldest dies, however good it is
        else:
            population.remove(min(population, key=lambda member: sign * member[1]))
    return result


# --------------------------------------------------------------------------- chapter 15: the controller


class Controller(nn.Module):
    """An LSTM policy over architectures that samples one token per decision.

    Step ``t`` reads the embedding of the token chosen at step ``t - 1`` (a learned start
    vector at ``t = 0``), so each choice is conditioned on all earlier ones:
    ``pi(a) = prod_t pi(a_t | a_<t)``. The seed's sketch fed noise instead, so no step
    saw the choices already made.
    The output heads start at zero, so the initial policy is exactly uniform.
    """

    def __init__(self, sizes: Sequence[int], hidden: int = 32, embed: int = 16) -> None:
        super().__init__()
        self.sizes = tuple(int(n) for n in sizes)
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"sizes must be a non-empty list of positive ints, got {sizes!r}")
        self.hidden = hidden
        self.start = nn.Parameter(torch.zeros(1, embed))
        self.embeddings = nn.ModuleList(nn.Embedding(n, embed) for n in self.sizes)
        self.cell = nn.LSTMCell(embed, hidden)
        heads = [nn.Linear(hidden, n) for n in self.sizes]
        for head in heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.heads = nn.ModuleList(heads)

    def forward(
        self, batch: int = 1, actions: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample ``batch`` architectures, or score the given ``actions`` ``(B, T)``.

        Returns ``actions (B, T)`` int64, their ``log_prob (B,)`` = sum over steps of
        ``log pi(a_t | a_<t)`` (differentiable), and the ``entropy (B,)`` summed over steps.
        A ``generator`` for sampling must be on the controller's device.
        """
        if actions is not None:
            if actions.ndim != 2 or actions.shape[1] != len(self.sizes):
                raise ValueError(f"actions must have shape (B, {len(self.sizes)}), got {tuple(actions.shape)}")
            batch = actions.shape[0]
        elif batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        x = self.start.expand(batch, -1)  # (B, embed)
        h = c = x.new_zeros(batch, self.hidden)  # (B, hidden)
        chosen, log_prob, entropy = [], x.new_zeros(batch), x.new_zeros(batch)
        for t, head in enumerate(self.heads):
            h, c = self.cell(x, (h, c))
            logp = F.log_softmax(head(h), dim=-1)  # (B, n_t)
            if actions is None:
                a = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)  # (B,)
            else:
                a = actions[:, t]
                if a.min() < 0 or a.max() >= self.sizes[t]:
                    raise ValueError(f"actions[:, {t}] must be in 0..{self.sizes[t] - 1}")
            log_prob = log_prob + logp.gather(1, a[:, None]).squeeze(1)
            entropy = entropy - (logp.exp() * logp).sum(dim=1)
            chosen.append(a)
            x = self.embeddings[t](a)  # (B, embed): feed back the action just taken
        return torch.stack(chosen, dim=1), log_prob, entropy

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        """``(B,)`` log-probability of each architecture in ``actions`` ``(B, T)``."""
        return self(actions=actions)[1]

    @torch.no_grad()
    def distribution(self, space: SearchSpace) -> np.ndarray:
        """``(len(space),)`` probability of every architecture, in :meth:`SearchSpace.index` order."""
        if space.sizes != self.sizes:
            raise ValueError(f"space sizes {space.sizes} do not match the controller's {self.sizes}")
        actions = torch.tensor(space.all(), device=self.start.device)  # (len(space), T)
        return self.log_prob(actions).exp().cpu().numpy().astype(np.float64)


def reinforce_step(
    objective: Objective,
    space: SearchSpace,
    result: SearchResult,
    *,
    baseline_decay: float = 0.9,
    entropy_weight: float = 0.0,
    generator: torch.Generator | None = None,
) -> Step:
    """The controller's training step for ``train.fit``: a batch is the number ``n`` of architectures to sample.

    The step samples ``n`` architectures, evaluates each (recording it in ``result``) and returns
    the surrogate loss ``-mean((R - b) log pi(a)) - entropy_weight * mean(H)``, whose gradient is
    minus the REINFORCE estimate; the engine's optimizer descends it. The reward ``R`` is the
    objective's value, negated when ``result.mode == "min"``. The baseline ``b`` is a moving average
    of past mean rewards, updated only after the loss is formed, so from the second batch on it does not
    depend on the current samples. The first batch has no past: its baseline is its own mean reward,
    which biases that one update by the factor ``(n - 1) / n`` (chapter 15 computes it exactly).
    """
    if not 0.0 <= baseline_decay < 1.0:
        raise ValueError(f"baseline_decay must be in [0, 1), got {baseline_decay}")
    sign = _sign(result.mode)
    baseline: float | None = None

    def step(controller: nn.Module, n: int) -> dict[str, Any]:
        nonlocal baseline
        actions, log_prob, entropy = controller(n, generator=generator)  # (n, T), (n,), (n,)
        values = [result.evaluate(objective, space, a) for a in actions.tolist()]
        rewards = sign * torch.tensor(values, dtype=torch.float32, device=log_prob.device)  # (n,)
        if baseline is None:  # the first batch has no history: its advantages average to 0
            baseline = rewards.mean().item()
        loss = -((rewards - baseline) * log_prob).mean() - entropy_weight * entropy.mean()
        baseline = baseline_decay * baseline + (1 - baseline_decay) * rewards.mean().item()
        return {"loss": loss, "reward": rewards.mean().item(), "baseline": baseline}

    return step


def reinforce_search(
    objective: Objective,
    space: SearchSpace,
    budget: int,
    *,
    mode: str,
    device: torch.device | str,
    seed: int = 0,
    batch_size: int = 4,
    lr: float = 0.05,
    baseline_decay: float = 0.9,
    entropy_weight: float = 0.0,
    hidden: int = 32,
) -> SearchResult:
    """Train a :class:`Controller` (built on ``device``) with REINFORCE while it searches a space of choices.

    ``train.fit`` runs :func:`reinforce_step` with Adam on batches of ``batch_size`` samples until
    ``budget`` architectures have been evaluated. ``result.extra`` holds the trained ``controller``,
    its training ``history`` (``history.logs["baseline"]`` is the baseline after each step) and, when
    the objective is a :class:`Table`, the final policy's ``expected_reward`` (exact, summed over the space).
    """
    check_budget(budget)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    result = SearchResult(mode, "REINFORCE")
    with seeded(seed):
        controller = Controller(space.sizes, hidden=hidden).to(device)
    generator = torch.Generator(device=torch.device(device)).manual_seed(seed)
    step = reinforce_step(
        objective, space, result, baseline_decay=baseline_decay, entropy_weight=entropy_weight, generator=generator
    )
    batches = [min(batch_size, budget - done) for done in range(0, budget, batch_size)]  # samples per step
    history = fit(controller, batches, step, epochs=1, lr=lr, progress=False, desc="controller")
    result.extra.update(controller=controller, history=history)
    if isinstance(objective, Table):
        result.extra["expected_reward"] = float(controller.distribution(space) @ objective.val_acc)
    return result


# --------------------------------------------------------------------------- the policy gradient


def exact_policy_gradient(logits: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """``(K,)`` exact gradient of ``E_{a ~ softmax(logits)} R(a)`` for a categorical policy.

    In closed form ``d/d theta_k = pi_k (R_k - sum_j pi_j R_j)``.
    """
    if logits.ndim != 1 or logits.shape != rewards.shape:
        raise ValueError(
            f"logits and rewards must both have shape (K,), got {tuple(logits.shape)} and {tuple(rewards.shape)}"
        )
    pi = logits.softmax(dim=0)
    return pi * (rewards - (pi * rewards).sum())


def reinforce_estimate(
    logits: torch.Tensor,
    rewards: torch.Tensor,
    samples: int,
    baseline: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte-Carlo REINFORCE estimate of the gradient in :func:`exact_policy_gradient`.

    Draws ``samples`` actions ``a_i ~ pi`` and returns the mean and the per-sample estimates
    ``(R(a_i) - baseline) * grad log pi(a_i)``: shapes ``(K,)`` and ``(samples, K)``.
    Uses ``grad_theta log softmax(theta)_a = onehot(a) - pi``.
    """
    if logits.ndim != 1 or logits.shape != rewards.shape:
        raise ValueError(
            f"logits and rewards must both have shape (K,), got {tuple(logits.shape)} and {tuple(rewards.shape)}"
        )
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    pi = logits.softmax(dim=0)  # (K,)
    a = torch.multinomial(pi, samples, replacement=True, generator=generator)  # (S,)
    score = F.one_hot(a, len(pi)).to(pi.dtype) - pi  # (S, K): grad log pi(a)
    per_sample = (rewards[a] - baseline)[:, None] * score  # (S, K)
    return per_sample.mean(dim=0), per_sample
