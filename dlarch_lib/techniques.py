"""Training techniques: learning-rate schedules, dropout, weight decay, batch norm, clipping.

Each technique is written out by hand in a few lines, and each has a PyTorch counterpart it
is tested against:

- schedules ``step_lr``, ``cosine_lr``, ``warmup_cosine_lr``  ~ ``torch.optim.lr_scheduler``
- ``dropout`` / :class:`Dropout` (inverted dropout)              ~ ``nn.Dropout``
- ``adam_step`` (L2 in the gradient, or decoupled decay)         ~ ``torch.optim.Adam`` / ``AdamW``
- ``sgd_step``                                                   ~ ``torch.optim.SGD``
- :class:`BatchNorm1d`                                           ~ ``nn.BatchNorm1d``
- ``clip_grad_norm``                                             ~ ``nn.utils.clip_grad_norm_``

The experiments train with the book's engine, :func:`dlarch_lib.core.train.fit`: the digits MLP
(``modular.MLPConfig``) with :func:`train_classifier`, whose step :func:`scheduled_step` logs the
learning rate a ``LambdaLR`` schedule sets at every step, and a plain RNN on the adding problem
(chapter 5's :func:`dlarch_lib.rnn.adding_problem`, :func:`train_rnn`), whose step :func:`clipped_sgd_step` clips the
gradient and records its norm.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dlarch_lib.core.data import Split, TensorBatches
from dlarch_lib.core.runtime import seeded
from dlarch_lib.core.train import History, Step, evaluate, fit, make_optimizer, model_device

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

    running_mean: torch.Tensor  # (C,) buffers, registered in __init__
    running_var: torch.Tensor

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
    total = torch.stack([(g.detach() ** 2).sum() for g in grads]).sum().sqrt()
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # torch adds the same 1e-6
    for g in grads:
        g.mul_(scale)
    return total


# --------------------------------------------------------------------------- training with a schedule


def scheduled_step(optimizer: torch.optim.Optimizer) -> Step:
    """The classifier's step, logging the learning rate ``optimizer`` uses for it.

    :func:`fit` back-propagates the loss, steps ``optimizer`` and then the scheduler, so the
    rate read here, before the update, is the one the schedule set for this step.
    """

    def step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor | float]:
        x, y = batch  # (B, 1, 8, 8), (B,)
        return {"loss": F.cross_entropy(model(x), y), "lr": optimizer.param_groups[0]["lr"]}

    return step


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
    progress: bool = False,
    desc: str = "train",
) -> History:
    """Train on ``split`` with a per-step ``schedule`` (``LambdaLR`` over :func:`schedule_factor`).

    The model trains on its own device (move it to ``RUN.device`` first). Batches come from
    :class:`~dlarch_lib.core.data.TensorBatches`, dropout from the global generator, both seeded by ``seed``
    (:func:`seeded`: the caller's stream is left alone). The history logs ``"lr"`` at every
    step; the test set is used once, at the end: ``history.evals["test_acc"]`` (and
    ``"test_loss"``), one entry each.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    batches = TensorBatches(
        split.x_train.to(device), split.y_train.to(device), batch_size=batch_size, generator=generator
    )
    total = epochs * len(batches)
    opt = make_optimizer(model, optimizer, lr, weight_decay)
    factor = schedule_factor(schedule, total, max(1, int(warmup_frac * total)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    with seeded(seed):
        history = fit(
            model,
            batches,
            scheduled_step(opt),
            epochs=epochs,
            optimizer=opt,
            scheduler=sched,
            progress=progress,
            desc=desc,
        )
    test = evaluate(model, [(split.x_test, split.y_test)])
    history.evals.update(test_loss=[test["loss"]], test_acc=[test["acc"]])
    history.eval_steps.append(history.steps)
    return history


# --------------------------------------------------------------------------- an exploding RNN


class RNNRegressor(nn.Module):
    """A plain (Elman) RNN read out from its last hidden state: ``(N, T, 2) -> (N,)``."""

    def __init__(self, hidden: int = 64, nonlinearity: str = "tanh", recurrent_scale: float = 1.0) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, hidden, batch_first=True, nonlinearity=nonlinearity)
        recurrent = self.rnn.get_parameter("weight_hh_l0")  # (H, H)
        with torch.no_grad():  # orthogonal recurrent matrix times a scale: spectral radius = scale
            nn.init.orthogonal_(recurrent)
            recurrent.mul_(recurrent_scale)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions ``(N,)``."""
        if x.ndim != 3 or x.shape[-1] != 2:
            raise ValueError(f"expected (N, T, 2), got {tuple(x.shape)}")
        out, _ = self.rnn(x)  # (N, T, H)
        return self.head(out[:, -1]).squeeze(-1)


def clipped_sgd_step(optimizer: torch.optim.Optimizer, clip: float | None) -> Step:
    """A regression step that updates the parameters itself: back-propagate, measure, clip, step.

    It records the global gradient norm *before* clipping (``nn.utils.clip_grad_norm_`` with
    ``max_norm=clip``; ``None``: no clipping), which the engine's own clipping does not report,
    so it runs under :func:`fit` with ``optimizer=None``. A non-finite loss is recorded without
    an update: the weights are lost anyway.
    """

    def step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        x, y = batch  # (B, T, 2), (B,)
        loss = F.mse_loss(model(x), y)
        if not math.isfinite(loss.item()):
            return {"loss": loss.item()}
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(model.parameters(), clip if clip is not None else math.inf)
        optimizer.step()
        return {"loss": loss.item(), "grad_norm": norm.item()}

    return step


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
) -> History:
    """Train with SGD on random mini-batches of ``(x, y)`` drawn with ``seed``; :func:`clipped_sgd_step`.

    The model trains on its own device. ``history.loss`` holds the loss of every step and
    ``history.logs["grad_norm"]`` the gradient norm before clipping. A non-finite loss stops
    training: it is the last loss recorded, and has no gradient norm.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    generator = torch.Generator().manual_seed(seed)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            idx = torch.randint(0, len(y), (batch_size,), generator=generator)
            yield x[idx], y[idx]

    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return fit(
        model,
        batches(),
        clipped_sgd_step(optimizer, clip),
        steps=steps,
        optimizer=None,
        stop=lambda history: not math.isfinite(history.loss[-1]),
        progress=False,
    )
