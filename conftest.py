"""pytest wiring for the book: thread count, device audit, hardware gating, the notebook run.

- ``$DLARCH_THREADS`` sets torch's thread count in the test processes too (as ``dl.setup`` does
  in the notebooks), so that two workers on two cores do not oversubscribe them.
- ``DLARCH_DEVICE_AUDIT=1`` (set here, inherited by the notebook kernels) makes ``dl.setup`` name
  the run's device ``cpu:0`` and the training engine fail any model not moved to ``RUN.device``
  (``dlarch_lib.core.runtime.check_placed``).
- Cells tagged ``requires-cuda``, ``requires-2-gpus`` or ``requires-tensorrt`` are skipped,
  with the reason, when that hardware is missing (rules in ``dlarch_lib.core.hardware``).
- ``tests/nbrun.py`` keeps what nbval executed (the executed notebooks the websites render) and
  ends every run that executes notebooks with the table of wall time per notebook.
"""

from __future__ import annotations

import os

import pytest

from tests.gating import apply_cell_gating

pytest_plugins = ["tests.nbrun"]


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("DLARCH_DEVICE_AUDIT", "1")
    threads = os.environ.get("DLARCH_THREADS")
    if threads:
        if not threads.isdigit() or int(threads) < 1:
            raise pytest.UsageError(f"DLARCH_THREADS must be a positive integer, got {threads!r}")
        import torch

        torch.set_num_threads(int(threads))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    apply_cell_gating(items)
