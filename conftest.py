"""pytest wiring for the book: hardware gating of notebook cells and the timing table.

- ``$DLARCH_THREADS`` sets torch's thread count in the test processes too (as ``dl.setup`` does
  in the notebooks), so that two workers on two cores do not oversubscribe them.
- Cells tagged ``requires-cuda``, ``requires-2-gpus`` or ``requires-tensorrt`` are skipped,
  with the reason, when that hardware is missing (rules in ``dlarch_lib.hardware``).
- Every run that executes notebooks ends with a table of wall time per notebook; it is
  also written to ``_build/timings/notebooks.{csv,md}`` for the website's statistics page.
  A notebook over ``DLARCH_NB_BUDGET_S`` (60 s) is flagged; over ``DLARCH_NB_FAIL_S``
  (90 s, room for a noisy machine) the run fails.
- The node ids of the failed tests go to ``_build/timings/failed.txt``, from which
  ``tools/failed_notebooks.py`` picks the notebooks ``tools/dev.sh test`` runs once more. That
  second run sets ``DLARCH_NB_RERUN=1``: its rows replace those notebooks' rows in the table,
  marked "rerun", instead of replacing the whole table.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from dlarch_lib.hardware import apply_cell_gating
from dlarch_lib.runtime import apply_thread_setting

ROOT = Path(__file__).parent
TIMINGS_DIR = ROOT / "_build" / "timings"
BUDGET_S = float(os.environ.get("DLARCH_NB_BUDGET_S", "60"))
FAIL_S = float(os.environ.get("DLARCH_NB_FAIL_S", "90"))
_seconds: dict[str, float] = defaultdict(float)
_failed: set[str] = set()
_failed_nodes: list[str] = []
RERUN = os.environ.get("DLARCH_NB_RERUN") == "1"


def pytest_configure(config):
    # the library tests, like the notebooks, use $DLARCH_THREADS threads (1 under tools/dev.sh test)
    apply_thread_setting()


def pytest_collection_modifyitems(config, items):
    apply_cell_gating(items)


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    if report.failed:
        _failed_nodes.append(report.nodeid)
    if path.endswith(".ipynb"):
        _seconds[path] += report.duration
        if report.failed:
            _failed.add(path)


def _is_controller(config) -> bool:
    return not hasattr(config, "workerinput")


def _earlier_rows() -> dict[str, tuple[float, str]]:
    """The table of the first run, which a rerun of some notebooks updates."""
    csv = TIMINGS_DIR / "notebooks.csv"
    if not RERUN or not csv.exists():
        return {}
    rows = {}
    for line in csv.read_text().splitlines()[1:]:
        path, seconds, status = line.split(",", 2)
        rows[path] = (float(seconds), status)
    return rows


def _table() -> list[tuple[str, float, str]]:
    rows = _earlier_rows()
    for path, seconds in _seconds.items():
        status = "FAILED" if path in _failed else ("over budget" if seconds > BUDGET_S else "ok")
        rows[path] = (seconds, f"{status} (rerun)" if RERUN else status)
    return [(path, seconds, status) for path, (seconds, status) in sorted(rows.items())]


def pytest_sessionfinish(session, exitstatus):
    if not _seconds or not _is_controller(session.config):
        return
    rows = _table()
    TIMINGS_DIR.mkdir(parents=True, exist_ok=True)
    (TIMINGS_DIR / "failed.txt").write_text("".join(f"{node}\n" for node in _failed_nodes))
    with open(TIMINGS_DIR / "notebooks.csv", "w") as f:
        f.write("notebook,seconds,status\n")
        f.writelines(f"{p},{s:.1f},{st}\n" for p, s, st in rows)
    with open(TIMINGS_DIR / "notebooks.md", "w") as f:
        f.write("| notebook | seconds | status |\n|---|---:|---|\n")
        f.writelines(f"| {p} | {s:.1f} | {st} |\n" for p, s, st in rows)
        f.write(f"| **total** | **{sum(s for _, s, _ in rows):.1f}** | |\n")
    if any(s > FAIL_S for p, s, _ in rows if p in _seconds) and session.exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _seconds or not _is_controller(config):
        return
    rows = _table()
    tr = terminalreporter
    tr.section(f"notebook wall time (budget {BUDGET_S:.0f} s each, fail above {FAIL_S:.0f} s)")
    width = max(len(p) for p, _, _ in rows)
    for path, seconds, status in rows:
        tr.write_line(f"{path:<{width}}  {seconds:7.1f} s  {status}")
    tr.write_line(f"{'total':<{width}}  {sum(s for _, s, _ in rows):7.1f} s  ({len(rows)} notebooks)")
    over = [p for p, s, _ in rows if s > FAIL_S and p in _seconds]
    if over:
        tr.write_line(f"FAIL: over {FAIL_S:.0f} s: {', '.join(over)}", red=True)
