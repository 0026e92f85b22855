"""Neural architecture search on a small, tabulated space of digits networks.

An architecture is a sequence of tokens, one choice index per decision of a
:class:`SearchSpace` (depth, width, activation, skip connections, learning rate).
:func:`train_and_evaluate` trains one such network briefly on the digits and returns its
validation accuracy. :func:`load_table` evaluates the whole space once and caches the
result on disk, so that a search only *looks up* rewards and many searches over many
seeds fit in a CPU budget (the idea of NAS-Bench-101/201).

Three search strategies share one interface, ``(space, objective, budget, seed)``:

- :func:`random_search`: uniform samples, the baseline every method must beat;
- :func:`reinforce_search`: an LSTM :class:`Controller` that samples token by token,
  feeding back the embedding of its previous action, trained with REINFORCE and a
  moving-average baseline (Zoph & Le, 2017);
- :func:`regularized_evolution`: tournament selection, mutation and aging (Real et al., 2019).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
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
from dlarch_lib.core.train import accuracy

Arch = tuple[int, ...]
"""An architecture: one token (the index of the chosen option) per decision of the space."""

Objective = Callable[[Arch], float]
"""Maps an architecture to its reward (here: validation accuracy)."""

TABLE_FORMAT = 2  # bump when the stored table layout or the evaluation procedure changes (2: cpu_seconds)


# --------------------------------------------------------------------------- search space


@dataclass(frozen=True)
class SearchSpace:
    """A product of named decisions, each with a tuple of options.

    ``SearchSpace.from_dict({"depth": (1, 2), "lr": (1e-3, 1e-2)})`` has 4 architectures;
    the architecture ``(1, 0)`` means depth 2 and learning rate 1e-3.
    """

    decisions: tuple[tuple[str, tuple[Any, ...]], ...]

    def __post_init__(self) -> None:
        if not self.decisions:
            raise ValueError("a search space needs at least one decision")
        names = [name for name, _ in self.decisions]
        if len(set(names)) != len(names):
            raise ValueError(f"decision names must be unique, got {names}")
        for name, options in self.decisions:
            if not isinstance(options, tuple) or len(options) == 0:
                raise ValueError(f"decision {name!r} needs a non-empty tuple of options, got {options!r}")

    @classmethod
    def from_dict(cls, decisions: dict[str, Sequence[Any]]) -> SearchSpace:
        """Build a space from ``{name: options}`` (order of the dict = order of the tokens)."""
        return cls(tuple((name, tuple(options)) for name, options in decisions.items()))

    @property
    def names(self) -> tuple[str, ...]:
        """Decision names, in token order."""
        return tuple(name for name, _ in self.decisions)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of options of each decision (the controller's vocabulary per step)."""
        return tuple(len(options) for _, options in self.decisions)

    def __len__(self) -> int:
        return int(np.prod(self.sizes))

    def validate(self, arch: Sequence[int]) -> Arch:
        """Return ``arch`` as a tuple of ints, or raise ``ValueError`` if it is not in the space."""
        arch = tuple(int(t) for t in arch)
        if len(arch) != len(self.sizes):
            raise ValueError(f"an architecture has {len(self.sizes)} tokens {self.names}, got {len(arch)}: {arch}")
        for token, size, name in zip(arch, self.sizes, self.names):
            if not 0 <= token < size:
                raise ValueError(f"token for {name!r} must be in 0..{size - 1}, got {token}")
        return arch

    def decode(self, arch: Sequence[int]) -> dict[str, Any]:
        """Tokens -> ``{name: option}``."""
        arch = self.validate(arch)
        return {name: options[t] for (name, options), t in zip(self.decisions, arch)}

    def encode(self, config: dict[str, Any]) -> Arch:
        """``{name: option}`` -> tokens (inverse of :meth:`decode`)."""
        if set(config) != set(self.names):
            raise ValueError(f"config keys must be {sorted(self.names)}, got {sorted(config)}")
        arch = []
        for name, options in self.decisions:
            if config[name] not in options:
                raise ValueError(f"{name}={config[name]!r} is not an option; options are {options}")
            arch.append(options.index(config[name]))
        return tuple(arch)

    def index(self, arch: Sequence[int]) -> int:
        """Position of ``arch`` in :meth:`all` (mixed-radix number, last token fastest)."""
        index = 0
        for token, size in zip(self.validate(arch), self.sizes):
            index = index * size + token
        return index

    def arch_at(self, index: int) -> Arch:
        """The architecture at position ``index`` of :meth:`all`."""
        if not 0 <= index < len(self):
            raise ValueError(f"index must be in 0..{len(self) - 1}, got {index}")
        return tuple(int(t) for t in np.unravel_index(index, self.sizes))

    def all(self) -> list[Arch]:
        """Every architecture, in index order."""
        return list(itertools.product(*(range(n) for n in self.sizes)))

    def sample(self, rng: np.random.Generator) -> Arch:
        """One architecture drawn uniformly at random."""
        return tuple(int(rng.integers(n)) for n in self.sizes)

    def to_json(self) -> list[list[Any]]:
        """A JSON-ready description (used in the cache key)."""
        return [[name, list(options)] for name, options in self.decisions]


DIGITS_SPACE = SearchSpace.from_dict(
    {
        "depth": (1, 2, 3),  # hidden layers
        "width": (16, 32, 64, 128),  # units per hidden layer
        "activation": ("relu", "tanh", "sigmoid"),
        "skip": (False, True),  # residual connections between hidden layers
        "lr": (1e-3, 3e-3, 1e-2, 3e-2),  # Adam learning rate
    }
)
"""The book's search space: 3 * 4 * 3 * 2 * 4 = 288 architectures."""


def mutate(arch: Sequence[int], space: SearchSpace, rng: np.random.Generator) -> Arch:
    """Change one uniformly chosen decision to a different option (the evolution's mutation)."""
    arch = list(space.validate(arch))
    mutable = [i for i, n in enumerate(space.sizes) if n > 1]
    if not mutable:
        raise ValueError("cannot mutate: every decision of the space has a single option")
    i = mutable[int(rng.integers(len(mutable)))]
    new = int(rng.integers(space.sizes[i] - 1))
    arch[i] = new if new < arch[i] else new + 1  # uniform over the *other* options
    return tuple(arch)


# --------------------------------------------------------------------------- the networks

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}
NETWORK_KEYS = ("depth", "width", "activation", "skip")


class DigitsMLP(nn.Module):
    """An MLP on flattened 8x8 digits: ``depth`` hidden layers of ``width`` units.

    With ``skip`` every hidden layer after the first adds its input back (a residual
    connection, ``h <- h + act(W h)``); with ``depth == 1`` there is nothing to skip.
    """

    def __init__(
        self, depth: int, width: int, activation: str = "relu", skip: bool = False, num_classes: int = 10
    ) -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"depth and width must be >= 1, got depth={depth}, width={width}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
        self.skip = bool(skip) and depth > 1
        self.inp = nn.Sequential(nn.Linear(64, width), ACTIVATIONS[activation]())
        self.hidden = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), ACTIVATIONS[activation]()) for _ in range(depth - 1)
        )
        self.out = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x.flatten(1))  # (B, 64) -> (B, width)
        for layer in self.hidden:
            h = h + layer(h) if self.skip else layer(h)  # (B, width)
        return self.out(h)  # (B, num_classes)


def build_network(config: dict[str, Any]) -> DigitsMLP:
    """The network of a decoded architecture (keys ``depth, width, activation, skip``; others ignored)."""
    missing = [k for k in NETWORK_KEYS if k not in config]
    if missing:
        raise ValueError(f"architecture config lacks {missing}; it has {sorted(config)}")
    return DigitsMLP(int(config["depth"]), int(config["width"]), str(config["activation"]), bool(config["skip"]))


def canonical_config(config: dict[str, Any]) -> dict[str, Any]:
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


def train_and_evaluate(
    config: dict[str, Any], split: Split, settings: EvalSettings = EvalSettings()
) -> dict[str, float]:
    """Train the network of ``config`` for ``settings.steps`` steps; return its accuracies.

    Returns ``{"val_acc", "test_acc", "params"}``. Seeded: the same config, split and
    settings give the same numbers (on the same machine).
    """
    if "lr" not in config:
        raise ValueError(f"architecture config lacks 'lr'; it has {sorted(config)}")
    torch.manual_seed(settings.seed)
    model = build_network(config)
    opt = torch.optim.Adam(model.parameters(), lr=float(config["lr"]), fused=True)  # fused: ~20% faster on tiny nets
    generator = torch.Generator().manual_seed(settings.seed)
    x, y = split.x_train, split.y_train  # (N, 1, 8, 8), (N,)
    model.train()
    for _ in range(settings.steps):
        batch = torch.randint(len(y), (settings.batch_size,), generator=generator)  # sampled with replacement
        loss = F.cross_entropy(model(x[batch]), y[batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        val_acc = accuracy(model(split.x_val), split.y_val)
        test_acc = accuracy(model(split.x_test), split.y_test)
    return {"val_acc": val_acc, "test_acc": test_acc, "params": float(count_parameters(model))}


# --------------------------------------------------------------------------- the table


@dataclass
class Table:
    """Evaluations of every architecture of a space, indexed by :meth:`SearchSpace.index`.

    Calling the table is the search objective: ``table(arch)`` is the validation accuracy.
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

    def __call__(self, arch: Sequence[int]) -> float:
        return float(self.val_acc[self.space.index(arch)])

    def test(self, arch: Sequence[int]) -> float:
        """Test accuracy of ``arch`` (report it only for the architecture a search returns)."""
        return float(self.test_acc[self.space.index(arch)])

    @property
    def best_arch(self) -> Arch:
        """The architecture with the highest validation accuracy (first one on ties)."""
        return self.space.arch_at(int(np.argmax(self.val_acc)))

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


def compute_table(space: SearchSpace, settings: EvalSettings = EvalSettings(), progress: bool = True) -> Table:
    """Train and evaluate every architecture of ``space`` (on the CPU; each network is tiny).

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
            done[key] = train_and_evaluate(config, split, settings)
        rows.append(done[key])
    return Table(
        space,
        settings,
        *(np.array([r[k] for r in rows]) for k in ("val_acc", "test_acc", "params")),
        cpu_seconds=time.process_time() - start,
    )


def load_table(
    space: SearchSpace = DIGITS_SPACE,
    settings: EvalSettings = EvalSettings(),
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Table:
    """The table of ``space`` under ``settings``: read from the cache, or computed and cached.

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
    table = compute_table(space, settings, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
        json.dump(table.to_json(), tmp)
    os.replace(tmp.name, path)
    return table


# --------------------------------------------------------------------------- searches


@dataclass
class SearchResult:
    """The architectures a search evaluated, in order, and their rewards."""

    archs: list[Arch] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, arch: Arch, reward: float) -> None:
        """Record one evaluation."""
        self.archs.append(arch)
        self.rewards.append(float(reward))

    @property
    def best_so_far(self) -> np.ndarray:
        """``(budget,)`` best reward after each evaluation."""
        return best_so_far(self.rewards)

    @property
    def best_arch(self) -> Arch:
        """The evaluated architecture with the highest reward (first one on ties)."""
        if not self.archs:
            raise ValueError("empty search result")
        return self.archs[int(np.argmax(self.rewards))]


def best_so_far(rewards: Sequence[float]) -> np.ndarray:
    """Running maximum of ``rewards``: entry ``i`` is the best of the first ``i + 1``."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 1 or len(rewards) == 0:
        raise ValueError(f"rewards must be a non-empty 1-D sequence, got shape {rewards.shape}")
    return np.maximum.accumulate(rewards)


def _check_budget(budget: int) -> None:
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive int, got {budget!r}")


def random_search(space: SearchSpace, objective: Objective, budget: int, seed: int = 0) -> SearchResult:
    """Evaluate ``budget`` architectures drawn uniformly (with replacement)."""
    _check_budget(budget)
    rng = np.random.default_rng(seed)
    result = SearchResult()
    for _ in range(budget):
        arch = space.sample(rng)
        result.add(arch, objective(arch))
    return result


def regularized_evolution(
    space: SearchSpace,
    objective: Objective,
    budget: int,
    seed: int = 0,
    population_size: int = 20,
    sample_size: int = 5,
    aging: bool = True,
) -> SearchResult:
    """Regularized (aging) evolution (Real et al., 2019).

    Start from ``population_size`` random architectures. Then repeat: draw ``sample_size``
    members at random (a tournament), mutate the best of them, evaluate the child, add it and
    remove the *oldest* member (``aging=True``) or the *worst* (``aging=False``, classic
    tournament evolution). Every evaluation, the initial ones included, counts toward ``budget``.
    """
    _check_budget(budget)
    if not 1 <= sample_size <= population_size:
        raise ValueError(f"need 1 <= sample_size <= population_size, got {sample_size}, {population_size}")
    rng = np.random.default_rng(seed)
    result = SearchResult()
    population: deque[tuple[Arch, float]] = deque()  # oldest on the left
    while len(population) < population_size and len(result.archs) < budget:
        arch = space.sample(rng)
        reward = objective(arch)
        population.append((arch, reward))
        result.add(arch, reward)
    while len(result.archs) < budget:
        contenders = rng.choice(len(population), size=sample_size, replace=False)
        parent = max((population[i] for i in contenders), key=lambda member: member[1])
        child = mutate(parent[0], space, rng)
        reward = objective(child)
        population.append((child, reward))
        result.add(child, reward)
        if aging:
            population.popleft()  # the oldest dies, however good it is
        else:
            population.remove(min(population, key=lambda member: member[1]))
    return result


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
        self.heads = nn.ModuleList(nn.Linear(hidden, n) for n in self.sizes)
        for head in self.heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(
        self, batch: int = 1, actions: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample ``batch`` architectures, or score the given ``actions`` ``(B, T)``.

        Returns ``actions (B, T)`` int64, their ``log_prob (B,)`` = sum over steps of
        ``log pi(a_t | a_<t)`` (differentiable), and the ``entropy (B,)`` summed over steps.
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
        return self.log_prob(torch.tensor(space.all())).exp().numpy().astype(np.float64)


def reinforce_search(
    space: SearchSpace,
    objective: Objective,
    budget: int,
    seed: int = 0,
    batch_size: int = 4,
    lr: float = 0.05,
    baseline_decay: float = 0.9,
    entropy_weight: float = 0.0,
    hidden: int = 32,
) -> SearchResult:
    """Train a :class:`Controller` with REINFORCE while it searches.

    Each update samples ``batch_size`` architectures, evaluates them, and descends
    ``-mean((R - b) * log pi(a)) - entropy_weight * mean(H)``. The baseline ``b`` is an
    exponential moving average of past rewards, updated *after* the step so it does not
    depend on the current samples. ``result.extra`` holds the trained ``controller``, the
    ``baseline`` trace and, when the objective is a :class:`Table`, the final policy's
    ``expected_reward`` (exact, summed over the whole space).
    """
    _check_budget(budget)
    if not 0.0 <= baseline_decay < 1.0:
        raise ValueError(f"baseline_decay must be in [0, 1), got {baseline_decay}")
    torch.manual_seed(seed)
    controller = Controller(space.sizes, hidden=hidden)
    opt = torch.optim.Adam(controller.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    result = SearchResult()
    baseline: float | None = None
    baselines = []
    while len(result.archs) < budget:
        n = min(batch_size, budget - len(result.archs))
        actions, log_prob, entropy = controller(n, generator=generator)  # (n, T), (n,), (n,)
        archs = [tuple(a) for a in actions.tolist()]
        rewards = torch.tensor([objective(a) for a in archs], dtype=torch.float32)  # (n,)
        for arch, reward in zip(archs, rewards.tolist()):
            result.add(arch, reward)
        if baseline is None:
            baseline = float(rewards.mean())  # first batch: no history yet, advantage averages to 0
        advantage = rewards - baseline  # (n,)
        loss = -(advantage * log_prob).mean() - entropy_weight * entropy.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        baseline = baseline_decay * baseline + (1 - baseline_decay) * float(rewards.mean())
        baselines.append(baseline)
    result.extra.update(controller=controller, baseline=np.array(baselines))
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
