"""Tests for dlarch_lib.bench: the throughput sweep and the roofline helpers (the timer: test_measure.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from dlarch_lib import bench


def test_throughput_sweep():
    model = nn.Sequential(nn.Linear(8, 4), nn.Dropout(0.5)).train()
    seen = []
    points = bench.throughput_sweep(model, lambda b: seen.append(b) or torch.zeros(b, 8), [1, 4], repeats=3, warmup=1)
    assert seen == [1, 4] and [p.batch for p in points] == [1, 4]
    assert not model.training and all(p.stats.n == 3 for p in points)  # timed in eval mode, `repeats` calls each
    assert points[1].items_per_s == pytest.approx(4 / (points[1].stats.median / 1000))
    with pytest.raises(ValueError, match="batch_sizes"):
        bench.throughput_sweep(model, lambda b: torch.zeros(b, 8), [0])
    with pytest.raises(ValueError, match="returned a batch"):
        bench.throughput_sweep(model, lambda b: torch.zeros(2, 8), [3])


def test_matmul_and_copy_rates_are_positive_and_plausible():
    assert 0.0 < bench.matmul_gflops(n=128, repeats=2, warmup=1) < float("inf")
    assert 0.0 < bench.copy_gbs(numel=2**18, repeats=2, warmup=1) < float("inf")
    with pytest.raises(ValueError):
        bench.matmul_gflops(n=0)
    with pytest.raises(ValueError):
        bench.copy_gbs(numel=-1)


def test_theoretical_peak_and_cpuinfo():
    assert bench.theoretical_peak_gflops(2.5, 32, cores=2) == 160.0
    with pytest.raises(ValueError):
        bench.theoretical_peak_gflops(0.0, 32)
    info = "cpu MHz\t\t: 2445.4\nflags\t\t: fpu sse avx avx2 fma\n"
    ghz, width = bench.cpu_clock_and_width(info)
    assert ghz == pytest.approx(2.4454) and width == 32
    assert bench.cpu_clock_and_width(info.replace("avx2", "avx2 avx512f"))[1] == 64
    assert bench.cpu_clock_and_width("no such fields") is None


def test_physical_cores_counts_cores_not_hyperthreads():
    # 4 logical CPUs: two SMT siblings on core 0, two on core 1, one socket
    info = "\n\n".join(f"processor\t: {p}\nphysical id\t: 0\ncore id\t\t: {p // 2}\nflags\t: avx2" for p in range(4))
    assert bench.physical_cores(info, cpus=range(4)) == 2
    assert bench.physical_cores(info, cpus=[0, 1]) == 1  # both siblings of core 0
    assert bench.physical_cores(info, cpus=[1, 2]) == 2
    two_sockets = info + "\n\n" + "processor\t: 4\nphysical id\t: 1\ncore id\t\t: 0"
    assert bench.physical_cores(two_sockets, cpus=range(5)) == 3  # core 0 of socket 1 is another core
    assert bench.physical_cores("processor\t: 0\nflags\t: avx2", cpus=[0]) is None  # no topology given
    here = bench.physical_cores()
    assert here is None or 1 <= here <= len(os.sched_getaffinity(0))


def test_memory_traffic_bytes_by_hand():
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU())
    x = torch.zeros(2, 3)
    # Linear: input 2*3 + output 2*5 + weight 15 + bias 5 floats; ReLU: input 10 + output 10 floats
    assert bench.memory_traffic_bytes(model, x) == 4 * ((6 + 10 + 15 + 5) + (10 + 10))
    assert not model[0]._forward_hooks  # hooks removed


def test_roofline():
    roof = bench.Roofline(peak_gflops=100.0, bandwidth_gbs=10.0)
    assert roof.ridge == 10.0
    assert roof.bound(1.0) == 10.0 and roof.bound(1000.0) == 100.0
    np.testing.assert_allclose(roof.bound(np.array([0.5, 20.0])), [5.0, 100.0])
    assert roof.fraction(1.0, 5.0) == 0.5
    with pytest.raises(ValueError, match="positive"):
        bench.Roofline(0.0, 1.0)
