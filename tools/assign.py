"""Course assignments cut from the chapter notebooks and graded with otter-grader.

    python tools/assign.py list                         # chapters with assignments, questions, points
    python tools/assign.py generate [CHAPTER ...]       # student + autograder material -> _assign/
    python tools/assign.py generate --site              # ... and the student edition of the website
    python tools/assign.py site                         # only the student edition -> _student/_build/html
    python tools/assign.py grade SUBMISSIONS [--csv scores.csv] [--jobs 2]

The chapter notebooks stay the single source. A chapter marks its assignment in otter-grader's
own format (https://otter-grader.readthedocs.io, "Otter Assign"): raw cells ``# BEGIN QUESTION``
(YAML: ``name``, ``points``), ``# BEGIN SOLUTION`` / ``# END SOLUTION`` around the cell the student
writes (inside it, ``# BEGIN SOLUTION`` / ``# END SOLUTION`` lines or ``# SOLUTION`` suffixes mark
what the stub replaces by ``...``), ``# BEGIN TESTS`` / ``# END TESTS`` around public test cells and
hidden ones (those start with otter's ``# BEGIN TEST CONFIG`` docstring, ``hidden: true``, and are
tagged ``remove-input`` so the website does not show them), and ``# END QUESTION``. Raw cells
without a format are invisible on the website, and the chapter runs its own tests under nbval.
Code cells tagged ``assignment-setup`` (imports, data) are copied into the assignment too.

``generate`` builds one otter *master* notebook per chapter (setup cells + question blocks, under a
generated title and ``# ASSIGNMENT CONFIG``), then runs ``otter assign`` on it:

    _assign/<chapter>/master/<chapter>.ipynb            what otter assign reads
    _assign/<chapter>/student/<chapter>.ipynb           hand-out: solutions are ``...``, public tests
    _assign/<chapter>/autograder/<chapter>.ipynb        reference solution (instructors)
    _assign/<chapter>/autograder/<chapter>-autograder.zip   all tests incl. hidden (``otter run -a``)
    _assign/<chapter>/{student,autograder}/tests/       the test files, which the notebooks also carry

Each notebook runs its ``grader.check`` cells with nothing beside it, on Colab too
(:func:`make_self_contained`): it installs otter-grader where missing and writes its own tests.

``grade`` runs ``otter run`` (local, no Docker) on every ``*.ipynb`` under SUBMISSIONS against the
autograder zip of its assignment (from the notebook's otter metadata, else its file name) and writes
one CSV row per submission.
"""

from __future__ import annotations

import argparse
import ast
import copy
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
ASSIGN_DIR = ROOT / "_assign"
STUDENT_SITE = ROOT / "_student"
SETUP_TAG = "assignment-setup"
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
BLOCK = re.compile(r"#\s*(BEGIN|END)\s+(QUESTION|SOLUTION|TESTS|PROMPT)\b", re.I)
# time limits of the subprocesses (a process over its limit is killed with its process group)
ASSIGN_TIMEOUT_S = 300  # `otter assign` of one chapter (about 2 s)
GRADE_TIMEOUT_S = 300  # `otter run` of one notebook (about 7 s on an idle 2-core machine)
SITE_TIMEOUT_S = 2 * 3600  # the student edition of the website (executes notebooks missing from the cache)


# --------------------------------------------------------------------------- reading chapters


@dataclass
class Question:
    """One graded question of a chapter: its otter config and the cells of its block."""

    name: str
    points: float
    cells: list = field(default_factory=list)  # nbformat cells, from BEGIN QUESTION to END QUESTION

    @property
    def solution_cells(self) -> list[str]:
        """The sources of the question's solution code cells (what a student writes)."""
        inside, out = False, []
        for cell in self.cells:
            marker = _marker(cell)
            if marker == ("BEGIN", "SOLUTION"):
                inside = True
            elif marker == ("END", "SOLUTION"):
                inside = False
            elif inside and cell.cell_type == "code":
                out.append(cell.source)
        return out

    @property
    def solution_source(self) -> str:
        """All of the question's solution code, one string."""
        return "\n".join(self.solution_cells)


def _marker(cell) -> tuple[str, str] | None:
    """(BEGIN|END, QUESTION|SOLUTION|TESTS|PROMPT) for an otter raw boundary cell, else None."""
    if cell.cell_type != "raw":
        return None
    first = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
    m = BLOCK.fullmatch(first.strip())
    return (m.group(1).upper(), m.group(2).upper()) if m else None


def _is_hidden_test(cell) -> bool:
    head = cell.source.split('""" # END TEST CONFIG')[0]
    return "# BEGIN TEST CONFIG" in head and re.search(r"^\s*hidden:\s*true\s*$", head, re.M) is not None


def read_questions(chapter: Path) -> list[Question]:
    """Parse and check the question blocks of a chapter notebook (raises ValueError on bad markup)."""
    nb = nbformat.read(chapter, as_version=4)
    questions: list[Question] = []
    current: Question | None = None
    stack: list[str] = []
    for i, cell in enumerate(nb.cells):
        marker = _marker(cell)
        if marker == ("BEGIN", "QUESTION"):
            if current is not None:
                raise ValueError(f"{chapter.name} cell {i}: BEGIN QUESTION inside question {current.name!r}")
            config = yaml.safe_load(cell.source.split("\n", 1)[1] if "\n" in cell.source else "") or {}
            if "name" not in config or "points" not in config:
                raise ValueError(f"{chapter.name} cell {i}: a question needs 'name' and 'points'")
            current = Question(str(config["name"]), float(config["points"]))
        if current is None:
            if marker is not None:
                raise ValueError(f"{chapter.name} cell {i}: {' '.join(marker)} outside a question")
            continue
        current.cells.append(cell)
        if marker and marker[1] != "QUESTION":
            if marker[0] == "BEGIN":
                stack.append(marker[1])
            elif not stack or stack.pop() != marker[1]:
                raise ValueError(f"{chapter.name} cell {i}: unmatched END {marker[1]} in {current.name!r}")
        if marker == ("END", "QUESTION"):
            if stack:
                raise ValueError(f"{chapter.name}: question {current.name!r} ends inside {stack[-1]}")
            _check_question(chapter, current)
            questions.append(current)
            current = None
    if current is not None:
        raise ValueError(f"{chapter.name}: question {current.name!r} has no END QUESTION")
    names = [q.name for q in questions]
    if len(names) != len(set(names)):
        raise ValueError(f"{chapter.name}: duplicate question names {names}")
    return questions


def _check_question(chapter: Path, q: Question) -> None:
    kinds = [_marker(c) for c in q.cells]
    if ("BEGIN", "SOLUTION") not in kinds or ("BEGIN", "TESTS") not in kinds:
        raise ValueError(f"{chapter.name}: question {q.name!r} needs a SOLUTION block and a TESTS block")
    if "# BEGIN SOLUTION" not in q.solution_source and "# SOLUTION" not in q.solution_source:
        raise ValueError(f"{chapter.name}: question {q.name!r}: mark the student's part with # BEGIN/END SOLUTION")
    tests, inside = [], False
    for cell in q.cells:
        m = _marker(cell)
        if m and m[1] == "TESTS":
            inside = m[0] == "BEGIN"
        elif inside:
            tests.append(cell)
    hidden = [c for c in tests if _is_hidden_test(c)]
    if not hidden or len(hidden) == len(tests):
        raise ValueError(f"{chapter.name}: question {q.name!r} needs public and hidden tests")
    for c in hidden:
        if "remove-input" not in c.metadata.get("tags", []):
            raise ValueError(f"{chapter.name}: hidden test of {q.name!r} must be tagged remove-input")


def chapters_with_assignments() -> list[Path]:
    """Chapter notebooks that contain at least one question block."""
    found = []
    for path in sorted(BOOK.glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        if any(_marker(c) == ("BEGIN", "QUESTION") for c in nb.cells):
            found.append(path)
    return found


def resolve(chapter: str) -> Path:
    """'06', '06_transformer' or a path -> the chapter notebook."""
    path = Path(chapter)
    if path.suffix == ".ipynb" and path.exists():
        return path.resolve()
    hits = sorted(BOOK.glob(f"{chapter}*.ipynb"))
    if len(hits) != 1:
        raise SystemExit(f"no single chapter matches {chapter!r}: {[h.name for h in hits]}")
    return hits[0]


# --------------------------------------------------------------------------- generating


ROLE = re.compile(r"\{([a-z:]+)\}`([^`]*)`")


def plain_markdown(text: str) -> str:
    """Markdown without the book's Sphinx roles, which a notebook cannot resolve.

    ``{term}`Stride <stride>``` -> Stride; ``{eq}`eq-x``` / ``{prf:ref}`def-x``` / ``{ref}`sec-x``` ->
    the label, marked as the chapter's; ``{footcite}`` -> removed."""

    def sub(m: re.Match) -> str:
        role, body = m.group(1), m.group(2)
        shown = re.sub(r"\s*<[^>]*>$", "", body)
        if role == "footcite":
            return ""
        if role in ("eq", "prf:ref", "ref", "numref", "doc"):
            return f"`{shown}` (in the chapter)" if shown == body else shown
        return shown  # term, math-like and unknown roles: their text

    return re.sub(r" +([.,;:])", r"\1", ROLE.sub(sub, text))


def master_notebook(chapter: Path) -> nbformat.NotebookNode:
    """The otter master notebook of a chapter: title, assignment config, setup cells, questions."""
    nb = nbformat.read(chapter, as_version=4)
    questions = read_questions(chapter)
    if not questions:
        raise ValueError(f"{chapter.name} has no assignment")
    title = nb.cells[0].source.splitlines()[0].lstrip("# ").strip()
    total = sum(q.points for q in questions)
    intro = (
        f"# Assignment — {title}\n\n"
        f"From the dlarch chapter *{title}* (`book/{chapter.name}`). Write your code where the cells "
        "say `...`, then run the `grader.check(...)` cell under each question: it runs the public "
        "tests. Your submission is graded with further hidden tests, so a passing public check is "
        f"necessary, not sufficient. Questions: {', '.join(f'`{q.name}` ({q.points:g} pts)' for q in questions)}; "
        f"total {total:g} points."
    )
    config = {
        "name": chapter.stem,
        "init_cell": True,
        "check_all_cell": False,
        "export_cell": False,
        "requirements": None,
        # Colab: the kernel cannot read the notebook file, so otter refuses tests kept in its
        # metadata there (otter-grader#901): tests go to files, and the hand-out writes them itself
        "runs_on": "colab",
        "tests": {"files": True},
    }
    cells = [
        nbformat.v4.new_markdown_cell(intro),
        nbformat.v4.new_raw_cell("# ASSIGNMENT CONFIG\n" + yaml.safe_dump(config, sort_keys=False)),
    ]
    setup = [c for c in nb.cells if c.cell_type == "code" and SETUP_TAG in c.metadata.get("tags", [])]
    if not setup:
        raise ValueError(f"{chapter.name}: tag the cells the assignment needs (imports, data) {SETUP_TAG!r}")
    for c in setup + [c for q in questions for c in q.cells]:
        c = copy.deepcopy(c)
        if c.cell_type == "markdown":
            c.source = plain_markdown(c.source)
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
            tags = [t for t in c.metadata.get("tags", []) if t not in (SETUP_TAG, "remove-input")]
            c.metadata = {"tags": tags} if tags else {}
        cells.append(c)
    master = nbformat.v4.new_notebook(cells=cells)
    master.metadata = {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}}
    nbformat.validate(master)
    return master


def generate_one(chapter: Path, out: Path = ASSIGN_DIR) -> Path:
    """Write master, student and autograder material of one chapter; return its folder."""
    dest = out / chapter.stem
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "master").mkdir(parents=True)
    master = dest / "master" / chapter.name
    nbformat.write(master_notebook(chapter), master)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            run = _run(
                [_otter(), "assign", "--no-pdfs", "--no-run-tests", str(master), tmp],
                timeout=ASSIGN_TIMEOUT_S,
                capture_output=True,
                text=True,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"otter assign of {chapter.name} ran over {ASSIGN_TIMEOUT_S} s") from None
        if run.returncode != 0:
            raise RuntimeError(f"otter assign failed for {chapter.name}:\n{run.stdout}\n{run.stderr}")
        shutil.copytree(Path(tmp) / "student", dest / "student")
        shutil.copytree(Path(tmp) / "autograder", dest / "autograder")
    for nb_path in (dest / "student" / chapter.name, dest / "autograder" / chapter.name):
        make_self_contained(nb_path)
    zips = sorted((dest / "autograder").glob("*-autograder_*.zip"))
    if len(zips) != 1:
        raise RuntimeError(f"expected one autograder zip for {chapter.name}, found {zips}")
    zips[0].rename(dest / "autograder" / f"{chapter.stem}-autograder.zip")
    return dest


OTTER_PIP_CELL = "%pip install -q otter-grader"  # otter assign's install cell for runs_on: colab (unpinned)
OTTER_INIT = "grader = otter.Notebook()"  # otter assign's init cell for runs_on: colab: tests from ./tests
TESTS_DIR = "tests"  # where otter.Notebook() reads the tests (relative to the kernel's working directory)
IGNORE_TAG = "otter_ignore"  # otter's tag of the cells that grading (otter run) does not execute


def make_self_contained(path: Path) -> None:
    """Make an otter-assigned notebook run ``grader.check`` with nothing beside it (Colab).

    On Colab the kernel cannot read the notebook file, so otter reads no tests from its metadata
    there and requires a ``tests`` folder (otter-grader#901); otter assign's ``runs_on: colab``
    writes the tests as files beside the notebook, which a student who uploads only the ``.ipynb``
    does not have. Two locked cells go before otter's init cell: one installs the pinned
    otter-grader where it is missing (instead of otter's unpinned ``%pip`` cell), one writes the
    notebook's own test files (from its ``tests`` folder: public tests in the hand-out, all tests
    in the reference) to ``./tests``. The second is tagged ``otter_ignore``: grading does not run it,
    so it cannot replace the autograder's tests with the hand-out's."""
    nb = nbformat.read(path, as_version=4)
    nb.cells = [c for c in nb.cells if not (c.cell_type == "code" and c.source.strip() == OTTER_PIP_CELL)]
    if not any(c.cell_type == "code" and OTTER_INIT in c.source for c in nb.cells):
        raise RuntimeError(f"{path}: no otter init cell {OTTER_INIT!r} (tests read from ./{TESTS_DIR})")
    tests = {p.name: p.read_text() for p in sorted((path.parent / TESTS_DIR).glob("*.py"))}
    if not tests:
        raise RuntimeError(f"{path}: otter assign wrote no test files to {path.parent / TESTS_DIR}")
    cells = [install_cell(), tests_cell(tests)]
    for cell in cells:
        cell.metadata["deletable"], cell.metadata["editable"] = False, False
    cells[1].metadata["tags"] = [IGNORE_TAG]
    nb.cells = cells + nb.cells
    nbformat.validate(nb)
    nbformat.write(nb, path)


def install_cell() -> nbformat.NotebookNode:
    """A cell that installs otter-grader, the version that generated the notebook, where it is missing."""
    from otter import __version__ as otter_version

    return nbformat.v4.new_code_cell(
        "# Where otter-grader is missing (e.g. on Colab), install it: the cells below import it.\n"
        "import importlib, importlib.util, subprocess, sys\n"
        'if importlib.util.find_spec("otter") is None:\n'
        f'    pip = [sys.executable, "-m", "pip", "install", "-q", "otter-grader=={otter_version}"]\n'
        "    subprocess.run(pip, check=True)\n"
        "    importlib.invalidate_caches()"
    )


def tests_cell(tests: dict[str, str]) -> nbformat.NotebookNode:
    """A cell that writes ``tests`` (file name -> text) into ./tests, where ``grader.check`` reads them."""
    lines = [
        f"# The tests that grader.check runs, written to ./{TESTS_DIR} (on Colab nothing lies beside the notebook).",
        "import pathlib",
        "",
        "_tests = {",
    ]
    for name, text in tests.items():
        lines.append(f"    {name!r}: (")
        lines += [f"        {line!r}" for line in text.splitlines(keepends=True)]
        lines.append("    ),")
    lines += [
        "}",
        f"pathlib.Path({TESTS_DIR!r}).mkdir(exist_ok=True)",
        "for _name, _text in _tests.items():",
        f"    (pathlib.Path({TESTS_DIR!r}) / _name).write_text(_text)",
        "del _tests, _name, _text",
    ]
    return nbformat.v4.new_code_cell("\n".join(lines))


def embedded_tests(nb: nbformat.NotebookNode) -> dict[str, str]:
    """The test files that a notebook's tests cell (:func:`tests_cell`) writes: file name -> text."""
    cells = [c for c in nb.cells if c.cell_type == "code" and IGNORE_TAG in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"expected one tests cell (tag {IGNORE_TAG!r}), found {len(cells)}")
    source = cells[0].source
    literal = source[source.index("_tests = {") + len("_tests = ") : source.index("\n}\n") + 2]
    tests = ast.literal_eval(literal)
    if not isinstance(tests, dict):
        raise ValueError("the tests cell holds no dict of test files")
    return tests


def generate(chapters: list[Path], out: Path = ASSIGN_DIR, jobs: int = 2) -> list[Path]:
    """Generate every chapter's assignment (``jobs`` at once)."""
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda c: generate_one(c, out), chapters))


def build_student_site() -> Path:
    """Build the student edition of the website into _student/_build/html (solutions hidden).

    Same book, second config: the book extension's
    ``dlarch_edition: student`` (assignment solutions become their stubs, without outputs).
    Execution reuses the main build's cache (_build/.jupyter_cache) when it exists."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config["title"] = f"{config['title']} (student edition)"
    config["execute"]["cache"] = str(ROOT / "_build" / ".jupyter_cache")
    # the book's extension removes the solutions (gated ones with their code cells too); hide_solutions
    # would leave a gated solution's cells behind (tools/sphinxext/dlarch_site.py)
    config["sphinx"]["config"]["hide_solutions"] = False
    config["sphinx"]["config"]["dlarch_edition"] = "student"
    # paths of local extensions are read relative to the config file: make them absolute
    config["sphinx"]["local_extensions"] = {k: str(ROOT / v) for k, v in config["sphinx"]["local_extensions"].items()}
    STUDENT_SITE.mkdir(exist_ok=True)
    path = STUDENT_SITE / "_config_student.yml"
    path.write_text(
        "# generated by tools/assign.py from _config.yml; do not edit\n" + yaml.safe_dump(config, sort_keys=False)
    )
    env = dict(os.environ, DLARCH_THREADS=os.environ.get("DLARCH_THREADS", "1"))
    _run(
        [
            _bin("jupyter-book"),
            "build",
            str(ROOT),
            "--all",
            "-W",
            "--keep-going",
            "--config",
            str(path),
            "--path-output",
            str(STUDENT_SITE),
        ],
        timeout=SITE_TIMEOUT_S,
        check=True,
        env=env,
    )
    return STUDENT_SITE / "_build" / "html"


# --------------------------------------------------------------------------- grading


@dataclass
class Grade:
    submission: str
    assignment: str
    score: float
    max_score: float
    questions: dict[str, tuple[float, float]]
    seconds: float
    error: str = ""


def assignment_of(submission: Path) -> str:
    """The assignment a submitted notebook belongs to: otter's metadata, else its file name."""
    try:
        name = nbformat.read(submission, as_version=4).metadata.get("otter", {}).get("assignment_name")
    except Exception:  # unreadable notebook: fall back on the name, grading will report the error
        name = None
    return name or submission.stem


def grade_one(submission: Path, assign_dir: Path = ASSIGN_DIR) -> Grade:
    """Grade one notebook with ``otter run`` against its assignment's autograder zip."""
    name = assignment_of(submission)
    zips = sorted((assign_dir / name / "autograder").glob("*-autograder.zip"))
    start = time.perf_counter()

    def failed(why: str) -> Grade:  # no score: the submission could not be graded
        return Grade(str(submission), name, 0.0, 0.0, {}, time.perf_counter() - start, why)

    if not zips:
        return failed(f"no autograder for {name!r} in {assign_dir}")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            run = _run(
                [_otter(), "run", "-a", str(zips[0]), "-o", tmp, str(submission)],
                timeout=GRADE_TIMEOUT_S,
                capture_output=True,
                text=True,
            )
        except subprocess.TimeoutExpired:
            return failed(f"otter run ran over {GRADE_TIMEOUT_S} s")
        results = Path(tmp) / "results.json"
        if not results.exists():
            return failed(f"otter run failed: {(run.stderr or run.stdout)[-500:]}")
        tests = json.loads(results.read_text())["tests"]
    return grade_from_results(str(submission), name, tests, time.perf_counter() - start)


def grade_from_results(submission: str, assignment: str, tests: list[dict], seconds: float, error: str = "") -> Grade:
    """A Grade from the ``tests`` of otter's results.json (one entry per question with a max_score)."""
    questions = {
        t["name"]: (float(t.get("score") or 0.0), float(t["max_score"]))
        for t in tests
        if t.get("max_score") is not None
    }
    return Grade(
        submission,
        assignment,
        sum(s for s, _ in questions.values()),
        sum(m for _, m in questions.values()),
        questions,
        seconds,
        error,
    )


def grade(submissions: Path, csv_path: Path, assign_dir: Path = ASSIGN_DIR, jobs: int = 2) -> list[Grade]:
    """Grade every notebook under ``submissions`` and write the score table to ``csv_path``."""
    files = sorted(p for p in Path(submissions).rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    if not files:
        raise SystemExit(f"no notebooks under {submissions}")
    with ThreadPoolExecutor(jobs) as pool:
        grades = list(pool.map(lambda f: grade_one(f, assign_dir), files))
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["submission", "assignment", "score", "max_score", "percent", "questions", "seconds", "error"])
        for g in grades:
            detail = "; ".join(f"{q}={s:g}/{m:g}" for q, (s, m) in g.questions.items())
            percent = 100 * g.score / g.max_score if g.max_score else 0.0
            writer.writerow(
                [
                    g.submission,
                    g.assignment,
                    f"{g.score:g}",
                    f"{g.max_score:g}",
                    f"{percent:.1f}",
                    detail,
                    f"{g.seconds:.1f}",
                    g.error,
                ]
            )
    return grades


# --------------------------------------------------------------------------- command line


def _run(
    cmd: list[str], timeout: float, check: bool = False, capture_output: bool = False, **kwargs
) -> subprocess.CompletedProcess:
    """subprocess.run in a process group of its own: over ``timeout`` the whole group is killed
    (``otter run``'s kernel notices that its parent is gone and exits), then TimeoutExpired."""
    if capture_output:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with subprocess.Popen(cmd, start_new_session=True, **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.communicate()
            raise
        finally:
            if proc.poll() is None:  # interrupted otherwise (KeyboardInterrupt): leave nothing behind
                _kill_group(proc.pid)
    if check and proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd, out, err)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def _otter() -> str:
    return _bin("otter")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="chapters with assignments")
    g = sub.add_parser("generate", help="student and autograder material (and the student site)")
    g.add_argument("chapters", nargs="*", help="chapter numbers or names (default: all with assignments)")
    g.add_argument("--out", type=Path, default=ASSIGN_DIR)
    g.add_argument("--site", action="store_true", help="also build the student edition of the website")
    g.add_argument("--jobs", type=int, default=2)
    sub.add_parser("site", help="build the student edition of the website")
    r = sub.add_parser("grade", help="grade a folder of submitted notebooks into a CSV")
    r.add_argument("submissions", type=Path)
    r.add_argument("--csv", type=Path, default=Path("scores.csv"))
    r.add_argument("--assign", type=Path, default=ASSIGN_DIR)
    r.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)

    if args.cmd == "list":
        for chapter in chapters_with_assignments():
            qs = read_questions(chapter)
            print(f"{chapter.stem:32s} " + ", ".join(f"{q.name} ({q.points:g})" for q in qs))
    elif args.cmd == "generate":
        chapters = [resolve(c) for c in args.chapters] or chapters_with_assignments()
        start = time.perf_counter()
        for dest in generate(chapters, args.out, args.jobs):
            print(f"{dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}: student/, autograder/")
        print(f"{len(chapters)} assignments generated in {time.perf_counter() - start:.1f} s")
        if args.site:
            print(f"student edition of the website: {build_student_site()}")
    elif args.cmd == "site":
        print(f"student edition of the website: {build_student_site()}")
    elif args.cmd == "grade":
        start = time.perf_counter()
        grades = grade(args.submissions, args.csv, args.assign, args.jobs)
        for g in grades:
            status = g.error or ", ".join(f"{q} {s:g}/{m:g}" for q, (s, m) in g.questions.items())
            print(f"{g.score:6g}/{g.max_score:<4g} {g.submission}  [{status}]")
        print(f"{len(grades)} submissions graded in {time.perf_counter() - start:.1f} s -> {args.csv}")


if __name__ == "__main__":
    main()
