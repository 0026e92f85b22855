"""What hardware is present, and which notebook cells may run here.

Cells that need hardware the test machine lacks carry a tag; :data:`CELL_REQUIREMENTS`
maps each tag to a predicate that must hold for the cell to run, and a reason shown
when it is skipped. The test suite's ``conftest.py`` applies these rules to nbval's
cells (:func:`skip_reason`), and chapters call the same predicates to guard the cells at run time.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@functools.cache
def gpu_count() -> int:
    """Number of CUDA GPUs visible to torch (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def has_tensorrt() -> bool:
    """True when the ``tensorrt`` Python package can be imported."""
    return importlib.util.find_spec("tensorrt") is not None


@dataclass(frozen=True)
class Requirement:
    """A hardware requirement: ``present()`` must be true for a tagged cell to run."""

    present: Callable[[], bool]
    reason: str


CELL_REQUIREMENTS: dict[str, Requirement] = {
    "requires-cuda": Requirement(lambda: gpu_count() >= 1, "needs a CUDA GPU"),
    "requires-2-gpus": Requirement(lambda: gpu_count() >= 2, "needs at least 2 CUDA GPUs"),
    "requires-tensorrt": Requirement(has_tensorrt, "needs the tensorrt package (and a CUDA GPU)"),
}
"""Gating tags -> requirement. Gated cells are also tagged ``skip-execution`` for the site build."""

GATING_TAGS = frozenset(CELL_REQUIREMENTS)


def skip_reason(tags: Iterable[str]) -> str | None:
    """The reason a cell with these tags cannot run here, or ``None`` if it can.

    >>> skip_reason(["hide-input"]) is None
    True
    """
    for tag in tags:
        requirement = CELL_REQUIREMENTS.get(tag)
        if requirement is not None and not requirement.present():
            return f"[{tag}] {requirement.reason}"
    return None


def explain_missing(tag: str) -> str:
    """A one-line message for a reader whose runtime lacks what ``tag`` needs."""
    if tag not in CELL_REQUIREMENTS:
        raise KeyError(f"unknown gating tag {tag!r}; known: {sorted(CELL_REQUIREMENTS)}")
    return f"Skipped: this cell {CELL_REQUIREMENTS[tag].reason} (found {gpu_count()} GPU(s))."
