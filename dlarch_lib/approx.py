"""Chapter 01: an architecture as a formal object, and universal approximation in 1-D.

- :func:`five_tuple` reads ``(L, F, W, B, O)`` off a real ``nn.Module`` and optimizer.
- :func:`interpolating_relu_net` is the constructive proof of the universal approximation
  theorem in one dimension: a one-hidden-layer ReLU network equal to the piecewise-linear
  interpolant of ``f`` on a uniform grid.
- :func:`fit_one_hidden_layer` trains such a network with the book's engine
  (:func:`dlarch_lib.core.train.fit`), to compare what gradient descent finds with the construction.
- :func:`sawtooth_net` is the depth-separation example: ``k`` layers of 2 units give
  ``2**k`` linear pieces.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dlarch_lib.core.runtime import seeded
from dlarch_lib.core.train import fit, loss_step, model_device


@dataclass(frozen=True)
class FiveTuple:
    """The five-tuple ``A = (L, F, W, B, O)`` of an architecture, read off a model."""

    layers: list[str]  # L: the parametrised layers, in order
    activations: list[str]  # F: the non-linearities, in order
    weights: dict[str, tuple[int, ...]]  # W: weight tensors and their shapes
    biases: dict[str, tuple[int, ...]]  # B: bias tensors and their shapes
    optimizer: dict[str, object]  # O: optimizer class and hyper-parameters

    @property
    def num_parameters(self) -> int:
        """Number of scalars in W and B."""
        count = 0
        for shape in (*self.weights.values(), *self.biases.values()):
            n = 1
            for s in shape:
                n *= s
            count += n
        return count


def is_activation(module: nn.Module) -> bool:
    """True for PyTorch's activation layers: the classes defined in ``torch.nn.modules.activation``.

    That module is PyTorch's own list of non-linearities (``ReLU``, ``GELU``, ``Tanh``, ``SiLU``,
    ``Softmax``, ``PReLU``, ...), so no table has to be kept here. Subclasses count too; an
    activation written as a plain ``nn.Module`` of your own does not. ``MultiheadAttention``,
    which PyTorch keeps in the same file, is a layer, not an activation.
    """
    if isinstance(module, nn.MultiheadAttention):
        return False
    return any(cls.__module__ == nn.modules.activation.__name__ for cls in type(module).__mro__)


def five_tuple(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> FiveTuple:
    """Read the five-tuple off ``model`` (and ``optimizer``, if given).

    Layers are the leaf modules that own parameters; activations are the leaf modules that
    :func:`is_activation` recognises; W and B are the parameters named ``*weight``/``*bias``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    leaves = [(name, m) for name, m in model.named_modules() if not list(m.children())]
    layers = [f"{name}: {m.__class__.__name__}" for name, m in leaves if list(m.parameters(recurse=False))]
    activations = [f"{name}: {m.__class__.__name__}" for name, m in leaves if is_activation(m)]
    weights: dict[str, tuple[int, ...]] = {}
    biases: dict[str, tuple[int, ...]] = {}
    for name, p in model.named_parameters():
        (biases if name.endswith("bias") else weights)[name] = tuple(p.shape)
    opt: dict[str, object] = {}
    if optimizer is not None:
        group = optimizer.param_groups[0]
        keep = ("lr", "betas", "momentum", "weight_decay", "eps")
        opt = {"class": optimizer.__class__.__name__, **{k: group[k] for k in keep if k in group}}
    return FiveTuple(layers, activations, weights, biases, opt)


def interpolating_relu_net(
    f: Callable[[torch.Tensor], torch.Tensor], n_pieces: int, lo: float = 0.0, hi: float = 1.0
) -> nn.Sequential:
    """A one-hidden-layer ReLU network equal to the piecewise-linear interpolant of ``f``.

    With knots ``t_0 < ... < t_n`` (uniform on ``[lo, hi]``) and slopes ``s_j`` of the
    interpolant on ``[t_j, t_{j+1}]``, the network computes
    ``f(t_0) + s_0 relu(x - t_0) + sum_{j>=1} (s_j - s_{j-1}) relu(x - t_j)``:
    ``n_pieces`` hidden units. Input ``(N, 1)``, output ``(N, 1)``.
    """
    if n_pieces < 1:
        raise ValueError(f"n_pieces must be >= 1, got {n_pieces}")
    if not hi > lo:
        raise ValueError(f"need lo < hi, got [{lo}, {hi}]")
    knots = torch.linspace(lo, hi, n_pieces + 1, dtype=torch.float64)  # (n+1,)
    values = f(knots)  # (n+1,)
    slopes = torch.diff(values) / torch.diff(knots)  # (n,)
    out_weights = torch.cat([slopes[:1], torch.diff(slopes)])  # (n,)
    hidden = nn.Linear(1, n_pieces).double()
    output = nn.Linear(n_pieces, 1).double()
    with torch.no_grad():
        hidden.weight.fill_(1.0)  # (n, 1)
        hidden.bias.copy_(-knots[:-1])  # unit j switches on at t_j
        output.weight.copy_(out_weights[None, :])  # (1, n)
        output.bias.fill_(float(values[0]))
    return nn.Sequential(hidden, nn.ReLU(), output)


def one_hidden_layer(width: int, activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """The model class of the theorem: ``x -> W2 act(W1 x + b1) + b2`` for scalar x."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    return nn.Sequential(nn.Linear(1, width), activation(), nn.Linear(width, 1))


def sup_error(
    f: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, lo: float = 0.0, hi: float = 1.0, n: int = 10_001
) -> float:
    """Sup-norm error ``max |f(x) - model(x)|`` estimated on a fine uniform grid of ``n`` points.

    ``model`` maps ``(n, 1) -> (n, 1)``; it runs on its own device, in its own dtype.
    """
    x = torch.linspace(lo, hi, n, dtype=torch.float64)[:, None]  # (n, 1)
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float64
    with torch.no_grad():
        y = model(x.to(model_device(model), dtype)).double().cpu()
    return (f(x) - y).abs().max().item()


def spread_kinks_(model: nn.Sequential, lo: float = 0.0, hi: float = 1.0, max_slope: float = 5.0) -> nn.Sequential:
    """Re-initialise the hidden layer so every ReLU kink ``-b/w`` falls inside [lo, hi].

    PyTorch's default init draws ``w, b ~ U(-1, 1)``: many kinks then sit outside the
    domain and those units are linear (or dead) there, wasting width. Draws from torch's
    global generator (seed it, or call this inside :func:`dlarch_lib.core.runtime.seeded`).
    """
    hidden = model[0]
    if not isinstance(hidden, nn.Linear) or hidden.in_features != 1:
        raise TypeError(f"expected a model whose first layer is nn.Linear(1, width), got {hidden}")
    width = hidden.out_features
    with torch.no_grad():
        sign = torch.where(torch.rand(width) < 0.5, -1.0, 1.0)
        w = sign * (1.0 + (max_slope - 1.0) * torch.rand(width))  # (width,)
        kinks = lo + (hi - lo) * torch.rand(width)  # (width,)
        hidden.weight.copy_(w[:, None])
        hidden.bias.copy_(-w * kinks)
    return model


def fit_one_hidden_layer(
    f: Callable[[torch.Tensor], torch.Tensor],
    width: int,
    *,
    device: torch.device | str,
    steps: int = 3000,
    lr: float = 1e-2,
    n_train: int = 512,
    seed: int = 0,
    kinks_in_domain: bool = True,
) -> nn.Sequential:
    """Train a width-``width`` ReLU network on ``f`` over [0, 1]: full batch, MSE, Adam, cosine lr.

    The network is initialised from ``seed`` (:func:`dlarch_lib.core.runtime.seeded`: the caller's
    random stream is left alone), built on ``device`` and trained there by
    :func:`dlarch_lib.core.train.fit`, one step per full pass over ``n_train`` grid points.
    ``kinks_in_domain`` applies :func:`spread_kinks_` before training; ``False`` keeps
    PyTorch's default initialisation. Returns the trained network.
    """
    if steps < 1 or n_train < 2:
        raise ValueError(f"need steps >= 1 and n_train >= 2, got {steps} and {n_train}")
    with seeded(seed):
        model = one_hidden_layer(width)
        if kinks_in_domain:
            spread_kinks_(model)
    model.to(device)
    x = torch.linspace(0, 1, n_train, device=model_device(model))[:, None]  # (n_train, 1)
    y = f(x.double()).float()  # (n_train, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    full_batch = itertools.repeat((x, y))  # the same batch at every step
    fit(model, full_batch, loss_step(F.mse_loss), steps=steps, optimizer=optimizer, scheduler=schedule, progress=False)
    return model


def sawtooth_net(depth: int) -> nn.Sequential:
    """``depth`` compositions of the tent map ``t(x) = 2 relu(x) - 4 relu(x - 1/2)`` on [0, 1].

    Each tent layer uses 2 hidden ReLU units; the composition has ``2**depth`` linear pieces.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    layers: list[nn.Module] = []
    for _ in range(depth):
        up = nn.Linear(1, 2).double()
        with torch.no_grad():
            up.weight.fill_(1.0)
            up.bias.copy_(torch.tensor([0.0, -0.5]))
        down = nn.Linear(2, 1).double()
        with torch.no_grad():
            down.weight.copy_(torch.tensor([[2.0, -4.0]]))
            down.bias.zero_()
        layers += [up, nn.ReLU(), down]
    return nn.Sequential(*layers)


def count_linear_pieces(model: nn.Module, lo: float = 0.0, hi: float = 1.0, n: int = 2**16 + 1) -> int:
    """Number of linear pieces of a 1-D piecewise-linear ``model`` on [lo, hi] (slope changes + 1)."""
    x = torch.linspace(lo, hi, n, dtype=torch.float64)[:, None]
    with torch.no_grad():
        y = model(x.to(model_device(model), next(model.parameters()).dtype)).double().cpu().squeeze(1)
    slopes = torch.diff(y) / torch.diff(x.squeeze(1))
    changes = (torch.diff(slopes).abs() > 1e-6 * slopes.abs().max().clamp_min(1.0)).long()
    # a kink strictly inside a grid cell shows up as two consecutive changes: count runs
    starts = changes[1:] & (1 - changes[:-1])
    return int(changes[0].item() + starts.sum().item()) + 1


def activation_region_ids(model: nn.Sequential, lo: float = -1.0, hi: float = 1.0, n: int = 400) -> torch.Tensor:
    """Which linear region each point of an ``n x n`` grid of ``[lo, hi]^2`` lies in: ids ``(n, n)``, ``[x1, x2]``.

    ``model`` is a 2-input ``Linear``/``ReLU`` stack. Points with the same ReLU on/off pattern of all units
    share an id: on such a set the network is one affine map. Ids run from 0 to the number of patterns - 1.
    """
    first = next((m for m in model if isinstance(m, nn.Linear)), None)
    if first is None or first.in_features != 2:
        raise ValueError("activation_regions needs an nn.Sequential whose first Linear layer has 2 inputs")
    if n < 2 or not lo < hi:
        raise ValueError(f"need n >= 2 and lo < hi; got {n=}, {lo=}, {hi=}")
    xs = torch.linspace(lo, hi, n, dtype=first.weight.dtype, device=first.weight.device)
    h = torch.stack(torch.meshgrid(xs, xs, indexing="ij"), dim=-1).reshape(-1, 2)  # (n^2, 2)
    patterns = []
    with torch.no_grad():
        for layer in model:
            h = layer(h)
            if isinstance(layer, nn.ReLU):
                patterns.append(h > 0)  # (n^2, width)
    if not patterns:
        raise ValueError("the model has no ReLU layer")
    _, ids = torch.unique(torch.cat(patterns, dim=1), dim=0, return_inverse=True)  # (n^2,)
    return ids.reshape(n, n)


def activation_regions(model: nn.Sequential, lo: float = -1.0, hi: float = 1.0, n: int = 400) -> int:
    """Number of distinct ReLU on/off patterns over the grid of :func:`activation_region_ids`.

    This counts the linear regions the grid's points fall in (a lower bound: a region smaller than a
    grid cell can be missed).
    """
    return int(activation_region_ids(model, lo, hi, n).max()) + 1


def line_arrangement_regions(weight: torch.Tensor, bias: torch.Tensor, lo: float = -1.0, hi: float = 1.0) -> int:
    """Exact number of regions that the lines ``w_k . x + b_k = 0`` cut the open square ``(lo, hi)^2`` into.

    ``weight`` ``(n, 2)``, ``bias`` ``(n,)``. For lines in general position (no two parallel, no three
    through one point, none through a corner), each line that crosses the square adds one region plus one
    per earlier line it meets inside: ``1 + #lines crossing + #crossings inside``.
    """
    if weight.ndim != 2 or weight.shape[1] != 2 or bias.shape != weight.shape[:1]:
        raise ValueError(f"expected weight (n, 2) and bias (n,), got {tuple(weight.shape)} and {tuple(bias.shape)}")
    w, b = weight.double(), bias.double()
    corners = torch.tensor([[lo, lo], [lo, hi], [hi, lo], [hi, hi]], dtype=torch.float64)
    side = corners @ w.T + b  # (4, n): the sign at each corner
    crossing = (side.min(dim=0).values < 0) & (side.max(dim=0).values > 0)  # (n,)
    inside = 0
    idx = torch.nonzero(crossing).flatten().tolist()
    for a_pos, i in enumerate(idx):
        for j in idx[a_pos + 1 :]:
            A = torch.stack([w[i], w[j]])  # (2, 2)
            if torch.linalg.det(A).abs() < 1e-12:
                continue  # parallel: no crossing
            point = torch.linalg.solve(A, -torch.stack([b[i], b[j]]))  # (2,)
            inside += int(bool(((point > lo) & (point < hi)).all()))
    return 1 + len(idx) + inside


def ridge_relu_net(
    directions: torch.Tensor,
    profiles: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    n_pieces: int,
    ranges: Sequence[tuple[float, float]],
) -> nn.Sequential:
    """One hidden layer on ``R^d`` for a sum of ridge functions ``f(x) = sum_r g_r(a_r . x)``.

    ``directions`` ``(m, d)`` holds the ``a_r``; ``g_r`` is interpolated on ``ranges[r]`` (which must
    contain ``a_r . x`` over the domain) by :func:`interpolating_relu_net` with ``n_pieces`` units, so the
    network has ``m * n_pieces`` hidden units. Input ``(N, d)``, output ``(N, 1)``, float64.
    """
    if directions.ndim != 2 or not len(profiles) == len(ranges) == directions.shape[0]:
        raise ValueError(
            f"need directions (m, d) with m profiles and m ranges; got {tuple(directions.shape)}, "
            f"{len(profiles)} profiles, {len(ranges)} ranges"
        )
    m, d = directions.shape
    hidden = nn.Linear(d, m * n_pieces).double()
    output = nn.Linear(m * n_pieces, 1).double()
    with torch.no_grad():
        output.bias.zero_()
        for r, (g, (lo, hi)) in enumerate(zip(profiles, ranges)):
            one_d = interpolating_relu_net(g, n_pieces, lo, hi)  # x -> relu(x - t_j) units on [lo, hi]
            first, last = one_d[0], one_d[2]
            assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)
            rows = slice(r * n_pieces, (r + 1) * n_pieces)
            hidden.weight[rows] = directions[r].double()  # unit j of ridge r sees a_r . x
            hidden.bias[rows] = first.bias
            output.weight[0, rows] = last.weight[0]
            output.bias.add_(last.bias)
    return nn.Sequential(hidden, nn.ReLU(), output)
