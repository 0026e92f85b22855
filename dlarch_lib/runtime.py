"""Seeding, device choice and the run size every chapter starts from.

Each chapter runs at one of two sizes:

- ``"ci"``: small enough to finish in at most 45 seconds on a 2-core CPU (the test machine);
- ``"full"``: larger models and longer training for a GPU (Colab, a workstation).

The size defaults to ``"full"`` when CUDA is available and ``"ci"`` otherwise; the
environment variable ``DLARCH_SIZE`` overrides it.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

SIZES = ("ci", "full")
T = TypeVar("T")


def seed_everything(seed: int = 0) -> None:
    """Seed Python's, NumPy's and torch's random number generators."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(prefer: str | None = None) -> torch.device:
    """Return the device to compute on.

    ``prefer`` (or the environment variable ``DLARCH_DEVICE``) forces a choice such as
    ``"cpu"`` or ``"cuda:0"``; otherwise CUDA is used when present, else the CPU.
    """
    choice = prefer or os.environ.get("DLARCH_DEVICE")
    if choice:
        device = torch.device(choice)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {choice!r} requested but CUDA is not available")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_size(size: str | None = None) -> str:
    """Return the run size: ``size``, else ``$DLARCH_SIZE``, else by hardware."""
    chosen = size or os.environ.get("DLARCH_SIZE") or ("full" if torch.cuda.is_available() else "ci")
    if chosen not in SIZES:
        raise ValueError(f"unknown run size {chosen!r}; expected one of {SIZES}")
    return chosen


@dataclass(frozen=True)
class RunConfig:
    """What a chapter runs with: seed, device and size."""

    seed: int
    device: torch.device
    size: str
    threads: int

    @property
    def is_ci(self) -> bool:
        """True at the small ``"ci"`` size."""
        return self.size == "ci"

    def pick(self, *, ci: T, full: T) -> T:
        """Choose a setting by run size, e.g. ``epochs = RUN.pick(ci=10, full=100)``."""
        return ci if self.size == "ci" else full

    def __str__(self) -> str:  # one line for the setup cell
        return (
            f"seed {self.seed} | device {self.device} | size {self.size!r} | "
            f"torch {torch.__version__} | threads {self.threads}"
        )


def apply_thread_setting() -> None:
    """Set torch's CPU thread count from ``$DLARCH_THREADS`` when it is set (else leave it).

    The test suite runs two notebooks, or two test processes, at once on two cores with one
    thread each: two threads per process would oversubscribe the cores, and a thread descheduled
    in the middle of a parallel region stalls the others for milliseconds.
    """
    threads_env = os.environ.get("DLARCH_THREADS")
    if threads_env:
        if not threads_env.isdigit() or int(threads_env) < 1:
            raise ValueError(f"DLARCH_THREADS must be a positive integer, got {threads_env!r}")
        torch.set_num_threads(int(threads_env))


def setup(seed: int = 0, size: str | None = None, device: str | None = None, quiet: bool = False) -> RunConfig:
    """Prepare a chapter: seed everything, choose device and size, set plot style.

    The number of CPU threads torch uses can be set with ``$DLARCH_THREADS``
    (:func:`apply_thread_setting`).
    """
    apply_thread_setting()
    seed_everything(seed)
    from dlarch_lib.viz import set_style

    set_style()
    config = RunConfig(seed=seed, device=pick_device(device), size=run_size(size), threads=torch.get_num_threads())
    if not quiet:
        print(config)
    return config


def describe(config: RunConfig) -> dict[str, Any]:
    """The run configuration as a plain dict (for logs and glue)."""
    return {"seed": config.seed, "device": str(config.device), "size": config.size, "threads": config.threads}
