"""Grade many notebooks of one assignment in one process, with otter-grader's own grading code.

    python tools/grade_variants.py AUTOGRADER_ZIP BASE.ipynb [NOTEBOOK.ipynb ...] --out report.json

``otter run`` (``tools/assign.py grade``) starts a new process and a new Jupyter kernel per
notebook, and every kernel imports torch and dlarch_lib and runs the chapter's setup cells again:
about 7 s a notebook, most of it the same work each time. Notebooks that differ only from their
first solution cell on (the reference solution, its wrong answers in tests/assignment_mutants,
the student stub) can share that work. For one assignment:

1. the autograder zip is unpacked and its tests put beside the submission by otter's own runner
   (``create_runner(...).prepare_files()``), in the layout ``otter run`` grades in;
2. each notebook becomes the notebook ``otter run`` executes, by otter's own
   ``GradingPreprocessor`` (a first cell that puts otter in grading mode; a last cell that runs
   every test file not checked yet and pickles otter's ``GradingResults``; the cells tagged
   ``otter_ignore`` left out, such as the hand-out's cell that writes its public tests);
3. the code cells before BASE's first solution cell (otter's first cells, the setup and import
   cells) run once, in an IPython shell (its transformers: magics work as in a kernel);
4. per notebook the process forks: the child, a copy-on-write copy of that state, runs the rest of
   *its* notebook (solutions, ``grader.check`` cells, otter's last cell); the parent reads the
   pickled results and makes otter's results.json of them (``GradingResults.to_gradescope_dict``
   with the zip's config), as ``otter run`` does.

A notebook whose cells before that point differ from BASE's is refused (grade it with
``otter run``). Every child starts from the same state, so no notebook can change what the next
one sees; tests/test_assignments.py checks that all the same (BASE graded first and again last)
and that BASE grades here exactly as under ``otter run``.

:class:`Server` (what the tests use) keeps one process that has imported torch, IPython and otter
and forks a process per assignment from it. Between notebooks and between assignments, a parent
imports the modules its children imported (modules only; no name enters a notebook), so that
the next children find them loaded: libraries import lazily (torch's ``testing.assert_close``
loads ``torch.distributed.tensor`` and sympy on first use, over a second) and a child's imports
die with it.

Forked children must not inherit a multi-threaded runtime (OpenMP is not fork-safe): torch runs
one thread (``$DLARCH_THREADS`` is set to 1 here, as tools/dev.sh test sets it) and the report
counts the threads alive at each fork. Matplotlib draws with the non-GUI backend Agg. The shared
cells must run without error (the notebooks' own cells may fail, as under ``otter run``).

Time limits: a cell ``--cell-timeout`` (CELL_TIMEOUT_S), a notebook ``--timeout``
(NOTEBOOK_TIMEOUT_S: its child is killed and its row says so), an assignment under the server
ASSIGNMENT_TIMEOUT_S (its process is killed); a forked process dies with its parent.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import json
import os
import pickle
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zipfile
from collections.abc import Callable
from glob import glob
from pathlib import Path

SOLUTION_TAG = "otter_assign_solution_cell"  # otter assign's tag of the cells a student writes
CELL_TIMEOUT_S = 120
NOTEBOOK_TIMEOUT_S = 300
ASSIGNMENT_TIMEOUT_S = 600  # one assignment under the server (a notebook takes about 0.3 s here)
# imported by the server before it forks: every grading of this book's notebooks imports them
PRELOAD = [
    "torch",
    "numpy",
    "nbformat",
    "IPython.core.interactiveshell",
    "otter",
    "otter.execute",
    "otter.execute.preprocessor",
    "otter.run.run_autograder.runners",
    "otter.test_files",
]


class CellTimeout(BaseException):
    """Raised in a cell over its time limit (a BaseException: ``except Exception`` in a notebook
    does not swallow it)."""


# --------------------------------------------------------------------------- one assignment


def _closed_port() -> int:
    """A local port nothing listens on: otter's first cell sends its log records there, where they
    are dropped (``otter run`` receives them in its own process; here the notebook runs in this
    one, and a server here would receive its own records again and again)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _time_limit(seconds: float):
    def expire(signum, frame):
        raise CellTimeout(f"cell ran over its time limit of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _die_with_parent(parent: int) -> None:
    """In a forked child: get SIGKILL when the parent dies (Linux), so no orphan grades on."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before that
        os._exit(9)


def _redirect_output(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1), os.dup2(fd, 2)
    os.close(fd)


def _fork(work: Callable[[], None]) -> int:
    """Run ``work()`` in a forked child that dies with this process; the child's pid.

    The child leaves with ``os._exit`` (0, or 3 after printing the traceback of an exception),
    without the interpreter's cleanup, which belongs to the parent."""
    sys.stdout.flush(), sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            _die_with_parent(parent)
            work()
        except BaseException:
            traceback.print_exc()
            code = 3
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
    return pid


def _wait(pid: int, deadline: float) -> int | None:
    """Wait for a child until ``deadline`` (perf_counter); its exit code, or None: killed then."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.perf_counter() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.01)


def _preload(modules: list[str]) -> int:
    """Import modules (ignoring names that are not importable); how many were not."""
    failed = 0
    for name in modules:
        if name in sys.modules or name.startswith("__"):
            continue
        try:
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
                importlib.import_module(name)
        except BaseException:  # aliases and other entries of sys.modules that are no importable module
            failed += 1
    return failed


class Grader:
    """One assignment's grading: unpacked zip, shared cells run once, a forked child per notebook."""

    def __init__(self, zip_path: Path, base: Path, cell_timeout: float, work: Path):
        import nbformat
        from otter.run.run_autograder.runners import create_runner
        from otter.utils import OTTER_CONFIG_FILENAME

        self.nbformat, self.cell_timeout, self.work = nbformat, cell_timeout, work
        ag_dir = work / "autograder"
        for sub in ("source", "submission", "results"):
            (ag_dir / sub).mkdir(parents=True)
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(ag_dir / "source")
        config_path = ag_dir / "source" / OTTER_CONFIG_FILENAME
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        # as `otter run` does (otter.run.main -> run_autograder.main -> PythonRunner.run)
        self.runner = create_runner(config, autograder_dir=str(ag_dir), logo=False, debug=False)
        self.runner.ag_config.otter_run = True
        os.chdir(ag_dir)
        self.runner.prepare_files()  # the zip's tests/ into submission/, __init__.py files
        os.chdir(ag_dir / "submission")
        self.port = _closed_port()
        shutil.copy(base, base.name)  # where otter run has the submission (validate_submission reads it)
        self.runner.validate_submission(base.name)
        cells = self.code_cells(base, work / "base.pkl")
        split = next((i for i, c in enumerate(cells) if SOLUTION_TAG in c.metadata.get("tags", [])), None)
        if split is None:
            raise ValueError(f"{base}: no solution cell (tag {SOLUTION_TAG!r})")
        self.shared = [c.source for c in cells[:split]]
        self.shell = self._make_shell()
        self.threads_at_fork, self.imported = 0, []

    def code_cells(self, notebook: Path, results_path: Path) -> list:
        """The code cells ``otter run`` executes for ``notebook``: otter's GradingPreprocessor,
        configured as otter's grade_notebook configures it for the PythonRunner."""
        from otter.execute import preprocessor as otter_pre
        from otter.utils import NBFORMAT_VERSION
        from traitlets.config import Config

        nb = self.nbformat.read(notebook, as_version=NBFORMAT_VERSION)
        ag = self.runner.ag_config
        c = Config()
        c.GradingPreprocessor.cwd = os.getcwd()
        c.GradingPreprocessor.test_dir = "./tests"
        c.GradingPreprocessor.tests_glob = sorted(glob("./tests/*.py"))
        c.GradingPreprocessor.results_path = str(results_path)
        c.GradingPreprocessor.seed = ag.seed
        c.GradingPreprocessor.seed_variable = ag.seed_variable
        c.GradingPreprocessor.otter_log = None
        c.GradingPreprocessor.variables = ag.serialized_variables
        c.GradingPreprocessor.logging_server_host = "localhost"
        c.GradingPreprocessor.logging_server_port = self.port
        c.GradingPreprocessor.force_python3_kernel = not ag.otter_run
        # otter names its grader object notebook_<6 random characters>: the same name in every
        # notebook keeps the shared cells identical
        names = iter(f"DLARCH{i}" for i in range(10_000))
        real = otter_pre.id_generator
        otter_pre.id_generator = lambda *a, **k: next(names)
        try:
            nb, _ = otter_pre.GradingPreprocessor(config=c).preprocess(nb)
        finally:
            otter_pre.id_generator = real
        return [cell for cell in nb.cells if cell.cell_type == "code"]

    @staticmethod
    def _make_shell():
        from IPython.core.interactiveshell import InteractiveShell
        from traitlets.config import Config

        c = Config()
        c.HistoryManager.enabled = False  # no history database, and no history thread to fork
        c.InteractiveShell.colors = "nocolor"
        c.InteractiveShell.xmode = "Plain"
        return InteractiveShell.instance(config=c)

    def run_cells(self, cells: list[str]) -> list[str]:
        """Execute cells as a kernel does, errors allowed (``otter run`` ignores them too); returns
        the errors. A cell over the time limit raises CellTimeout."""
        errors = []
        for source in cells:
            start = time.perf_counter()
            with _time_limit(self.cell_timeout):
                result = self.shell.run_cell(source, store_history=True)
            first = source.strip().splitlines()[0][:60] if source.strip() else ""
            print(f"[grade_variants] {time.perf_counter() - start:.2f} s: {first}")
            error = result.error_before_exec or result.error_in_exec
            if isinstance(error, CellTimeout):
                raise error
            if error is not None:
                errors.append(f"{type(error).__name__}: {error}")
            sys.stdout.flush(), sys.stderr.flush()
        return errors

    def run_shared(self) -> float:
        start, before = time.perf_counter(), set(sys.modules)
        errors = self.run_cells(self.shared)
        if errors:
            raise RuntimeError(f"the shared cells failed: {errors}")
        self.imported += [m for m in list(sys.modules) if m not in before]
        return time.perf_counter() - start

    def grade(self, notebook: Path, index: int, timeout: float, log: Path) -> dict:
        """Grade one notebook in a forked child; its row with otter's results.json ``tests``."""
        from otter.test_files import GradingResults

        start = time.perf_counter()
        row = {"submission": str(notebook), "tests": [], "seconds": 0.0, "error": "", "log": str(log)}
        try:
            self.runner.validate_submission(str(notebook))
        except Exception as e:  # another assignment: otter run refuses it too
            row["error"] = f"{type(e).__name__}: {e}"
            return row
        pkl, listing = self.work / f"{index:03d}.pkl", self.work / f"{index:03d}.modules"
        cells = self.code_cells(notebook, pkl)
        if [c.source for c in cells[: len(self.shared)]] != self.shared:
            row["error"] = (
                "its cells before the first solution cell differ from the base notebook's: grade it with otter run"
            )
            return row
        self.threads_at_fork = max(self.threads_at_fork, threading.active_count())

        def rest_of_notebook() -> None:
            _redirect_output(log)
            before = set(sys.modules)
            errors = self.run_cells([c.source for c in cells[len(self.shared) :]])
            print(f"[grade_variants] errors in cells (allowed, as under otter run): {errors}")
            listing.write_text("\n".join(m for m in list(sys.modules) if m not in before))

        code = _wait(_fork(rest_of_notebook), start + timeout)
        row["seconds"] = time.perf_counter() - start
        if code is None:
            row["error"] = f"ran over its time limit of {timeout:g} s"
        elif code != 0:
            row["error"] = f"grading process failed (exit code {code}); its output: {log}"
        if row["error"]:
            return row
        if listing.exists():
            modules = listing.read_text().split()
            self.imported += modules
            _preload(modules)
        try:  # as otter's grade_notebook reads what the notebook's last cell pickled
            with open(pkl, "rb") as f:
                results = pickle.load(f)
        except Exception as e:
            results = GradingResults.without_results(e)
        row["tests"] = results.to_gradescope_dict(self.runner.ag_config)["tests"]
        return row


def grade_assignment(
    zip_path: Path,
    base: Path,
    notebooks: list[Path],
    logs: Path,
    cell_timeout: float = CELL_TIMEOUT_S,
    notebook_timeout: float = NOTEBOOK_TIMEOUT_S,
) -> dict:
    """Grade ``notebooks`` (BASE's shared cells run once, in this process, which should be one of
    its own: it changes directory and runs notebook code). The report: ``{"setup_seconds",
    "shared_cells", "torch_threads", "threads_at_fork", "imported", "results": [{"submission",
    "tests", "seconds", "error", "log"}, ...]}``, one result per notebook, in order; ``tests`` as
    in otter's results.json."""
    import torch

    logs.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="grade_variants_"))
    try:
        grader = Grader(zip_path, base, cell_timeout, work)
        setup_seconds = grader.run_shared()
        results = [grader.grade(nb, i, notebook_timeout, logs / f"{i:03d}.log") for i, nb in enumerate(notebooks)]
        return {
            "setup_seconds": setup_seconds,
            "shared_cells": len(grader.shared),
            "torch_threads": torch.get_num_threads(),
            "threads_at_fork": grader.threads_at_fork,
            "imported": list(dict.fromkeys(grader.imported)),
            "results": results,
        }
    finally:
        os.chdir("/")
        shutil.rmtree(work, ignore_errors=True)


def _prepare_process() -> None:
    threads = os.environ.get("DLARCH_THREADS", "1")
    if threads != "1":
        print(
            f"grade_variants: DLARCH_THREADS={threads} ignored: forked processes need a single-threaded torch "
            "(OpenMP is not fork-safe)",
            file=sys.stderr,
        )
    os.environ["DLARCH_THREADS"] = os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MPLBACKEND"] = "Agg"  # no GUI backend (a kernel would draw inline)
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    import torch

    torch.set_num_threads(1)


# --------------------------------------------------------------------------- the server


def serve() -> None:
    """Read requests, one JSON line each, on stdin; grade each assignment in a forked process;
    answer one JSON line each: ``{"ok", "error", "seconds"}`` (the report is in the request's
    ``out``)."""
    _prepare_process()
    _preload(PRELOAD)
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else printed goes to the server's log, not into the answers
    for line in sys.stdin:
        request = json.loads(line)
        out, logs = Path(request["out"]), Path(request["logs"])
        logs.mkdir(parents=True, exist_ok=True)
        start, threads = time.perf_counter(), threading.active_count()

        def one_assignment(request: dict = request, logs: Path = logs, out: Path = out, threads: int = threads) -> None:
            answers.close()
            _redirect_output(logs / "assignment.log")
            report = grade_assignment(
                Path(request["zip"]),
                Path(request["base"]),
                [Path(n) for n in request["notebooks"]],
                logs,
                request["cell_timeout"],
                request["notebook_timeout"],
            )
            report["server_threads_at_fork"] = threads
            out.write_text(json.dumps(report, indent=1))

        code = _wait(_fork(one_assignment), start + request["timeout"])
        log = logs / "assignment.log"
        error = (
            ""
            if code == 0 and out.exists()
            else f"ran over its time limit of {request['timeout']:g} s"
            if code is None
            else f"grading process failed (exit code {code}): " + (log.read_text()[-3000:] if log.exists() else "")
        )
        imported = [] if error else json.loads(out.read_text())["imported"]  # before the client removes it
        answers.write(json.dumps({"ok": not error, "error": error, "seconds": time.perf_counter() - start}) + "\n")
        answers.flush()
        _preload(imported)  # what the assignment's processes imported, the next assignments find loaded
    answers.close()
    os._exit(0)  # stdin closed: done (skip the interpreter's slow teardown of torch)


class Server:
    """A grading server process (started on first use): ``grade(zip, base, notebooks)`` -> the
    report of :func:`grade_assignment`. ``close()`` ends it."""

    def __init__(self, log: Path):
        self.log, self.proc = log, None

    def _start(self) -> None:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--serve"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                start_new_session=True,
            )

    def grade(
        self,
        zip_path: Path,
        base: Path,
        notebooks: list[Path],
        *,
        cell_timeout: float = CELL_TIMEOUT_S,
        notebook_timeout: float = NOTEBOOK_TIMEOUT_S,
        timeout: float = ASSIGNMENT_TIMEOUT_S,
    ) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        with tempfile.TemporaryDirectory(prefix="grade_variants_") as tmp:
            out = Path(tmp) / "report.json"
            request = {
                "zip": str(zip_path),
                "base": str(base),
                "notebooks": [str(n) for n in notebooks],
                "out": str(out),
                "logs": str(Path(tmp) / "logs"),
                "cell_timeout": cell_timeout,
                "notebook_timeout": notebook_timeout,
                "timeout": timeout,
            }
            try:
                self.proc.stdin.write(json.dumps(request) + "\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                raise RuntimeError(f"the grading server died: {self.log.read_text()[-3000:]}") from None
            # the server's own start (imports) and its limit for the assignment, and some slack
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout + 120)
            answer = self.proc.stdout.readline() if ready else ""
            if not answer:
                self.close()
                raise RuntimeError(
                    f"no answer from the grading server ({'timed out' if not ready else 'it died'}): "
                    f"{self.log.read_text()[-3000:]}"
                )
            answer = json.loads(answer)
            if not answer["ok"]:
                raise RuntimeError(f"grading {base.name} failed: {answer['error']}")
            report = json.loads(out.read_text())
            for row in report["results"]:  # the logs go with the folder
                row["log"] = Path(row["log"]).read_text()[-3000:] if row["error"] and Path(row["log"]).exists() else ""
            return report

    def close(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # and whatever it forked
        self.proc.wait()
        self.proc = None


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    if argv is None and sys.argv[1:] == ["--serve"]:
        return serve()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("autograder", type=Path, help="the assignment's autograder zip")
    parser.add_argument("base", type=Path, help="the notebook whose shared cells run once (e.g. the reference)")
    parser.add_argument("notebooks", type=Path, nargs="*", help="notebooks to grade (BASE is graded only if listed)")
    parser.add_argument("--out", type=Path, required=True, help="the JSON report")
    parser.add_argument("--logs", type=Path, help="the notebooks' output, one file each (default: discarded)")
    parser.add_argument("--cell-timeout", type=float, default=CELL_TIMEOUT_S)
    parser.add_argument("--timeout", type=float, default=NOTEBOOK_TIMEOUT_S, help="per notebook")
    args = parser.parse_args(argv)
    _prepare_process()
    out = args.out.resolve()
    with tempfile.TemporaryDirectory(prefix="grade_variants_logs_") as tmp:
        logs = args.logs.resolve() if args.logs else Path(tmp)
        report = grade_assignment(
            args.autograder.resolve(),
            args.base.resolve(),
            [n.resolve() for n in args.notebooks],
            logs,
            args.cell_timeout,
            args.timeout,
        )
        for row in report["results"]:
            scores = ", ".join(
                f"{t['name']} {t['score']:g}/{t['max_score']:g}" for t in row["tests"] if "max_score" in t
            )
            print(f"{row['seconds']:6.2f} s  {row['submission']}  {row['error'] or scores}")
            if row["error"] and not args.logs:
                print(Path(row["log"]).read_text()[-3000:] if Path(row["log"]).exists() else "")
            row["log"] = row["log"] if args.logs else ""
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
