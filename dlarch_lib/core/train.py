"""The book's one training engine: :func:`fit` runs the loop, a chapter supplies its ``step``.

Every model in the book trains through :func:`fit`. What differs between a classifier, a language
model, a GAN or a REINFORCE controller is only what one step computes, so a chapter writes that
as a short function ``step(model, batch)`` -- the chapter's lesson, small enough for ``dl.show`` --
and :func:`fit` does the rest, the same way every time:

- it takes the device from the model (move the model once, ``model.to(RUN.device)``) and moves
  every tensor of every batch there;
- if ``step`` returns a loss tensor (or a dict with a ``"loss"`` tensor), it zeroes the gradients,
  back-propagates, clips the gradient norm, steps the optimizer and then the scheduler;
- if ``optimizer=None``, ``step`` updates the parameters itself (a GAN's two optimizers, the
  REINFORCE controller) and returns the numbers to record;
- it stops after ``epochs`` passes over ``data``, after ``steps`` steps, or when ``stop(history)``
  says so -- never on a clock, so a result does not depend on the speed or load of the machine;
- every ``eval_every`` steps (default: at the end of each epoch) it calls ``evaluate(model)``
  in eval mode without gradients and records the numbers it returns;
- it returns one :class:`History`.

>>> model = nn.Linear(3, 2)
>>> data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))] * 4
>>> h = fit(model, data, classification_step, epochs=2, progress=False)
>>> h.steps, h.epochs, len(h.loss)
(8, 2, 8)
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm  # plain text bars: no ipywidgets needed, same in Jupyter, Colab and nbval

from dlarch_lib.core.runtime import check_placed

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepOutput = torch.Tensor | Mapping[str, Any]
Step = Callable[[nn.Module, Any], StepOutput]
Evaluate = Callable[[nn.Module], Mapping[str, float]]
Optimizers = str | torch.optim.Optimizer | None


@dataclass
class History:
    """The record of one training run, the same for every model in the book.

    - ``loss``: the minimised loss at every step (for a step that optimises itself, its ``"loss"``);
    - ``logs``: every other number a step returned, one list per name, one entry per step;
    - ``evals``: every number ``evaluate`` returned, one list per name, one entry per evaluation,
      made after step ``eval_steps[i]``;
    - ``epoch_loss``: the mean loss of each completed epoch, weighted by batch size, the epoch ending
      after step ``epoch_steps[i]``.
    """

    loss: list[float] = field(default_factory=list)
    logs: dict[str, list[float]] = field(default_factory=dict)
    evals: dict[str, list[float]] = field(default_factory=dict)
    eval_steps: list[int] = field(default_factory=list)
    epoch_loss: list[float] = field(default_factory=list)
    epoch_steps: list[int] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0  # wall time of the whole run, for information only

    @property
    def epochs(self) -> int:
        """Number of completed epochs."""
        return len(self.epoch_loss)

    @property
    def train_loss(self) -> list[float]:
        """Mean training loss per epoch (``epoch_loss``)."""
        return self.epoch_loss

    @property
    def val_loss(self) -> list[float]:
        """Validation loss per evaluation (``evals["loss"]``; empty without evaluation)."""
        return self.evals.get("loss", [])

    @property
    def val_acc(self) -> list[float]:
        """Validation accuracy per evaluation (``evals["acc"]``; empty without evaluation)."""
        return self.evals.get("acc", [])

    def last(self, name: str) -> float:
        """The latest value of ``name``: ``"loss"``, a step's log or an evaluation's number."""
        if name == "loss" and self.loss:
            return self.loss[-1]
        series = self.evals.get(name) or self.logs.get(name)
        if not series:
            known = ["loss", *self.logs, *self.evals]
            raise KeyError(f"no recorded values of {name!r}; recorded: {known}")
        return series[-1]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max matches the label. logits ``(N, C)``, labels ``(N,)``."""
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"expected logits (N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    return (logits.argmax(dim=1) == labels).float().mean().item()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU for a model with neither)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it moved to ``device`` (tuples, lists, dicts, named tuples)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a NamedTuple keeps its type
        return type(batch)(*(to_device(b, device) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def classification_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The classifier's step: cross-entropy of ``model(x)`` ``(B, C)`` against labels ``y`` ``(B,)``."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def loss_step(loss_fn: LossFn) -> Step:
    """A step computing ``loss_fn(model(x), y)`` on a batch ``(x, y)`` (e.g. ``F.mse_loss``)."""

    def step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return loss_fn(model(x), y)

    return step


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Any], loss_fn: LossFn = F.cross_entropy) -> dict[str, float]:
    """Mean loss and accuracy of a classifier over ``loader`` of ``(x, y)`` (model put in eval mode).

    The batches are moved to the model's device.
    """
    check_placed(model)
    model.eval()
    device = model_device(model)
    total_loss, correct, count = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        total_loss += loss_fn(logits, y).item() * len(y)
        correct += int((logits.argmax(dim=1) == y).sum().item())
        count += len(y)
    if count == 0:
        raise ValueError("evaluate() got an empty loader")
    return {"loss": total_loss / count, "acc": correct / count}


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``"adam"``, ``"adamw"`` or ``"sgd"`` (momentum 0.9) over the model's parameters."""
    params = model.parameters()
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected 'adam', 'adamw' or 'sgd'")


def _batch_size(batch: Any) -> int:
    """Rows in the first tensor of ``batch`` (1 when it holds none): the weight of its loss."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, (list, tuple)):
        for item in batch:
            if isinstance(item, torch.Tensor):
                return _batch_size(item)
    if isinstance(batch, Mapping):
        return _batch_size(list(batch.values()))
    return 1


def _batches(data: Iterable[Any], epochs: int | None) -> Iterator[tuple[int, Any]]:
    """``(epoch, batch)`` pairs: ``epochs`` passes over ``data``, or passes without end."""
    for epoch in itertools.count() if epochs is None else range(epochs):
        empty = True
        for batch in data:
            empty = False
            yield epoch, batch
        if empty:
            raise ValueError("fit() got data that yields no batches")
        if isinstance(data, Iterator):  # a one-shot iterator (a generator): one pass is all there is
            return  # (not `iter(data) is data`: a new DataLoader iterator draws from the loader's generator)


def _record(history: History, out: StepOutput) -> torch.Tensor | None:
    """Store a step's numbers in ``history``; return the loss tensor to minimise, if any."""
    if isinstance(out, torch.Tensor):
        history.loss.append(out.item())
        return out
    if not isinstance(out, Mapping):
        raise TypeError(f"a step must return a loss tensor or a dict of numbers, got {type(out).__name__}")
    loss = out.get("loss")
    for name, value in out.items():
        number = value.item() if isinstance(value, torch.Tensor) else float(value)
        if name == "loss":
            history.loss.append(number)
        else:
            history.logs.setdefault(name, []).append(number)
    return loss if isinstance(loss, torch.Tensor) else None


def fit(
    model: nn.Module,
    data: Iterable[Any],
    step: Step = classification_step,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    optimizer: Optimizers = "adam",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    clip_grad_norm: float | None = None,
    evaluate: Evaluate | None = None,
    eval_every: int | None = None,
    val_loader: Iterable[Any] | None = None,
    stop: Callable[[History], bool] | None = None,
    progress: bool = True,
    desc: str = "train",
) -> History:
    """Train ``model`` on ``data`` with ``step`` and return its :class:`History`.

    ``data`` is re-iterated for each of ``epochs`` passes (a ``DataLoader``, a list of batches), or
    is an endless iterator of batches with ``steps`` (e.g. a generator drawing a fresh batch each
    step). ``step(model, batch)`` returns the loss tensor to minimise, or a dict of numbers (with a
    ``"loss"`` tensor to minimise, or, with ``optimizer=None``, after updating the parameters
    itself). ``optimizer`` is a name for :func:`make_optimizer`, a ready optimizer, or ``None``.
    ``scheduler`` is stepped after every optimizer step. ``val_loader`` is shorthand for
    ``evaluate=lambda m: evaluate(m, val_loader)`` (classifier loss and accuracy). Evaluation runs
    every ``eval_every`` steps, and at the end of every epoch when ``eval_every`` is ``None``.
    """
    if epochs is None and steps is None:
        raise ValueError("fit() needs epochs=, steps= or both")
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")
    if val_loader is not None:
        if evaluate is not None:
            raise ValueError("pass evaluate= or val_loader=, not both")
        loader = val_loader
        evaluate = lambda m: _evaluate_classifier(m, loader)
    check_placed(model)
    device = model_device(model)
    if isinstance(optimizer, str):
        optimizer = make_optimizer(model, optimizer, lr, weight_decay)
    if optimizer is None and (scheduler is not None or clip_grad_norm is not None):
        raise ValueError("scheduler= and clip_grad_norm= need the engine's optimizer (optimizer=None given)")
    history = History()

    def run_evaluation() -> None:
        if evaluate is None:
            return
        model.eval()
        with torch.no_grad():
            numbers = evaluate(model)
        model.train()
        for name, value in numbers.items():
            history.evals.setdefault(name, []).append(float(value))
        history.eval_steps.append(history.steps)

    start = time.perf_counter()
    bar = tqdm(total=steps, desc=desc, disable=not progress, mininterval=0.5)
    epoch_sum, epoch_n, current_epoch = 0.0, 0, 0
    model.train()
    for epoch, batch in _batches(data, epochs):
        if epoch != current_epoch:  # the previous epoch is complete
            history.epoch_loss.append(epoch_sum / max(epoch_n, 1))
            history.epoch_steps.append(history.steps)
            epoch_sum, epoch_n, current_epoch = 0.0, 0, epoch
            if eval_every is None:
                run_evaluation()
        batch = to_device(batch, device)
        loss = _record(history, step(model, batch))
        if optimizer is not None:
            if loss is None:
                raise ValueError("the step returned no loss tensor for the optimizer (use optimizer=None)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        history.steps += 1
        if history.loss:
            size = _batch_size(batch)
            epoch_sum, epoch_n = epoch_sum + history.loss[-1] * size, epoch_n + size
        bar.update(1)
        if history.loss and bar.n % 20 == 0:
            bar.set_postfix(loss=f"{history.loss[-1]:.3f}", refresh=False)
        if eval_every is not None and history.steps % eval_every == 0:
            run_evaluation()
        if (steps is not None and history.steps >= steps) or (stop is not None and stop(history)):
            break
    else:  # the data ran out (the last epoch completed)
        history.epoch_loss.append(epoch_sum / max(epoch_n, 1))
        history.epoch_steps.append(history.steps)
        if eval_every is None:
            run_evaluation()
    bar.close()
    history.seconds = time.perf_counter() - start
    return history


def _evaluate_classifier(model: nn.Module, loader: Iterable[Any]) -> dict[str, float]:
    return evaluate(model, loader)


__all__: Sequence[str] = [
    "History",
    "accuracy",
    "classification_step",
    "evaluate",
    "fit",
    "loss_step",
    "make_optimizer",
    "model_device",
    "to_device",
]
