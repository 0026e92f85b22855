"""Chapter 01: an architecture as a formal object, and universal approximation in 1-D.

- :func:`five_tuple` reads ``(L, F, W, B, O)`` off a real ``nn.Module`` and optimizer.
- :func:`interpolating_relu_net` is the constructive proof of the universal approximation
  theorem in one dimension: a one-hidden-layer ReLU network equal to the piecewise-linear
  interpolant of ``f`` on a uniform grid.
- :func:`sawtooth_net` is the depth-separation example: ``k`` layers of 2 units give
  ``2**k`` linear pieces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

ACTIVATIONS = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Softplus)


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


def five_tuple(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> FiveTuple:
    """Read the five-tuple off ``model`` (and ``optimizer``, if given).

    Layers are the leaf modules that own parameters; activations are the leaf modules
    of the usual activation types; W and B are the parameters named ``*weight``/``*bias``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    leaves = [(name, m) for name, m in model.named_modules() if not list(m.children())]
    layers = [f"{name}: {m.__class__.__name__}" for name, m in leaves if list(m.parameters(recurse=False))]
    activations = [f"{name}: {m.__class__.__name__}" for name, m in leaves if isinstance(m, ACTIVATIONS)]
    weights, biases = {}, {}
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
    """Sup-norm error ``max |f(x) - model(x)|`` estimated on a fine uniform grid of ``n`` points."""
    x = torch.linspace(lo, hi, n, dtype=torch.float64)[:, None]  # (n, 1)
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float64
    with torch.no_grad():
        y = model(x.to(dtype)).double()
    return (f(x) - y).abs().max().item()


def spread_kinks_(model: nn.Sequential, lo: float = 0.0, hi: float = 1.0, max_slope: float = 5.0) -> nn.Sequential:
    """Re-initialise the hidden layer so every ReLU kink ``-b/w`` falls inside [lo, hi].

    PyTorch's default init draws ``w, b ~ U(-1, 1)``: many kinks then sit outside the
    domain and those units are linear (or dead) there, wasting width.
    """
    hidden = model[0]
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
    steps: int = 3000,
    lr: float = 1e-2,
    n_train: int = 512,
    seed: int = 0,
    kinks_in_domain: bool = True,
) -> nn.Sequential:
    """Train a width-``width`` ReLU network on ``f`` over [0, 1] (Adam, full batch, MSE, cosine lr).

    ``kinks_in_domain`` applies :func:`spread_kinks_` before training; ``False`` keeps
    PyTorch's default initialisation.
    """
    torch.manual_seed(seed)
    model = one_hidden_layer(width)
    if kinks_in_domain:
        spread_kinks_(model)
    x = torch.linspace(0, 1, n_train)[:, None]  # (n_train, 1)
    y = f(x.double()).float()  # (n_train, 1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model


def sawtooth_net(depth: int) -> nn.Sequential:
    """``depth`` compositions of the tent map ``t(x) = 2 relu(x) - 4 relu(x - 1/2)`` on [0, 1].

    Each tent layer uses 2 hidden ReLU units; the composition has ``2**depth`` linear pieces.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    layers: list[nn.Module] = []
    for i in range(depth):
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
        y = model(x.to(next(model.parameters()).dtype)).double().squeeze(1)
    slopes = torch.diff(y) / torch.diff(x.squeeze(1))
    changes = (torch.diff(slopes).abs() > 1e-6 * slopes.abs().max().clamp_min(1.0)).long()
    # a kink strictly inside a grid cell shows up as two consecutive changes: count runs
    starts = changes[1:] & (1 - changes[:-1])
    return int(changes[0].item() + starts.sum().item()) + 1
