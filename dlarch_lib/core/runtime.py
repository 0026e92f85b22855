"""Seeding, device choice and the run size every chapter starts from.

Each chapter runs at one of two sizes:

- ``"ci"``: small enough to finish in at most 45 seconds on a 2-core CPU (the test machine);
- ``"full"``: larger models and longer training for a GPU (Colab, a workstation).

The size defaults to ``"full"`` when CUDA is available and ``"ci"`` otherwise; the
environment variable ``DLARCH_SIZE`` overrides it.

The conventions every chapter and every library function follow:

- **Device.** ``RUN.device`` is the one device of a run. A chapter moves each model there once
  (``model.to(RUN.device)``); every training, evaluation and inference function then takes the
  device from the model. With ``DLARCH_DEVICE_AUDIT=1`` (the test suite sets it) the run's device
  is the CPU under another name (``cpu:0``), models remember what they were moved to, and
  :func:`check_placed` -- called by the training engine -- fails a model that was built or moved
  without ``RUN.device``: a chapter that would train on the CPU beside a GPU fails on a CPU too.
- **Randomness.** :func:`setup` seeds the notebook's global generators once. Library functions
  never reseed them: they draw from a ``torch.Generator`` the caller passes, or run their own
  seeded block inside :func:`seeded`, which restores the caller's generator state afterwards.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import random
import subprocess
import sys
from collections.abc import Iterator
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
    np.random.seed(seed)  # noqa: NPY002 (seeding NumPy's global generator is this function's job)
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's global generator seeded to ``seed``; restore the caller's state after.

    For library code whose randomness is the global generator's (module initialisation, dropout,
    ``DataLoader`` shuffling): the block is reproducible from ``seed``, and the notebook's own
    random stream continues after the call exactly as if the call had not happened.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


AUDIT_DEVICE = torch.device("cpu", 0)
"""The run's device under ``DLARCH_DEVICE_AUDIT=1``: the CPU, under a name no default can produce."""

_run_device: torch.device | None = None  # RUN.device of the latest setup(), for check_placed


def _audit_enabled() -> bool:
    return os.environ.get("DLARCH_DEVICE_AUDIT") == "1"


def _install_placement_audit() -> None:
    """Make ``Module.to`` / ``cuda`` / ``cpu`` remember the device each module was moved to."""
    if getattr(torch.nn.Module, "_dlarch_audited", False):
        return
    original_to = torch.nn.Module.to

    def to(self: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        result = original_to(self, *args, **kwargs)
        if device is not None:
            for module in self.modules():
                module._dlarch_device = device  # type: ignore[assignment]
        return result

    torch.nn.Module.to = to  # type: ignore[method-assign, assignment]
    torch.nn.Module._dlarch_audited = True  # type: ignore[attr-defined]


def check_placed(model: torch.nn.Module) -> None:
    """Under ``DLARCH_DEVICE_AUDIT=1``: raise unless every module of ``model`` holding parameters
    was moved to ``RUN.device`` (else do nothing). The training engine calls this before it trains.
    """
    if not _audit_enabled() or _run_device is None:
        return
    for name, module in model.named_modules():
        if next(module.parameters(recurse=False), None) is None:
            continue
        placed = getattr(module, "_dlarch_device", None)
        if placed != _run_device:
            where = f"module {name!r} ({type(module).__name__})" if name else f"the model ({type(module).__name__})"
            raise RuntimeError(
                f"{where} was {'moved to ' + str(placed) if placed is not None else 'never moved'}, "
                f"not to the run's device {_run_device}: build it, then move it once with model.to(RUN.device)"
            )


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


def _device_name(device: torch.device) -> str:
    """``"cpu"`` for the CPU under any index (the audit's ``cpu:0`` included), else ``str(device)``."""
    return "cpu" if device.type == "cpu" else str(device)


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
            f"seed {self.seed} | device {_device_name(self.device)} | size {self.size!r} | "
            f"torch {torch.__version__} | threads {self.threads}"
        )


def _apply_thread_setting() -> None:
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

    The number of CPU threads torch uses can be set with ``$DLARCH_THREADS``.
    """
    global _run_device
    _apply_thread_setting()
    seed_everything(seed)
    from dlarch_lib.core.viz import set_style

    set_style()
    chosen = pick_device(device)
    if _audit_enabled() and chosen.type == "cpu":
        _install_placement_audit()
        chosen = AUDIT_DEVICE
    _run_device = chosen
    config = RunConfig(seed=seed, device=chosen, size=run_size(size), threads=torch.get_num_threads())
    if not quiet:
        print(config)
    return config


def describe(config: RunConfig) -> dict[str, Any]:
    """The run configuration as a plain dict (for logs and glue)."""
    return {"seed": config.seed, "device": _device_name(config.device), "size": config.size, "threads": config.threads}


def extra_requirements(group: str) -> list[str]:
    """The requirements of ``dlarch_lib``'s optional dependency ``group`` (``pyproject.toml``), e.g.
    ``extra_requirements("onnx") == ["onnx>=1.17", "onnxruntime>=1.20"]``."""
    from packaging.requirements import Requirement

    groups: dict[str, list[str]] = {}
    for line in importlib.metadata.requires("dlarch_lib") or []:
        requirement = Requirement(line)
        marker = str(requirement.marker or "")
        if marker.startswith("extra =="):
            name = marker.split("==", 1)[1].strip().strip("\"'")
            requirement.marker = None
            groups.setdefault(name, []).append(str(requirement))
    if group not in groups:
        raise ValueError(f"dlarch_lib has no optional dependency group {group!r}; groups: {sorted(groups)}")
    return [r for r in groups[group] if not r.startswith("dlarch_lib")]


def _satisfied(requirement: str) -> bool:
    from packaging.requirements import Requirement

    parsed = Requirement(requirement)
    try:
        return parsed.specifier.contains(importlib.metadata.version(parsed.name), prereleases=True)
    except importlib.metadata.PackageNotFoundError:
        return False


def require(group: str, *, install: bool = True) -> list[str]:
    """Make this runtime hold what the optional dependency ``group`` needs; return what was missing.

    A chapter that needs more than the core calls this in its second cell, e.g.
    ``dl.require("onnx")``: where a requirement is absent or outside its range (Colab ships no onnx,
    onnxruntime, optuna or otter-grader), it is installed with pip, in the declared range. With
    ``install=False`` nothing is installed and a missing requirement is an error.
    """
    missing = [r for r in extra_requirements(group) if not _satisfied(r)]
    if missing and not install:
        raise ModuleNotFoundError(f"this runtime lacks {missing} (pip install 'dlarch_lib[{group}]')")
    if missing:
        with _install_lock():  # two chapters run at once (the tests) must not pip-install into one env together
            missing = [r for r in missing if not _satisfied(r)]  # another process may have installed them
            if missing:
                print(f"installing {', '.join(missing)} for this chapter ...")
                subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)
                importlib.invalidate_caches()
    return missing


@contextlib.contextmanager
def _install_lock() -> Iterator[None]:
    """An exclusive lock on this Python environment (a file beside its site-packages), where ``fcntl`` exists."""
    try:
        import fcntl
    except ImportError:  # Windows: no concurrent test runs to guard against
        yield
        return
    with open(os.path.join(sys.prefix, ".dlarch-require.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
