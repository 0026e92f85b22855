"""Chapter 22: benchmarking -- throughput against batch size, the machine's peaks, the roofline.

Timing itself is :func:`dlarch_lib.core.measure.timings_ms` (the book's one timing entry point);
this module builds the chapter's measurements on it:

- :func:`throughput_sweep` measures items per second against batch size, inputs pre-staged;
- :func:`matmul_gflops` and :func:`copy_gbs` measure the machine's compute peak and memory
  bandwidth, :func:`memory_traffic_bytes` estimates a model's bytes moved, and :class:`Roofline`
  bounds attainable GFLOP/s by arithmetic intensity;
- :func:`profile_calls` runs ``torch.profiler`` around repeated calls and :func:`op_stats` reads its
  per-operator counts, self CPU times and FLOPs;
- :func:`bootstrap_ci` gives a confidence interval for a median or a ratio of medians (comparing two
  systems), and :func:`closed_loop` measures latency and throughput under ``k`` concurrent clients.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dlarch_lib.core import measure
from dlarch_lib.core.measure import Stats
from dlarch_lib.core.train import model_device


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
    clock: str = "wall",
) -> list[ThroughputPoint]:
    """Forward-pass latency and throughput of ``model`` at each batch size (eval mode, no grad).

    The model runs on its own device. ``make_input(b)`` returns a batch of ``b`` items; it is
    called and moved to the model's device *before* timing starts, so data preparation stays
    out of the timed region. Each batch size is timed by :func:`dlarch_lib.core.measure.timings_ms`
    (``repeats`` calls after ``warmup``, the device synchronised around each) on ``clock``.
    """
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive ints, got {batch_sizes!r}")
    device = model_device(model)
    points = []
    for b in batch_sizes:
        x = make_input(b).to(device)  # pre-staged: not timed
        if x.shape[0] != b:
            raise ValueError(f"make_input({b}) returned a batch of {x.shape[0]}")
        times = measure.timings_ms(measure.inference_call(model, x), repeats, warmup, device=device, clock=clock)
        points.append(ThroughputPoint(b, measure.summarize(times)))
    return points


# --- the roofline ------------------------------------------------------------------------


def matmul_gflops(
    n: int = 1024, repeats: int = 8, warmup: int = 2, *, clock: str = "wall", device: torch.device | str = "cpu"
) -> float:
    """Best fp32 GFLOP/s of an ``(n, n) @ (n, n)`` product: ``2 n^3`` FLOPs over the *minimum* time.

    The minimum, because the question is what the hardware can do: interference only adds time.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device) for _ in range(2))
    best = min(measure.timings_ms(lambda: a @ b, repeats, warmup, device=device, clock=clock))
    return 2 * n**3 / (best / 1000.0) / 1e9


def copy_gbs(
    numel: int = 32 * 2**20,
    repeats: int = 8,
    warmup: int = 2,
    *,
    clock: str = "wall",
    device: torch.device | str = "cpu",
) -> float:
    """Best memory bandwidth in GB/s of ``dst.copy_(src)`` for fp32 tensors of ``numel`` elements.

    A copy reads ``numel * 4`` bytes and writes as many, so it moves ``8 * numel`` bytes.
    Choose ``numel`` so that the tensors are much larger than the last-level cache (the default
    is 128 MiB each), otherwise this measures the cache, not memory.
    """
    if not isinstance(numel, int) or numel < 1:
        raise ValueError(f"numel must be a positive int, got {numel!r}")
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    best = min(measure.timings_ms(lambda: dst.copy_(src), repeats, warmup, device=device, clock=clock))
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


def physical_cores(cpuinfo: str | None = None, cpus: Iterable[int] | None = None) -> int | None:
    """How many distinct physical cores the logical CPUs ``cpus`` sit on, read from ``/proc/cpuinfo``.

    Hyperthreads (SMT siblings) share one core's FMA units, so a theoretical peak counts cores,
    not threads. ``cpus`` defaults to the CPUs this process may run on (``os.sched_getaffinity``).
    Returns ``None`` where ``/proc/cpuinfo`` gives no ``physical id`` / ``core id`` (some VMs, non-Linux).
    """
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        if not path.is_file():
            return None
        cpuinfo = path.read_text()
    if cpus is None:
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    allowed, cores = set(cpus), set()
    for block in cpuinfo.strip().split("\n\n"):  # one block per logical CPU
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "processor" not in fields or "core id" not in fields:
            return None
        if int(fields["processor"]) in allowed:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores) or None


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


# --- the profiler -------------------------------------------------------------------------


@dataclass(frozen=True)
class OpStat:
    """One operator's totals over a profiled run (see :func:`op_stats`)."""

    count: int  # calls recorded
    self_cpu_us: float  # CPU time inside the operator itself, children excluded (microseconds)
    flops: int  # FLOPs the profiler attributes to it (0 where it has no formula for the operator)


def profile_calls(
    fn: Callable[[], Any],
    calls: int = 3,
    warmup: int = 1,
    *,
    device: torch.device | str | None = None,
    with_flops: bool = True,
    record_shapes: bool = False,
) -> torch.profiler.profile:
    """``torch.profiler`` around ``calls`` calls of ``fn()``, after ``warmup`` unprofiled calls.

    Records CPU activity, and CUDA kernels too when ``device`` is a CUDA device (synchronised before
    the profiler stops, so every kernel is in the trace). Returns the finished profiler: read it with
    :func:`op_stats`, ``.key_averages().table(...)`` or ``.export_chrome_trace(path)``.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if not isinstance(calls, int) or calls < 1:
        raise ValueError(f"calls must be a positive int, got {calls!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup!r}")
    sync = measure.synchronizer(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device is not None and torch.device(device).type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    for _ in range(warmup):
        fn()
    sync()
    with torch.profiler.profile(activities=activities, with_flops=with_flops, record_shapes=record_shapes) as prof:
        for _ in range(calls):
            fn()
        sync()
    return prof


def op_stats(prof: torch.profiler.profile) -> dict[str, OpStat]:
    """``{operator name: OpStat}`` from a finished profiler (``key_averages``, grouped by name)."""
    return {e.key: OpStat(int(e.count), float(e.self_cpu_time_total), int(e.flops)) for e in prof.key_averages()}


# --- comparing two systems: bootstrap confidence intervals ---------------------------------


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided confidence interval ``[low, high]`` at confidence ``level``."""

    estimate: float
    low: float
    high: float
    level: float

    def contains(self, value: float) -> bool:
        """True when ``low <= value <= high``: the data do not rule ``value`` out at this level."""
        return self.low <= value <= self.high

    def __str__(self) -> str:
        return f"{self.estimate:.4g} [{self.low:.4g}, {self.high:.4g}] ({self.level:.0%} CI)"


def _times_1d(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    t = np.asarray(values, dtype=float)
    if t.ndim != 1 or t.size < 2:
        raise ValueError(f"{name} must be a 1-D sequence of at least 2 values, got shape {t.shape}")
    if not np.all(np.isfinite(t)) or (t <= 0).any():
        raise ValueError(f"{name} must hold finite positive times")
    return t


def bootstrap_ci(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray | None = None,
    *,
    level: float = 0.95,
    n_boot: int = 2000,
    paired: bool = False,
    rng: np.random.Generator | int = 0,
) -> Interval:
    """Percentile-bootstrap confidence interval of ``median(x)``, or of ``median(x) / median(y)``.

    Each of ``n_boot`` bootstrap replicates draws ``len(x)`` values from ``x`` with replacement (and
    ``len(y)`` from ``y``) and recomputes the statistic; the interval is the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles of the replicates. ``paired=True`` draws the *same* indices for ``x``
    and ``y`` (they must have equal length): use it for interleaved timings, where ``x[i]`` and
    ``y[i]`` were timed in the same round and share that round's load. ``rng`` is a seed or a
    :class:`numpy.random.Generator`, so the interval is reproducible.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if not isinstance(n_boot, int) or n_boot < 100:
        raise ValueError(f"n_boot must be an int >= 100, got {n_boot!r}")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    xs = _times_1d("x", x)
    idx_x = gen.integers(0, xs.size, size=(n_boot, xs.size))  # (n_boot, n_x) resampled positions
    reps = np.median(xs[idx_x], axis=1)  # (n_boot,)
    estimate = float(np.median(xs))
    if y is not None:
        ys = _times_1d("y", y)
        if paired and ys.size != xs.size:
            raise ValueError(f"paired resampling needs equally long samples, got {xs.size} and {ys.size}")
        idx_y = idx_x if paired else gen.integers(0, ys.size, size=(n_boot, ys.size))
        reps = reps / np.median(ys[idx_y], axis=1)
        estimate /= float(np.median(ys))
    elif paired:
        raise ValueError("paired=True needs a second sample y")
    low, high = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return Interval(estimate, float(low), float(high), level)


# --- latency under concurrent load ----------------------------------------------------------


@dataclass(frozen=True)
class LoadPoint:
    """A closed-loop load test: ``clients`` clients, each sending its next request when the last returns."""

    clients: int
    latencies_ms: tuple[float, ...]  # every request's latency, all clients together
    elapsed_s: float  # from the first client's start to the last client's end

    @property
    def throughput(self) -> float:
        """Completed requests per second over the whole run."""
        return len(self.latencies_ms) / self.elapsed_s

    @property
    def mean_ms(self) -> float:
        """Mean latency (ms): the ``R`` of Little's law."""
        return float(np.mean(self.latencies_ms))

    def percentile(self, q: float) -> float:
        """The ``q``-th latency percentile in ms (``q`` in [0, 100])."""
        return float(np.percentile(self.latencies_ms, q))

    @property
    def littles_ratio(self) -> float:
        """``throughput x mean latency / clients``: Little's law ``N = X R`` says 1 for a closed loop."""
        return self.throughput * self.mean_ms / 1000.0 / self.clients


def closed_loop(
    request: Callable[[], Any],
    clients: int,
    duration_s: float,
    *,
    threads_per_client: int = 1,
    device: torch.device | str | None = None,
) -> LoadPoint:
    """Run ``clients`` threads that call ``request()`` back to back for ``duration_s`` seconds.

    Each client thread first sets ``torch.set_num_threads(threads_per_client)`` (so that ``clients``
    clients ask for ``clients x threads_per_client`` compute threads, a number you choose), waits at a
    barrier with the others, then loops: read the wall clock, ``request()``, synchronise ``device``,
    read the clock, until its ``duration_s`` is up. PyTorch releases Python's global interpreter
    lock inside its operators, so the clients really do compute at the same time. The caller's
    thread count is restored afterwards. An exception in a client is re-raised here.
    """
    if not callable(request):
        raise TypeError(f"request must be callable, got {type(request).__name__}")
    if not isinstance(clients, int) or clients < 1:
        raise ValueError(f"clients must be a positive int, got {clients!r}")
    if not duration_s > 0:
        raise ValueError(f"duration_s must be positive, got {duration_s!r}")
    if not isinstance(threads_per_client, int) or threads_per_client < 1:
        raise ValueError(f"threads_per_client must be a positive int, got {threads_per_client!r}")
    sync = measure.synchronizer(device)
    barrier = threading.Barrier(clients)
    spans: list[tuple[float, float]] = []
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    previous = torch.get_num_threads()

    def client() -> None:
        try:
            torch.set_num_threads(threads_per_client)  # this client's intra-op threads
            mine: list[float] = []
            barrier.wait()
            start = time.perf_counter()
            deadline = start + duration_s
            now = start
            while now < deadline:
                t0 = time.perf_counter()
                request()
                sync()
                now = time.perf_counter()
                mine.append(1000.0 * (now - t0))
            with lock:
                spans.append((start, now))
                latencies.extend(mine)
        except BaseException as err:  # re-raised in the caller's thread
            barrier.abort()
            errors.append(err)

    workers = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        torch.set_num_threads(previous)
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if errors:
        raise (real or errors)[0]
    elapsed = max(end for _, end in spans) - min(start for start, _ in spans)
    return LoadPoint(clients, tuple(latencies), elapsed)
