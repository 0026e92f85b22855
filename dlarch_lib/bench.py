"""Timing code honestly: warm up first, then take the median of many repeats.

- :func:`timings_ms` runs a callable ``warmup`` times untimed, then ``repeats`` times under
  ``time.perf_counter`` and returns every time in milliseconds.
- :func:`median_ms` is their median, the one number most chapters quote. The median, not the
  mean: one preemption by the operating system adds a long outlier that would drag a mean.

The callable must do all the work being timed and nothing else: prepare inputs (tensor
conversion, data loading) outside it. On a GPU, make the callable end with
``torch.cuda.synchronize()`` (kernels run asynchronously; see
:func:`dlarch_lib.modular.latency_ms`). The benchmarking chapter extends this module.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def timings_ms(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn()`` in milliseconds, after ``warmup`` untimed calls.

    The warm-up calls pay one-off costs (memory allocation, kernel selection, caches) that
    a steady-state measurement must not include.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup!r}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000.0 * (time.perf_counter() - start))
    return times


def median_ms(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` calls after ``warmup`` untimed calls."""
    return statistics.median(timings_ms(fn, repeats, warmup))
