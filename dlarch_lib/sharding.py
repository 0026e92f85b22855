"""Chapter 18, second part: sharding the training state (ZeRO, FSDP2) and compressing the gradients.

Data parallelism (:mod:`dlarch_lib.parallel`) keeps the whole training state on every rank: the
weights, their gradients and the optimizer's state. ZeRO (Rajbhandari et al., 2020) partitions it
over the ``N`` ranks in three stages: the optimizer state (stage 1), then the gradients (2), then
the weights themselves (3), which PyTorch's FSDP2 (``fully_shard``) implements. This module has

- :func:`zero_bytes_per_rank`: the bytes per rank of each stage, in closed form;
- :func:`local_state_bytes`: the bytes a rank actually holds, read from its (local) tensors;
- :func:`powersgd_numel`: the numbers PowerSGD sends for a list of gradient shapes;
- :class:`ShardJob`, the worker :func:`sharding_worker` (one spawned rank trains the same MLP with
  DDP, DDP + ``ZeroRedundancyOptimizer``, FSDP2, DDP with the fp16 and PowerSGD communication
  hooks, and DDP under bfloat16 ``torch.autocast``: mixed precision) and its single-process
  reference :func:`reference_run`.

The worker runs in processes started by :func:`dlarch_lib.parallel.launch` (spawn, a deadline, a
process-group timeout), like every distributed run of the book.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dlarch_lib import modular
from dlarch_lib.core.runtime import seeded
from dlarch_lib.parallel import PG_TIMEOUT_S, init_distributed, shutdown_distributed

ZERO_STAGES = (0, 1, 2, 3)
"""0 is plain data parallelism; 1, 2, 3 shard the optimizer state, then the gradients, then the weights."""

VARIANTS = ("DDP", "ZeRO-1", "FSDP2", "DDP + fp16 hook", "DDP + PowerSGD", "DDP + bf16 autocast")
"""What :func:`sharding_worker` trains, in this order. The last is mixed precision: float32 weights,
gradients, all-reduce and Adam, with the forward and backward matrix products in bfloat16."""

MIXED = "DDP + bf16 autocast"
"""The mixed-precision variant of :data:`VARIANTS`."""

COMPARED_STEP = 2
"""The step (from 0) whose averaged gradient the worker returns: PowerSGD compresses from this one on
(its first steps are plain all-reduces, as error feedback and warm start require)."""


def zero_bytes_per_rank(
    n_params: int, world_size: int, stage: int, *, weight_bytes: int = 2, grad_bytes: int = 2, optim_bytes: int = 12
) -> dict[str, float]:
    """Bytes of training state one rank holds under ZeRO stage ``stage``, for ``n_params`` parameters.

    The defaults are mixed-precision Adam (16-bit weights and gradients; fp32 master weights, first
    and second moments: 12 bytes). Stage 0 holds everything; stage ``s`` divides the optimizer state
    (``s >= 1``), the gradients (``s >= 2``) and the weights (``s = 3``) by ``world_size``. Returns
    ``{"weights", "grads", "optimizer", "total"}``.
    """
    if n_params < 1 or world_size < 1:
        raise ValueError(f"need n_params >= 1 and world_size >= 1, got {n_params}, {world_size}")
    if stage not in ZERO_STAGES:
        raise ValueError(f"stage must be one of {ZERO_STAGES}, got {stage}")
    if min(weight_bytes, grad_bytes, optim_bytes) < 0:
        raise ValueError("byte counts must be >= 0")
    out = {
        "weights": n_params * weight_bytes / (world_size if stage >= 3 else 1),
        "grads": n_params * grad_bytes / (world_size if stage >= 2 else 1),
        "optimizer": n_params * optim_bytes / (world_size if stage >= 1 else 1),
    }
    return {**out, "total": sum(out.values())}


def _local(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this rank stores: a DTensor's local shard, any other tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _nbytes(tensors: Iterable[torch.Tensor | None]) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = _local(t)
        key = local.untyped_storage().data_ptr()
        if key not in seen:  # views of one storage (DDP's gradient buckets) count once
            seen.add(key)
            total += local.untyped_storage().nbytes()
    return total


def local_state_bytes(model: nn.Module, optimizer: Any) -> dict[str, int]:
    """Bytes of weights, gradients and optimizer state that *this rank* stores (DTensors: local shards).

    ``optimizer`` is a ``torch.optim.Optimizer`` or a ``ZeroRedundancyOptimizer`` (whose ``state``
    holds only this rank's partition). Adam's one-element ``step`` counters are left out, so the
    optimizer entry is the two moments. Returns ``{"weights", "grads", "optimizer", "total"}``.
    """
    if not isinstance(model, nn.Module) or not hasattr(optimizer, "state"):
        raise TypeError(f"need an nn.Module and an optimizer, got {type(model).__name__}, {type(optimizer).__name__}")
    params = list(model.parameters())
    optimizer = getattr(optimizer, "optim", optimizer)  # a ZeroRedundancyOptimizer wraps this rank's optimizer
    state = [t for s in optimizer.state.values() for k, t in s.items() if torch.is_tensor(t) and k != "step"]
    out = {"weights": _nbytes(params), "grads": _nbytes(p.grad for p in params), "optimizer": _nbytes(state)}
    return {**out, "total": sum(out.values())}


def powersgd_numel(shapes: Sequence[Sequence[int]], rank: int) -> dict[str, int]:
    """Numbers all-reduced per step for gradients of ``shapes``: uncompressed, and with PowerSGD of ``rank``.

    PowerSGD (Vogels et al., 2019) sends a matrix gradient ``(n, m)`` as two factors ``P (n, r)`` and
    ``Q (m, r)``, ``(n + m) r`` numbers instead of ``n m``, where ``r = min(rank, n, m)``; vectors go
    uncompressed. Returns ``{"dense", "factors", "vectors", "compressed"}`` (``compressed = factors + vectors``).
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    dense = factors = vectors = 0
    for shape in shapes:
        numel = math.prod(shape)
        dense += numel
        if len(shape) <= 1:
            vectors += numel
        else:
            n, m = shape[0], numel // shape[0]
            factors += (n + m) * min(rank, n, m)
    return {"dense": dense, "factors": factors, "vectors": vectors, "compressed": factors + vectors}


@dataclass(frozen=True)
class ShardJob:
    """The run every variant of :func:`sharding_worker` makes: Adam on the book's digits MLP, in float64
    (float32 weights under bfloat16 autocast in the :data:`MIXED` variant).

    ``steps`` steps on consecutive global batches of ``batch_size`` examples (rank ``r`` of ``N``
    takes the ``r``-th of ``N`` equal slices of each); ``hidden`` units in each of two hidden layers.
    """

    steps: int = 10  # at least COMPARED_STEP + 1
    batch_size: int = 64
    hidden: int = 256
    lr: float = 1e-3
    seed: int = 0
    powersgd_rank: int = 2
    timeout_s: float = PG_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.steps <= COMPARED_STEP or self.batch_size < 1 or self.hidden < 1 or self.powersgd_rank < 1:
            raise ValueError(
                f"need steps > {COMPARED_STEP} and positive batch_size, hidden, powersgd_rank; got {self.steps}, "
                f"{self.batch_size}, {self.hidden}, {self.powersgd_rank}"
            )

    def initial_model(self) -> nn.Module:
        """The same weights on every call (and every rank): chapter 2's MLP, float64, on the CPU."""
        with seeded(self.seed):
            model = modular.build_model(modular.MLPConfig(width=self.hidden, depth=2))
        return model.to(torch.float64)

    def global_batches(self, x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``steps`` consecutive batches ``(B, ...)``, ``(B,)``, wrapping around the data."""
        if len(x) != len(y) or len(x) < self.batch_size:
            raise ValueError(f"need as many labels as inputs and at least one batch, got {len(x)}, {len(y)}")
        out = []
        for k in range(self.steps):
            idx = torch.arange(k * self.batch_size, (k + 1) * self.batch_size) % len(x)
            out.append((x[idx].to(torch.float64), y[idx]))
        return out


def _flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """One vector of the *full* tensors (a DTensor is gathered first)."""
    full = [t.full_tensor() if hasattr(t, "full_tensor") else t for t in tensors]
    return torch.cat([t.detach().reshape(-1) for t in full])


def reference_run(job: ShardJob, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """One process, no sharding: Adam on the job's global batches; the gradient of :data:`COMPARED_STEP`
    and the final weights."""
    model = job.initial_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=job.lr)
    grad = torch.empty(0)
    for k, (xb, yb) in enumerate(job.global_batches(x, y)):
        F.cross_entropy(model(xb), yb).backward()
        if k == COMPARED_STEP:
            grad = _flat(p.grad for p in model.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad()
    return {"grad": grad, "final": _flat(model.parameters())}


def _build(variant: str, job: ShardJob, world_size: int) -> tuple[nn.Module, nn.Module, Any, Any]:
    """(module to call, plain model, optimizer, hook state) for one variant, on this rank."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = job.initial_model()
    if variant == MIXED:
        model = model.float()  # float32 master weights; autocast runs the products in bfloat16
    if variant == "FSDP2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world_size,))
        for layer in model.modules():
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)  # each layer's weights: a dim-0 shard per rank
        fully_shard(model, mesh=mesh)
        return model, model, torch.optim.Adam(model.parameters(), lr=job.lr), None
    # PowerSGD's all-reduces of several buckets can reach gloo in different orders on different ranks (a
    # size mismatch or a hang: seen with two buckets at 512 hidden units); one bucket for all gradients avoids it.
    one_bucket_mb = 1 + sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    ddp = nn.parallel.DistributedDataParallel(
        model, bucket_cap_mb=one_bucket_mb if variant == "DDP + PowerSGD" else None
    )
    state = None
    if variant == "ZeRO-1":
        optimizer: Any = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=torch.optim.Adam, lr=job.lr)
    else:
        optimizer = torch.optim.Adam(ddp.parameters(), lr=job.lr)
    if variant == "DDP + fp16 hook":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif variant == "DDP + PowerSGD":
        state = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=job.powersgd_rank,
            start_powerSGD_iter=COMPARED_STEP,  # plain all-reduce before, as error feedback requires
        )
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif variant not in ("DDP", "ZeRO-1", MIXED):
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    return ddp, model, optimizer, state


def sharding_worker(
    rank: int, world_size: int, init_method: str, job: ShardJob, x: torch.Tensor, y: torch.Tensor
) -> dict[str, Any]:
    """One rank (the worker of :func:`~dlarch_lib.parallel.launch`): train every variant of :data:`VARIANTS`.

    Each variant starts from the job's initial weights and takes ``job.steps`` Adam steps, the rank
    computing on its slice of every global batch. Returns, per variant, this rank's
    :func:`local_state_bytes` after the first step (gradients still in place), and from rank 0 also the
    full averaged gradient of step :data:`COMPARED_STEP`, the full final weights, (PowerSGD) the numbers in its
    ``P`` and ``Q`` factors and (:data:`MIXED`) the dtypes of the logits and of the all-reduced gradients.
    Every module goes before the process group does.
    """
    torch.set_num_threads(1)
    init_distributed("gloo", rank, world_size, init_method, timeout_s=job.timeout_s)
    per_rank = job.batch_size // world_size
    if per_rank * world_size != job.batch_size:
        raise ValueError(f"global batch {job.batch_size} does not split evenly over {world_size} ranks")
    results: dict[str, Any] = {}
    module = model = optimizer = state = None
    try:
        batches = job.global_batches(x, y)
        for variant in VARIANTS:
            module, model, optimizer, state = _build(variant, job, world_size)
            record: dict[str, Any] = {}
            mixed = variant == MIXED
            for k, (xb, yb) in enumerate(batches):
                mine = slice(rank * per_rank, (rank + 1) * per_rank)  # this rank's slice of the global batch
                autocast = torch.autocast("cpu", dtype=torch.bfloat16) if mixed else contextlib.nullcontext()
                with autocast:
                    logits = module(xb[mine].float() if mixed else xb[mine])  # (B / N, 10)
                    loss = F.cross_entropy(logits, yb[mine])
                loss.backward()  # outside autocast, as PyTorch recommends; DDP all-reduces the float32 grads
                if k == COMPARED_STEP:
                    record["grad"] = _flat(p.grad for p in model.parameters() if p.grad is not None)
                    if mixed:
                        grad_dtypes = {str(p.grad.dtype) for p in model.parameters() if p.grad is not None}
                        record["dtypes"] = {"logits": str(logits.dtype), "grads": grad_dtypes}
                optimizer.step()
                if k == 0:
                    record["bytes"] = local_state_bytes(model, optimizer)
                optimizer.zero_grad()
            record["final"] = _flat(model.parameters())
            if state is not None:
                record["factor_numel"] = sum(
                    t.numel() for d in (state.p_memory_dict, state.q_memory_dict) for t in d.values()
                )
            if rank != 0:
                record = {"bytes": record["bytes"]}
            results[variant] = record
            del module, model, optimizer, state  # DDP's Reducer holds the process group
            module = model = optimizer = state = None
        return results
    finally:
        del module, model, optimizer, state
        shutdown_distributed()
