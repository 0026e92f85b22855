"""Tests for dlarch_lib.pipeline: model, pipeline and tensor parallelism."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dlarch_lib import pipeline as pl


def _stages():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU()), nn.Linear(5, 3)


def test_two_stage_model_matches_unsplit_and_moves_activations():
    s0, s1 = _stages()
    reference = nn.Sequential(s0, s1)
    x = torch.randn(4, 6)
    expected = reference(x)
    model = pl.TwoStageModel(s0, s1, "cpu", "cpu")
    out, moves = pl.record_device_moves(model, x)
    torch.testing.assert_close(out, expected)
    assert moves == [torch.device("cpu"), torch.device("cpu")]  # input to dev0, activation to dev1


def test_two_stage_model_on_cpu_and_meta():
    s0, s1 = _stages()
    model = pl.TwoStageModel(s0, s1, "cpu", "meta")
    out, moves = pl.record_device_moves(model, torch.randn(4, 6))
    assert out.device.type == "meta" and out.shape == (4, 3)
    assert moves == [torch.device("cpu"), torch.device("meta")]


def test_seed_model_fails_with_device_mismatch():
    s0, s1 = _stages()
    seed_model = pl.SeedTwoStageModel(s0, s1, "cpu", "meta")
    with pytest.raises(RuntimeError, match="device"):
        seed_model(torch.randn(4, 6))
    _, moves = pl.record_device_moves(pl.SeedTwoStageModel(*_stages(), "cpu", "cpu"), torch.randn(4, 6))
    assert moves == [torch.device("cpu")]  # only the input is moved


@pytest.mark.parametrize("p,m", [(1, 1), (2, 1), (2, 5), (4, 8), (3, 2)])
def test_gpipe_schedule_bubble_matches_formula(p, m):
    tasks = pl.gpipe_schedule(p, m, t_fwd=1.0, t_bwd=2.0)
    assert len(tasks) == 2 * p * m
    makespan = max(t.end for t in tasks)
    assert makespan == pytest.approx((m + p - 1) * 3.0)
    assert pl.idle_fraction(tasks) == pytest.approx(pl.bubble_fraction(p, m))


def test_gpipe_schedule_respects_dependencies_and_no_overlap():
    tasks = pl.gpipe_schedule(3, 4, t_fwd=[1.0, 2.0, 0.5], t_bwd=[2.0, 1.0, 3.0])
    by = {(t.stage, t.micro, t.phase): t for t in tasks}
    for (s, i, phase), t in by.items():
        if phase == "F" and s > 0:
            assert t.start >= by[(s - 1, i, "F")].end
        if phase == "B" and s < 2:
            assert t.start >= by[(s + 1, i, "B")].end
    for s in range(3):
        own = sorted((t for t in tasks if t.stage == s), key=lambda t: t.start)
        assert all(a.end <= b.start + 1e-12 for a, b in zip(own, own[1:]))
    assert pl.idle_fraction(tasks) > pl.bubble_fraction(3, 4)  # unequal stages idle more


def test_bubble_fraction_values_and_errors():
    assert pl.bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert pl.bubble_fraction(1, 3) == 0.0
    with pytest.raises(ValueError, match="p >= 1"):
        pl.bubble_fraction(0, 2)
    with pytest.raises(ValueError, match="t_fwd"):
        pl.gpipe_schedule(2, 2, t_fwd=[1.0])
    with pytest.raises(ValueError):
        pl.idle_fraction([])


@pytest.mark.parametrize("p,m", [(1, 1), (2, 1), (2, 5), (4, 3), (4, 8), (5, 12)])
def test_one_f_one_b_same_makespan_as_gpipe_and_p_minus_s_in_flight(p, m):
    tasks = pl.one_f_one_b_schedule(p, m, t_fwd=1.0, t_bwd=2.0)
    assert len(tasks) == 2 * p * m
    assert max(t.end for t in tasks) == pytest.approx((m + p - 1) * 3.0)
    assert pl.idle_fraction(tasks) == pytest.approx(pl.bubble_fraction(p, m))
    assert pl.peak_in_flight(tasks) == {s: min(p - s, m) for s in range(p)}
    assert pl.peak_in_flight(pl.gpipe_schedule(p, m)) == {s: m for s in range(p)}


def test_one_f_one_b_order_and_dependencies():
    assert pl.one_f_one_b_order(3, 0, 4) == ["F", "F", "F", "B", "F", "B", "B", "B"]
    assert pl.one_f_one_b_order(3, 2, 2) == ["F", "B", "F", "B"]
    tasks = pl.one_f_one_b_schedule(3, 4, t_fwd=[1.0, 2.0, 0.5], t_bwd=[2.0, 1.0, 3.0])
    by = {(t.stage, t.micro, t.phase): t for t in tasks}
    for (s, i, phase), t in by.items():
        if phase == "F" and s > 0:
            assert t.start >= by[(s - 1, i, "F")].end
        if phase == "B":
            assert t.start >= (by[(s + 1, i, "B")] if s < 2 else by[(s, i, "F")]).end
    with pytest.raises(ValueError, match="0 <= s < p"):
        pl.one_f_one_b_order(2, 2, 3)
    with pytest.raises(ValueError, match="m >= 1"):
        pl.one_f_one_b_schedule(2, 0)
    with pytest.raises(ValueError):
        pl.peak_in_flight([])


@pytest.mark.parametrize("p,v,m", [(2, 1, 4), (2, 2, 2), (4, 2, 8), (4, 4, 4), (3, 3, 6)])
def test_interleaved_schedule_bubble(p, v, m):
    tasks = pl.interleaved_schedule(p, m, v)
    assert len(tasks) == 2 * p * v * m and {t.stage for t in tasks} == set(range(p))
    assert pl.idle_fraction(tasks) == pytest.approx(pl.interleaved_bubble(p, m, v))
    assert pl.interleaved_bubble(p, m, 1) == pytest.approx(pl.bubble_fraction(p, m))
    with pytest.raises(ValueError, match="divisible"):
        pl.interleaved_schedule(p, m + 1, v)


def test_saved_tensor_bytes_and_recomputation():
    stack = pl.block_stack(16, 4, seed=0)
    x = torch.randn(8, 16)
    unit = 8 * 16 * 4
    plain, out = pl.saved_tensor_bytes(stack, x.clone().requires_grad_(), list(stack.parameters()))
    assert plain == 4 * 2 * unit  # each block saves its Linear's input and its Tanh's output
    grads = {}
    for k in (0, 1, 2, 4):
        stack.zero_grad()
        model = pl.Recomputed(stack, k)
        saved, y = pl.saved_tensor_bytes(model, x.clone().requires_grad_(), list(stack.parameters()))
        assert saved == (k * unit if k else plain)  # only the segments' inputs
        torch.testing.assert_close(y, out)
        y.square().sum().backward()
        grads[k] = [q.grad.clone() for q in stack.parameters()]
    for k in (1, 2, 4):
        for a, b in zip(grads[k], grads[0]):
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="segments"):
        pl.Recomputed(stack, 3)
    with pytest.raises(ValueError, match="tensor"):
        pl.saved_tensor_bytes(stack, [1.0])  # type: ignore[arg-type]


def test_parallel_costs():
    one = pl.parallel_costs(1, 1, 1, layers=4, d=8, tokens=16, m=2)
    assert one["weights"] == 8 * 8 * 8 * 4 and one["dp_comm"] == one["pp_comm"] == one["tp_comm"] == 0
    three = pl.parallel_costs(2, 2, 2, layers=4, d=8, tokens=16, m=2)
    assert three["weights"] * 4 == one["weights"] and three["dp_comm"] == three["weights"]
    assert three["pp_comm"] == 2 * 2 * 16 * 8
    # tensor parallelism: the same all-reduce volume as tp_comm_elements, forward and backward, per layer
    tp = pl.parallel_costs(1, 1, 4, layers=4, d=8, tokens=16, m=2)
    assert tp["tp_comm"] == 4 * 2 * 2 * pl.tp_comm_elements("column+row", 16, 8, 32, 4)
    with pytest.raises(ValueError, match="split"):
        pl.parallel_costs(1, 3, 1, layers=4, d=8, tokens=16, m=2)
    with pytest.raises(ValueError, match="positive"):
        pl.parallel_costs(0, 1, 1, layers=4, d=8, tokens=16, m=2)


def test_plot_gantt_draws_one_bar_per_task():
    import matplotlib

    matplotlib.use("Agg")
    tasks = pl.gpipe_schedule(2, 3)
    ax = pl.plot_gantt(tasks)
    assert len(ax.patches) == len(tasks)


@pytest.mark.parametrize("p", [1, 2, 4])
def test_tensor_parallel_splits_equal_unsplit_layer(p):
    torch.manual_seed(0)
    layer, x = nn.Linear(8, 12), torch.randn(5, 8)
    torch.testing.assert_close(pl.column_parallel_linear(x, layer, p), layer(x))
    torch.testing.assert_close(pl.row_parallel_linear(x, layer, p), layer(x))


def test_tensor_parallel_errors():
    layer = nn.Linear(8, 12)
    with pytest.raises(ValueError, match="divisible"):
        pl.column_parallel_linear(torch.randn(2, 8), layer, 5)
    with pytest.raises(ValueError, match="divisible"):
        pl.row_parallel_linear(torch.randn(2, 8), layer, 3)
    with pytest.raises(ValueError, match="features"):
        pl.row_parallel_linear(torch.randn(2, 6), layer, 2)


def test_tp_comm_elements():
    assert pl.tp_comm_elements("column", 4, 8, 12, 2) == 0.5 * 4 * 12
    assert pl.tp_comm_elements("row", 4, 8, 12, 2) == 4 * 12
    assert pl.tp_comm_elements("column+row", 4, 8, 12, 4) == 2 * 0.75 * 4 * 8
    assert pl.tp_comm_elements("row", 4, 8, 12, 1) == 0
    with pytest.raises(ValueError, match="kind"):
        pl.tp_comm_elements("diagonal", 4, 8, 12, 2)


def test_block_stack_and_split_stages():
    state = torch.get_rng_state()
    model = pl.block_stack(16, 4, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # seeded: the caller's random stream is left alone
    assert len(model) == 4 and all(
        isinstance(block[0], nn.Linear) and isinstance(block[-1], nn.Tanh) for block in model
    )
    stages = pl.split_stages(model, 2)
    x = torch.randn(3, 16)
    torch.testing.assert_close(stages[1](stages[0](x)), model(x))
    torch.testing.assert_close(pl.block_stack(16, 4, seed=1)(x), model(x))  # seeded
    assert not torch.equal(pl.block_stack(16, 4, seed=2)(x), model(x))
    with pytest.raises(ValueError, match="equal stages"):
        pl.split_stages(model, 3)
    with pytest.raises(ValueError):
        pl.block_stack(0, 2)


def test_timed_stage_logs_forward_and_backward():
    stage = pl.TimedStage(nn.Linear(4, 4))
    for _ in range(2):
        stage(torch.randn(2, 4)).sum().backward()
    tasks = pl._intervals(stage.log, stage=0)
    assert [(t.phase, t.micro) for t in tasks] == [("F", 0), ("B", 0), ("F", 1), ("B", 1)]
    assert all(t.end >= t.start for t in tasks)


def test_run_pipeline_rejects_bad_config():
    with pytest.raises(ValueError, match="world"):
        pl.run_pipeline(world=1, device="cpu")
    with pytest.raises(ValueError, match="equal stages"):
        pl.run_pipeline(world=2, depth=3, device="cpu")
    with pytest.raises(ValueError, match="micro-batch"):
        pl.run_pipeline(world=2, microbatches=(0,), device="cpu")
    with pytest.raises(ValueError, match="timeout_s"):
        pl.run_pipeline(world=2, timeout_s=0, device="cpu")
    with pytest.raises(ValueError, match="deadline_s"):
        pl.run_pipeline(world=2, microbatches=(1,), deadline_s=-1, device="cpu")
    with pytest.raises(ValueError, match="device"):
        pl.run_pipeline(world=2, device="meta")
    with pytest.raises(ValueError, match="tp_shape"):
        pl.run_pipeline(world=3, tp_shape=(8, 4), depth=3, device="cpu")  # 4d = 16 rows over 3 ranks
    with pytest.raises(ValueError, match="schedules"):
        pl.run_pipeline(world=2, device="cpu", schedules=("zero-bubble",))


@pytest.mark.timeout(120)
def test_run_pipeline_two_gloo_processes():
    # one spawn (a few seconds of start-up): the notebook runs the bigger measurement
    run = pl.run_pipeline(
        world=2,
        microbatches=(2,),
        micro_batch=4,
        width=16,
        depth=2,
        repeats=1,
        device="cpu",
        tp_shape=(8, 4),
        deadline_s=100,
        schedules=("gpipe", "1f1b"),
    )
    assert run.grad_err[2] < 1e-5  # GPipe gradients equal the unsplit model's
    assert max(run.tp_err.values()) < 1e-5  # column/row-parallel with all_gather/all_reduce
    assert len(run.runs[2][0]) == 2 * 2 * 2  # 2 stages x 2 micro-batches x (F, B)
    assert run.idle(2) >= pl.bubble_fraction(2, 2) - 0.02  # the bubble is a floor
    assert set(run.tp_ms) == {"compute_ms", "all_reduce_ms"} and min(run.tp_ms.values()) > 0
    assert run.schedule_grad_err["1f1b"][2] < 1e-5  # 1F1B reorders tasks, same gradient
    assert pl.peak_in_flight(run.schedule_runs["gpipe"][2][0]) == {0: 2, 1: 2}
    assert pl.peak_in_flight(run.schedule_runs["1f1b"][2][0]) == {0: 2, 1: 1}
    for rank in run.dtensor:  # DTensor's parallelize_module: the unsplit MLP, half the weights each
        assert rank["out_err"] < 1e-5 and rank["grad_err"] < 1e-5
        assert rank["local"] == [(32, 16), (16, 32)] and rank["full"] == [(64, 16), (16, 64)]
        assert rank["mesh"] == {"dp": 1, "tp": 2}
