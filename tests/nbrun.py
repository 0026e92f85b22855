"""pytest plugin beside nbval: one execution of every notebook serves every check and both websites.

nbval runs each code cell of a notebook in one kernel (``--nbval-lax``: a cell fails on an
exception, including a failed ``assert``). This plugin keeps what nbval saw:

- **Executed notebooks.** After each cell runs, the outputs nbval collected (streams, displays,
  figures, ``glue`` data) become the cell's outputs, and when a notebook's last cell is done the
  whole notebook is written to ``_build/executed/<path>`` with its verdict and wall time in the
  metadata (``dlarch_run``). Cells nbval did not run (hardware-gated cells skipped on this machine)
  keep their recorded outputs. ``tools/nb.py cache-executed`` then puts the notebooks that passed
  into the jupyter-cache the website builds read, so neither website executes a chapter again.
- **The timing table.** Every run that executes notebooks ends with a table of wall time per
  notebook (kernel start included), also written to ``_build/timings/notebooks.csv`` for the
  website's statistics page (with ``DLARCH_NB_APPEND=1`` merged into the table an earlier session
  of the same run wrote), beside ``runtime.csv``: the Python and packages the notebooks ran in.
  A notebook over ``DLARCH_NB_BUDGET_S`` (45 s, the book's budget) is
  flagged; over ``DLARCH_NB_FAIL_S`` (60 s: wall time is the one measurement here that load can
  stretch, and a landing must not fail on a burst of it) the run fails.

It works with pytest-xdist (``--dist loadfile``: each notebook runs whole on one worker, which
writes it; the controller, which sees every report, writes the table).

- **Gated cells alone.** With ``DLARCH_GATED_ALONE_DIR`` set (``tools/gpu.sh``, which runs several
  notebooks at once on one GPU), a hardware-gated cell, whose output is recorded for the website,
  runs while no other worker runs a cell: it takes an exclusive lock in that folder that every
  other cell takes shared, so what it measures is the GPU alone, not the GPU shared.
"""

from __future__ import annotations

import contextlib
import csv
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
# where the executed notebooks and the timing table go (environment variables for the plugin's own test)
EXECUTED_DIR = Path(os.environ.get("DLARCH_EXECUTED_DIR", ROOT / "_build" / "executed"))
TIMINGS_DIR = Path(os.environ.get("DLARCH_TIMINGS_DIR", ROOT / "_build" / "timings"))
BUDGET_S = float(os.environ.get("DLARCH_NB_BUDGET_S", "45"))
FAIL_S = float(os.environ.get("DLARCH_NB_FAIL_S", "60"))


def _is_cell(item) -> bool:
    return type(item).__name__ == "IPyNbCell"


def _notebook_path(nodeid: str) -> str | None:
    path = nodeid.split("::")[0]
    return path if path.endswith(".ipynb") else None


# --------------------------------------------------------------------------- worker side


class _Recorder:
    """Per notebook (one ``IPyNbFile``): the outputs nbval collected, the verdict and the time."""

    def __init__(self) -> None:
        self.seconds: dict[object, float] = defaultdict(float)
        self.failed: dict[object, list[str]] = defaultdict(list)
        self.counter: dict[object, int] = defaultdict(int)
        self.written: set[object] = set()

    def record(self, item, report) -> None:
        notebook = item.parent
        self.seconds[notebook] += report.duration
        if report.failed:
            self.failed[notebook].append(f"{item.name} ({report.when})")
        outputs = getattr(item, "test_outputs", None)
        if report.when == "call" and outputs is not None:  # nbval ran the cell: keep what it saw
            self.counter[notebook] += 1
            item.cell.outputs = [nbformat.from_dict(dict(o)) for o in outputs]
            for out in item.cell.outputs:
                if out.output_type == "execute_result":
                    out.execution_count = self.counter[notebook]
            item.cell.execution_count = self.counter[notebook]

    def write(self, notebook) -> Path:
        """Write the executed notebook under _build/executed, mirroring its path in the repository."""
        self.written.add(notebook)
        path = Path(str(notebook.fspath)).resolve()
        out = EXECUTED_DIR / path.relative_to(notebook.config.rootpath)
        out.parent.mkdir(parents=True, exist_ok=True)
        nb = notebook.nb
        nb.metadata["dlarch_run"] = {
            "passed": not self.failed[notebook],
            "failed": self.failed[notebook],
            "seconds": round(self.seconds[notebook], 2),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "threads": os.environ.get("DLARCH_THREADS", ""),
        }
        tmp = out.with_suffix(".tmp")
        nbformat.write(nb, tmp)
        tmp.replace(out)
        return out


_recorder = _Recorder()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if _is_cell(item):
        _recorder.record(item, outcome.get_result())


@contextlib.contextmanager
def cell_turn(folder: str, alone: bool) -> Iterator[None]:
    """Hold the turn of one cell among all the processes that use ``folder``: shared by any number
    of ordinary cells, exclusive for a cell that runs ``alone``.

    Two ``flock`` files: ``cells.lock`` is the readers-writer lock; ``turnstile.lock``, taken by
    every cell before it and held by an exclusive cell until it is done, keeps new cells from
    starting while an exclusive one waits, so it waits only for the cells already running."""
    import fcntl

    with (
        open(os.path.join(folder, "turnstile.lock"), "a") as turnstile,
        open(os.path.join(folder, "cells.lock"), "a") as cells,
    ):
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(cells, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            if not alone:
                fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(cells, fcntl.LOCK_UN)
            fcntl.flock(turnstile, fcntl.LOCK_UN)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    folder = os.environ.get("DLARCH_GATED_ALONE_DIR")
    if not folder or not _is_cell(item):
        yield
        return
    from dlarch_lib.core.hardware import GATING_TAGS

    alone = bool(set(item.cell.metadata.get("tags", []) or []) & GATING_TAGS)
    with cell_turn(folder, alone):
        yield


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    # after the teardown of a notebook's last cell (nbval stops its kernel there)
    if _is_cell(item) and (nextitem is None or nextitem.parent is not item.parent):
        _recorder.write(item.parent)


# --------------------------------------------------------------------------- controller side

_seconds: dict[str, float] = defaultdict(float)
_failed: set[str] = set()


def pytest_runtest_logreport(report):
    path = _notebook_path(report.nodeid)
    if path:
        _seconds[path] += report.duration
        if report.failed:
            _failed.add(path)


def _is_controller(config) -> bool:
    return not hasattr(config, "workerinput")


def _rows() -> list[tuple[str, float, str]]:
    rows = []
    for path, seconds in sorted(_seconds.items()):
        status = "FAILED" if path in _failed else (f"over {BUDGET_S:.0f} s" if seconds > BUDGET_S else "ok")
        rows.append((path, seconds, status))
    return rows


def _runtime_rows() -> list[tuple[str, str]]:
    """The runtime the notebooks ran in: this process's Python and packages, which the kernels share."""
    import platform
    import sys
    from importlib import metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    rows = [("Python", sys.version.split()[0]), ("platform", platform.platform(terse=True))]
    rows += [(name, version(name)) for name in ("torch", "numpy", "matplotlib", "scikit-learn", "jax")]
    rows.append(("dlarch_lib", f"{version('dlarch_lib')} (installed by the chapters' setup cells)"))
    return rows


def pytest_sessionfinish(session, exitstatus):
    if not _seconds or not _is_controller(session.config):
        return
    rows = _rows()
    TIMINGS_DIR.mkdir(parents=True, exist_ok=True)
    table = TIMINGS_DIR / "notebooks.csv"
    if os.environ.get("DLARCH_NB_APPEND") == "1" and table.exists():  # a run in several sessions: one table
        ran = {p for p, _, _ in rows}
        kept = [line.strip().split(",") for line in table.read_text().splitlines()[1:]]
        rows = sorted([(p, float(s), st) for p, s, st in kept if p not in ran] + rows)
    with open(table, "w") as f:
        f.write("notebook,seconds,status\n")
        f.writelines(f"{p},{s:.1f},{st}\n" for p, s, st in rows)
    with open(TIMINGS_DIR / "runtime.csv", "w", newline="") as f:
        csv.writer(f).writerows([("component", "version"), *_runtime_rows()])
    if any(s > FAIL_S for _, s, _ in rows) and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _seconds or not _is_controller(config):
        return
    rows = _rows()
    tr = terminalreporter
    tr.section(f"notebook wall time (budget {BUDGET_S:.0f} s each; over {FAIL_S:.0f} s fails the run)")
    width = max(len(p) for p, _, _ in rows)
    for path, seconds, status in rows:
        tr.write_line(f"{path:<{width}}  {seconds:7.1f} s  {status}")
    tr.write_line(f"{'total':<{width}}  {sum(s for _, s, _ in rows):7.1f} s  ({len(rows)} notebooks)")
    over = [p for p, s, _ in rows if s > BUDGET_S]
    if over:
        fail = any(s > FAIL_S for _, s, _ in rows)
        tr.write_line(f"{'FAIL' if fail else 'WARNING'}: over the {BUDGET_S:.0f} s budget: {', '.join(over)}", red=True)
