"""Training techniques: learning-rate schedules, dropout, weight decay, batch norm, clipping.

Each technique is written out by hand in a few lines, and each has a PyTorch counterpart it
is tested against:

- schedules ``step_lr``, ``cosine_lr``, ``warmup_cosine_lr``  ~ ``torch.optim.lr_scheduler``
- ``dropout`` / :class:`Dropout` (inverted dropout)              ~ ``nn.Dropout``
- ``adam_step`` (L2 in the gradient, or decoupled decay)         ~ ``torch.optim.Adam`` / ``AdamW``
- ``sgd_step``                                                   ~ ``torch.optim.SGD``
- :class:`BatchNorm1d`                                           ~ ``nn.BatchNorm1d``
- ``clip_grad_norm``                                             ~ ``nn.utils.clip_grad_norm_``

The experiments use :class:`DigitsMLP` with :func:`train_classifier` (a small loop that steps a
schedule every batch) and a plain RNN on the adding problem (:func:`adding_problem`,
:func:`train_rnn`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dlarch_lib.core.data import Split
from dlarch_lib.core.train import accuracy, make_optimizer

SCHEDULES = ("constant", "step", "cosine", "warmup_cosine")

# --------------------------------------------------------------------------- schedules


def _check_step(step: int) -> None:
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")


def step_lr(step: int, *, base_lr: float, step_size: int, gamma: float = 0.1) -> float:
    """Step decay: ``base_lr * gamma ** (step // step_size)`` (``StepLR``)."""
    _check_step(step)
    if step_size < 1:
        raise ValueError(f"step_size must be >= 1, got {step_size}")
    return base_lr * gamma ** (step // step_size)


def cosine_lr(step: int, *, base_lr: float, total_steps: int, min_lr: float = 0.0) -> float:
    """Cosine annealing from ``base_lr`` at step 0 to ``min_lr`` at ``total_steps`` (then flat).

    ``min_lr + (base_lr - min_lr) * (1 + cos(pi * step / total_steps)) / 2`` (``CosineAnnealingLR``).
    """
    _check_step(step)
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    progress = min(step, total_steps) / total_steps
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_lr(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warm-up ``base_lr * (step + 1) / warmup_steps`` for the first ``warmup_steps``
    steps, then cosine annealing over the remaining ``total_steps - warmup_steps``."""
    _check_step(step)
    if not 1 <= warmup_steps < total_steps:
        raise ValueError(f"need 1 <= warmup_steps < total_steps, got {warmup_steps} and {total_steps}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return cosine_lr(step - warmup_steps, base_lr=base_lr, total_steps=total_steps - warmup_steps, min_lr=min_lr)


def schedule_factor(name: str, total_steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """The multiplier ``lr_t / base_lr`` of schedule ``name`` (one of ``SCHEDULES``), for ``LambdaLR``.

    ``"step"`` divides the rate by 10 every ``total_steps // 3`` steps (two drops in all);
    ``"warmup_cosine"`` needs ``warmup_steps >= 1``.
    """
    if name == "constant":
        return lambda step: 1.0
    if name == "step":
        return lambda step: step_lr(step, base_lr=1.0, step_size=max(1, total_steps // 3), gamma=0.1)
    if name == "cosine":
        return lambda step: cosine_lr(step, base_lr=1.0, total_steps=total_steps)
    if name == "warmup_cosine":
        return lambda step: warmup_cosine_lr(step, base_lr=1.0, warmup_steps=warmup_steps, total_steps=total_steps)
    raise ValueError(f"unknown schedule {name!r}; expected one of {SCHEDULES}")


def torch_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr: float = 0.0,
    step_size: int = 1,
    gamma: float = 0.1,
) -> torch.optim.lr_scheduler.LRScheduler:
    """PyTorch's own scheduler for ``"step"``, ``"cosine"`` or ``"warmup_cosine"`` (the reference).

    ``"warmup_cosine"`` is ``SequentialLR(LinearLR(1/W -> 1 over W-1 steps), CosineAnnealingLR)``.
    """
    sched = torch.optim.lr_scheduler
    if name == "step":
        return sched.StepLR(optimizer, step_size=step_size, gamma=gamma)
    if name == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=min_lr)
    if name == "warmup_cosine":
        if not 1 <= warmup_steps < total_steps:
            raise ValueError(f"need 1 <= warmup_steps < total_steps, got {warmup_steps} and {total_steps}")
        warm = sched.LinearLR(
            optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0, total_iters=max(warmup_steps - 1, 1)
        )
        cos = sched.CosineAnnealingLR(optimizer, T_max=total_steps - warmup_steps, eta_min=min_lr)
        return sched.SequentialLR(optimizer, [warm, cos], milestones=[warmup_steps])
    raise ValueError(f"unknown torch scheduler {name!r}; expected 'step', 'cosine' or 'warmup_cosine'")


def scheduler_lrs(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    """The learning rate a scheduler gives at steps ``0 .. steps-1`` (it calls ``scheduler.step()``)."""
    lrs = []
    for step in range(steps):
        if step > 0:
            scheduler.optimizer.step()  # PyTorch warns if the scheduler steps before the optimizer
            scheduler.step()
        lrs.append(scheduler.optimizer.param_groups[0]["lr"])
    return lrs


# --------------------------------------------------------------------------- dropout


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout: zero each entry with probability ``p`` and scale survivors by ``1/(1-p)``.

    In eval mode (``training=False``) it is the identity. Draws its mask like ``F.dropout``
    (``bernoulli_(1 - p)`` on a tensor shaped like ``x``), so both agree under the same seed.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    keep = torch.empty_like(x).bernoulli_(1.0 - p)  # 1 with probability 1-p, same shape as x
    return x * keep.div_(1.0 - p)  # survivors scaled by 1/(1-p), in the order F.dropout uses


class Dropout(nn.Module):
    """Module form of :func:`dropout`: active in ``train()`` mode, identity in ``eval()`` mode."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same shape as ``x``."""
        return dropout(x, self.p, self.training)


# --------------------------------------------------------------------------- weight decay vs L2


@dataclass
class AdamState:
    """Adam's moment estimates for one tensor and the step count."""

    m: torch.Tensor
    v: torch.Tensor
    t: int = 0

    @classmethod
    def zeros_like(cls, w: torch.Tensor) -> AdamState:
        """Fresh state (zero moments) for a parameter shaped like ``w``."""
        return cls(torch.zeros_like(w), torch.zeros_like(w))


def adam_step(
    w: torch.Tensor,
    grad: torch.Tensor,
    state: AdamState,
    *,
    lr: float,
    weight_decay: float = 0.0,
    decoupled: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.Tensor:
    """One Adam step; returns the new ``w`` and updates ``state`` in place.

    ``decoupled=False`` is Adam with L2: ``grad + weight_decay * w`` goes through the moments
    (``torch.optim.Adam(weight_decay=...)``). ``decoupled=True`` is AdamW: ``w`` shrinks by
    ``lr * weight_decay * w`` outside the moments (``torch.optim.AdamW``).
    """
    if w.shape != grad.shape or w.shape != state.m.shape:
        raise ValueError(
            f"w, grad and state must have one shape, got {tuple(w.shape)}, {tuple(grad.shape)}, {tuple(state.m.shape)}"
        )
    if decoupled:
        w = w * (1.0 - lr * weight_decay)
    else:
        grad = grad + weight_decay * w
    b1, b2 = betas
    state.t += 1
    state.m = b1 * state.m + (1 - b1) * grad
    state.v = b2 * state.v + (1 - b2) * grad * grad
    m_hat, v_hat = state.m / (1 - b1**state.t), state.v / (1 - b2**state.t)
    return w - lr * m_hat / (v_hat.sqrt() + eps)


def sgd_step(
    w: torch.Tensor, grad: torch.Tensor, *, lr: float, weight_decay: float = 0.0, decoupled: bool = False
) -> torch.Tensor:
    """One plain SGD step with L2 in the gradient (``decoupled=False``) or decoupled decay.

    The two are the same update: ``w - lr * (grad + wd * w) == (1 - lr * wd) * w - lr * grad``.
    """
    if w.shape != grad.shape:
        raise ValueError(f"w and grad must have one shape, got {tuple(w.shape)} and {tuple(grad.shape)}")
    if decoupled:
        return (1.0 - lr * weight_decay) * w - lr * grad
    return w - lr * (grad + weight_decay * w)


# --------------------------------------------------------------------------- batch normalisation


class BatchNorm1d(nn.Module):
    """Batch normalisation over ``(N, C)`` or ``(N, C, L)`` inputs, written out.

    Train mode normalises with the batch mean and biased variance per channel and updates the
    running statistics, ``running <- (1 - momentum) * running + momentum * batch`` (with the
    *unbiased* variance, as PyTorch does). Eval mode normalises with the running statistics.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))  # gamma
        self.bias = nn.Parameter(torch.zeros(num_features))  # beta
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same shape as ``x``: ``(N, C)`` or ``(N, C, L)``."""
        if x.ndim not in (2, 3) or x.shape[1] != self.num_features:
            raise ValueError(f"expected (N, {self.num_features}) or (N, {self.num_features}, L), got {tuple(x.shape)}")
        dims = (0,) if x.ndim == 2 else (0, 2)  # statistics per channel over batch (and length)
        shape = (1, -1) if x.ndim == 2 else (1, -1, 1)
        if self.training:
            count = x.numel() // self.num_features
            if count < 2:
                raise ValueError("batch norm in train mode needs more than one value per channel")
            mean = x.mean(dim=dims)  # (C,)
            var = x.var(dim=dims, unbiased=False)  # (C,) biased: used to normalise
            with torch.no_grad():
                m = self.momentum
                self.running_mean.mul_(1 - m).add_(m * mean)
                self.running_var.mul_(1 - m).add_(m * var * count / (count - 1))  # unbiased
        else:
            mean, var = self.running_mean, self.running_var
        x_hat = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return self.weight.view(shape) * x_hat + self.bias.view(shape)


# --------------------------------------------------------------------------- gradient clipping


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Rescale all gradients by ``min(1, max_norm / ||g||)``, ``||g||`` the global L2 norm.

    Returns the norm before clipping (like ``nn.utils.clip_grad_norm_``).
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    total = torch.sqrt(sum((g.detach() ** 2).sum() for g in grads))
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # torch adds the same 1e-6
    for g in grads:
        g.mul_(scale)
    return total


# --------------------------------------------------------------------------- the digits MLP


class DigitsMLP(nn.Module):
    """An MLP for 8x8 digits: ``depth`` blocks of Linear -> [BatchNorm] -> ReLU -> [Dropout].

    The batch-norm layers drop the linear bias (it would cancel, chapter 4).
    """

    def __init__(
        self, hidden: int = 256, depth: int = 2, dropout: float = 0.0, batchnorm: bool = False, num_classes: int = 10
    ) -> None:
        super().__init__()
        if hidden < 1 or depth < 1:
            raise ValueError(f"hidden and depth must be >= 1, got {hidden} and {depth}")
        layers: list[nn.Module] = [nn.Flatten()]  # (N, 1, 8, 8) -> (N, 64)
        width = 64
        for _ in range(depth):
            layers.append(nn.Linear(width, hidden, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for images ``(N, 1, 8, 8)`` (or flat ``(N, 64)``)."""
        return self.net(x)


@dataclass
class RunRecord:
    """What :func:`train_classifier` returns: per-step learning rate and loss, test accuracy."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    epoch_loss: list[float] = field(default_factory=list)
    test_acc: float = float("nan")


def train_classifier(
    model: nn.Module,
    split: Split,
    *,
    epochs: int,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    schedule: str = "constant",
    warmup_frac: float = 0.1,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
    desc: str = "train",
) -> RunRecord:
    """Train on ``split`` with a per-step ``schedule`` (``LambdaLR`` over :func:`schedule_factor`).

    ``dlarch_lib.core.train.fit`` steps no scheduler, hence this small loop. It batches by slicing a
    seeded permutation of the tensors (much cheaper than a ``DataLoader`` for 8x8 images). The
    test set is used once, at the end, in eval mode.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_train, y_train = split.x_train.to(device), split.y_train.to(device)
    n = len(y_train)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    opt = make_optimizer(model, optimizer, lr, weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule_factor(schedule, total, max(1, int(warmup_frac * total))))
    model.to(device)
    record = RunRecord()
    for _ in tqdm(range(epochs), desc=desc, disable=not progress, mininterval=0.5):
        model.train()
        order = torch.randperm(n, generator=g).to(device)
        running = 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            record.lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
            record.losses.append(loss.item())
            running += record.losses[-1]
        record.epoch_loss.append(running / steps_per_epoch)
    model.eval()
    with torch.no_grad():
        record.test_acc = accuracy(model(split.x_test.to(device)), split.y_test.to(device))
    return record


# --------------------------------------------------------------------------- an exploding RNN


def adding_problem(n: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The adding problem: ``x`` ``(n, length, 2)``, target ``y`` ``(n,)``.

    Channel 0 holds uniform numbers in [0, 1]; channel 1 marks two positions, one in each half of
    the sequence; the target is the sum of the two marked numbers. Predicting the mean, 1, gives
    a mean squared error of 1/6.
    """
    if n < 1 or length < 2:
        raise ValueError(f"need n >= 1 and length >= 2, got {n} and {length}")
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(n, length, generator=g)
    first = torch.randint(0, length // 2, (n,), generator=g)
    second = torch.randint(length // 2, length, (n,), generator=g)
    marks = torch.zeros(n, length)
    rows = torch.arange(n)
    marks[rows, first] = 1.0
    marks[rows, second] = 1.0
    return torch.stack([values, marks], dim=-1), values[rows, first] + values[rows, second]


class RNNRegressor(nn.Module):
    """A plain (Elman) RNN read out from its last hidden state: ``(N, T, 2) -> (N,)``."""

    def __init__(self, hidden: int = 64, nonlinearity: str = "tanh", recurrent_scale: float = 1.0) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, hidden, batch_first=True, nonlinearity=nonlinearity)
        with torch.no_grad():  # orthogonal recurrent matrix times a scale: spectral radius = scale
            nn.init.orthogonal_(self.rnn.weight_hh_l0)
            self.rnn.weight_hh_l0.mul_(recurrent_scale)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions ``(N,)``."""
        if x.ndim != 3 or x.shape[-1] != 2:
            raise ValueError(f"expected (N, T, 2), got {tuple(x.shape)}")
        out, _ = self.rnn(x)  # (N, T, H)
        return self.head(out[:, -1]).squeeze(-1)


def train_rnn(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int = 64,
    clip: float | None = None,
    seed: int = 0,
) -> tuple[list[float], list[float]]:
    """Train with SGD on mini-batches of ``(x, y)``; returns per-step (losses, gradient norms).

    ``clip`` is the ``max_norm`` for ``nn.utils.clip_grad_norm_`` (``None``: no clipping). A
    non-finite loss stops training early (the rest of the run is lost anyway).
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses, norms = [], []
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch_size,), generator=g)
        loss = F.mse_loss(model(x[idx]), y[idx])
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(model.parameters(), clip if clip is not None else float("inf"))
        norms.append(norm.item())
        opt.step()
    return losses, norms
