"""Model, pipeline and tensor parallelism: splitting one model over several devices.

Data parallelism (:mod:`dlarch_lib.parallel`) copies the whole model to every worker. When
the model itself is too big for one device, we split *the model* instead:

- **model parallelism** (:class:`TwoStageModel`): consecutive layers live on different devices
  and ``forward`` moves the activations from one device to the next;
- **pipeline parallelism** (GPipe): the batch is cut into ``m`` micro-batches that flow through
  the ``p`` stages like parts on an assembly line. :func:`gpipe_schedule` is an event
  simulation of the schedule, :func:`bubble_fraction` the idle fraction ``(p-1)/(m+p-1)``,
  and :func:`run_pipeline` measures the real thing with ``torch.distributed.pipelining``
  (``PipelineStage`` + ``ScheduleGPipe``) on CPU processes with the gloo backend;
- **tensor parallelism** (Megatron-LM): one linear layer's weight is split by output
  (column-parallel, then all-gather) or by input features (row-parallel, then all-reduce):
  :func:`column_parallel_linear`, :func:`row_parallel_linear`, :func:`tp_comm_elements`.

The pipelined model is :func:`block_stack`, equal blocks of the book's MLP. Spawned workers must
be importable, so :func:`pipeline_worker` lives here, not in a notebook.
Its processes are started, and joined with a deadline, by :func:`dlarch_lib.parallel.launch`;
each rank joins and leaves its process group with :func:`~dlarch_lib.parallel.init_distributed`
(with a timeout) and :func:`~dlarch_lib.parallel.shutdown_distributed`.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from dlarch_lib import modular
from dlarch_lib.core.runtime import seeded
from dlarch_lib.parallel import DEADLINE_S, PG_TIMEOUT_S, _check_seconds, init_distributed, launch, shutdown_distributed

# --------------------------------------------------------------------------- model parallelism


class TwoStageModel(nn.Module):
    """A model split over two devices: ``stage0`` on ``dev0``, ``stage1`` on ``dev1``.

    ``forward`` moves the input to ``dev0`` and the activation between the stages to ``dev1``;
    the second move is what the seed's sketch (section 8) leaves out.
    """

    def __init__(self, stage0: nn.Module, stage1: nn.Module, dev0: str | torch.device, dev1: str | torch.device):
        super().__init__()
        self.dev0, self.dev1 = torch.device(dev0), torch.device(dev1)
        self.stage0 = stage0.to(self.dev0)
        self.stage1 = stage1.to(self.dev1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) on any device -> stage1's output on ``dev1``."""
        h = self.stage0(x.to(self.dev0))  # activations live on dev0
        return self.stage1(h.to(self.dev1))  # move them to dev1: the line the seed forgets


class SeedTwoStageModel(TwoStageModel):
    """The seed's version: stages placed on two devices, but ``forward`` never moves activations.

    It works only when both devices are the same; otherwise ``stage1`` receives a tensor on
    ``dev0`` and PyTorch raises a device-mismatch ``RuntimeError``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) -> output; fails when ``dev0 != dev1``."""
        return self.stage1(self.stage0(x.to(self.dev0)))  # bug: h stays on dev0


class _RecordMoves(TorchFunctionMode):
    """Records the target device of every ``Tensor.to`` call made while active."""

    def __init__(self) -> None:
        super().__init__()
        self.devices: list[torch.device] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            if isinstance(target, (str, torch.device)):
                self.devices.append(torch.device(target))
        return func(*args, **kwargs)


def record_device_moves(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.device]]:
    """Run ``model(x)`` and return its output and the devices passed to ``Tensor.to``, in order."""
    with _RecordMoves() as mode:
        out = model(x)
    return out, mode.devices


# --------------------------------------------------------------------------- the GPipe schedule


@dataclass(frozen=True)
class Task:
    """One box of the pipeline's Gantt chart: stage ``stage`` runs ``phase`` of micro-batch ``micro``."""

    stage: int
    micro: int
    phase: str  # "F" (forward) or "B" (backward)
    start: float
    end: float
    cpu: float | None = None  # CPU seconds the task's thread used (measured tasks only)


def _times(value: float | Sequence[float], p: int, name: str) -> list[float]:
    times = [float(value)] * p if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(times) != p or any(t < 0 for t in times):
        raise ValueError(f"{name} must be one non-negative time or {p} of them, got {value!r}")
    return times


def gpipe_schedule(
    p: int, m: int, t_fwd: float | Sequence[float] = 1.0, t_bwd: float | Sequence[float] = 2.0
) -> list[Task]:
    """Event simulation of GPipe: all ``m`` forwards, then all ``m`` backwards, on ``p`` stages.

    Stage ``s`` runs its tasks in order; a forward F(s, i) waits for F(s-1, i) (its input), a
    backward B(s, i) for B(s+1, i) (its output gradient); the last stage starts backward once
    its forwards are done. ``t_fwd``/``t_bwd`` are per-stage times (one number: all equal).
    Communication is taken as free. Returns the tasks sorted by start time.
    """
    if p < 1 or m < 1:
        raise ValueError(f"need p >= 1 stages and m >= 1 micro-batches, got p={p}, m={m}")
    tf, tb = _times(t_fwd, p, "t_fwd"), _times(t_bwd, p, "t_bwd")
    free = [0.0] * p  # when each stage's device is next free
    f_end = [[0.0] * m for _ in range(p)]
    b_end = [[0.0] * m for _ in range(p)]
    tasks = []
    for i in range(m):
        for s in range(p):
            start = max(free[s], f_end[s - 1][i] if s > 0 else 0.0)
            f_end[s][i] = free[s] = start + tf[s]
            tasks.append(Task(s, i, "F", start, start + tf[s]))
    for i in range(m):  # ScheduleGPipe runs the backwards in micro-batch order
        for s in reversed(range(p)):
            start = max(free[s], b_end[s + 1][i] if s < p - 1 else 0.0)
            b_end[s][i] = free[s] = start + tb[s]
            tasks.append(Task(s, i, "B", start, start + tb[s]))
    return sorted(tasks, key=lambda t: (t.start, t.stage))


def bubble_fraction(p: int, m: int) -> float:
    """GPipe's idle fraction ``(p-1)/(m+p-1)`` for ``p`` equal stages and ``m`` micro-batches."""
    if p < 1 or m < 1:
        raise ValueError(f"need p >= 1 and m >= 1, got p={p}, m={m}")
    return (p - 1) / (m + p - 1)


def _list_schedule(
    orders: Sequence[Sequence[tuple[int, int, str]]],
    duration: dict[tuple[int, int, str], float],
    needs: dict[tuple[int, int, str], tuple[int, int, str] | None],
    rank_of: dict[int, int],
) -> list[Task]:
    """Run each rank's task list in order; a task starts when its rank is free and ``needs`` ended.

    Tasks are keys ``(virtual stage, micro, phase)``; ``rank_of`` maps a virtual stage to its rank
    (the row of the Gantt chart). Raises ``ValueError`` if the orders deadlock.
    """
    end: dict[tuple[int, int, str], float] = {}
    free = [0.0] * len(orders)
    nxt = [0] * len(orders)
    tasks: list[Task] = []
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for r, order in enumerate(orders):
            while nxt[r] < len(order):
                key = order[nxt[r]]
                dep = needs[key]
                if dep is not None and dep not in end:
                    break
                start = max(free[r], end[dep] if dep is not None else 0.0)
                end[key] = free[r] = start + duration[key]
                tasks.append(Task(rank_of[key[0]], key[1], key[2], start, end[key]))
                nxt[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise ValueError("the task orders deadlock")
    return sorted(tasks, key=lambda t: (t.start, t.stage))


def _deps(n_stages: int, m: int) -> dict[tuple[int, int, str], tuple[int, int, str] | None]:
    """F(s, i) needs F(s-1, i); B(s, i) needs B(s+1, i), and the last stage's B needs its own F."""
    needs: dict[tuple[int, int, str], tuple[int, int, str] | None] = {}
    for s in range(n_stages):
        for i in range(m):
            needs[(s, i, "F")] = (s - 1, i, "F") if s > 0 else None
            needs[(s, i, "B")] = (s + 1, i, "B") if s < n_stages - 1 else (s, i, "F")
    return needs


def one_f_one_b_order(p: int, s: int, m: int) -> list[str]:
    """Stage ``s``'s task order under 1F1B: ``min(p-s-1, m)`` warm-up forwards, then F/B pairs, then the rest."""
    if p < 1 or m < 1 or not 0 <= s < p:
        raise ValueError(f"need p >= 1, m >= 1 and 0 <= s < p, got p={p}, s={s}, m={m}")
    warm = min(p - s - 1, m)
    return ["F"] * warm + [ph for _ in range(m - warm) for ph in ("F", "B")] + ["B"] * warm


def one_f_one_b_schedule(
    p: int, m: int, t_fwd: float | Sequence[float] = 1.0, t_bwd: float | Sequence[float] = 2.0
) -> list[Task]:
    """Event simulation of the 1F1B schedule (PipeDream-flush) on ``p`` stages, ``m`` micro-batches.

    Stage ``s`` runs :func:`one_f_one_b_order`: ``p - s - 1`` forwards to fill the pipeline,
    then one forward and one backward in turn, then the remaining backwards. Dependencies and
    task times are those of :func:`gpipe_schedule`, so :func:`plot_gantt` and
    :func:`idle_fraction` work on the result. Returns the tasks sorted by start time.
    """
    if p < 1 or m < 1:
        raise ValueError(f"need p >= 1 stages and m >= 1 micro-batches, got p={p}, m={m}")
    tf, tb = _times(t_fwd, p, "t_fwd"), _times(t_bwd, p, "t_bwd")
    orders = []
    for s in range(p):
        counts = {"F": 0, "B": 0}
        order = []
        for ph in one_f_one_b_order(p, s, m):
            order.append((s, counts[ph], ph))
            counts[ph] += 1
        orders.append(order)
    duration = {(s, i, ph): (tf if ph == "F" else tb)[s] for s in range(p) for i in range(m) for ph in "FB"}
    return _list_schedule(orders, duration, _deps(p, m), {s: s for s in range(p)})


def interleaved_schedule(p: int, m: int, v: int, t_fwd: float = 1.0, t_bwd: float = 2.0) -> list[Task]:
    """Event simulation of an interleaved pipeline: ``v`` model chunks per rank, ``p * v`` virtual stages.

    Virtual stage ``j`` (``1/(p v)`` of the model, times ``t_fwd/v`` and ``t_bwd/v``) lives on rank
    ``j mod p``. Each rank runs all forwards, then all backwards (GPipe order), taking the
    micro-batches in groups of ``p``: for each group, its chunks in order (depth first), as in
    Megatron-LM's interleaved schedule. Needs ``m`` divisible by ``p``. Tasks carry the rank as
    ``stage``. For equal times the bubble is ``(p-1)/v`` task slots, see :func:`interleaved_bubble`.
    """
    if p < 1 or m < 1 or v < 1 or m % p:
        raise ValueError(f"need p, m, v >= 1 with m divisible by p, got p={p}, m={m}, v={v}")
    if t_fwd < 0 or t_bwd < 0:
        raise ValueError(f"task times must be non-negative, got {t_fwd}, {t_bwd}")
    n = p * v
    orders: list[list[tuple[int, int, str]]] = [[] for _ in range(p)]
    for r in range(p):
        for phase, chunks in (("F", list(range(v))), ("B", list(reversed(range(v))))):
            for g in range(m // p):
                for c in chunks:
                    orders[r].extend((c * p + r, g * p + k, phase) for k in range(p))
    duration = {(j, i, ph): (t_fwd if ph == "F" else t_bwd) / v for j in range(n) for i in range(m) for ph in "FB"}
    return _list_schedule(orders, duration, _deps(n, m), {j: j % p for j in range(n)})


def interleaved_bubble(p: int, m: int, v: int) -> float:
    """Idle fraction of the interleaved schedule: ``(p-1) / (v m + p - 1)``; bubble/ideal ``= (p-1)/(v m)``."""
    if p < 1 or m < 1 or v < 1:
        raise ValueError(f"need p, m, v >= 1, got p={p}, m={m}, v={v}")
    return (p - 1) / (v * m + p - 1)


def peak_in_flight(tasks: Sequence[Task]) -> dict[int, int]:
    """Per stage: the most micro-batches whose forward has ended and whose backward has not.

    That is how many micro-batches' activations the stage holds at once. Each stage's tasks are
    taken in start order: ``+1`` at the end of a forward, ``-1`` at the end of a backward.
    """
    if not tasks:
        raise ValueError("no tasks")
    peak: dict[int, int] = {}
    for s in sorted({t.stage for t in tasks}):
        held = top = 0
        for t in sorted((t for t in tasks if t.stage == s), key=lambda t: t.start):
            held += 1 if t.phase == "F" else -1
            top = max(top, held)
        peak[s] = top
    return peak


def idle_fraction(tasks: Sequence[Task]) -> float:
    """Fraction of device-time spent idle: ``1 - busy / (p * makespan)`` over all stages."""
    if not tasks:
        raise ValueError("no tasks")
    p = 1 + max(t.stage for t in tasks)
    start, end = min(t.start for t in tasks), max(t.end for t in tasks)
    busy = sum(t.end - t.start for t in tasks)
    return 1.0 - busy / (p * (end - start))


def plot_gantt(tasks: Sequence[Task], ax=None, title: str = "GPipe schedule", unit: str = "time"):
    """Draw ``tasks`` as a Gantt chart: one row per stage, forward blue, backward orange."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(10, 3))[1]
    p = 1 + max(t.stage for t in tasks)
    t0 = min(t.start for t in tasks)
    colors = {"F": "tab:blue", "B": "tab:orange"}
    for t in tasks:
        ax.barh(t.stage, t.end - t.start, left=t.start - t0, color=colors[t.phase], edgecolor="black", height=0.8)
        ax.text((t.start + t.end) / 2 - t0, t.stage, f"{t.phase}{t.micro}", ha="center", va="center", fontsize=7)
    ax.set_yticks(range(p), [f"stage {s}" for s in range(p)])
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.set_title(title)
    return ax


# --------------------------------------------------------------------------- tensor parallelism


def column_parallel_linear(x: torch.Tensor, layer: nn.Linear, p: int) -> torch.Tensor:
    """Megatron's column-parallel split, in one process: shard ``W`` by output rows, concatenate.

    Shard k holds ``W[k*o/p:(k+1)*o/p]`` and its bias slice and computes ``x @ W_k.T + b_k``
    (B, o/p); the concatenation along the last axis is the all-gather of a real run.
    """
    out = layer.out_features
    if out % p:
        raise ValueError(f"out_features={out} is not divisible by p={p}")
    weights = layer.weight.chunk(p, dim=0)  # p x (o/p, i)
    biases = layer.bias.chunk(p) if layer.bias is not None else [None] * p
    return torch.cat([F.linear(x, w, b) for w, b in zip(weights, biases)], dim=-1)  # (B, o)


def row_parallel_linear(x: torch.Tensor, layer: nn.Linear, p: int) -> torch.Tensor:
    """Megatron's row-parallel split, in one process: shard ``W`` and ``x`` by input features, sum.

    Shard k holds ``W[:, k*i/p:(k+1)*i/p]`` and sees ``x[..., k*i/p:(k+1)*i/p]``; each partial
    product is (B, o), and their sum (the all-reduce of a real run) plus the bias is the output.
    """
    inp = layer.in_features
    if inp % p:
        raise ValueError(f"in_features={inp} is not divisible by p={p}")
    if x.shape[-1] != inp:
        raise ValueError(f"x has {x.shape[-1]} features, the layer expects {inp}")
    partials = [F.linear(xk, wk) for xk, wk in zip(x.chunk(p, dim=-1), layer.weight.chunk(p, dim=1))]
    out = torch.stack(partials).sum(0)  # (B, o): the all-reduce
    return out + layer.bias if layer.bias is not None else out


def tp_comm_elements(kind: str, batch: int, in_features: int, out_features: int, p: int) -> float:
    """Elements each rank sends (ring algorithms) in the forward pass of a split linear layer.

    ``"column"``: all-gather of the (batch, out) output, ``(p-1)/p * batch * out``.
    ``"row"``: all-reduce of the (batch, out) partial sums, ``2 (p-1)/p * batch * out``.
    ``"column+row"`` (a Megatron MLP ``in -> out -> in``): one all-reduce of (batch, in).
    """
    if p < 1 or min(batch, in_features, out_features) < 1:
        raise ValueError("p, batch and feature sizes must be positive")
    share = (p - 1) / p
    if kind == "column":
        return share * batch * out_features
    if kind == "row":
        return 2 * share * batch * out_features
    if kind == "column+row":
        return 2 * share * batch * in_features
    raise ValueError(f"kind must be 'column', 'row' or 'column+row', got {kind!r}")


# --------------------------------------------------------------------------- activation recomputation


def saved_tensor_bytes(fn: Any, x: torch.Tensor, params: Sequence[torch.Tensor] = ()) -> tuple[int, torch.Tensor]:
    """Bytes autograd saves for the backward while computing ``fn(x)``, and the output.

    Every tensor that an operation saves passes through ``torch.autograd.graph.saved_tensors_hooks``;
    we add up the bytes of those that do not share storage with ``params`` (weights are
    stored anyway; only activations count). A tensor saved twice is counted twice (chapter 21's
    ``complexity.saved_activation_bytes`` counts each storage once, for a whole module).
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a tensor, got {type(x).__name__}")
    weights = {q.untyped_storage().data_ptr() for q in params}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.untyped_storage().data_ptr() not in weights:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    return total, out


class Recomputed(nn.Module):
    """A ``Sequential`` cut into ``segments`` runs of blocks, each under ``torch.utils.checkpoint``.

    The forward keeps only each segment's input; the backward recomputes the segment's forward
    from it, then differentiates. ``segments = 0`` runs the stack plainly (no recomputation).
    """

    def __init__(self, stack: nn.Sequential, segments: int):
        super().__init__()
        if segments < 0 or (segments and len(stack) % segments):
            raise ValueError(f"cannot cut {len(stack)} blocks into {segments} equal segments")
        self.stack, self.segments = stack, segments
        self.parts = split_stages(stack, segments) if segments else [stack]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, width) -> (B, width), the same values as ``stack(x)``."""
        if not self.segments:
            return self.stack(x)
        from torch.utils.checkpoint import checkpoint

        for part in self.parts:
            x = checkpoint(part, x, use_reentrant=False)  # saves x only; recomputes part in backward
        return x


# --------------------------------------------------------------------------- composing parallelisms


def parallel_costs(dp: int, pp: int, tp: int, *, layers: int, d: int, tokens: int, m: int) -> dict[str, float]:
    """Per-rank memory and traffic (in elements) of a stack of Megatron MLP layers ``d -> 4d -> d``.

    ``dp x pp x tp`` ranks; each training step sees ``m`` micro-batches of ``tokens`` tokens per
    data-parallel replica, under 1F1B. Per rank:

    - ``weights``: ``8 d^2 L / (pp tp)`` (each layer has ``8 d^2`` weights, biases ignored);
    - ``activations``: stage 0 holds ``min(pp, m)`` micro-batches of ``L/pp`` layers, each saving
      the layer input ``tokens d`` (replicated) and two ``tokens 4d / tp`` hidden tensors;
    - ``dp_comm``: ring all-reduce of the rank's gradients, ``2 (dp-1)/dp * weights``;
    - ``pp_comm``: ``2 m tokens d`` (one activation out, one gradient back per micro-batch), 0 if ``pp = 1``;
    - ``tp_comm``: two all-reduces of ``(tokens, d)`` per layer and micro-batch (forward and
      backward), ``2 (tp-1)/tp tokens d`` each.
    """
    if min(dp, pp, tp, layers, d, tokens, m) < 1:
        raise ValueError("all sizes must be positive")
    if layers % pp or 4 * d % tp:
        raise ValueError(f"{layers} layers must split over pp={pp} stages and 4d={4 * d} over tp={tp}")
    weights = 8 * d * d * layers / (pp * tp)
    per_layer = tokens * d + 2 * tokens * 4 * d / tp
    return {
        "weights": weights,
        "activations": min(pp, m) * layers / pp * per_layer,
        "dp_comm": 2 * (dp - 1) / dp * weights,
        "pp_comm": 2.0 * m * tokens * d if pp > 1 else 0.0,
        "tp_comm": layers / pp * m * 2 * 2 * (tp - 1) / tp * tokens * d,
    }


# --------------------------------------------------------------------------- a real pipeline (gloo)


def block_stack(width: int = 256, depth: int = 8, seed: int = 0) -> nn.Sequential:
    """The model we pipeline, ``(B, width) -> (B, width)``: ``depth`` equal blocks ``Linear(width, width) -> Tanh``.

    Each block is the book's MLP block (:func:`~dlarch_lib.modular.mlp_block`, no norm, no
    dropout), all of the same width, so :func:`split_stages` can cut the stack into stages of
    equal cost. Initialised from ``seed`` (inside :func:`~dlarch_lib.core.runtime.seeded`): the
    same weights on every rank.
    """
    if width < 1 or depth < 1:
        raise ValueError(f"width and depth must be positive, got {width}, {depth}")
    with seeded(seed):
        return nn.Sequential(*[modular.mlp_block(width, width, activation="tanh") for _ in range(depth)])


def split_stages(model: nn.Sequential, p: int) -> list[nn.Sequential]:
    """Cut a ``Sequential`` into ``p`` consecutive stages of equal length."""
    if p < 1 or len(model) % p:
        raise ValueError(f"cannot split {len(model)} layers into p={p} equal stages")
    k = len(model) // p
    layers = list(model)
    return [nn.Sequential(*layers[s * k : (s + 1) * k]) for s in range(p)]


class _Clock(torch.autograd.Function):
    """Identity whose backward appends ``(tag, time)`` to a log: timestamps a backward pass."""

    @staticmethod
    def forward(ctx, x, log, tag):
        ctx.log, ctx.tag = log, tag
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if grad.is_cuda:
            torch.cuda.synchronize(grad.device)
        ctx.log.append((ctx.tag, time.perf_counter(), time.thread_time()))
        return grad, None, None


class TimedStage(nn.Module):
    """Wraps a stage and logs ``(tag, wall, cpu)`` stamps; tags F0/F1, B0/B1 = forward/backward start/end.

    ``wall`` is ``time.perf_counter()`` (one clock for all processes on a machine); ``cpu`` is
    ``time.thread_time()``, which does not advance while the OS has the process descheduled.
    On a CPU the autograd engine runs the backward in the calling thread, so both are comparable.
    """

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        self.log: list[tuple[str, float, float]] = []  # (tag, wall seconds, CPU seconds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as ``body(x)``, with timestamps for this forward and (later) its backward."""
        if x.is_cuda:  # time the GPU's work, not the kernel launches
            torch.cuda.synchronize(x.device)
        self.log.append(("F0", time.perf_counter(), time.thread_time()))
        if not x.requires_grad:  # first stage: make the input a leaf so its backward end is seen
            x = x.detach().requires_grad_()
        y = self.body(_Clock.apply(x, self.log, "B1"))
        y = _Clock.apply(y, self.log, "B0")
        if y.is_cuda:
            torch.cuda.synchronize(y.device)
        self.log.append(("F1", time.perf_counter(), time.thread_time()))
        return y


def _intervals(log: list[tuple[str, float, float]], stage: int) -> list[Task]:
    """Pair the start/end stamps of a :class:`TimedStage` log into tasks (micro-batches in order)."""
    tasks: list[Task] = []
    open_: dict[str, tuple[float, float]] = {}
    counts = {"F": 0, "B": 0}
    for tag, wall, cpu in log:
        phase, edge = tag[0], tag[1]
        if edge == "0":
            open_[phase] = (wall, cpu)
        else:
            wall0, cpu0 = open_.pop(phase)
            tasks.append(Task(stage, counts[phase], phase, wall0, wall, cpu - cpu0))
            counts[phase] += 1
    return tasks


def _tensor_parallel_check(rank: int, world: int, seed: int, device: torch.device) -> dict[str, float]:
    """Column- and row-parallel ``Linear(16, 8)`` across ranks with all_gather / all_reduce."""
    with seeded(seed):  # the same full layer and input on every rank
        layer, x = nn.Linear(16, 8).to(device), torch.randn(4, 16).to(device)
    with torch.no_grad():
        full = layer(x)
        w_col, b_col = layer.weight.chunk(world, 0)[rank], layer.bias.chunk(world)[rank]
        parts = [torch.empty(4, 8 // world, device=device) for _ in range(world)]
        dist.all_gather(parts, F.linear(x, w_col, b_col))  # column-parallel: gather outputs
        col = torch.cat(parts, dim=-1)
        partial = F.linear(x.chunk(world, -1)[rank], layer.weight.chunk(world, 1)[rank])
        dist.all_reduce(partial)  # row-parallel: sum partial products
        row = partial + layer.bias
    return {"column_err": (col - full).abs().max().item(), "row_err": (row - full).abs().max().item()}


def _dtensor_mlp_check(rank: int, world: int, seed: int, device: torch.device) -> dict[str, Any]:
    """Megatron MLP ``Linear(16, 64) -> GELU -> Linear(64, 16)`` with DTensor's ``parallelize_module``.

    The ranks form a 2-D ``DeviceMesh`` of shape ``(1, world)`` with dimensions ``("dp", "tp")``
    (data x tensor parallelism; one data-parallel replica here). ``ColwiseParallel`` shards the
    first layer's weight by rows, ``RowwiseParallel`` the second's by columns, over the mesh's
    ``"tp"`` dimension. Returns the largest error against the unsplit MLP (forward output and the
    first layer's gradient), the local and full weight shapes, and the mesh's shape.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    with seeded(seed):
        mlp = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)).to(device)
        x = torch.randn(4, 16).to(device)
    ref = copy.deepcopy(mlp)
    ref_out = ref(x)
    ref_out.pow(2).sum().backward()
    ref_grad = _grad(cast(nn.Linear, ref[0]).weight)
    mesh = init_device_mesh(device.type, (1, world), mesh_dim_names=("dp", "tp"))
    tp: Any = parallelize_module(mlp, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    out = tp(x)  # each rank: its half of the hidden units, then an all-reduce
    out.pow(2).sum().backward()
    w1, w2 = tp[0].weight, tp[2].weight  # DTensors: full logical shape, a local shard
    g1 = w1.grad.full_tensor()  # gather the sharded gradient (a collective) to compare
    return {
        "out_err": (out - ref_out).abs().max().item(),
        "grad_err": (g1 - ref_grad).abs().max().item(),
        "local": [tuple(w1.to_local().shape), tuple(w2.to_local().shape)],
        "full": [tuple(w1.shape), tuple(w2.shape)],
        "mesh": {name: mesh[name].size() for name in ("dp", "tp")},
    }


def _megatron_mlp_ms(
    rank: int, world: int, tokens: int, d: int, repeats: int, device: torch.device
) -> dict[str, float]:
    """Median ms of one rank's Megatron MLP shard (``d -> 4d/p -> d``) and of the all-reduce after it.

    Rank ``k`` holds the column-parallel rows of ``A`` (``4d/p x d``) and the row-parallel columns
    of ``B`` (``d x 4d/p``); its forward pass is ``gelu(x A_k^T) B_k^T``, a partial ``(tokens, d)``
    sum that one all-reduce completes (theorem thm-ch19-tp). Both are timed separately, after a
    barrier and with the device synchronised, over ``repeats`` rounds after one warm-up.
    """
    if d * 4 % world:
        raise ValueError(f"hidden width 4d = {4 * d} is not divisible by {world} ranks")
    with seeded(rank):  # each rank its own shard; the values do not matter for the timing
        x = torch.randn(tokens, d, device=device)
        a_k = torch.randn(4 * d // world, d, device=device) / d**0.5
        b_k = torch.randn(d, 4 * d // world, device=device) / d**0.5

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    compute, reduce = [], []
    with torch.no_grad():
        for step in range(1 + repeats):
            dist.barrier()
            sync()
            t0 = time.perf_counter()
            partial = F.gelu(x @ a_k.T) @ b_k.T  # (tokens, d): this rank's share of the output
            sync()
            t1 = time.perf_counter()
            dist.all_reduce(partial)  # the MLP's one communication
            sync()
            t2 = time.perf_counter()
            if step > 0:
                compute.append(1e3 * (t1 - t0))
                reduce.append(1e3 * (t2 - t1))
    return {"compute_ms": statistics.median(compute), "all_reduce_ms": statistics.median(reduce)}


def _grad(param: torch.Tensor) -> torch.Tensor:
    """The gradient that backward left in ``param.grad`` (an error if there is none)."""
    if param.grad is None:
        raise RuntimeError("a parameter received no gradient")
    return param.grad


PIPELINE_SCHEDULES = ("gpipe", "1f1b")  # config["schedules"]: ScheduleGPipe, Schedule1F1B


def pipeline_worker(rank: int, world: int, init_method: str, config: dict) -> dict:
    """One rank of :func:`run_pipeline`: training steps with ``ScheduleGPipe`` and ``Schedule1F1B`` (gloo or NCCL).

    For each schedule in ``config["schedules"]`` (names in :data:`PIPELINE_SCHEDULES`) and each
    micro-batch count ``m`` in ``config["microbatches"]`` (1F1B only for ``m >= world``, which it
    requires) it runs one warm-up step and ``config["repeats"]`` timed steps on a batch of
    ``m * config["micro_batch"]`` rows, logs the start/end of every forward and backward, checks
    the stage's gradients against the unsplit model (rank-local reference), and returns all of it.
    It also checks tensor parallelism by hand (all_gather/all_reduce) and with DTensor.
    ``config["device"]`` is ``"cpu"`` (gloo) or ``"cuda"`` (rank r on ``cuda:r``, NCCL);
    ``config["timeout_s"]`` is how long a rank waits for a missing peer before it raises.
    """
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    classes = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
    torch.set_num_threads(1)
    cuda = config["device"] == "cuda"
    device = init_distributed("nccl" if cuda else "gloo", rank, world, init_method, timeout_s=config["timeout_s"])
    stage = schedule = None
    try:
        result: dict[str, Any] = {
            "tp": _tensor_parallel_check(rank, world, config["seed"], device),
            "dtensor": _dtensor_mlp_check(rank, world, config["seed"], device),
            "tp_ms": _megatron_mlp_ms(
                rank, world, config["tp_shape"][0], config["tp_shape"][1], config["repeats"], device
            ),
            "runs": {},
            "grad_err": {},
        }
        width, b = config["width"], config["micro_batch"]
        model = block_stack(width, config["depth"], config["seed"])
        reference = block_stack(width, config["depth"], config["seed"]).to(device)  # unsplit, for the gradient check
        stage_module = TimedStage(split_stages(model, world)[rank]).to(device)
        loss_fn = F.mse_loss
        for name in config["schedules"]:
            for m in config["microbatches"]:
                if name == "1f1b" and m < world:
                    continue
                gen = torch.Generator().manual_seed(m)
                x, y = (torch.randn(m * b, width, generator=gen).to(device) for _ in range(2))
                stage = PipelineStage(stage_module, rank, world, device)
                schedule = classes[name](stage, n_microbatches=m, loss_fn=loss_fn)  # grads scaled by 1/m
                runs = []
                for step in range(1 + config["repeats"]):
                    stage_module.zero_grad(set_to_none=True)
                    stage_module.log.clear()
                    dist.barrier()
                    if rank == 0:
                        schedule.step(x)
                    elif rank == world - 1:
                        schedule.step(target=y)
                    else:
                        schedule.step()
                    if step > 0:
                        runs.append([tuple(vars(t).values()) for t in _intervals(list(stage_module.log), rank)])
                result["runs"][name, m] = runs
                reference.zero_grad()
                loss_fn(reference(x), y).backward()  # full batch, one device
                ref_stage = split_stages(reference, world)[rank]
                result["grad_err"][name, m] = max(
                    (_grad(pa) - _grad(pr)).abs().max().item()
                    for pa, pr in zip(stage_module.body.parameters(), ref_stage.parameters())
                )
        return result
    finally:
        del stage, schedule  # they hold the process group: release them before destroying it
        shutdown_distributed()


@dataclass
class PipelineRun:
    """What :func:`run_pipeline` measured: tasks per (m, repeat), gradient and TP errors."""

    runs: dict[int, list[list[Task]]]  # ScheduleGPipe: m -> repeats -> tasks of all stages
    grad_err: dict[int, float]  # ScheduleGPipe: m -> max |grad_pipeline - grad_unsplit| over all stages
    tp_err: dict[str, float]  # "column_err"/"row_err" -> max error over ranks
    tp_ms: dict[str, float]  # Megatron MLP shard: "compute_ms"/"all_reduce_ms", slowest rank's median
    seconds: float  # wall time of the whole spawn, start-up included
    schedule_runs: dict[str, dict[int, list[list[Task]]]]  # schedule name -> m -> repeats -> tasks
    schedule_grad_err: dict[str, dict[int, float]]  # schedule name -> m -> max gradient error
    dtensor: list[dict[str, Any]]  # per rank: DTensor MLP errors and local/full weight shapes

    def idle(self, m: int) -> float:
        """Median over repeats of the measured idle fraction for ``m`` micro-batches."""
        values = sorted(idle_fraction(tasks) for tasks in self.runs[m])
        return values[len(values) // 2]


def run_pipeline(
    world: int = 2,
    microbatches: Sequence[int] = (1, 2, 4, 8),
    micro_batch: int = 32,
    width: int = 256,
    depth: int = 8,
    repeats: int = 3,
    seed: int = 0,
    *,
    device: str,
    tp_shape: tuple[int, int] = (512, 256),
    timeout_s: float = PG_TIMEOUT_S,
    deadline_s: float = DEADLINE_S,
    schedules: Sequence[str] = ("gpipe",),
) -> PipelineRun:
    """Run :func:`pipeline_worker` on ``world`` spawned processes (:func:`~dlarch_lib.parallel.launch`).

    ``device`` (required) is where the ranks compute: ``"cpu"``, gloo processes on the CPU, or
    ``"cuda"``, one GPU per rank with NCCL.
    Each micro-batch has ``micro_batch`` rows, so the per-task work is the same for every ``m``.
    Each rank also times its shard of a Megatron MLP on ``tp_shape = (tokens, d)`` against the
    all-reduce that completes it (:attr:`PipelineRun.tp_ms`).
    ``schedules`` names the pipeline schedules to run in the same spawn (:data:`PIPELINE_SCHEDULES`); the
    first is the one reported in :attr:`PipelineRun.runs`, all are in :attr:`PipelineRun.schedule_runs`.
    A rank waits at most ``timeout_s`` seconds for a missing peer; the whole run is killed with a
    ``TimeoutError`` if it is not done after ``deadline_s`` seconds.
    """
    if not schedules or any(name not in PIPELINE_SCHEDULES for name in schedules):
        raise ValueError(f"schedules must be a non-empty choice from {PIPELINE_SCHEDULES}, got {tuple(schedules)}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and torch.cuda.device_count() < world:
        raise ValueError(f"device='cuda' needs {world} GPUs, found {torch.cuda.device_count()}")
    if world < 2:
        raise ValueError(f"a pipeline needs world >= 2 processes, got {world}")
    if depth % world:
        raise ValueError(f"depth={depth} layers cannot be split into {world} equal stages")
    if len(tp_shape) != 2 or min(tp_shape) < 1 or 4 * tp_shape[1] % world:
        raise ValueError(f"tp_shape must be (tokens, d) >= 1 with 4d divisible by {world} ranks, got {tuple(tp_shape)}")
    if not microbatches or min(microbatches) < 1 or repeats < 1:
        raise ValueError(f"need micro-batch counts >= 1 and repeats >= 1, got {tuple(microbatches)}, {repeats}")
    _check_seconds("timeout_s", timeout_s)
    config = dict(
        microbatches=list(microbatches),
        micro_batch=micro_batch,
        width=width,
        depth=depth,
        repeats=repeats,
        seed=seed,
        device=device,
        tp_shape=tuple(tp_shape),
        timeout_s=timeout_s,
        schedules=list(schedules),
    )
    start = time.perf_counter()
    results = launch(
        pipeline_worker, (config,), world, deadline_s=deadline_s, name=f"run_pipeline ({world} ranks, {device})"
    )
    seconds = time.perf_counter() - start
    schedule_runs: dict[str, dict[int, list[list[Task]]]] = {name: {} for name in schedules}
    schedule_grad_err: dict[str, dict[int, float]] = {name: {} for name in schedules}
    for name, m in results[0]["runs"]:
        schedule_runs[name][m] = [
            [Task(*row) for res in results for row in res["runs"][name, m][k]] for k in range(repeats)
        ]
        schedule_grad_err[name][m] = max(res["grad_err"][name, m] for res in results)
    tp_err = {key: max(res["tp"][key] for res in results) for key in results[0]["tp"]}
    tp_ms = {key: max(res["tp_ms"][key] for res in results) for key in results[0]["tp_ms"]}
    first = schedules[0]
    return PipelineRun(
        schedule_runs[first],
        schedule_grad_err[first],
        tp_err,
        tp_ms,
        seconds,
        schedule_runs,
        schedule_grad_err,
        [res["dtensor"] for res in results],
    )
