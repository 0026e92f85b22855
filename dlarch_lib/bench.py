"""Timing code honestly: warm up, synchronise the device, repeat, and summarise robustly.

- :func:`timings_ms` runs a callable ``warmup`` times untimed, then ``repeats`` times between
  two clock reads, each read preceded by a device synchronisation, and returns every time in
  milliseconds. :func:`median_ms` is their median, the one number most chapters quote: one
  preemption by the operating system adds a long outlier that would drag a mean.
- :func:`interleaved_timings_ms` times several variants taking turns, and :func:`best_ms` keeps
  each variant's fastest call: the comparison to use on a shared, busy machine.
- :class:`Stats` (from :func:`summarize` or :func:`benchmark`) holds median, p95, min and IQR.
- :func:`cuda_timings_ms` times with CUDA events instead of the host clock.
- :func:`throughput_sweep` measures items per second against batch size, inputs pre-staged.
- The roofline (chapter 22): :func:`matmul_gflops` and :func:`copy_gbs` measure the machine's
  compute peak and memory bandwidth, :func:`memory_traffic_bytes` estimates a model's bytes
  moved, and :class:`Roofline` bounds attainable GFLOP/s by arithmetic intensity.

The callable must do all the work being timed and nothing else: prepare inputs (tensor
conversion, data loading, host-to-device copies) outside it.
"""

from __future__ import annotations

import contextlib
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

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
    device and ends when the work is done. ``clock`` is ``"wall"`` or ``"cpu"`` (:data:`CLOCKS`).
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    _check_counts(repeats, warmup)
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
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


def median_ms(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` calls after ``warmup`` untimed calls."""
    return statistics.median(timings_ms(fn, repeats, warmup))


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
        return (f"median {self.median:.3f} ms | p95 {self.p95:.3f} | min {self.min:.3f} | "
                f"IQR {self.iqr:.3f} | mean {self.mean:.3f} (n={self.n})")


def summarize(times_ms: Sequence[float]) -> Stats:
    """:class:`Stats` of a list of times (percentiles by linear interpolation, as ``numpy.percentile``)."""
    t = np.asarray(times_ms, dtype=float)
    if t.ndim != 1 or t.size == 0:
        raise ValueError(f"need a non-empty 1-D sequence of times, got shape {t.shape}")
    if not np.all(np.isfinite(t)) or (t < 0).any():
        raise ValueError("times must be finite and non-negative")
    q1, median, q3, p95 = np.percentile(t, [25, 50, 75, 95])
    return Stats(n=int(t.size), mean=float(t.mean()), median=float(median), p95=float(p95),
                 min=float(t.min()), max=float(t.max()), q1=float(q1), q3=float(q3))


def benchmark(
    fn: Callable[[], Any],
    repeats: int = 20,
    warmup: int = 3,
    *,
    device: torch.device | str | None = None,
    clock: str = "wall",
) -> Stats:
    """:func:`timings_ms` summarised as :class:`Stats`."""
    return summarize(timings_ms(fn, repeats, warmup, device=device, clock=clock))


def cuda_timings_ms(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3) -> list[float]:
    """Times of ``fn()`` in milliseconds measured by CUDA events on the current stream.

    An event is a timestamp written by the GPU itself when the stream reaches it, so the
    interval covers exactly the kernels queued between the two events, not host overhead.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("cuda_timings_ms needs a CUDA device")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    _check_counts(repeats, warmup)
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


@dataclass(frozen=True)
class ThroughputPoint:
    """One batch size of a throughput sweep."""

    batch: int
    stats: Stats

    @property
    def items_per_s(self) -> float:
        """Items per second at the median latency."""
        return self.batch / (self.stats.median / 1000.0)


def throughput_sweep(
    model: nn.Module,
    make_input: Callable[[int], torch.Tensor],
    batch_sizes: Sequence[int],
    repeats: int = 10,
    warmup: int = 2,
    device: torch.device | str | None = None,
    clock: str = "wall",
) -> list[ThroughputPoint]:
    """Forward-pass latency and throughput of ``model`` at each batch size (eval mode, no grad).

    ``make_input(b)`` returns a batch of ``b`` items; it is called and moved to ``device``
    *before* timing starts, so data preparation stays out of the timed region.
    ``clock`` as in :func:`timings_ms`.
    """
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive ints, got {batch_sizes!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    points = []
    with torch.no_grad():
        for b in batch_sizes:
            x = make_input(b).to(device)  # pre-staged: not timed
            if x.shape[0] != b:
                raise ValueError(f"make_input({b}) returned a batch of {x.shape[0]}")
            points.append(ThroughputPoint(b, benchmark(lambda: model(x), repeats, warmup, device=device, clock=clock)))
    return points


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


# --- the roofline ------------------------------------------------------------------------


def matmul_gflops(n: int = 1024, repeats: int = 8, warmup: int = 2, *, clock: str = "wall",
                  device: torch.device | str = "cpu") -> float:
    """Best fp32 GFLOP/s of an ``(n, n) @ (n, n)`` product: ``2 n^3`` FLOPs over the *minimum* time.

    The minimum, because the question is what the hardware can do: interference only adds time.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device) for _ in range(2))
    best = min(timings_ms(lambda: a @ b, repeats, warmup, device=device, clock=clock))
    return 2 * n**3 / (best / 1000.0) / 1e9


def copy_gbs(numel: int = 32 * 2**20, repeats: int = 8, warmup: int = 2, *, clock: str = "wall",
             device: torch.device | str = "cpu") -> float:
    """Best memory bandwidth in GB/s of ``dst.copy_(src)`` for fp32 tensors of ``numel`` elements.

    A copy reads ``numel * 4`` bytes and writes as many, so it moves ``8 * numel`` bytes.
    Choose ``numel`` so that the tensors are much larger than the last-level cache (the default
    is 128 MiB each), otherwise this measures the cache, not memory.
    """
    if not isinstance(numel, int) or numel < 1:
        raise ValueError(f"numel must be a positive int, got {numel!r}")
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    best = min(timings_ms(lambda: dst.copy_(src), repeats, warmup, device=device, clock=clock))
    return 2 * src.nbytes / (best / 1000.0) / 1e9


def theoretical_peak_gflops(ghz: float, flops_per_cycle: int, cores: int = 1) -> float:
    """Peak fp32 GFLOP/s = cores x clock (GHz) x FLOPs per cycle per core.

    FLOPs per cycle: 32 for AVX2 with two FMA units (8 lanes x 2 FLOPs x 2 units), 64 for
    AVX-512 with two FMA units.
    """
    if ghz <= 0 or flops_per_cycle < 1 or cores < 1:
        raise ValueError(f"need ghz > 0, flops_per_cycle >= 1, cores >= 1; got {ghz}, {flops_per_cycle}, {cores}")
    return cores * ghz * flops_per_cycle


def cpu_clock_and_width(cpuinfo: str | None = None) -> tuple[float, int] | None:
    """(GHz, fp32 FLOPs per cycle per core) read from ``/proc/cpuinfo``, or ``None`` if unknown.

    Assumes two FMA units per core (true of recent x86 server cores; check your CPU's manual).
    """
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        if not path.is_file():
            return None
        cpuinfo = path.read_text()
    mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
    if mhz is None or flags is None:
        return None
    names = set(flags.group(1).split())
    width = 64 if "avx512f" in names else 32 if {"avx2", "fma"} <= names else 16 if "avx" in names else 8
    return float(mhz.group(1)) / 1000.0, width


def memory_traffic_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes a forward pass moves if every leaf module reads its inputs and weights from memory
    and writes its output back (no fusion, no cache reuse between layers): an upper-bound model.
    """
    total = 0

    def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
        nonlocal total
        tensors = [t for t in (*inputs, output) if isinstance(t, torch.Tensor)]
        tensors += list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        total += sum(t.nbytes for t in tensors)

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total


@dataclass(frozen=True)
class Roofline:
    """The roofline model: attainable GFLOP/s = min(peak, intensity x bandwidth)."""

    peak_gflops: float  # measured compute peak
    bandwidth_gbs: float  # measured memory bandwidth

    def __post_init__(self) -> None:
        if self.peak_gflops <= 0 or self.bandwidth_gbs <= 0:
            raise ValueError(f"peak and bandwidth must be positive, got {self.peak_gflops}, {self.bandwidth_gbs}")

    @property
    def ridge(self) -> float:
        """Arithmetic intensity (FLOP/byte) where the memory roof meets the compute roof."""
        return self.peak_gflops / self.bandwidth_gbs

    def bound(self, intensity: float | np.ndarray) -> float | np.ndarray:
        """Attainable GFLOP/s at ``intensity`` FLOP/byte."""
        return np.minimum(self.peak_gflops, np.asarray(intensity) * self.bandwidth_gbs)

    def fraction(self, intensity: float, achieved_gflops: float) -> float:
        """``achieved / bound(intensity)``: how close a kernel comes to its roof."""
        return float(achieved_gflops / self.bound(intensity))
