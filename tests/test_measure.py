"""Tests for dlarch_lib.core.measure: the one timer (checked against torch.utils.benchmark), its
variants that take turns, the statistics, and the counters' helpers."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.utils.benchmark as torch_benchmark
from torch import nn

from dlarch_lib.core import measure


def _timer_best_ms(fn, repeats: int, timer=time.perf_counter) -> float:
    """Fastest of ``repeats`` single-call measurements of ``fn()`` by ``torch.utils.benchmark.Timer``, in ms."""
    timer_ = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}, timer=timer, num_threads=torch.get_num_threads())
    return 1000.0 * min(timer_.timeit(number=1).mean for _ in range(repeats))


# --- timings_ms against torch.utils.benchmark.Timer ----------------------------------------


def test_timings_ms_agrees_with_torch_timer_on_a_sleep():
    nap = lambda: time.sleep(0.004)
    ours = min(measure.timings_ms(nap, repeats=5, warmup=1))
    theirs = _timer_best_ms(nap, repeats=5)
    assert ours >= 3.9 and theirs >= 3.9  # a 4 ms sleep takes at least 4 ms of wall time
    assert 0.5 < ours / theirs < 2.0, (ours, theirs)  # the same workload, the same answer (load only adds)


def test_timings_ms_agrees_with_torch_timer_on_fixed_work_cpu_clock():
    work = lambda: sum(range(100_000))  # pure Python: one thread, the same work every call
    ours = min(measure.timings_ms(work, repeats=7, warmup=2, clock="cpu"))
    theirs = _timer_best_ms(work, repeats=7, timer=time.process_time)
    assert ours > 0.1 and theirs > 0.1  # milliseconds, not seconds: 1e5 additions take ~1 ms
    assert 0.5 < ours / theirs < 2.0, (ours, theirs)  # CPU time: other programs can hardly move it


def test_timings_ms_cpu_clock_does_not_count_sleeping():
    wall = measure.timings_ms(lambda: time.sleep(0.01), repeats=3, warmup=0)
    cpu = measure.timings_ms(lambda: time.sleep(0.01), repeats=3, warmup=0, clock="cpu")
    assert min(wall) >= 9.5  # sleeping takes wall time...
    assert max(cpu) < 5.0  # ...but almost no CPU time


# --- warm-up, repeats and synchronisation, counted exactly ---------------------------------


def test_timings_ms_counts_warmup_and_repeats():
    calls = []
    times = measure.timings_ms(lambda: calls.append(1), repeats=4, warmup=3)
    assert len(calls) == 7 and len(times) == 4 and all(t >= 0 for t in times)
    calls.clear()
    assert len(measure.timings_ms(lambda: calls.append(1), repeats=1, warmup=0)) == 1 and len(calls) == 1


def test_timings_ms_synchronises_around_every_timed_call(monkeypatch):
    """Warm-up calls untimed; then sync, clock, call, sync, clock for each repeat; ms of the fake clock."""
    events, clock, devices = [], [0.0], []

    def fake_synchronizer(device):
        devices.append(device)
        return lambda: events.append("sync")

    def fake_clock():
        events.append("clock")
        return clock[0]

    def work():  # the k-th call takes k ms of (fake) time
        events.append("call")
        clock[0] += 0.001 * events.count("call")

    monkeypatch.setattr(measure, "synchronizer", fake_synchronizer)
    monkeypatch.setitem(measure.CLOCKS, "wall", fake_clock)
    times = measure.timings_ms(work, repeats=3, warmup=2, device="cuda:1")
    assert devices == ["cuda:1"]  # the device given is the device synchronised
    assert events == ["call"] * 2 + ["sync", "clock", "call", "sync", "clock"] * 3
    assert times == pytest.approx([3.0, 4.0, 5.0])  # calls 3, 4, 5: the warm-ups are not timed


def test_synchronizer():
    assert measure.synchronizer("cpu")() is None and measure.synchronizer(None)() is None
    assert measure.synchronizer(torch.device("cpu", 0))() is None
    with pytest.raises(ValueError, match="device type"):
        measure.synchronizer("meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_timings_ms_waits_for_the_gpu():  # pragma: no cover - GPU only
    a = torch.randn(4096, 4096, device="cuda")
    work = lambda: [a @ a for _ in range(5)]
    synced = min(measure.timings_ms(work, repeats=5, warmup=2, device="cuda"))
    events = min(measure.timings_ms(work, repeats=5, warmup=2, clock="cuda"))
    assert 0.5 < synced / events < 2.0, (synced, events)


def test_cuda_event_timings_need_cuda():
    if torch.cuda.is_available():
        assert len(measure.timings_ms(lambda: torch.ones(10, device="cuda") * 2, repeats=3, clock="cuda")) == 3
    else:
        with pytest.raises(RuntimeError, match="CUDA"):
            measure.timings_ms(lambda: None, clock="cuda")
    with pytest.raises(ValueError, match="clock must be one of"):
        measure.timings_ms(lambda: None, clock="sundial")


def test_timings_ms_bad_input():
    with pytest.raises(TypeError, match="callable"):
        measure.timings_ms(3)
    with pytest.raises(ValueError, match="repeats"):
        measure.timings_ms(lambda: None, repeats=0)
    with pytest.raises(ValueError, match="repeats"):
        measure.timings_ms(lambda: None, repeats=2.0)
    with pytest.raises(ValueError, match="warmup"):
        measure.timings_ms(lambda: None, warmup=-1)
    with pytest.raises(ValueError, match="clock"):
        measure.timings_ms(lambda: None, clock="sundial")
    with pytest.raises(ValueError, match="device type"):
        measure.timings_ms(lambda: None, device="meta")


# --- the callable of a model's forward pass ------------------------------------------------


def test_inference_call_runs_in_eval_mode_without_gradients():
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).train()
    x = torch.randn(5, 4)
    call = measure.inference_call(model, x)
    assert not model.training  # dropout off: the same output every call
    out = call()
    assert not out.requires_grad and torch.equal(out, call())
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))
    assert len(measure.timings_ms(call, repeats=2, warmup=1)) == 2


# --- variants taking turns -----------------------------------------------------------------


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


def test_interleaved_timings_go_through_timings_ms(monkeypatch):
    seen = []

    def fake_timings_ms(fn, repeats, warmup, *, device, clock):
        seen.append((repeats, warmup, device, clock))
        return [1.0] * repeats

    monkeypatch.setattr(measure, "timings_ms", fake_timings_ms)
    fns = {"a": lambda: None}
    times = measure.interleaved_timings_ms(fns, rounds=2, warmup=0, repeats=3, device="cpu", clock="cpu")
    assert times == {"a": [1.0] * 6} and seen == [(3, 0, "cpu", "cpu")] * 2


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


# --- statistics, clocks, threads -----------------------------------------------------------


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


def test_steady_clock_is_cpu_time_only_for_single_threaded_cpu_work():
    with measure.num_threads(1):
        assert measure.steady_clock() == "cpu" and measure.steady_clock("cpu") == "cpu"
        assert measure.steady_clock("cuda:0") == "wall"
    with measure.num_threads(2):
        assert measure.steady_clock() == "wall"


def test_num_threads_restores():
    before = torch.get_num_threads()
    with measure.num_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="positive"):
        with measure.num_threads(0):
            pass


def test_forward_flops_leaves_the_model_unchanged():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert measure.forward_flops(model, torch.zeros(8, 4)) == 2 * 8 * 4 * 4
    assert model.training  # the mode is given back
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # batch-norm statistics untouched
