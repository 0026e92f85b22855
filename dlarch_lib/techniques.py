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

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
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


def scheduled_step(
    optimizer: torch.optim.Optimizer, *, ema: EMA | None = None, autocast_dtype: torch.dtype | None = None
) -> Step:
    """The classifier's step, logging the learning rate ``optimizer`` uses for it.

    :func:`fit` back-propagates the loss, steps ``optimizer`` and then the scheduler, so the
    rate read here, before the update, is the one the schedule set for this step. ``ema``
    averages in the weights this step starts from; ``autocast_dtype`` (e.g. ``torch.bfloat16``)
    runs the forward pass under ``torch.autocast`` on the model's device.
    """

    def step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor | float]:
        x, y = batch  # (B, 1, 8, 8), (B,)
        if ema is not None:
            ema.update(model)
        low = torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
        with low:
            logits = model(x)  # (B, 10), in autocast_dtype under autocast
        return {"loss": F.cross_entropy(logits.float(), y), "lr": optimizer.param_groups[0]["lr"]}

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
    ema: EMA | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> History:
    """Train on ``split`` with a per-step ``schedule`` (``LambdaLR`` over :func:`schedule_factor`).

    The model trains on its own device (move it to ``RUN.device`` first). Batches come from
    :class:`~dlarch_lib.core.data.TensorBatches`, dropout from the global generator, both seeded by ``seed``
    (:func:`seeded`: the caller's stream is left alone). The history logs ``"lr"`` at every
    step; the test set is used once, at the end: ``history.evals["test_acc"]`` (and
    ``"test_loss"``), one entry each. With ``ema`` (an :class:`EMA` of ``model``) the average is updated
    before every step and once after the last, and ``"ema_test_acc"`` / ``"ema_test_loss"`` are recorded
    too; ``autocast_dtype`` trains with the forward pass under ``torch.autocast`` (see :func:`scheduled_step`).
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
            scheduled_step(opt, ema=ema, autocast_dtype=autocast_dtype),
            epochs=epochs,
            optimizer=opt,
            scheduler=sched,
            progress=progress,
            desc=desc,
        )
    test = evaluate(model, [(split.x_test, split.y_test)])
    history.evals.update(test_loss=[test["loss"]], test_acc=[test["acc"]])
    if ema is not None:
        ema.update(model)
        ema_test = evaluate(ema.module, [(split.x_test, split.y_test)])
        history.evals.update(ema_test_loss=[ema_test["loss"]], ema_test_acc=[ema_test["acc"]])
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


# --------------------------------------------------------------------------- SGD with momentum


def momentum_step(
    w: torch.Tensor,
    grad: torch.Tensor,
    buf: torch.Tensor | None,
    *,
    lr: float,
    momentum: float,
    nesterov: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of SGD with momentum in PyTorch's form; returns ``(w_new, buf_new)``.

    ``buf <- momentum * buf + grad`` (``buf = grad`` at the first step, ``buf=None``), then
    ``w <- w - lr * buf``, or with ``nesterov=True`` ``w <- w - lr * (grad + momentum * buf)``,
    as ``torch.optim.SGD(momentum=..., nesterov=...)`` with no dampening does.
    """
    if w.shape != grad.shape or (buf is not None and buf.shape != w.shape):
        raise ValueError(f"w, grad and buf must have one shape, got {tuple(w.shape)} and {tuple(grad.shape)}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    buf = grad.clone() if buf is None else momentum * buf + grad
    direction = grad + momentum * buf if nesterov else buf
    return w - lr * direction, buf


def heavy_ball_step(
    w: torch.Tensor, w_prev: torch.Tensor, grad: torch.Tensor, *, lr: float, beta: float
) -> torch.Tensor:
    """Polyak's heavy ball, the textbook form: ``w + beta * (w - w_prev) - lr * grad``."""
    if not w.shape == w_prev.shape == grad.shape:
        raise ValueError(f"w, w_prev and grad must have one shape, got {tuple(w.shape)}, {tuple(grad.shape)}")
    return w + beta * (w - w_prev) - lr * grad


def quadratic_iterations(
    curvatures: torch.Tensor, *, lr: float, momentum: float = 0.0, tol: float = 1e-6, max_steps: int = 100_000
) -> int:
    """Steps of (heavy-ball) gradient descent on ``f(w) = sum(c_i w_i^2) / 2`` from ``w = 1`` to ``|w| <= tol |w_0|``.

    ``curvatures`` ``(n,)`` are the Hessian's eigenvalues; returns ``max_steps`` if never reached.
    """
    if curvatures.ndim != 1 or not bool((curvatures > 0).all()):
        raise ValueError("curvatures must be a 1-D tensor of positive numbers")
    w = torch.ones_like(curvatures, dtype=torch.float64)
    c, start, buf = curvatures.to(torch.float64), w.norm(), None
    for t in range(1, max_steps + 1):
        w, buf = momentum_step(w, c * w, buf, lr=lr, momentum=momentum)
        if w.norm() <= tol * start:
            return t
    return max_steps


def tuned_rates(kappa: float, smallest: float = 1.0) -> dict[str, tuple[float, float]]:
    """The best ``(lr, momentum)`` on a quadratic with curvatures in ``[smallest, kappa * smallest]``.

    Plain GD: ``lr = 2 / (L + mu)``, contraction ``(kappa - 1) / (kappa + 1)`` per step. Heavy ball:
    ``lr = 4 / (sqrt L + sqrt mu)^2``, ``momentum = ((sqrt kappa - 1) / (sqrt kappa + 1))^2``,
    contraction ``(sqrt kappa - 1) / (sqrt kappa + 1)``.
    """
    if kappa < 1 or smallest <= 0:
        raise ValueError(f"need kappa >= 1 and smallest > 0, got {kappa} and {smallest}")
    mu, big = smallest, kappa * smallest
    root = math.sqrt(kappa)
    return {
        "plain": (2 / (big + mu), 0.0),
        "heavy ball": (4 / (math.sqrt(big) + math.sqrt(mu)) ** 2, ((root - 1) / (root + 1)) ** 2),
    }


# --------------------------------------------------------------------------- initialisation


def init_std(fan_in: int, fan_out: int, scheme: str) -> float:
    """The weight standard deviation of ``scheme``: ``"xavier"`` ``sqrt(2 / (fan_in + fan_out))``,
    ``"he"`` ``sqrt(2 / fan_in)`` (ReLU), ``"lecun"`` ``sqrt(1 / fan_in)``."""
    if fan_in < 1 or fan_out < 1:
        raise ValueError(f"fans must be >= 1, got {fan_in} and {fan_out}")
    stds = {"xavier": math.sqrt(2 / (fan_in + fan_out)), "he": math.sqrt(2 / fan_in), "lecun": math.sqrt(1 / fan_in)}
    if scheme not in stds:
        raise ValueError(f"unknown scheme {scheme!r}; known: {sorted(stds)}")
    return stds[scheme]


def activation_stds(
    depth: int, width: int, weight_std: float, *, batch: int = 256, generator: torch.Generator | None = None
) -> list[float]:
    """Std of the pre-activations of each layer of a bias-free ReLU MLP at initialisation.

    ``depth`` square ``width x width`` layers with ``N(0, weight_std^2)`` weights act on
    standard normal inputs ``(batch, width)`` in float64; entry ``l`` is the std after layer ``l + 1``.
    """
    if depth < 1 or width < 1 or batch < 2 or weight_std <= 0:
        raise ValueError("depth, width >= 1, batch >= 2 and weight_std > 0 required")
    x = torch.randn(batch, width, generator=generator, dtype=torch.float64)  # (B, n)
    stds = []
    for layer in range(depth):
        w = torch.randn(width, width, generator=generator, dtype=torch.float64) * weight_std  # (n_out, n_in)
        y = (torch.relu(x) if layer else x) @ w.T  # (B, n): the first layer sees the raw input
        stds.append(y.std().item())
        x = y
    return stds


# --------------------------------------------------------------------------- gradient accumulation


def accumulate_gradients(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    micro_batches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> float:
    """Fill ``.grad`` with the gradient of the mean loss over ``(x, y)``, computed in ``micro_batches`` pieces.

    Each piece of ``B / k`` samples back-propagates ``loss / k``; the gradients add up in ``.grad``.
    ``B`` must be divisible by ``k``: with unequal pieces ``1 / k`` is the wrong weight. Returns the loss.
    """
    if micro_batches < 1 or len(x) % micro_batches or len(x) != len(y):
        raise ValueError(f"a batch of {len(x)} (labels {len(y)}) does not split into {micro_batches} equal pieces")
    model.zero_grad(set_to_none=True)
    total = 0.0
    for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
        loss = loss_fn(model(xs), ys) / micro_batches
        loss.backward()  # adds into .grad
        total += loss.item()
    return total


def flat_grad(model: nn.Module) -> torch.Tensor:
    """All parameter gradients of ``model`` as one vector (zeros where a gradient is missing)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in model.parameters()])


# --------------------------------------------------------------------------- mixed precision


def fp16_flush_fraction(grads: torch.Tensor, scale: float = 1.0) -> float:
    """Fraction of the non-zero entries of ``grads`` that become 0 when ``grads * scale`` is stored in float16."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    nonzero = grads != 0
    if not bool(nonzero.any()):
        raise ValueError("grads has no non-zero entry")
    halves = (grads[nonzero].double() * scale).half()
    return (halves == 0).double().mean().item()


class DynamicLossScaler:
    """Dynamic loss scaling as ``torch.amp.GradScaler`` does it, written out.

    Multiply the loss by ``scale``; before the step divide the gradients by it. If any gradient
    is inf or NaN, skip the step and multiply ``scale`` by ``backoff_factor``; after
    ``growth_interval`` finite steps in a row, multiply it by ``growth_factor``.
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        if init_scale <= 0 or growth_factor <= 1 or not 0 < backoff_factor < 1 or growth_interval < 1:
            raise ValueError("need init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1, growth_interval >= 1")
        self.scale, self.growth_factor, self.backoff_factor = init_scale, growth_factor, backoff_factor
        self.growth_interval, self.good_steps = growth_interval, 0

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Unscale the gradients in place, step unless one is not finite, update the scale; True if it stepped."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        for g in grads:
            g.div_(self.scale)
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        if finite:
            optimizer.step()
            self.good_steps += 1
            if self.good_steps == self.growth_interval:
                self.scale, self.good_steps = self.scale * self.growth_factor, 0
        else:
            self.scale, self.good_steps = self.scale * self.backoff_factor, 0
        return finite


# --------------------------------------------------------------------------- EMA of weights


class EMA:
    """An exponential moving average of a model's parameters: ``ema <- decay * ema + (1 - decay) * w``.

    The first :meth:`update` copies the weights (as ``AveragedModel`` does); buffers (BatchNorm's
    running statistics) are copied, not averaged. :attr:`module` is the averaged model.
    """

    def __init__(self, model: nn.Module, decay: float = 0.99) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.module, self.decay, self.updates = copy.deepcopy(model), decay, 0
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average in the current weights of ``model`` (same architecture)."""
        for ema_p, p in zip(self.module.parameters(), model.parameters(), strict=True):
            if self.updates == 0:
                ema_p.copy_(p)
            else:
                ema_p.mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)
        for ema_b, b in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)
        self.updates += 1


# --------------------------------------------------------------------------- layer normalisation


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Normalise each sample over its last dimension ``(..., D)``: no batch statistics, no running state."""
    if x.shape[-1:] != weight.shape or weight.shape != bias.shape:
        raise ValueError(f"weight and bias must have shape ({x.shape[-1]},), got {tuple(weight.shape)}")
    mean = x.mean(dim=-1, keepdim=True)  # (..., 1)
    var = x.var(dim=-1, unbiased=False, keepdim=True)  # (..., 1)
    return weight * (x - mean) / torch.sqrt(var + eps) + bias
