"""pytest wiring for the book: thread count, hardware gating of notebook cells, the notebook run.

- ``$DLARCH_THREADS`` sets torch's thread count in the test processes too (as ``dl.setup`` does
  in the notebooks), so that two workers on two cores do not oversubscribe them.
- Cells tagged ``requires-cuda``, ``requires-2-gpus`` or ``requires-tensorrt`` are skipped,
  with the reason, when that hardware is missing (rules in ``dlarch_lib.hardware``).
- ``tests/nbrun.py`` keeps what nbval executed (the executed notebooks the websites render) and
  ends every run that executes notebooks with the table of wall time per notebook.
"""

from __future__ import annotations

from dlarch_lib.hardware import apply_cell_gating
from dlarch_lib.runtime import apply_thread_setting

pytest_plugins = ["tests.nbrun"]


def pytest_configure(config):
    # the library tests, like the notebooks, use $DLARCH_THREADS threads (1 under tools/dev.sh test)
    apply_thread_setting()


def pytest_collection_modifyitems(config, items):
    apply_cell_gating(items)
