"""Measuring a model: parameters, FLOPs, and the one way this book times code.

- :func:`count_parameters` and :func:`forward_flops` count what a design costs, independent of the
  machine (used from chapter 2 on).
- :func:`timings_ms` is the book's one timing entry point: it warms up, synchronises the device
  before each clock read, repeats, and returns every time in milliseconds; reduce them with
  ``min`` (the least disturbed call), :func:`statistics.median` or :func:`summarize`; time a
  model's forward pass with :func:`inference_call`.
  :func:`interleaved_timings_ms` lets several variants take turns through it and :func:`best_ms`
  keeps each one's fastest call: the comparison to use on a shared, busy machine.
  ``clock="cuda"`` reads CUDA events instead of the host clock.
- :func:`steady_clock` picks the clock other programs disturb least; :func:`num_threads`
  runs a block with a given torch thread count.

The callable must do all the work being timed and nothing else: prepare inputs (tensor
conversion, data loading, host-to-device copies) outside it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters registered in ``model`` (what an optimizer can see).

    Parameters shared between modules are counted once: ``parameters()`` yields each tensor once.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def inference_call(model: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A callable running ``model(x)`` in eval mode without gradients: what :func:`timings_ms` times
    for a model's latency, e.g. ``min(timings_ms(inference_call(model, x), device=x.device))``."""
    model.eval()

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    return forward


def forward_flops(model: Callable[[torch.Tensor], Any], x: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``x``, counted by ``torch.utils.flop_counter``.

    ``model`` is a module or any function of ``x``. A module runs in eval mode (its mode is restored
    afterwards), so counting never changes it: in training mode it would update batch-norm statistics.
    """
    counter = FlopCounterMode(display=False)
    module = model if isinstance(model, nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        if module is not None:
            module.train(was_training)
    return int(counter.get_total_flops())


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
"""``"wall"``: elapsed time (what a user waits). ``"cpu"``: CPU time of this process, all threads
(what the computation cost; largely unaffected by other programs sharing the cores, blind to device work)."""


def steady_clock(device: torch.device | str | None = None) -> str:
    """The clock least disturbed by other programs for work on ``device`` (default: the CPU).

    ``"cpu"`` when the work runs on a CPU with one torch thread: then the process's CPU time is
    the work's time, and other programs sharing the cores cannot add their own time to it (they
    can still slow it down somewhat, by evicting its data from the caches). ``"wall"`` otherwise
    (several threads, or a GPU, where the CPU mostly waits).
    """
    on_cpu = device is None or torch.device(device).type == "cpu"
    return "cpu" if on_cpu and torch.get_num_threads() == 1 else "wall"


def _check_counts(repeats: int, warmup: int) -> None:
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup!r}")


def synchronizer(device: torch.device | str | None) -> Callable[[], None]:
    """A function that waits until ``device`` has finished its queued work (a no-op on the CPU).

    CUDA kernels are launched asynchronously: without this wait a clock read measures how long
    the *launch* took, not the computation.
    """
    if device is None:
        return lambda: None
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "cpu":
        return lambda: None
    raise ValueError(f"no synchronizer for device type {device.type!r} (expected 'cpu' or 'cuda')")


def timings_ms(
    fn: Callable[[], Any],
    repeats: int = 20,
    warmup: int = 3,
    *,
    device: torch.device | str | None = None,
    clock: str = "wall",
) -> list[float]:
    """Times of ``repeats`` calls of ``fn()`` in milliseconds, after ``warmup`` untimed calls.

    The warm-up calls pay one-off costs (memory allocation, kernel selection, caches) that
    a steady-state measurement must not include. With ``device`` set to a CUDA device the
    device is synchronised before *each* clock read, so every interval starts on an idle
    device and ends when the work is done. ``clock`` is ``"wall"`` or ``"cpu"`` (host clocks,
    :data:`CLOCKS`), or ``"cuda"``: CUDA events on the current stream, timestamps the GPU writes
    itself when the stream reaches them, so an interval covers exactly the kernels queued between
    them and no host overhead (no synchronisation between calls; one at the end).
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    _check_counts(repeats, warmup)
    if clock == "cuda":
        return _cuda_event_timings_ms(fn, repeats, warmup)
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS) + ['cuda']}, got {clock!r}")
    sync, now = synchronizer(device), CLOCKS[clock]
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()  # nothing still running from before may leak into this interval
        start = now()
        fn()
        sync()  # the work must be finished before the clock is read
        times.append(1000.0 * (now() - start))
    return times


def _cuda_event_timings_ms(fn: Callable[[], Any], repeats: int, warmup: int) -> list[float]:
    """:func:`timings_ms` with ``clock="cuda"``: intervals between CUDA events, in milliseconds."""
    if not torch.cuda.is_available():
        raise RuntimeError('clock="cuda" needs a CUDA device')
    for _ in range(warmup):
        fn()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    torch.cuda.synchronize()
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()  # all events written before we read them
    return [start.elapsed_time(end) for start, end in pairs]


def interleaved_timings_ms(
    fns: Mapping[str, Callable[[], Any]],
    rounds: int = 5,
    warmup: int = 1,
    *,
    repeats: int = 1,
    device: torch.device | str | None = None,
    clock: str = "wall",
) -> dict[str, list[float]]:
    """Times in milliseconds of each callable in ``fns``, the callables taking turns.

    Every callable first gets ``warmup`` untimed calls. Then each of ``rounds`` rounds times
    ``repeats`` consecutive calls of every callable, in the order of ``fns`` (with ``repeats > 1``
    the later calls of a turn find the caches warm from the earlier ones). Taking turns spreads a busy phase of a shared
    machine over all variants instead of penalising whichever was timed at the wrong moment; the
    minimum of each list (:func:`best_ms`) is then the least disturbed estimate, because
    interference only ever adds time. ``device`` and ``clock`` as in :func:`timings_ms`; pass
    ``clock=steady_clock(device)`` for the clock least affected by other programs.
    Returns ``{name: [ms of each call, rounds * repeats of them, in order]}``.
    """
    if not fns:
        raise ValueError("interleaved_timings_ms needs at least one callable")
    for name, fn in fns.items():
        if not callable(fn):
            raise TypeError(f"fns[{name!r}] must be callable, got {type(fn).__name__}")
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds!r}")
    _check_counts(repeats, warmup)
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name] += timings_ms(fn, repeats, 0, device=device, clock=clock)
    return times


def best_ms(
    fns: Mapping[str, Callable[[], Any]],
    rounds: int = 5,
    warmup: int = 1,
    *,
    repeats: int = 1,
    device: torch.device | str | None = None,
    clock: str = "wall",
) -> dict[str, float]:
    """Fastest time in milliseconds of each callable over its :func:`interleaved_timings_ms` calls."""
    times = interleaved_timings_ms(fns, rounds, warmup, repeats=repeats, device=device, clock=clock)
    return {name: min(t) for name, t in times.items()}


@dataclass(frozen=True)
class Stats:
    """Summary of repeated timings, in milliseconds.

    Quote ``median`` for a typical call and ``p95`` for the tail a user notices; ``min`` is the
    best the machine did (noise only ever adds time); ``iqr`` measures the spread.
    """

    n: int
    mean: float
    median: float
    p95: float
    min: float
    max: float
    q1: float  # 25th percentile
    q3: float  # 75th percentile

    @property
    def iqr(self) -> float:
        """Interquartile range ``q3 - q1`` (ms)."""
        return self.q3 - self.q1

    def __str__(self) -> str:
        return (
            f"median {self.median:.3f} ms | p95 {self.p95:.3f} | min {self.min:.3f} | "
            f"IQR {self.iqr:.3f} | mean {self.mean:.3f} (n={self.n})"
        )


def summarize(times_ms: Sequence[float]) -> Stats:
    """:class:`Stats` of a list of times (percentiles by linear interpolation, as ``numpy.percentile``)."""
    t = np.asarray(times_ms, dtype=float)
    if t.ndim != 1 or t.size == 0:
        raise ValueError(f"need a non-empty 1-D sequence of times, got shape {t.shape}")
    if not np.all(np.isfinite(t)) or (t < 0).any():
        raise ValueError("times must be finite and non-negative")
    q1, median, q3, p95 = np.percentile(t, [25, 50, 75, 95])
    return Stats(
        n=int(t.size),
        mean=float(t.mean()),
        median=float(median),
        p95=float(p95),
        min=float(t.min()),
        max=float(t.max()),
        q1=float(q1),
        q3=float(q3),
    )


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Run a block with ``torch.set_num_threads(n)``, restoring the previous count afterwards."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"thread count must be a positive int, got {n!r}")
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
