"""A small, readable training loop for classifiers (and anything with a loss).

``fit`` trains for a number of epochs, shows a tqdm progress bar and returns a :class:`History`
of per-epoch losses and accuracies. Training stops on its epoch count, never on a clock, so a
result does not depend on the speed of the machine or on what else runs on it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm  # plain text bars: no ipywidgets needed, same in Jupyter, Colab and nbval

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class History:
    """Per-epoch training record. Accuracies are ``nan`` when no validation loader was given."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the whole run, for information only
    steps: int = 0

    @property
    def epochs(self) -> int:
        """Number of completed epochs."""
        return len(self.train_loss)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max matches the label. logits ``(N, C)``, labels ``(N,)``."""
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"expected logits (N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    return (logits.argmax(dim=1) == labels).float().mean().item()


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, loss_fn: LossFn = F.cross_entropy, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` over ``loader`` (model put in eval mode)."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        total_loss += loss_fn(logits, y).item() * len(y)
        correct += (logits.argmax(dim=1) == y).sum().item()
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


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    *,
    epochs: int,
    lr: float = 1e-3,
    optimizer: str | torch.optim.Optimizer = "adam",
    weight_decay: float = 0.0,
    loss_fn: LossFn = F.cross_entropy,
    val_loader: DataLoader | None = None,
    device: torch.device | str = "cpu",
    clip_grad_norm: float | None = None,
    progress: bool = True,
    desc: str = "train",
) -> History:
    """Train ``model`` with ``loss_fn(model(x), y)`` and return its :class:`History`.

    ``optimizer`` is a name for :func:`make_optimizer` or a ready optimizer.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    opt = make_optimizer(model, optimizer, lr, weight_decay) if isinstance(optimizer, str) else optimizer
    model.to(device)
    history = History()
    start = time.perf_counter()
    bar = tqdm(range(epochs), desc=desc, disable=not progress, mininterval=0.5)
    for _ in bar:
        model.train()
        running, seen = 0.0, 0
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            opt.step()
            running += loss.item() * len(y)
            seen += len(y)
            history.steps += 1
        history.train_loss.append(running / max(seen, 1))
        if val_loader is not None:
            metrics = evaluate(model, val_loader, loss_fn, device)
            history.val_loss.append(metrics["loss"])
            history.val_acc.append(metrics["acc"])
            bar.set_postfix(loss=f"{history.train_loss[-1]:.3f}", val_acc=f"{metrics['acc']:.3f}")
        else:
            history.val_acc.append(float("nan"))
            bar.set_postfix(loss=f"{history.train_loss[-1]:.3f}")
    history.seconds = time.perf_counter() - start
    return history
