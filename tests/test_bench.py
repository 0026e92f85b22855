"""Tests for dlarch_lib.bench: the harness, its statistics and the roofline helpers."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from dlarch_lib import bench
from dlarch_lib.core import measure


def test_timings_warmup_and_repeat_counts():
    calls = []
    times = measure.timings_ms(lambda: calls.append(1), repeats=4, warmup=3)
    assert len(calls) == 7 and len(times) == 4 and all(t >= 0 for t in times)


def test_timings_measure_a_known_sleep():
    wall = measure.timings_ms(lambda: time.sleep(0.01), repeats=3, warmup=0)
    cpu = measure.timings_ms(lambda: time.sleep(0.01), repeats=3, warmup=0, clock="cpu")
    assert min(wall) >= 9.5  # sleeping takes wall time...
    assert max(cpu) < 5.0  # ...but almost no CPU time


def test_timings_bad_input():
    with pytest.raises(TypeError, match="callable"):
        measure.timings_ms(3)
    with pytest.raises(ValueError, match="repeats"):
        measure.timings_ms(lambda: None, repeats=0)
    with pytest.raises(ValueError, match="warmup"):
        measure.timings_ms(lambda: None, warmup=-1)
    with pytest.raises(ValueError, match="clock"):
        measure.timings_ms(lambda: None, clock="sundial")


def test_median_ms_unchanged():
    assert measure.median_ms(lambda: time.sleep(0.002), repeats=3, warmup=0) >= 1.9


def test_synchronizer():
    calls = measure.synchronizer("cpu")
    assert calls() is None and measure.synchronizer(None)() is None
    with pytest.raises(ValueError, match="device type"):
        measure.synchronizer("meta")


def test_summarize_hand_computed():
    s = measure.summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert (s.n, s.median, s.min, s.max) == (5, 3.0, 1.0, 100.0)
    assert s.q1 == 2.0 and s.q3 == 4.0 and s.iqr == 2.0
    assert s.mean == pytest.approx(22.0)
    assert s.p95 == pytest.approx(np.percentile([1, 2, 3, 4, 100], 95))
    assert "median 3.000 ms" in str(s)


def test_summarize_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        measure.summarize([])
    with pytest.raises(ValueError, match="finite"):
        measure.summarize([1.0, float("nan")])
    with pytest.raises(ValueError, match="finite"):
        measure.summarize([-1.0])


def test_benchmark_returns_stats():
    s = measure.benchmark(lambda: time.sleep(0.001), repeats=5, warmup=1)
    assert isinstance(s, measure.Stats) and s.n == 5 and s.min >= 0.9 and s.min <= s.median <= s.p95 <= s.max


def test_cuda_timings_need_cuda():
    if torch.cuda.is_available():
        assert len(measure.cuda_timings_ms(lambda: torch.ones(10, device="cuda") * 2, repeats=3)) == 3
    else:
        with pytest.raises(RuntimeError, match="CUDA"):
            measure.cuda_timings_ms(lambda: None)


def test_throughput_sweep():
    model = nn.Linear(8, 4)
    seen = []
    points = bench.throughput_sweep(model, lambda b: seen.append(b) or torch.zeros(b, 8), [1, 4], repeats=3, warmup=1)
    assert seen == [1, 4] and [p.batch for p in points] == [1, 4]
    assert points[1].items_per_s == pytest.approx(4 / (points[1].stats.median / 1000))
    with pytest.raises(ValueError, match="batch_sizes"):
        bench.throughput_sweep(model, lambda b: torch.zeros(b, 8), [0])
    with pytest.raises(ValueError, match="returned a batch"):
        bench.throughput_sweep(model, lambda b: torch.zeros(2, 8), [3])


def test_num_threads_restores():
    before = torch.get_num_threads()
    with measure.num_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="positive"):
        with measure.num_threads(0):
            pass


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


def test_steady_clock_is_cpu_time_only_for_single_threaded_cpu_work():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert measure.steady_clock() == "cpu" and measure.steady_clock("cpu") == "cpu"
        assert measure.steady_clock("cuda:0") == "wall"
        torch.set_num_threads(2)
        assert measure.steady_clock() == "wall"
    finally:
        torch.set_num_threads(threads)


def test_interleaved_timings_take_turns_and_best_is_the_minimum():
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    times = measure.interleaved_timings_ms(fns, rounds=3, warmup=2)
    assert order == ["a", "a", "b", "b"] + ["a", "b"] * 3  # warm-ups first, then the variants alternate
    assert set(times) == {"a", "b"} and all(len(t) == 3 and min(t) >= 0 for t in times.values())
    order.clear()
    times = measure.interleaved_timings_ms(fns, rounds=2, warmup=0, repeats=2)
    assert order == ["a", "a", "b", "b"] * 2 and all(len(t) == 4 for t in times.values())  # a turn is `repeats` calls
    best = measure.best_ms({"sleep": lambda: time.sleep(0.005), "spin": lambda: sum(range(50_000))}, rounds=3, warmup=0)
    assert best["sleep"] >= 4.5 and best["spin"] > 0
    cpu = measure.best_ms({"sleep": lambda: time.sleep(0.005)}, rounds=3, warmup=0, clock="cpu")
    assert cpu["sleep"] < 3.0  # CPU time does not count sleeping


def test_interleaved_timings_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        measure.interleaved_timings_ms({})
    with pytest.raises(TypeError, match="callable"):
        measure.interleaved_timings_ms({"x": 3})
    with pytest.raises(ValueError, match="rounds"):
        measure.interleaved_timings_ms({"x": lambda: None}, rounds=0)
    with pytest.raises(ValueError, match="warmup"):
        measure.interleaved_timings_ms({"x": lambda: None}, warmup=-1)
    with pytest.raises(ValueError, match="repeats"):
        measure.interleaved_timings_ms({"x": lambda: None}, repeats=0)
    with pytest.raises(ValueError, match="clock"):
        measure.best_ms({"x": lambda: None}, clock="sundial")
