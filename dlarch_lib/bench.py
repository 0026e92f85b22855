"""Chapter 22: benchmarking -- throughput against batch size, the machine's peaks, the roofline.

Timing itself is :func:`dlarch_lib.core.measure.timings_ms` (the book's one timing entry point);
this module builds the chapter's measurements on it:

- :func:`throughput_sweep` measures items per second against batch size, inputs pre-staged;
- :func:`matmul_gflops` and :func:`copy_gbs` measure the machine's compute peak and memory
  bandwidth, :func:`memory_traffic_bytes` estimates a model's bytes moved, and :class:`Roofline`
  bounds attainable GFLOP/s by arithmetic intensity.
"""

from __future__ import annotations

import os
import re
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
