"""Tests for dlarch_lib.parallel: gradient averaging, sharding, ring all-reduce, cost model, DDP."""

from __future__ import annotations

import json
import time

import psutil
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from dlarch_lib import modular, parallel
from dlarch_lib.core.measure import count_parameters


def _spawned_ranks() -> list[int]:
    """Pids of this process's children that are ranks started by ``parallel.launch`` and still alive."""
    pids = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                pids.append(child.pid)
        except psutil.NoSuchProcess:  # exited while we looked
            pass
    return pids


def _sleeping_worker(rank: int, world_size: int, init_method: str, seconds: float) -> None:
    """A rank that hangs (a worker for ``parallel.launch``: spawned ranks import it from this module)."""
    time.sleep(seconds)


def _lonely_rank_worker(rank: int, world_size: int, init_method: str) -> None:
    """Rank 0 waits for rank 1 in the rendezvous; rank 1 never comes."""
    if rank == 0:
        parallel.init_distributed("gloo", rank, world_size, init_method, timeout_s=1.0)
        parallel.shutdown_distributed()
    else:
        time.sleep(600)


def _data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


def test_shard_shapes_and_errors():
    x = torch.arange(12).reshape(6, 2)
    parts = parallel.shard(x, 3)
    assert len(parts) == 3 and all(p.shape == (2, 2) for p in parts)
    torch.testing.assert_close(torch.cat(parts), x)
    with pytest.raises(ValueError, match="equal shards"):
        parallel.shard(x, 4)
    with pytest.raises(ValueError, match="world_size"):
        parallel.shard(x, 0)


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_replica_gradients_equal_batch_gradients(world_size):
    x, y = _data()
    model = parallel.DDPJob(hidden=16).initial_model()
    for a, b in zip(
        parallel.replica_gradients(model, F.cross_entropy, x, y, world_size),
        parallel.batch_gradients(model, F.cross_entropy, x, y),
    ):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_plain_average_of_unequal_shards_is_wrong():
    x, y = _data()
    model = parallel.DDPJob(hidden=16).initial_model()
    full = parallel.batch_gradients(model, F.cross_entropy, x, y)
    a = parallel.batch_gradients(model, F.cross_entropy, x[:48], y[:48])
    b = parallel.batch_gradients(model, F.cross_entropy, x[48:], y[48:])
    assert max(float((0.5 * (ga + gb) - g).abs().max()) for ga, gb, g in zip(a, b, full)) > 1e-4


@pytest.mark.parametrize("drop_last", [False, True])
def test_shard_indices_match_distributed_sampler(drop_last):
    for n in range(1, 12):
        for p in range(1, 5):
            if drop_last and n < p:
                continue
            for epoch in range(2):
                for shuffle in (True, False):
                    ours = parallel.shard_indices(n, p, shuffle=shuffle, seed=3, epoch=epoch, drop_last=drop_last)
                    for rank in range(p):
                        sampler = DistributedSampler(
                            range(n), num_replicas=p, rank=rank, shuffle=shuffle, seed=3, drop_last=drop_last
                        )
                        sampler.set_epoch(epoch)
                        assert list(sampler) == ours[rank]


def test_shard_indices_known_case_and_errors():
    assert parallel.shard_indices(5, 2, shuffle=False) == [[0, 2, 4], [1, 3, 0]]  # padded with index 0
    assert parallel.shard_indices(5, 2, shuffle=False, drop_last=True) == [[0, 2], [1, 3]]
    assert parallel.shard_indices(100, 2, epoch=0) != parallel.shard_indices(100, 2, epoch=1)
    with pytest.raises(ValueError, match="empty"):
        parallel.shard_indices(0, 2)
    with pytest.raises(ValueError, match="world_size"):
        parallel.shard_indices(10, 0)
    with pytest.raises(ValueError, match="drop_last"):
        parallel.shard_indices(2, 3, drop_last=True)


@pytest.mark.parametrize("p", [1, 2, 3, 5, 8])
def test_ring_allreduce_sums_and_counts_traffic(p):
    tensors = [torch.randn(4, 10, dtype=torch.float64) for _ in range(p)]
    results, sent = parallel.ring_allreduce(tensors)
    for r in results:
        assert r.shape == (4, 10)
        torch.testing.assert_close(r, torch.stack(tensors).sum(0))
    if 40 % p == 0:
        assert sent == [2 * (p - 1) * 40 // p] * p
    assert all(s <= 2 * 40 for s in sent)
    assert tensors[0].shape == (4, 10)  # inputs untouched in shape


def test_ring_allreduce_errors():
    with pytest.raises(ValueError, match="same shape"):
        parallel.ring_allreduce([torch.zeros(3), torch.zeros(4)])
    with pytest.raises(ValueError, match="world_size"):
        parallel.ring_allreduce([])


def test_cost_model_known_values():
    assert parallel.ring_allreduce_bytes(100.0, 1) == 0.0
    assert parallel.ring_allreduce_bytes(100.0, 2) == 100.0
    assert parallel.ring_allreduce_bytes(100.0, 4) == 150.0
    # p=4: 6 latencies of 1 ms, 1.5 MB at 1 MB/s
    assert parallel.allreduce_seconds(1e6, 4, 1e-3, 1e6) == pytest.approx(6e-3 + 1.5)
    assert parallel.compute_seconds(1e6, 10, 6e9) == pytest.approx(0.01)
    assert parallel.scaling_efficiency(1.0, 1.0) == 0.5
    assert parallel.scaling_efficiency(1.0, 0.5, overlap=1.0) == 1.0
    assert parallel.scaling_efficiency(1.0, 1.5, overlap=1.0) == pytest.approx(1 / 1.5)
    with pytest.raises(ValueError):
        parallel.allreduce_seconds(1.0, 2, -1.0, 1.0)
    with pytest.raises(ValueError):
        parallel.compute_seconds(0, 1, 1)
    with pytest.raises(ValueError):
        parallel.scaling_efficiency(1.0, 1.0, overlap=2.0)


@pytest.mark.parametrize("p", [2, 4])
def test_fit_alpha_beta_recovers_synthetic_constants(p):
    sizes = [1e3, 1e4, 1e5, 1e6, 1e7]
    times = [parallel.allreduce_seconds(m, p, 50e-6, 2e9) for m in sizes]
    latency, bandwidth = parallel.fit_alpha_beta(sizes, times, p)
    assert latency == pytest.approx(50e-6, rel=1e-6)
    assert bandwidth == pytest.approx(2e9, rel=1e-6)


def test_fit_alpha_beta_errors():
    with pytest.raises(ValueError, match="world_size"):
        parallel.fit_alpha_beta([1, 2], [1, 2], 1)
    with pytest.raises(ValueError, match="two distinct"):
        parallel.fit_alpha_beta([1, 1], [1, 2], 2)
    with pytest.raises(ValueError, match="does not grow"):
        parallel.fit_alpha_beta([1, 2, 3], [3, 2, 1], 2)


def test_fit_alpha_beta_goes_through_the_end_points():
    latency, bandwidth = parallel.fit_alpha_beta([10, 500, 1000], [2e-3, 9.0, 4e-3], 2)  # middle ignored
    assert parallel.allreduce_seconds(10, 2, latency, bandwidth) == pytest.approx(2e-3)
    assert parallel.allreduce_seconds(1000, 2, latency, bandwidth) == pytest.approx(4e-3)
    with pytest.raises(ValueError, match="positive"):
        parallel.fit_alpha_beta([1, 2], [0, 1], 2)


def test_initial_model_and_job_checks():
    job = parallel.DDPJob(hidden=8, seed=5)
    state = torch.get_rng_state()
    a, b = job.initial_model(), job.initial_model()
    assert torch.equal(torch.get_rng_state(), state)  # seeded: the caller's random stream is left alone
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb) and pa.dtype == torch.float64
    assert a(torch.zeros(3, 1, 8, 8, dtype=torch.float64)).shape == (3, 10)
    assert count_parameters(a) == modular.mlp_parameter_count(modular.MLPConfig(width=8))  # the book's MLP
    assert not torch.equal(next(a.parameters()), next(parallel.DDPJob(hidden=8, seed=6).initial_model().parameters()))
    with pytest.raises(ValueError, match="hidden"):
        parallel.DDPJob(hidden=0).initial_model()
    opt = job.optimizer(a)
    assert (
        isinstance(opt, torch.optim.SGD) and opt.defaults["lr"] == job.lr and opt.defaults["momentum"] == job.momentum
    )
    assert parallel.DDPJob(batch_size=64).per_rank_batch(4) == 16
    with pytest.raises(ValueError, match="split evenly"):
        parallel.DDPJob(batch_size=10).per_rank_batch(3)


def test_free_port_and_init_errors(monkeypatch):
    port = parallel.free_port()
    assert 0 < port < 65536
    with pytest.raises(ValueError, match="backend"):
        parallel.init_distributed("mpi", 0, 1, f"tcp://127.0.0.1:{port}")
    with pytest.raises(ValueError, match="init_method"):
        parallel.init_distributed("gloo", 0, 1, None)
    with pytest.raises(ValueError, match="init_method"):
        parallel.init_distributed("gloo", 0, 1, f"127.0.0.1:{port}")
    with pytest.raises(ValueError, match="timeout_s"):
        parallel.init_distributed("gloo", 0, 1, f"tcp://127.0.0.1:{port}", timeout_s=0)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        parallel.init_distributed("gloo")
    assert not dist.is_initialized()
    parallel.shutdown_distributed()  # no group: nothing to do


def test_global_batches_are_the_ranks_batches_together():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    batches = list(parallel.global_batches(x, y, world_size=2, per_rank=2, seed=0, epochs=2))
    assert len(batches) == 2 * 3  # 5 examples per rank, 2 per step: 3 steps an epoch (the last one short)
    for epoch in range(2):
        shards = parallel.shard_indices(10, 2, seed=0, epoch=epoch)
        first_x, first_y = batches[3 * epoch]
        assert first_y.tolist() == shards[0][:2] + shards[1][:2]  # rank 0's rows, then rank 1's
        assert first_x[:, 0].tolist() == [float(i) for i in first_y]
    assert sorted(i for _, yb in batches[:3] for i in yb.tolist()) == list(range(10))  # an epoch covers the data


def test_train_reference_runs_the_engine_and_checks_dtype():
    x, y = _data(n=20)
    job = parallel.DDPJob(epochs=2, batch_size=8, hidden=8)
    model = job.initial_model()
    history = parallel.train_reference(model, job, x, y, world_size=2)
    assert history.steps == len(history.loss) == 2 * 3  # 10 examples per rank, 4 per step: 3 steps, the last short
    with pytest.raises(ValueError, match="float64"):
        parallel.train_reference(model.float(), job, x, y)


@pytest.mark.timeout(120)
def test_ddp_two_ranks_match_single_process():
    x, y = _data(n=101)  # odd: DistributedSampler pads
    job = parallel.DDPJob(epochs=2, batch_size=16, lr=0.1, hidden=16, bucket_cap_mb=0.001)
    reference = job.initial_model()
    ref_history = parallel.train_reference(reference, job, x, y, world_size=2)
    run = parallel.spawn_ddp(job, x, y, world_size=2, deadline_s=100)
    model = job.initial_model()
    model.load_state_dict(run.state_dict)
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert run.replica_max_diff == 0.0
    assert run.epoch0_indices == parallel.shard_indices(101, 2, seed=job.seed)
    assert sum(run.bucket_numels) == count_parameters(model) and len(run.bucket_numels) >= 2
    assert len(run.step_seconds) == 2 * 7  # 51 examples per rank (one padded), 8 per step: 7 steps an epoch
    assert run.history.steps == ref_history.steps == len(run.history.loss) == 2 * 7  # the same engine, the same steps
    assert run.history.epochs == 2


def test_spawn_ddp_errors():
    x, y = _data(n=10)
    with pytest.raises(ValueError, match="disagree"):
        parallel.spawn_ddp(parallel.DDPJob(batch_size=4), x, y[:5])
    with pytest.raises(ValueError, match="split evenly"):
        parallel.spawn_ddp(parallel.DDPJob(batch_size=5), x, y)
    with pytest.raises(ValueError, match="deadline_s"):
        parallel.spawn_ddp(parallel.DDPJob(batch_size=4), x, y, deadline_s=0)
    with pytest.raises(ValueError, match="timeout_s"):
        parallel.spawn_ddp(parallel.DDPJob(batch_size=4, timeout_s=-1.0), x, y)


def test_launch_rejects_bad_input():
    with pytest.raises(ValueError, match="module-level"):
        parallel.launch(lambda rank, world_size, init_method: None)
    with pytest.raises(ValueError, match="world_size"):
        parallel.launch(_sleeping_worker, (0.0,), world_size=0)
    with pytest.raises(ValueError, match="deadline_s"):
        parallel.launch(_sleeping_worker, (0.0,), deadline_s=float("inf"))
    with pytest.raises(ValueError, match="grace_s"):
        parallel.launch(_sleeping_worker, (0.0,), grace_s=-1.0)
    assert not _spawned_ranks()  # nothing was started


@pytest.mark.timeout(60)
def test_launch_kills_hung_ranks_at_the_deadline():
    start = time.monotonic()
    # one rank is enough here (each costs a torch import); the next test has a peer terminated
    with pytest.raises(TimeoutError, match=r"hung job: rank\(s\) \[0\] of 1 still running after the deadline of 3 s"):
        parallel.launch(_sleeping_worker, (600.0,), world_size=1, deadline_s=3, name="hung job", grace_s=1)
    assert time.monotonic() - start < 3 + 1 + 10  # the deadline, the grace period, slack for a busy machine
    assert not _spawned_ranks()  # terminated and reaped


@pytest.mark.timeout(60)
def test_launch_fails_fast_when_a_rank_never_joins():
    # rank 0's process-group timeout (1 s) fires long before the launcher's deadline (50 s)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="lonely: rank 0 of 2 failed") as info:
        parallel.launch(_lonely_rank_worker, world_size=2, deadline_s=50, name="lonely", grace_s=1)
    assert time.monotonic() - start < 30
    assert "rank 0 of 2 could not join the process group" in str(info.value)  # the rank's error comes along
    assert "init_distributed" in str(info.value)  # with its traceback
    assert not _spawned_ranks()  # rank 1, asleep, was terminated


def test_main_in_process_world_of_one(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(parallel.free_port()))
    parallel.main(["--numels", "16,64", "--repeats", "2"])
    assert not dist.is_initialized()  # main cleans up its process group
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(parallel.JSON_MARKER)]
    out = json.loads(lines[-1][len(parallel.JSON_MARKER) :])
    assert out["world_size"] == 1 and out["nbytes"] == [64, 256]
    assert len(out["seconds"]) == 2 and all(t >= 0 for t in out["seconds"])


def test_time_allreduce_rejects_bad_repeats():
    with pytest.raises(ValueError, match="repeats"):
        parallel.time_allreduce([8], repeats=0, device="cpu")
    with pytest.raises(ValueError, match="stat"):
        parallel.time_allreduce([8], stat="mean", device="cpu")


def test_run_torchrun_kills_torchrun_at_the_deadline():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="deadline of 0.5 s"):
        parallel.run_torchrun(2, ["--repeats", "1"], timeout=0.5)  # torchrun cannot even start in 0.5 s
    assert time.monotonic() - start < 10
    with pytest.raises(ValueError, match="timeout"):
        parallel.run_torchrun(2, timeout=0)


def test_torchrun_command():
    cmd = parallel.torchrun_command(2, ["--backend", "gloo"])
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert "--nproc_per_node=2" in cmd
    assert cmd[-3:] == ["dlarch_lib.parallel", "--backend", "gloo"]
    with pytest.raises(ValueError):
        parallel.torchrun_command(0)
