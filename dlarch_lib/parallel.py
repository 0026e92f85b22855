"""Data parallelism: gradient averaging, sharded sampling, DDP workers and a communication-cost model.

Data parallelism keeps a full copy of the model on each of ``p`` workers (ranks). Each rank
computes gradients on its own shard of the global batch; an *all-reduce* averages them, so
every replica takes the same optimiser step. This module has:

- the theory in one process: :func:`shard`, :func:`replica_gradients` (average of per-shard
  gradients) against :func:`batch_gradients`, :func:`shard_indices` (what
  ``DistributedSampler`` does) and :func:`ring_allreduce` (the algorithm, simulated);
- real DDP with ``torch.distributed``: :func:`init_distributed` and :func:`shutdown_distributed`
  (join and leave a process group, with a timeout), :func:`launch` (start ranks with the
  ``spawn`` method, join them with a deadline), the worker :func:`train_worker` (each rank trains
  the DDP-wrapped model with the book's engine :func:`~dlarch_lib.core.train.fit` on its
  :class:`RankBatches`) and its launcher :func:`spawn_ddp`, the single-process reference
  :func:`train_reference` (the same engine and step on the :func:`global_batches`), and
  :func:`main`, a ``torchrun`` entry point that times all-reduce
  (``python -m torch.distributed.run --standalone --nproc_per_node=2 -m dlarch_lib.parallel``);
- the alpha-beta cost model: :func:`allreduce_seconds`, :func:`fit_alpha_beta`,
  :func:`scaling_efficiency`.

Workers run in child processes, so they live here (children cannot unpickle notebook code).

No distributed run here can wait forever: ranks are started with ``spawn`` (never ``fork``: a
forked copy of a process in which torch already runs threads can block for good on a lock one of
those threads held), every process group has a timeout, every launch a deadline after which the
ranks are killed, and each rank releases its DDP module before it destroys its process group.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from dlarch_lib import modular
from dlarch_lib.core.runtime import seeded
from dlarch_lib.core.train import History, LossFn, classification_step, fit

JSON_MARKER = "ALLREDUCE_JSON "
"""Prefix of the line :func:`main` prints on rank 0 (parsed by :func:`run_torchrun`)."""
PG_TIMEOUT_S = 60.0
"""Default seconds a rank waits for its peers (rendezvous, collectives) before it raises."""
DEADLINE_S = 300.0
"""Default seconds a launcher waits for all ranks of a job before it kills them and raises."""


# --------------------------------------------------------------------------- theory, one process


def _check_world_size(world_size: int) -> None:
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")


def shard(x: torch.Tensor, world_size: int) -> tuple[torch.Tensor, ...]:
    """Split a batch ``(B, ...)`` into ``world_size`` equal shards ``(B/p, ...)`` along dim 0."""
    _check_world_size(world_size)
    if x.ndim == 0 or x.shape[0] % world_size != 0:
        raise ValueError(f"batch of shape {tuple(x.shape)} does not split into {world_size} equal shards")
    return torch.chunk(x, world_size, dim=0)


def batch_gradients(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of the mean loss over the whole batch, one tensor per parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss_fn(model(x), y), params))


def replica_gradients(
    model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, world_size: int
) -> list[torch.Tensor]:
    """What data parallelism computes, in one process: per-shard gradients, then their average.

    Each of the ``world_size`` "replicas" sees ``B/p`` examples; averaging their gradients is
    the all-reduce. For a mean loss this equals :func:`batch_gradients` (chapter 18, theorem 1).
    """
    per_replica = [
        batch_gradients(model, loss_fn, xs, ys) for xs, ys in zip(shard(x, world_size), shard(y, world_size))
    ]
    return [torch.stack(grads).mean(dim=0) for grads in zip(*per_replica)]  # average over replicas


def shard_indices(
    n: int, world_size: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0, drop_last: bool = False
) -> list[list[int]]:
    """The dataset indices each rank reads in one epoch, exactly as ``DistributedSampler`` does.

    Shuffle with a generator seeded ``seed + epoch`` (the same permutation on every rank, new
    each epoch: that is what ``set_epoch`` is for), pad by wrapping around to a multiple of
    ``world_size`` (or drop the tail when ``drop_last``), then deal the indices out like cards:
    rank ``r`` takes positions ``r, r + p, r + 2p, ...``.
    """
    _check_world_size(world_size)
    if n < 1:
        raise ValueError(f"the dataset must not be empty, got n={n}")
    if drop_last and n < world_size:
        raise ValueError(f"drop_last with n={n} < world_size={world_size} leaves no samples")
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    else:
        order = list(range(n))
    per_rank = n // world_size if drop_last else math.ceil(n / world_size)
    total = per_rank * world_size
    order = (order * math.ceil(total / n))[:total]  # pad by wrapping around, or cut the tail
    return [order[rank:total:world_size] for rank in range(world_size)]


def ring_allreduce(tensors: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """Sum ``p`` equal-shaped tensors with the ring algorithm, simulated; return results and traffic.

    The flattened vector is cut into ``p`` segments. *Reduce-scatter*: in ``p - 1`` steps each
    rank sends one segment to its right neighbour, which adds it to its own; afterwards rank
    ``r`` holds the full sum of segment ``(r + 1) % p``. *All-gather*: ``p - 1`` more steps pass
    the finished segments round the ring. Returns every rank's result and the number of elements
    each rank sent: ``2 (p - 1) / p`` times the tensor size when ``p`` divides it.
    """
    p = len(tensors)
    _check_world_size(p)
    shape = tensors[0].shape
    if any(t.shape != shape for t in tensors):
        raise ValueError(f"all tensors must have the same shape, got {[tuple(t.shape) for t in tensors]}")
    segs = [list(torch.tensor_split(t.detach().flatten().clone(), p)) for t in tensors]  # segs[rank][segment]
    sent = [0] * p
    for step in range(p - 1):  # reduce-scatter
        outgoing = [(r, (r - step) % p, segs[r][(r - step) % p].clone()) for r in range(p)]
        for r, s, payload in outgoing:  # all sends of a step happen at once
            segs[(r + 1) % p][s] += payload
            sent[r] += payload.numel()
    for step in range(p - 1):  # all-gather: pass the finished segments on
        outgoing = [(r, (r + 1 - step) % p, segs[r][(r + 1 - step) % p].clone()) for r in range(p)]
        for r, s, payload in outgoing:
            segs[(r + 1) % p][s] = payload
            sent[r] += payload.numel()
    return [torch.cat(segs[r]).reshape(shape) for r in range(p)], sent


# --------------------------------------------------------------------------- the cost model


def ring_allreduce_bytes(nbytes: float, world_size: int) -> float:
    """Bytes each rank sends (and receives) in a ring all-reduce of ``nbytes``: ``2 (p-1)/p * nbytes``."""
    _check_world_size(world_size)
    return 2.0 * (world_size - 1) / world_size * nbytes


def allreduce_seconds(nbytes: float, world_size: int, latency_s: float, bandwidth: float) -> float:
    """Alpha-beta time of a ring all-reduce: ``2 (p-1)`` latencies plus the ring bytes over the bandwidth.

    ``latency_s`` (alpha) is the fixed cost of one ring step in seconds; ``bandwidth`` (1/beta)
    is in bytes per second per rank.
    """
    if latency_s < 0 or bandwidth <= 0:
        raise ValueError(f"need latency_s >= 0 and bandwidth > 0, got {latency_s}, {bandwidth}")
    return 2 * (world_size - 1) * latency_s + ring_allreduce_bytes(nbytes, world_size) / bandwidth


def fit_alpha_beta(nbytes: Sequence[float], seconds: Sequence[float], world_size: int) -> tuple[float, float]:
    """``(latency_s, bandwidth)`` of :func:`allreduce_seconds` from measured all-reduce times.

    The model is a straight line in the message size ``M``: intercept ``2 (p-1) alpha``, slope
    ``2 (p-1) / (p * bandwidth)``. We draw it through the smallest and the largest message: the
    smallest is all latency, the largest mostly bandwidth. (A least-squares line is pulled about
    by the middle sizes, where real transports switch protocols and the model fits worst.)
    """
    if world_size < 2:
        raise ValueError("fitting needs world_size >= 2 (one rank communicates nothing)")
    sizes, times = np.asarray(nbytes, dtype=float), np.asarray(seconds, dtype=float)
    if sizes.shape != times.shape or sizes.size < 2 or np.unique(sizes).size < 2:
        raise ValueError("need at least two distinct sizes, with one time per size")
    if (times <= 0).any():
        raise ValueError("measured times must be positive")
    small, large = int(np.argmin(sizes)), int(np.argmax(sizes))
    slope = (times[large] - times[small]) / (sizes[large] - sizes[small])  # seconds per byte
    if slope <= 0:
        raise ValueError(f"time does not grow with size (slope {slope:.3g} s/byte): measurement too noisy")
    intercept = max(float(times[small] - slope * sizes[small]), 0.0)
    return intercept / (2 * (world_size - 1)), 2 * (world_size - 1) / (world_size * float(slope))


def compute_seconds(n_params: float, samples: float, flops_per_second: float) -> float:
    """Rule-of-thumb time of one training step of a dense net: ``6 * params * samples / FLOP/s``.

    Forward costs about 2 FLOPs per parameter per sample (a multiply and an add), backward twice that.
    """
    if n_params <= 0 or samples <= 0 or flops_per_second <= 0:
        raise ValueError(
            f"need positive n_params, samples, flops_per_second; got {n_params}, {samples}, {flops_per_second}"
        )
    return 6.0 * n_params * samples / flops_per_second


def scaling_efficiency(compute_s: float, comm_s: float, overlap: float = 0.0) -> float:
    """Fraction of ideal speed-up with a fixed per-rank batch (weak scaling): ``t_compute / t_step``.

    ``t_step = t_compute + max(0, t_comm - overlap * t_compute)``: a fraction ``overlap`` of the
    compute (DDP overlaps the all-reduce with the backward pass) can hide communication.
    """
    if compute_s <= 0 or comm_s < 0 or not 0.0 <= overlap <= 1.0:
        raise ValueError(f"need compute_s > 0, comm_s >= 0, 0 <= overlap <= 1; got {compute_s}, {comm_s}, {overlap}")
    return compute_s / (compute_s + max(0.0, comm_s - overlap * compute_s))


# --------------------------------------------------------------------------- real processes


def _check_seconds(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {value!r}")
    return float(value)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks it when we bind to port 0).

    Racy: another process may take the port before we use it. :func:`launch` therefore meets in
    a file instead; this is for ``MASTER_PORT`` in a one-process world.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(
    backend: str = "gloo",
    rank: int | None = None,
    world_size: int | None = None,
    init_method: str | None = None,
    timeout_s: float = PG_TIMEOUT_S,
) -> torch.device:
    """Join the process group and return this rank's device (``cuda:local_rank`` for NCCL, else CPU).

    With ``rank``/``world_size``/``init_method`` given (:func:`launch` passes them), meet the other
    ranks at ``init_method`` (``file://...`` or ``tcp://host:port``). Without them (``torchrun``), read
    ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` from the environment:
    this is where the seed's undefined ``local_rank`` comes from. A peer that does not arrive within
    ``timeout_s`` seconds, here or later in a collective, makes this rank raise instead of waiting.
    """
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    timeout = datetime.timedelta(seconds=_check_seconds("timeout_s", timeout_s))
    if rank is None:
        if "LOCAL_RANK" not in os.environ:
            raise ValueError(
                "no rank given and LOCAL_RANK is not set: launch with torchrun or pass rank, world_size and init_method"
            )
        local_rank = int(os.environ["LOCAL_RANK"])  # set by torchrun for each process on a node
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
    else:
        if world_size is None or init_method is None:
            raise ValueError("with an explicit rank, give world_size and init_method too")
        if not init_method.startswith(("file://", "tcp://")):
            raise ValueError(f"init_method must start with 'file://' or 'tcp://', got {init_method!r}")
        local_rank = rank  # one machine: local rank == global rank
        try:
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)
        except RuntimeError as exc:  # gloo says only "Wait timeout" when a peer never came
            raise RuntimeError(
                f"rank {rank} of {world_size} could not join the process group at {init_method} "
                f"within {timeout_s:g} s: did every rank start? ({exc})"
            ) from exc
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def shutdown_distributed() -> None:
    """Leave the process group: first free what still holds it, then destroy it. Call it in ``finally``.

    A DDP module's ``Reducer`` (and a pipeline stage) holds the process group; delete them before
    calling this. When a rank is failing, the frames of the exception's traceback still hold their
    local variables, DDP modules among them: those frames are cleared (the traceback text stays).
    Does nothing when no process group exists.
    """
    exc = sys.exc_info()[1]
    if exc is not None:
        traceback.clear_frames(exc.__traceback__)
    gc.collect()  # DDP's Python objects hold reference cycles
    if dist.is_initialized():
        dist.destroy_process_group()


def _run_rank(
    rank: int, worker: Callable[..., Any], world_size: int, init_method: str, out_dir: str, args: tuple
) -> None:
    """What :func:`launch` runs in each child: call the worker, save what it returns for the parent."""
    result = worker(rank, world_size, init_method, *args)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def _stop(processes: Sequence[Any], grace_s: float) -> None:
    """SIGTERM the processes still alive, give them ``grace_s`` seconds, then SIGKILL; reap them all."""
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    end = time.monotonic() + grace_s
    for proc in processes:
        proc.join(max(0.0, end - time.monotonic()))
    for proc in processes:
        if proc.is_alive():
            proc.kill()  # SIGTERM is not enough for a process stuck in C++ with the signal blocked
        proc.join()


def launch(
    worker: Callable[..., Any],
    args: Sequence[Any] = (),
    world_size: int = 2,
    *,
    deadline_s: float = DEADLINE_S,
    name: str | None = None,
    grace_s: float = 2.0,
) -> list[Any]:
    """Run ``worker(rank, world_size, init_method, *args)`` in ``world_size`` new processes; return each rank's result.

    - The ranks are started with the ``spawn`` method, as ``mp.spawn`` does: each is a new
      interpreter that imports ``worker`` by name, so it must be a module-level function of an
      importable module (not a lambda, not a notebook cell). ``args`` are pickled.
    - ``init_method`` is a ``file://`` rendezvous in a fresh temporary directory: no TCP port to
      pick, so concurrent jobs (say, two pytest-xdist workers) cannot take each other's.
    - If a rank raises, the others are terminated and ``RuntimeError`` carries its traceback.
    - If the ranks have not all finished ``deadline_s`` seconds after the start, they are
      terminated (SIGKILL after ``grace_s`` more seconds) and ``TimeoutError`` is raised.

    Returns the list of the ranks' return values (index = rank). They travel through
    ``torch.save``/``torch.load(weights_only=True)``: tensors, numbers, strings, ``None`` and
    lists, tuples and dicts of these.
    """
    _check_world_size(world_size)
    deadline_s, grace_s = _check_seconds("deadline_s", deadline_s), float(grace_s)
    if grace_s < 0:
        raise ValueError(f"grace_s must be >= 0, got {grace_s}")
    qualname = getattr(worker, "__qualname__", "")
    if not callable(worker) or "<" in qualname or getattr(worker, "__module__", None) is None:
        raise ValueError(f"worker must be a module-level function (spawned ranks import it by name), got {worker!r}")
    if worker.__module__ == "__main__" and not hasattr(sys.modules["__main__"], "__file__"):
        raise ValueError(
            f"worker {qualname} is defined in a notebook or REPL, which spawned ranks cannot import: "
            "move it into a module"
        )
    name = name or qualname
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="dlarch-launch-") as tmp:
        init_method = "file://" + str(Path(tmp) / "rendezvous")
        start = time.monotonic()
        context = mp.start_processes(
            _run_rank,
            args=(worker, world_size, init_method, tmp, tuple(args)),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        try:
            while not context.join(timeout=max(0.0, start + deadline_s - time.monotonic()), grace_period=grace_s):
                if time.monotonic() >= start + deadline_s:
                    running = [rank for rank, proc in enumerate(context.processes) if proc.is_alive()]
                    raise TimeoutError(
                        f"{name}: rank(s) {running} of {world_size} still running after the deadline "
                        f"of {deadline_s:g} s; all ranks were terminated"
                    )
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            raise RuntimeError(
                f"{name}: rank {exc.error_index} of {world_size} failed, the others were terminated. {exc}"
            ) from exc
        finally:
            _stop(context.processes, grace_s)  # nothing left to do when every rank has exited
            for path in context.error_files:  # torch's tracebacks of failed ranks, in the system temp dir
                Path(path).unlink(missing_ok=True)
        return [torch.load(Path(tmp) / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]


@dataclass(frozen=True)
class DDPJob:
    """One data-parallel training run: model, schedule and communication settings.

    The model is the book's digits MLP (:class:`~dlarch_lib.modular.MLPConfig`: two hidden layers
    of ``hidden`` ReLU units) in ``dtype``; ``batch_size`` is the *global* batch, and each of the
    ``p`` ranks reads ``batch_size / p`` of it.
    """

    epochs: int = 2
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    hidden: int = 64
    seed: int = 0
    dtype: torch.dtype = torch.float64
    backend: str = "gloo"
    bucket_cap_mb: float = 25.0
    threads: int = 1
    timeout_s: float = PG_TIMEOUT_S  # how long a rank waits for a missing peer before it raises

    def per_rank_batch(self, world_size: int) -> int:
        """Examples per rank and step; the global batch must split evenly."""
        _check_world_size(world_size)
        if self.batch_size % world_size:
            raise ValueError(f"global batch {self.batch_size} does not split evenly over {world_size} ranks")
        return self.batch_size // world_size

    def initial_model(self) -> nn.Module:
        """The model every rank starts from, ``(N, 1, 8, 8) -> (N, 10)``: initialised from ``seed``, on the CPU.

        Each call builds the same weights (inside :func:`~dlarch_lib.core.runtime.seeded`), so
        every spawned rank and the single-process reference start equal; move it to a device after.
        """
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}")
        with seeded(self.seed):
            model = modular.build_model(modular.MLPConfig(width=self.hidden, depth=2))
        return model.to(self.dtype)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """SGD with the job's learning rate and momentum over ``model``'s parameters."""
        return torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum)


def _recording_allreduce_hook(bucket_numels, bucket):  # no annotations: DDP checks them, and ours are strings
    """DDP's default communication, written out: divide the bucket by p, all-reduce (sum) it, async.

    ``bucket`` is a ``dist.GradBucket`` (its gradients flattened into one buffer); the hook returns a
    ``torch.futures.Future`` of the reduced buffer, so backward can go on while it is in flight.
    DDP reduces the buckets in index order, so bucket 0 starts the record of a new step.
    """
    if bucket.index() == 0:  # the first bucket of this backward pass: forget the previous step's
        bucket_numels.clear()
    bucket_numels.append(bucket.buffer().numel())  # record the bucket's size, then do what DDP does
    grads = bucket.buffer().div_(dist.get_world_size())
    return dist.all_reduce(grads, async_op=True).get_future().then(lambda fut: fut.value()[0])


class RankBatches:
    """One rank's mini-batches for :func:`~dlarch_lib.core.train.fit`: its shard, reshuffled every epoch.

    Each pass over it is one epoch: it calls ``sampler.set_epoch(epoch)`` (the same new shuffle on
    every rank; without it every epoch repeats the first one's order), then yields the rank's
    ``batch_size`` examples at a time from its ``DistributedSampler`` shard of ``dataset``. It also
    times the steps: the engine trains on a batch before it asks for the next, so the seconds from
    handing a batch out to being asked again are that batch's step (forward, backward with its
    all-reduce, optimizer step), without the data loading. ``step_seconds`` holds one per step.
    """

    def __init__(
        self, dataset: Dataset, rank: int, world_size: int, batch_size: int, seed: int, device: torch.device
    ) -> None:
        self.sampler: DistributedSampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler)
        self.device, self.epoch = device, 0
        self.step_seconds: list[float] = []

    def __iter__(self) -> Iterator[Any]:
        self.sampler.set_epoch(self.epoch)  # a new shuffle each epoch, the same on every rank
        self.epoch += 1
        for batch in self.loader:
            start = time.perf_counter()
            yield batch  # the engine takes its step on this batch before it asks for the next one
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.step_seconds.append(time.perf_counter() - start)


def train_worker(
    rank: int, world_size: int, init_method: str, job: DDPJob, x: torch.Tensor, y: torch.Tensor
) -> dict | None:
    """One DDP rank (the worker of :func:`launch`): train the job's MLP on the rank's shards with :func:`fit`.

    The seed's sketch, corrected: the rank and device come from the launcher, every rank builds the
    same initial model, the batches come from a ``DistributedSampler`` (disjoint shards) with
    ``set_epoch`` each epoch (:class:`RankBatches`), and the loss is computed from the model's
    output by the ordinary classifier step. The DDP-wrapped model *is* the model: its all-reduce
    runs inside the engine's ``backward``. Rank 0 returns its :class:`~dlarch_lib.core.train.History`
    (as a dict), the final weights and what was measured; the others return ``None``. Whatever
    happens, the DDP module goes before the process group does.
    """
    torch.set_num_threads(job.threads)
    device = init_distributed(job.backend, rank, world_size, init_method, timeout_s=job.timeout_s)
    ddp = None
    try:
        model = job.initial_model().to(device)  # the same weights on every rank
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=job.bucket_cap_mb
        )
        bucket_numels: list[int] = []
        ddp.register_comm_hook(bucket_numels, _recording_allreduce_hook)
        dataset = TensorDataset(x.to(job.dtype), y)
        batches = RankBatches(dataset, rank, world_size, job.per_rank_batch(world_size), job.seed, device)
        epoch0 = list(batches.sampler)  # this rank's shard in the first epoch
        history = fit(
            ddp, batches, classification_step, epochs=job.epochs, optimizer=job.optimizer(ddp), progress=False
        )
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        replicas = [torch.empty_like(flat) for _ in range(world_size)]
        dist.all_gather(replicas, flat)  # every rank's weights, to check that they agree
        shards: list[list[int] | None] = [None] * world_size
        dist.all_gather_object(shards, epoch0)
        if rank != 0:
            return None
        return {
            "history": dataclasses.asdict(history),  # plain lists and numbers travel back to the launcher
            "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
            "replica_max_diff": max(float((r - flat).abs().max()) for r in replicas),
            "bucket_numels": list(bucket_numels),
            "step_seconds": batches.step_seconds,
            "epoch0_indices": shards,
        }
    finally:
        del ddp  # its Reducer holds the process group: release it first
        shutdown_distributed()


@dataclass
class DDPRun:
    """What :func:`spawn_ddp` brings back from rank 0 of a data-parallel run."""

    history: History  # rank 0's training record (the losses of its shards)
    state_dict: dict[str, torch.Tensor]  # the final weights, on the CPU
    replica_max_diff: float  # largest difference between any rank's weights and rank 0's
    bucket_numels: list[int]  # sizes of the gradient buckets of the last step, in elements
    step_seconds: list[float]  # rank 0's time of every step
    epoch0_indices: list[list[int]]  # each rank's shard of the data set in the first epoch


def spawn_ddp(
    job: DDPJob, x: torch.Tensor, y: torch.Tensor, world_size: int = 2, deadline_s: float = DEADLINE_S
) -> DDPRun:
    """Run :func:`train_worker` on ``world_size`` spawned processes (:func:`launch`); return rank 0's :class:`DDPRun`.

    Each rank is a fresh interpreter (the ``spawn`` start method), which costs a ``torch`` import
    per rank but is safe with threads and CUDA. A rank that waits ``job.timeout_s`` seconds for a
    missing peer raises; a job not done after ``deadline_s`` seconds is killed (``TimeoutError``).
    The ranks train on CPU processes with ``backend="gloo"``, on ``cuda:rank`` with ``"nccl"``.
    """
    job.per_rank_batch(world_size)  # fail early on a bad batch size
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y disagree on the number of examples: {x.shape[0]} vs {y.shape[0]}")
    _check_seconds("job.timeout_s", job.timeout_s)
    results = launch(
        train_worker,
        (job, x, y),
        world_size,
        deadline_s=deadline_s,
        name=f"spawn_ddp ({world_size} ranks, {job.backend})",
    )
    result = results[0]
    return DDPRun(history=History(**result.pop("history")), **result)


def global_batches(
    x: torch.Tensor, y: torch.Tensor, world_size: int, per_rank: int, seed: int, epochs: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The global batches that ``world_size`` ranks see together, epoch after epoch.

    Step ``k`` of an epoch is the union of every rank's ``k``-th mini-batch of ``per_rank``
    examples, each rank's shard taken from :func:`shard_indices` (what ``DistributedSampler``
    gives the ranks). Yields ``(x[idx], y[idx])``, ``(p * per_rank, ...)`` and ``(p * per_rank,)``.
    """
    for epoch in range(epochs):
        shards = shard_indices(len(x), world_size, shuffle=True, seed=seed, epoch=epoch)
        for start in range(0, len(shards[0]), per_rank):
            idx = torch.tensor([i for s in shards for i in s[start : start + per_rank]])  # the global batch
            yield x[idx], y[idx]


def train_reference(
    model: nn.Module, job: DDPJob, x: torch.Tensor, y: torch.Tensor, world_size: int = 2, progress: bool = False
) -> History:
    """One process, no DDP: train ``model`` with :func:`fit` on the *global* batches of ``world_size`` ranks.

    ``model`` is ``job.initial_model()``, moved to the device to train on; the engine, the step
    (the classifier's cross-entropy) and the optimizer are those of every rank of
    :func:`train_worker`, and the batches are the :func:`global_batches`, so by the averaging
    theorem it takes the same steps as the data-parallel run.
    """
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {job.dtype}:
        raise ValueError(f"model parameters are {sorted(map(str, dtypes))}, the job trains in {job.dtype}")
    batches = list(global_batches(x.to(job.dtype), y, world_size, job.per_rank_batch(world_size), job.seed, job.epochs))
    return fit(
        model,
        batches,
        classification_step,
        steps=len(batches),
        optimizer=job.optimizer(model),
        progress=progress,
        desc="single-process reference",
    )


def time_allreduce(
    numels: Sequence[int], repeats: int = 10, warmup: int = 2, *, device: torch.device | str, stat: str = "min"
) -> list[float]:
    """Seconds of ``dist.all_reduce`` on float32 tensors of each size on ``device`` (call inside a process group).

    ``device`` is the rank's device, as :func:`init_distributed` returns it.

    ``stat="min"`` (the default) keeps the fastest repeat: the cost of the collective itself, as
    the cost model needs it. On a shared machine every slower repeat waited for other processes.
    ``stat="median"`` gives the typical time instead.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    if stat not in ("min", "median"):
        raise ValueError(f"stat must be 'min' or 'median', got {stat!r}")
    device = torch.device(device)
    for _ in range(5 * warmup):  # warm the connection up once (the first collectives pay set-up costs)
        dist.all_reduce(torch.ones(1, device=device))
    results = []
    for n in numels:
        t = torch.ones(int(n), device=device)
        times = []
        for i in range(warmup + repeats):
            dist.barrier()  # start together, so we time the collective, not waiting for a late rank
            start = time.perf_counter()
            dist.all_reduce(t)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        results.append(min(times) if stat == "min" else statistics.median(times))
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """``torchrun`` entry point: time all-reduce (fastest of ``--repeats``) for several sizes; rank 0 prints JSON.

    ``python -m torch.distributed.run --standalone --nproc_per_node=2 -m dlarch_lib.parallel --backend gloo``
    """
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument(
        "--numels", default="1024,16384,131072,524288,2097152", help="comma-separated tensor sizes (float32 elements)"
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--timeout", type=float, default=PG_TIMEOUT_S, help="seconds a rank waits for a missing peer before it fails"
    )
    args = parser.parse_args(argv)
    device = init_distributed(args.backend, timeout_s=args.timeout)  # rank, world size, local rank: from torchrun
    try:
        numels = [int(n) for n in args.numels.split(",")]
        seconds = time_allreduce(numels, repeats=args.repeats, device=device)
        if dist.get_rank() == 0:
            print(
                JSON_MARKER
                + json.dumps(
                    {
                        "backend": args.backend,
                        "world_size": dist.get_world_size(),
                        "nbytes": [4 * n for n in numels],
                        "seconds": seconds,
                    }
                ),
                flush=True,
            )
    finally:
        shutdown_distributed()


def torchrun_command(nproc: int, args: Sequence[str] = ()) -> list[str]:
    """The command line that launches :func:`main` on ``nproc`` local processes with torchrun."""
    _check_world_size(nproc)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "dlarch_lib.parallel",
        *args,
    ]


def run_torchrun(nproc: int = 2, args: Sequence[str] = (), timeout: float = 120.0) -> dict:
    """Run :func:`torchrun_command` as a subprocess and return the JSON that rank 0 printed.

    torchrun and its ranks run in a session of their own; if they are not done after ``timeout``
    seconds, the whole session is killed and ``TimeoutError`` is raised.
    """
    timeout = _check_seconds("timeout", timeout)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(
        torchrun_command(nproc, args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and every rank it started
        stdout, stderr = proc.communicate()
        raise TimeoutError(
            f"torchrun ({nproc} ranks) still running after the deadline of {timeout:g} s; killed it "
            f"and its ranks:\n{stdout[-2000:]}\n{stderr[-2000:]}"
        ) from None
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C): leave no ranks behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    lines = [line for line in stdout.splitlines() if line.startswith(JSON_MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"torchrun failed (exit {proc.returncode}):\n{stdout[-2000:]}\n{stderr[-2000:]}")
    return json.loads(lines[-1][len(JSON_MARKER) :])


if __name__ == "__main__":
    main()
