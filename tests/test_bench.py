"""Tests for dlarch_lib.bench: the throughput sweep and the roofline helpers (the timer: test_measure.py)."""

from __future__ import annotations

import os
import time

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


def test_profile_calls_counts_operators_and_flops():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        prof = bench.profile_calls(lambda: model(x), calls=3, warmup=1)
    stats = bench.op_stats(prof)
    assert stats["aten::linear"].count == 2 * 3 and stats["aten::addmm"].count == 2 * 3  # 2 layers x 3 calls
    assert stats["aten::relu"].count == 3 and stats["aten::addmm"].self_cpu_us > 0
    assert sum(s.flops for s in stats.values()) == 3 * 2 * 5 * (8 * 16 + 16 * 4)  # the warm-up call is not recorded
    with pytest.raises(ValueError, match="calls"):
        bench.profile_calls(lambda: None, calls=0)
    with pytest.raises(TypeError):
        bench.profile_calls(42)  # type: ignore[arg-type]


def test_bootstrap_ci_median_and_ratio():
    x = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    ci = bench.bootstrap_ci(x, n_boot=500, rng=1)
    assert ci.estimate == 3.0 and 1.0 <= ci.low <= 3.0 <= ci.high <= 100.0 and ci.contains(3.0)
    assert bench.bootstrap_ci(x, n_boot=500, rng=1) == ci  # seeded: reproducible
    assert str(ci).endswith("(95% CI)")
    # a ratio of medians: y is x scaled by 2, paired resampling keeps the pairs, so the ratio is exactly 2
    paired = bench.bootstrap_ci(2 * x, x, paired=True, n_boot=500)
    assert paired.estimate == paired.low == paired.high == 2.0
    unpaired = bench.bootstrap_ci(2 * x, x, n_boot=500)
    assert unpaired.low < 2.0 < unpaired.high and unpaired.estimate == 2.0


def test_bootstrap_ci_coverage_near_nominal():
    rng = np.random.default_rng(0)
    hits = sum(bench.bootstrap_ci(rng.lognormal(0.0, 0.5, 31), n_boot=500, rng=rng).contains(1.0) for _ in range(200))
    # the true median is 1; allowance: three binomial standard errors plus 0.03 for the percentile method's own error
    assert abs(hits / 200 - 0.95) < 3 * np.sqrt(0.95 * 0.05 / 200) + 0.03


def test_bootstrap_ci_errors():
    with pytest.raises(ValueError, match="level"):
        bench.bootstrap_ci([1.0, 2.0], level=1.0)
    with pytest.raises(ValueError, match="n_boot"):
        bench.bootstrap_ci([1.0, 2.0], n_boot=10)
    with pytest.raises(ValueError, match="at least 2"):
        bench.bootstrap_ci([1.0])
    with pytest.raises(ValueError, match="positive"):
        bench.bootstrap_ci([1.0, -2.0])
    with pytest.raises(ValueError, match="equally long"):
        bench.bootstrap_ci([1.0, 2.0], [1.0, 2.0, 3.0], paired=True)
    with pytest.raises(ValueError, match="second sample"):
        bench.bootstrap_ci([1.0, 2.0], paired=True)


def test_closed_loop_littles_law_and_threads():
    seen_threads = []

    def request():
        seen_threads.append(torch.get_num_threads())
        time.sleep(0.002)  # a request that takes 2 ms and releases the GIL, like a torch operator

    before = torch.get_num_threads()
    point = bench.closed_loop(request, clients=3, duration_s=0.1, threads_per_client=1)
    assert torch.get_num_threads() == before  # restored
    assert point.clients == 3 and len(point.latencies_ms) > 3 * 10 and set(seen_threads) == {1}
    assert point.mean_ms >= 2.0 and point.percentile(99) >= point.percentile(50)
    assert point.throughput == pytest.approx(len(point.latencies_ms) / point.elapsed_s)
    assert 0.8 < point.littles_ratio <= 1.0 + 1e-9  # N = X R for a closed loop (idle gaps only lower it)
    assert point.throughput > 1.5 * 1000 / point.mean_ms  # three sleeping clients overlap


def test_closed_loop_errors():
    with pytest.raises(ValueError, match="clients"):
        bench.closed_loop(lambda: None, clients=0, duration_s=0.1)
    with pytest.raises(ValueError, match="duration"):
        bench.closed_loop(lambda: None, clients=1, duration_s=0.0)
    with pytest.raises(ValueError, match="threads_per_client"):
        bench.closed_loop(lambda: None, clients=1, duration_s=0.1, threads_per_client=0)

    def broken():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        bench.closed_loop(broken, clients=2, duration_s=0.1)
