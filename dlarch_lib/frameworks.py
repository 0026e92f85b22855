"""Chapter 29: tools and frameworks -- eager vs compiled PyTorch, ``torch.func``, a model zoo.

- :func:`compile_report` times a model in eager mode and under ``torch.compile`` (compile
  time, steady-state latency, speed-up) and checks that both give the same outputs.
- :func:`per_example_grads` computes one gradient per example with ``vmap(grad(loss))`` over
  ``functional_call``; :func:`per_example_grads_loop` is the slow reference (one backward
  pass per example).
- :func:`jacobian_rows` builds a Jacobian row by row with ``torch.autograd.grad``, the
  reference for ``torch.func.jacrev``.
- :func:`functional_sgd_step` is a pure update ``params -> params`` in the style JAX made
  popular; :class:`FunctionalSGD` is a training step built on it, for the book's engine
  :func:`~dlarch_lib.core.train.fit` with ``optimizer=None`` (the step updates its parameters itself).
- :data:`ZOO`, :func:`create_model`, :func:`list_models`: a ``timm``-style registry over the
  book's own digit classifiers (built from :class:`dlarch_lib.modular.Registry`).
"""

from __future__ import annotations

import fnmatch
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from dlarch_lib import cnn, efficientnet, modular
from dlarch_lib.core import measure
from dlarch_lib.core.train import LossFn

Params = dict[str, torch.Tensor]


# --- eager versus torch.compile --------------------------------------------------------------


def _cpu_seconds() -> float:
    """CPU time of this process *and its finished children* (inductor compiles C++ in subprocesses)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass(frozen=True)
class CompileReport:
    """What ``torch.compile`` cost and bought on one model and input."""

    backend: str
    compile_wall_s: float  # first compiled call: tracing + compilation + one run (wall clock)
    compile_cpu_s: float  # the same, CPU seconds of this process and its children
    eager_ms: float  # median steady-state latency, eager
    compiled_ms: float  # median steady-state latency, compiled
    max_abs_diff: float  # largest |eager - compiled| output difference

    @property
    def speedup(self) -> float:
        """``eager_ms / compiled_ms``: above 1 the compiled model is faster."""
        return self.eager_ms / self.compiled_ms

    @property
    def break_even_calls(self) -> float:
        """Calls needed before the saved time repays the compile time (``inf`` if it never does)."""
        saved_ms = self.eager_ms - self.compiled_ms
        return float("inf") if saved_ms <= 0 else 1000.0 * self.compile_wall_s / saved_ms


def compile_report(
    model: nn.Module,
    x: torch.Tensor,
    backend: str = "inductor",
    repeats: int = 30,
    warmup: int = 5,
    clock: str = "wall",
    rounds: int = 1,
) -> CompileReport:
    """Compile ``model`` with ``backend``, time it against eager mode (inference, no grad).

    The compile time is the first call of the compiled model; the latencies are medians of
    :func:`dlarch_lib.measure.timings_ms` after warm-up, with ``clock`` (``"wall"`` or ``"cpu"``).
    With ``rounds > 1`` the two versions take turns, ``rounds`` times ``repeats`` calls each, and
    each keeps the lowest of its rounds' medians: a burst of load from other programs then hits
    both versions instead of deciding the comparison.
    The compiled model is a fresh ``torch.compile`` wrapper: the eager model is not changed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    known = torch._dynamo.list_backends(exclude_tags=())  # include the debug backends (eager, aot_eager)
    if backend not in known:
        raise ValueError(f"unknown torch.compile backend {backend!r}; known: {known}")
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")
    model.eval()
    torch._dynamo.reset()  # no cached graphs from earlier calls: the compile is measured in full
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        wall0, cpu0 = time.perf_counter(), _cpu_seconds()
        out_compiled = compiled(x)
        compile_wall, compile_cpu = time.perf_counter() - wall0, _cpu_seconds() - cpu0
        out_eager = model(x)
        eager_ms = compiled_ms = float("inf")
        for _ in range(rounds):  # the two versions take turns; each keeps its best round
            eager = measure.timings_ms(lambda: model(x), repeats, warmup, device=x.device, clock=clock)
            fast = measure.timings_ms(lambda: compiled(x), repeats, warmup, device=x.device, clock=clock)
            eager_ms = min(eager_ms, measure.summarize(eager).median)
            compiled_ms = min(compiled_ms, measure.summarize(fast).median)
    diff = (out_eager - out_compiled).abs().max().item()
    return CompileReport(backend, compile_wall, compile_cpu, eager_ms, compiled_ms, diff)


# --- torch.func: the functional style --------------------------------------------------------


def params_of(model: nn.Module) -> Params:
    """The model's parameters as a plain ``{name: tensor}`` dict, detached (the explicit state)."""
    return {k: v.detach() for k, v in model.named_parameters()}


def _check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"need x (B, ...) and labels y (B,) with the same B, got {tuple(x.shape)} and {tuple(y.shape)}"
        )


def functional_loss(
    model: nn.Module, loss_fn: LossFn = F.cross_entropy
) -> Callable[[Params, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A pure function ``loss(params, x, y)``: ``model`` run with ``params`` by ``functional_call``.

    Buffers (BatchNorm statistics) are read from ``model``; use models in eval mode, or ones
    without buffers, for a function with no hidden state.
    """
    buffers = dict(model.named_buffers())

    def loss(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, (params, buffers), (x,)), y)

    return loss


def per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn = F.cross_entropy) -> Params:
    """Gradient of the loss of *each* example: ``{name: (B, *param.shape)}``, by ``vmap(grad(...))``.

    ``grad`` differentiates the one-example loss with respect to ``params``; ``vmap`` maps it
    over the batch dimension of ``x`` and ``y`` (``in_dims=(None, 0, 0)``: parameters shared).
    """
    _check_batch(x, y)
    loss = functional_loss(model, loss_fn)

    def one(params: Params, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return loss(params, xi.unsqueeze(0), yi.unsqueeze(0))  # a batch of one: (1, ...) -> scalar

    return vmap(grad(one), in_dims=(None, 0, 0))(params_of(model), x, y)


def per_example_grads_loop(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn = F.cross_entropy
) -> Params:
    """The reference for :func:`per_example_grads`: one backward pass per example, stacked.

    Each pass is ``torch.autograd.grad`` of one example's loss, so the model's ``.grad`` fields
    are left alone.
    """
    _check_batch(x, y)
    names, params = zip(*model.named_parameters())
    rows = [torch.autograd.grad(loss_fn(model(x[i : i + 1]), y[i : i + 1]), params) for i in range(x.shape[0])]
    return {n: torch.stack([row[k] for row in rows]) for k, n in enumerate(names)}


def jacobian_rows(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Jacobian ``(*f(x).shape, *x.shape)`` of ``f`` at ``x``, one ``autograd.grad`` call per output.

    The reference for ``torch.func.jacrev(f)(x)``, which computes all the rows in one
    vectorised (``vmap``-ed) reverse pass.
    """
    x = x.detach().requires_grad_(True)
    out = f(x)
    flat = out.reshape(-1)
    rows = [torch.autograd.grad(flat[i], x, retain_graph=True)[0] for i in range(flat.numel())]
    return torch.stack(rows).reshape(*out.shape, *x.shape)


def functional_sgd_step(params: Params, grads: Params, lr: float) -> Params:
    """A pure SGD update: a *new* dict ``params - lr * grads``; the inputs are not changed."""
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if params.keys() != grads.keys():
        raise ValueError(f"params and grads have different names: {sorted(set(params) ^ set(grads))}")
    return {k: params[k] - lr * grads[k] for k in params}


class FunctionalSGD:
    """A training step in the functional style: ``params = sgd(params, grad(loss)(params, x, y))``.

    The parameters are explicit state, ``self.params`` (a ``{name: tensor}`` dict, starting as a
    detached copy of ``model``'s), and each step replaces them with the output of a pure function,
    :func:`functional_sgd_step`: no optimizer object, no ``.grad`` fields, no ``.backward()``. The
    model only supplies the architecture, through ``functional_call``; it is never changed. Run it
    with the book's engine and ``optimizer=None`` (the step updates the parameters itself)::

        step = FunctionalSGD(model, lr=0.1)
        history = fit(model, batches, step, steps=len(batches), optimizer=None)
        step.params  # the trained parameters
    """

    def __init__(self, model: nn.Module, lr: float = 0.1, loss_fn: LossFn = F.cross_entropy) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        self.params, self.lr, self.loss_fn = params_of(model), lr, loss_fn

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        """One step on ``batch`` = (x ``(B, ...)``, labels ``(B,)``); returns the loss before the update."""
        x, y = batch
        grads, loss = torch.func.grad_and_value(functional_loss(model, self.loss_fn))(self.params, x, y)
        self.params = functional_sgd_step(self.params, grads, self.lr)
        return {"loss": loss.item()}


# --- a model zoo ------------------------------------------------------------------------------

ZOO: modular.Registry[Callable[..., nn.Module]] = modular.Registry("zoo model")
"""Builders of the book's digit classifiers: ``(N, 1, 8, 8) -> (N, num_classes)``."""


@ZOO.register("mlp")
def _mlp(num_classes: int = 10, width: int = 128, depth: int = 2, **kw: Any) -> nn.Module:
    """Chapter 02's MLP on flattened 8x8 digits."""
    return modular.build_model(modular.MLPConfig(num_classes=num_classes, width=width, depth=depth, **kw))


@ZOO.register("cnn")
def _cnn(num_classes: int = 10, width: int = 16, depth: int = 2, **kw: Any) -> nn.Module:
    """Chapter 02's plain CNN (conv blocks with pooling)."""
    return modular.build_model(modular.CNNConfig(num_classes=num_classes, width=width, depth=depth, **kw))


@ZOO.register("small_resnet")
def _resnet(num_classes: int = 10, width: int = 32, **kw: Any) -> nn.Module:
    """Chapter 04's SmallResNet."""
    return cnn.SmallResNet(num_classes=num_classes, width=width, **kw)


@ZOO.register("tiny_efficientnet")
def _effnet(num_classes: int = 10, **kw: Any) -> nn.Module:
    """Chapter 24's TinyEfficientNet (keywords go to :class:`~dlarch_lib.efficientnet.EffNetConfig`)."""
    return efficientnet.TinyEfficientNet(efficientnet.EffNetConfig(num_classes=num_classes, **kw))


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build zoo model ``name`` with random weights, like ``timm.create_model(name, pretrained=False)``.

    Unknown names raise a ``ValueError`` that lists the known ones; unknown keywords raise a
    ``TypeError`` naming the model.
    """
    builder = ZOO.get(name)
    try:
        return builder(**kwargs)
    except TypeError as err:
        raise TypeError(f"create_model({name!r}): {err}") from err


def list_models(pattern: str = "*") -> list[str]:
    """Zoo names matching a shell-style ``pattern`` (``"*net*"``), sorted, like ``timm.list_models``."""
    return [n for n in ZOO.names() if fnmatch.fnmatch(n, pattern)]
