"""Test plumbing: skip notebook cells whose tags need hardware this machine lacks.

The rules (tag -> predicate, reason) are the library's (``dlarch_lib.core.hardware``), because the
chapters guard their cells at run time with the same predicates; applying them to nbval's cells
is the test suite's business, so it lives here and ``conftest.py`` calls it.
"""

from __future__ import annotations

import pytest

from dlarch_lib.core.hardware import skip_reason


def apply_cell_gating(items: list[pytest.Item]) -> int:
    """Mark nbval cells whose tags need missing hardware as skipped; return how many."""
    try:
        from nbval.plugin import IPyNbCell
    except ImportError:  # nbval not installed: nothing to gate
        return 0
    skipped = 0
    for item in items:
        if isinstance(item, IPyNbCell):
            reason = skip_reason(item.cell.metadata.get("tags", []) or [])
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=reason))
                skipped += 1
    return skipped
