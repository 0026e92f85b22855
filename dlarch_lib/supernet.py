"""Chapter 15: weight-sharing architecture search, a supernet over the network part of a search space.

A *supernet* holds one set of weights from which every architecture of a space is a sub-network
(ENAS, Pham et al. 2018; single-path one-shot, Guo et al. 2020). For chapter 15's digits MLPs
(:data:`~dlarch_lib.nas.DIGITS_ARCH_SPACE` without its learning rate) that is:

- depth ``k``: the first ``k`` hidden layers of the deepest network;
- width ``w``: the first ``w`` units of each layer (a slice of the widest weight matrix, and of
  the head's input columns);
- activation and skip: switches, which own no weights.

:class:`SuperNet` runs any sub-network (``supernet(x, config)``); :meth:`SuperNet.extract` copies
the slices into the stand-alone network that :func:`~dlarch_lib.nas.build_network` builds, so the
two can be compared. :func:`train_supernet` trains it with uniform single-path sampling (one random
architecture per step). :func:`proxy_table` evaluates every architecture with its inherited weights,
without retraining, and returns a :class:`~dlarch_lib.nas.Table` that any search of chapter 15 or 16
can use as its objective. :func:`restrict` cuts the stand-alone table down to the same architectures
(with the training settings fixed), and :func:`rank_fidelity` and :func:`top_overlap` measure how
well the proxy ranks them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import kendalltau, spearmanr
from torch import nn

from dlarch_lib.core.data import Split
from dlarch_lib.core.train import History, accuracy, fit
from dlarch_lib.modular import ACTIVATIONS, Chain, MLPConfig, mlp_parameter_count
from dlarch_lib.nas import NETWORK_KEYS, Config, EvalSettings, SearchSpace, Table, build_network, random_batches


def network_space(space: SearchSpace) -> SearchSpace:
    """The decisions of ``space`` that describe the network (``depth, width, activation, skip``), in its order.

    The others (the learning rate) are training settings, which one shared set of weights cannot vary.
    """
    missing = [k for k in NETWORK_KEYS if k not in space.names]
    if missing:
        raise ValueError(f"the space lacks the network decisions {missing}; it has {list(space.names)}")
    return SearchSpace(tuple(d for d in space.dimensions if d.name in NETWORK_KEYS))


class SuperNet(nn.Module):
    """One set of weights for every digits MLP of up to ``max_depth`` hidden layers of up to ``max_width`` units.

    Hidden layer ``i`` owns a full ``nn.Linear`` (``in_features -> max_width`` for ``i = 0``,
    ``max_width -> max_width`` after); the head owns ``max_width -> num_classes``. The sub-network of
    ``config`` uses the first ``depth`` layers, and of each the top-left ``width x fan_in`` block of the
    weight and the first ``width`` biases; the head uses the first ``width`` input columns. It has no
    normalisation layers, so a sub-network needs no statistics of its own (no recalibration).
    """

    def __init__(self, max_depth: int = 3, max_width: int = 128, in_features: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        for name, value in dict(
            max_depth=max_depth, max_width=max_width, in_features=in_features, num_classes=num_classes
        ).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.max_depth, self.max_width = max_depth, max_width
        self.in_features, self.num_classes = in_features, num_classes
        fan_ins = [in_features] + [max_width] * (max_depth - 1)
        self.hidden = nn.ModuleList(nn.Linear(fan_in, max_width) for fan_in in fan_ins)
        self.head = nn.Linear(max_width, num_classes)

    @classmethod
    def for_space(cls, space: SearchSpace, in_features: int = 64, num_classes: int = 10) -> SuperNet:
        """The smallest supernet that holds every network of ``space`` (its deepest and widest options)."""
        net = network_space(space)
        config = {d.name: d.options for d in net.dimensions}  # type: ignore[union-attr]
        return cls(int(max(config["depth"])), int(max(config["width"])), in_features, num_classes)

    def check(self, config: Config) -> tuple[int, int, str, bool]:
        """``(depth, width, activation, skip)`` of ``config``, or ``ValueError`` if the supernet cannot run it."""
        missing = [k for k in NETWORK_KEYS if k not in config]
        if missing:
            raise ValueError(f"architecture config lacks {missing}; it has {sorted(config)}")
        depth, width = int(config["depth"]), int(config["width"])
        if not 1 <= depth <= self.max_depth:
            raise ValueError(f"depth must be in 1..{self.max_depth}, got {depth}")
        if not 1 <= width <= self.max_width:
            raise ValueError(f"width must be in 1..{self.max_width}, got {width}")
        activation = str(config["activation"])
        ACTIVATIONS.get(activation)  # an unknown name fails here
        return depth, width, activation, bool(config["skip"])

    def forward(self, x: torch.Tensor, config: Config) -> torch.Tensor:
        """Logits of the sub-network of ``config``: ``(B, ...) -> (B, num_classes)``."""
        depth, width, activation, skip = self.check(config)
        act = ACTIVATIONS.get(activation)()  # parameter-free: a switch, not a weight
        h = x.flatten(1)  # (B, in_features)
        if h.shape[1] != self.in_features:
            raise ValueError(f"inputs must flatten to {self.in_features} features, got {h.shape[1]}")
        layers = [m for m in self.hidden if isinstance(m, nn.Linear)][:depth]
        for i, layer in enumerate(layers):
            fan_in = self.in_features if i == 0 else width
            z = act(F.linear(h, layer.weight[:width, :fan_in], layer.bias[:width]))  # (B, width)
            h = h + z if skip and i > 0 else z  # the residual option acts from the second layer on
        return F.linear(h, self.head.weight[:, :width], self.head.bias)  # (B, num_classes)

    @torch.no_grad()
    def extract(self, config: Config) -> Chain:
        """A stand-alone :func:`~dlarch_lib.nas.build_network` of ``config`` holding copies of its slices."""
        depth, width, _, _ = self.check(config)
        model = build_network(config).to(self.head.weight.device)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]  # hidden layers in order, then the head
        layers = [m for m in self.hidden if isinstance(m, nn.Linear)][:depth]
        for target, layer in zip(linears[:-1], layers):
            target.weight.copy_(layer.weight[:width, : target.in_features])
            target.bias.copy_(layer.bias[:width])
        linears[-1].weight.copy_(self.head.weight[:, :width])
        linears[-1].bias.copy_(self.head.bias)
        return model


def single_path_step(space: SearchSpace, rng: np.random.Generator, log: list[Config] | None = None) -> Any:
    """A ``train.fit`` step for a :class:`SuperNet`: draw one architecture of ``space`` uniformly, train its path.

    A batch is ``(x, y)``; the loss is the cross-entropy of the sampled sub-network, so only the
    weights on its path get a gradient. Each sampled configuration is appended to ``log`` if given.
    """
    net = network_space(space)

    def step(supernet: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
        x, y = batch  # (B, ...), (B,)
        config = net.decode(net.sample(rng))
        if log is not None:
            log.append(config)
        return {"loss": F.cross_entropy(supernet(x, config), y)}

    return step


def train_supernet(
    supernet: SuperNet,
    space: SearchSpace,
    split: Split,
    *,
    steps: int,
    lr: float,
    batch_size: int = 128,
    seed: int = 0,
) -> History:
    """Train ``supernet`` (already on its device) for ``steps`` Adam steps of uniform single-path sampling.

    Each step draws a mini-batch of the training digits and one architecture of ``space`` (both seeded
    by ``seed``) and descends that sub-network's loss (Guo et al., 2020). ``history.loss``
    holds the loss of each step.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    device = supernet.head.weight.device
    x, y = split.x_train.to(device), split.y_train.to(device)  # (N, 1, 8, 8), (N,)
    batches = random_batches(x, y, batch_size, torch.Generator().manual_seed(seed))
    step = single_path_step(space, np.random.default_rng(seed))
    optimizer = torch.optim.Adam(supernet.parameters(), lr=lr)
    return fit(supernet, batches, step, steps=steps, optimizer=optimizer, progress=False, desc="supernet")


@torch.no_grad()
def proxy_table(supernet: SuperNet, space: SearchSpace, split: Split, settings: EvalSettings) -> Table:
    """Every architecture of ``network_space(space)`` evaluated with the supernet's weights (no retraining).

    ``val_acc`` is the proxy a search ranks by, ``test_acc`` the sub-network's test accuracy and
    ``params`` its stand-alone parameter count. ``settings`` describes the split, for the record.
    """
    net = network_space(space)
    device = supernet.head.weight.device
    x_val, y_val = split.x_val.to(device), split.y_val.to(device)
    x_test, y_test = split.x_test.to(device), split.y_test.to(device)
    supernet.eval()
    val, test, params = [], [], []
    for arch in net.all():
        config = net.decode(arch)
        val.append(accuracy(supernet(x_val, config), y_val))
        test.append(accuracy(supernet(x_test, config), y_test))
        mlp = MLPConfig(width=int(config["width"]), depth=int(config["depth"]))
        params.append(float(mlp_parameter_count(mlp)))
    supernet.train()
    return Table(net, settings, np.array(val), np.array(test), np.array(params))


def restrict(table: Table, fixed: Config) -> Table:
    """The rows of ``table`` whose other decisions equal ``fixed`` (e.g. ``{"lr": 1e-2}``), over the network space."""
    net = network_space(table.space)
    others = [name for name in table.space.names if name not in NETWORK_KEYS]
    if sorted(fixed) != sorted(others):
        raise ValueError(f"fix exactly the decisions {others}, got {sorted(fixed)}")
    rows = [table.space.index(table.space.encode({**net.decode(arch), **fixed})) for arch in net.all()]
    return Table(net, table.settings, table.val_acc[rows], table.test_acc[rows], table.params[rows], table.cpu_seconds)


def distinct_mask(space: SearchSpace) -> np.ndarray:
    """``(len(space),)`` bool: False for an architecture whose network duplicates an earlier one (skip at depth 1)."""
    seen: set[tuple[tuple[str, Any], ...]] = set()
    mask = []
    for arch in space.all():
        config = space.decode(arch)
        if config.get("depth") == 1 and "skip" in config:
            config["skip"] = False
        key = tuple(sorted(config.items()))
        mask.append(key not in seen)
        seen.add(key)
    return np.array(mask)


def _paired_scores(
    proxy: Sequence[float] | np.ndarray, truth: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    p, t = np.asarray(proxy, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if p.ndim != 1 or p.shape != t.shape or len(p) < 2:
        raise ValueError(f"proxy and truth must both have shape (n,) with n >= 2, got {p.shape} and {t.shape}")
    return p, t


def rank_fidelity(proxy: Sequence[float] | np.ndarray, truth: Sequence[float] | np.ndarray) -> dict[str, float]:
    """How well ``proxy`` ranks like ``truth`` (both ``(n,)``): Spearman's rho and Kendall's tau-b (ties allowed)."""
    p, t = _paired_scores(proxy, truth)
    return {"spearman": float(spearmanr(p, t).statistic), "kendall": float(kendalltau(p, t).statistic)}


def top_overlap(
    proxy: Sequence[float] | np.ndarray, truth: Sequence[float] | np.ndarray, k: int, quantile: float = 0.75
) -> float:
    """Fraction of the proxy's top ``k`` whose true value is at or above the ``quantile`` of ``truth``.

    A random choice of ``k`` scores about ``1 - quantile`` (ties at the cut raise it slightly).
    Ties in the proxy are broken by position (a stable sort).
    """
    p, t = _paired_scores(proxy, truth)
    if not 1 <= k <= len(p):
        raise ValueError(f"k must be in 1..{len(p)}, got {k}")
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"quantile must be in [0, 1), got {quantile}")
    top = np.argsort(-p, kind="stable")[:k]
    return float(np.mean(t[top] >= np.quantile(t, quantile)))


# --------------------------------------------------------------------------- DARTS's architecture gradient

ArchLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss(w, alpha) -> scalar``: a loss as a function of the network weights and the architecture weights."""


def darts_hypergradient(
    train_loss: ArchLoss, val_loss: ArchLoss, w: torch.Tensor, alpha: torch.Tensor, xi: float, eps: float = 1e-2
) -> torch.Tensor:
    """DARTS's approximate architecture gradient (Liu et al., 2019), with its finite-difference Hessian product.

    With one unrolled step ``w' = w - xi * grad_w L_train(w, alpha)``, the gradient of
    ``L_val(w', alpha)`` with respect to ``alpha`` is
    ``grad_alpha L_val(w', alpha) - xi * grad2_{alpha,w} L_train(w, alpha) @ grad_w' L_val(w', alpha)``.
    The product is approximated by ``(grad_alpha L_train(w+, alpha) - grad_alpha L_train(w-, alpha)) / (2 e)``
    with ``w+- = w +- e v``, ``v = grad_w' L_val(w', alpha)`` and ``e = eps / ||v||``. ``xi = 0`` is
    first-order DARTS. ``w`` and ``alpha`` are flat tensors (no graph needed); returns ``alpha``'s shape.
    """
    if w.ndim != 1 or alpha.ndim != 1:
        raise ValueError(
            f"w and alpha must be flat (1-D) tensors, got shapes {tuple(w.shape)} and {tuple(alpha.shape)}"
        )
    if xi < 0 or eps <= 0:
        raise ValueError(f"need xi >= 0 and eps > 0, got xi={xi}, eps={eps}")

    def grads(loss: ArchLoss, w_at: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w_var, a_var = w_at.detach().requires_grad_(True), alpha.detach().requires_grad_(True)
        g_w, g_a = torch.autograd.grad(loss(w_var, a_var), (w_var, a_var))
        return g_w, g_a

    g_w_train, _ = grads(train_loss, w)
    w_next = w.detach() - xi * g_w_train  # the unrolled step
    v, g_alpha = grads(val_loss, w_next)  # grad_w' L_val, grad_alpha L_val at (w', alpha)
    if xi == 0:
        return g_alpha
    e = eps / max(float(v.norm()), 1e-12)
    _, g_plus = grads(train_loss, w.detach() + e * v)
    _, g_minus = grads(train_loss, w.detach() - e * v)
    return g_alpha - xi * (g_plus - g_minus) / (2 * e)
