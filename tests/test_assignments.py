"""The course assignments (tools/assign.py, otter-grader): markup, generation and three-way grading.

For every chapter's assignment: the reference solution scores full marks, the unmodified student
stub scores zero, and each plausible wrong answer in tests/assignment_mutants/NN.yml loses points;
the notebooks carry their tests; and the grade command writes the score table. A hand-out (chapter
06; ``DLARCH_ASSIGN_COLAB``) runs alone on a Colab-like runtime, installing otter-grader itself.

The reference is graded by ``otter run`` end to end (a new process and kernel per notebook: the
real autograder zip works). The stub and the wrong answers, about seven notebooks a chapter, are
graded by tools/grade_variants.py: it runs a chapter's shared setup cells once and forks a process
per notebook, and otter-grader's own code grades them with the tests of the same zip. That grader
is held to ``otter run`` on every chapter: it must give the reference exactly the scores
``otter run`` gives it, graded before and again after all the other notebooks of the chapter.
``DLARCH_ASSIGN_STUB_OTTER=1`` also grades every stub with ``otter run`` (30 more runs, about
3 minutes on the 2-core CI machine) and requires the same scores.
"""

from __future__ import annotations

import copy
import csv
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import assign  # noqa: E402
import grade_variants  # noqa: E402

CHAPTERS = assign.chapters_with_assignments()
MUTANTS_DIR = Path(__file__).parent / "assignment_mutants"
IDS = [c.stem for c in CHAPTERS]

# time limits (pytest-timeout) of the tests that grade; a test may compute what another one shares
OTTER_TEST_TIMEOUT_S = assign.GRADE_TIMEOUT_S + 60
SHARED_TEST_TIMEOUT_S = 2 * assign.GRADE_TIMEOUT_S + grade_variants.ASSIGNMENT_TIMEOUT_S + 180


def mutants_of(chapter: Path) -> list[dict]:
    path = MUTANTS_DIR / f"{chapter.name[:2]}.yml"
    return yaml.safe_load(path.read_text()) if path.exists() else []


class Generated:
    """Assignment material, generated on first use per chapter (or read from DLARCH_ASSIGN_DIR,
    where ``tools/assign.py generate`` already wrote it, as tools/dev.sh test does)."""

    def __init__(self, root: Path, pregenerated: bool):
        self.root, self.pregenerated, self.done = root, pregenerated, set()

    def __truediv__(self, stem: str) -> Path:
        if not self.pregenerated and stem not in self.done:
            assign.generate_one(assign.BOOK / f"{stem}.ipynb", self.root)
            self.done.add(stem)
        return self.root / stem


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Generated:
    pre = os.environ.get("DLARCH_ASSIGN_DIR")
    if pre:
        return Generated(Path(pre), pregenerated=True)
    return Generated(tmp_path_factory.mktemp("assign"), pregenerated=False)


def _session_folder(tmp_path_factory, name: str) -> Path:
    """A folder that all xdist workers of this test session share."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    folder.mkdir(exist_ok=True)
    return folder


def _once(folder: Path, key: str, compute) -> dict:
    """``compute()`` (a JSON-able dict) once per test session and key, whichever worker asks first;
    the others wait for it (the lock-file pattern of pytest-xdist's documentation)."""
    path = folder / f"{key}.json"
    with open(folder / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            path.write_text(json.dumps(compute()))
    return json.loads(path.read_text())


def _as_grade(row: dict) -> assign.Grade:
    grade = assign.Grade(**row)
    grade.questions = {q: tuple(v) for q, v in grade.questions.items()}
    return grade


@pytest.fixture(scope="session")
def otter_grades(tmp_path_factory):
    """``otter run`` (assign.grade_one) of a notebook, once per test session."""
    folder = _session_folder(tmp_path_factory, "otter_grades")

    def grade(nb_path: Path, generated: Generated) -> assign.Grade:
        name = assign.assignment_of(nb_path)
        zip_path = generated / name / "autograder" / f"{name}-autograder.zip"
        key = f"{name}-" + hashlib.sha256(nb_path.read_bytes() + zip_path.read_bytes()).hexdigest()[:32]
        return _as_grade(_once(folder, key, lambda: vars(assign.grade_one(nb_path, generated.root))))

    return grade


@pytest.fixture(scope="session")
def grading_server(tmp_path_factory):
    """tools/grade_variants.py's server, one per xdist worker."""
    server = grade_variants.Server(tmp_path_factory.mktemp("grading_server") / "server.log")
    yield server
    server.close()


@dataclass
class ChapterGrades:
    """A chapter's notebooks graded by tools/grade_variants.py in one request."""

    report: dict  # the grader's report, less the rows
    reference_first: assign.Grade  # the reference, graded first
    stub: assign.Grade
    wrong: list[assign.Grade | str]  # per wrong answer on file: its grade, or why it was not graded
    reference_last: assign.Grade  # the reference again, after all the others


@pytest.fixture(scope="session")
def chapter_grades(tmp_path_factory, grading_server):
    """A chapter's ChapterGrades, once per test session."""
    folder = _session_folder(tmp_path_factory, "chapter_grades")

    def compute(chapter: Path, generated: Generated) -> dict:
        reference = generated / chapter.stem / "autograder" / chapter.name
        student = generated / chapter.stem / "student" / chapter.name
        zip_path = generated / chapter.stem / "autograder" / f"{chapter.stem}-autograder.zip"
        wrong = wrong_answer_notebooks(chapter, reference, folder / chapter.stem)
        notebooks = [reference, student, *(w for w in wrong if isinstance(w, Path)), reference]
        report = grading_server.grade(zip_path, reference, notebooks)
        rows = iter(
            vars(
                assign.grade_from_results(
                    r["submission"], chapter.stem, r["tests"], r["seconds"], r["error"] and f"{r['error']}\n{r['log']}"
                )
            )
            for r in report.pop("results")
        )
        return {
            "report": report,
            "reference_first": next(rows),
            "stub": next(rows),
            "wrong": [next(rows) if isinstance(w, Path) else w for w in wrong],
            "reference_last": next(rows),
        }

    def grades(chapter: Path, generated: Generated) -> ChapterGrades:
        done = _once(folder, chapter.stem, lambda: compute(chapter, generated))
        return ChapterGrades(
            done["report"],
            _as_grade(done["reference_first"]),
            _as_grade(done["stub"]),
            [_as_grade(w) if isinstance(w, dict) else w for w in done["wrong"]],
            _as_grade(done["reference_last"]),
        )

    return grades


def wrong_answer_notebooks(chapter: Path, reference: Path, folder: Path) -> list[Path | str]:
    """The reference notebook with each wrong answer of tests/assignment_mutants/NN.yml put into
    its solution cells, a notebook per wrong answer; or why a wrong answer cannot be made (each
    replacement must be in the solution of its question and change a solution cell)."""
    questions = {q.name: q for q in assign.read_questions(chapter)}
    out: list[Path | str] = []
    for index, mutant in enumerate(mutants_of(chapter)):
        nb = nbformat.read(reference, as_version=4)
        solutions = [c for c in nb.cells if "otter_assign_solution_cell" in c.metadata.get("tags", [])]
        target = questions[mutant["question"]].solution_source if mutant["question"] in questions else ""
        before = [c.source for c in solutions]
        missing = [old for old, _ in mutant["replace"] if old not in target]
        for old, new in mutant["replace"]:
            for cell in solutions:
                cell.source = cell.source.replace(old, new)
        if missing:
            out.append(f"{mutant['wrong']!r}: {missing} not in the solution of {mutant['question']}")
        elif [c.source for c in solutions] == before:
            out.append(f"{mutant['wrong']!r} changes no solution cell")
        else:
            path = folder / f"{index:02d}-{mutant['question']}" / chapter.name
            path.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, path)
            out.append(path)
    return out


def ok_test(text: str) -> dict:
    """The ``test`` dict of an otter test file in OK format."""
    namespace: dict = {}
    exec(text, namespace)
    return namespace["test"]


# --------------------------------------------------------------------------- the hand-out on Colab
#
# The hand-out alone, in the readers' runtime: Python 3.13 with Colab's packages (.venv-colab, or
# $DLARCH_COLAB_VENV) seen through a fresh environment of its own, where otter-grader is missing,
# so that the hand-out's first cell installs it from the registry (pinned; the pip cache makes
# reruns fast). The kernel runs as Colab's shell as otter recognises it, in an empty working
# directory (on Colab the notebook file is not on the kernel's disk); the hand-out is filled in
# with the reference solution (every public check passes) and left as handed out (every check
# fails). $DLARCH_ASSIGN_COLAB: the chapters (numbers, comma-separated, or "all"; default 06).

COLAB_VENV = Path(os.environ.get("DLARCH_COLAB_VENV") or ROOT / ".venv-colab")
COLAB_CHAPTERS = (
    CHAPTERS
    if os.environ.get("DLARCH_ASSIGN_COLAB") == "all"
    else [assign.resolve(c.strip()) for c in os.environ.get("DLARCH_ASSIGN_COLAB", "06").split(",") if c.strip()]
)
COLAB_CELL_TIMEOUT_S = 600  # a cell; the first install of otter-grader downloads about 60 MB
COLAB_TEST_TIMEOUT_S = 1200  # one chapter: two executions, the first installs otter-grader
# Colab's IPython shell is google.colab._shell.Shell; otter-grader tells Colab by str(get_ipython())
COLAB_SHELL = """\
import types as _types
_shell = get_ipython()
_shell.__class__ = _types.new_class(
    "Shell", (type(_shell),), exec_body=lambda ns: ns.update(__module__="google.colab._shell")
)
del _shell, _types
"""
EXECUTE = """\
import sys
import nbformat
from nbclient import NotebookClient

source, cwd, out, allow_errors, timeout = sys.argv[1:]
nb = nbformat.read(source, as_version=4)
client = NotebookClient(
    nb, timeout=float(timeout), allow_errors=allow_errors == "1", kernel_name="python3",
    resources={"metadata": {"path": cwd}},
)
try:
    client.execute()
finally:
    nbformat.write(nb, out)
"""
PROBE = """\
import json, sys
from otter.check.utils import IPythonInterpreter
print(json.dumps({"python": list(sys.version_info[:2]), "prefix": sys.prefix, "otter": otter.__file__,
                  "version": otter.__version__, "colab": grader.interpreter is IPythonInterpreter.COLAB}))
"""


def _python_output(python: Path, code: str) -> str:
    return assign._run([str(python), "-c", code], timeout=120, check=True, capture_output=True, text=True).stdout


def student_environment(folder: Path) -> Path:
    """A new Python environment that sees the Colab-like one's packages and adds its own; its python."""
    parent = COLAB_VENV / "bin" / "python"
    if not parent.exists():
        message = f"no Colab-like environment at {COLAB_VENV} (bash tools/dev.sh notebooks creates .venv-colab)"
        if os.environ.get("DLARCH_COLAB_VENV"):
            pytest.fail(message)
        pytest.skip(message)
    assign._run([str(parent), "-m", "venv", "--without-pip", str(folder)], timeout=120, check=True)
    python = folder / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(_python_output(python, purelib).strip())
    (site / "colab-packages.pth").write_text(_python_output(parent, purelib))  # after its own packages
    return python


def filled_in(hand_out: nbformat.NotebookNode, reference: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The hand-out with the reference solution in the cells the student writes."""
    filled = copy.deepcopy(hand_out)
    answers = [c for c in filled.cells if "otter_answer_cell" in c.metadata.get("tags", [])]
    solutions = [c for c in reference.cells if grade_variants.SOLUTION_TAG in c.metadata.get("tags", [])]
    assert answers and len(answers) == len(solutions), (len(answers), len(solutions))
    for answer, solution in zip(answers, solutions):
        assert "..." in answer.source and answer.source != solution.source
        answer.source = solution.source
    return filled


def execute_on_colab(
    python: Path, nb: nbformat.NotebookNode, folder: Path, allow_errors: bool
) -> tuple[dict[str, list], dict]:
    """Execute ``nb`` with ``python``'s kernel as Colab's shell, in the empty folder/content; the
    executed check cells (question -> outputs) and what the probe read in the kernel."""
    nb = copy.deepcopy(nb)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    for sub in ("content", "ipython/profile_default/startup", "jupyter/kernels/python3"):
        (folder / sub).mkdir(parents=True)
    (folder / "ipython/profile_default/startup/00-colab-shell.py").write_text(COLAB_SHELL)
    kernel = {"argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"], "language": "python"}
    (folder / "jupyter/kernels/python3/kernel.json").write_text(json.dumps(kernel | {"display_name": "Colab-like"}))
    nbformat.write(nb, folder / "notebook.ipynb")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "MPLBACKEND")}
    env.update(
        IPYTHONDIR=str(folder / "ipython"),
        JUPYTER_PATH=str(folder / "jupyter"),
        DLARCH_SOURCE=str(ROOT),
        DLARCH_THREADS="1",
    )
    args = [str(folder / "notebook.ipynb"), str(folder / "content"), str(folder / "executed.ipynb")]
    run = assign._run(
        [str(python), "-c", EXECUTE, *args, "1" if allow_errors else "0", str(COLAB_CELL_TIMEOUT_S)],
        timeout=(COLAB_TEST_TIMEOUT_S - 60) / 2,  # two executions a test
        capture_output=True,
        text=True,
        env=env,
        cwd=folder,
    )
    assert run.returncode == 0, f"the hand-out failed on the Colab-like runtime:\n{run.stderr[-5000:]}"
    executed = nbformat.read(folder / "executed.ipynb", as_version=4)
    checks = {}
    for cell in executed.cells:
        found = re.fullmatch(r'grader\.check\("(\w+)"\)', cell.source.strip()) if cell.cell_type == "code" else None
        if found:
            checks[found.group(1)] = cell.outputs
    probe = "".join(o.get("text", "") for o in executed.cells[-1].outputs if o.output_type == "stream")
    return checks, json.loads(probe)


@pytest.mark.timeout(COLAB_TEST_TIMEOUT_S)
@pytest.mark.parametrize("chapter", COLAB_CHAPTERS, ids=[c.stem for c in COLAB_CHAPTERS])
def test_hand_out_alone_runs_its_checks_on_colab(generated, tmp_path, chapter):
    """The hand-out, alone on a Colab-like runtime, installs otter-grader and runs every check: all
    pass with the reference solution filled in, all fail as handed out."""
    upload = tmp_path / "upload"
    upload.mkdir()
    shutil.copy(generated / chapter.stem / "student" / chapter.name, upload)  # the .ipynb, nothing else
    hand_out = nbformat.read(upload / chapter.name, as_version=4)
    reference = nbformat.read(generated / chapter.stem / "autograder" / chapter.name, as_version=4)
    python = student_environment(tmp_path / "env")
    spec = "import importlib.util; print(importlib.util.find_spec('otter') is None)"
    assert _python_output(python, spec).strip() == "True", (
        "otter-grader is preinstalled: the hand-out cannot prove it installs it"
    )
    questions = [q.name for q in assign.read_questions(chapter)]
    public = sorted(assign.embedded_tests(hand_out))

    checks, probe = execute_on_colab(python, filled_in(hand_out, reference), tmp_path / "filled", allow_errors=False)
    assert probe["python"] == [3, 13] and probe["colab"], probe
    assert Path(probe["otter"]).is_relative_to(tmp_path / "env"), ("otter-grader not installed by the hand-out", probe)
    import otter

    assert probe["version"] == otter.__version__, probe
    assert sorted(p.name for p in (tmp_path / "filled/content/tests").iterdir()) == public
    assert list(checks) == questions, (list(checks), questions)
    for name, outputs in checks.items():
        shown = "".join(o.get("data", {}).get("text/plain", "") for o in outputs)
        assert shown.startswith(f"{name} results: All test cases passed!"), (name, outputs)

    checks, probe = execute_on_colab(python, hand_out, tmp_path / "stub", allow_errors=True)
    assert probe["colab"] and list(checks) == questions, (probe, list(checks))
    for name, outputs in checks.items():
        assert not any(o.output_type == "error" for o in outputs), (name, outputs)
        shown = "".join(o.get("data", {}).get("text/plain", "") for o in outputs)
        assert shown.startswith(f"{name} results:") and "All test cases passed" not in shown, (name, outputs)


def test_every_chapter_has_an_assignment():
    chapters = sorted(assign.BOOK.glob("[0-9][0-9]_*.ipynb"))
    missing = [c.name for c in chapters if c not in CHAPTERS]
    assert not missing, f"chapters without a graded assignment: {missing}"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_every_question_has_a_wrong_answer_on_file(chapter):
    covered = {m["question"] for m in mutants_of(chapter)}
    names = {q.name for q in assign.read_questions(chapter)}
    assert covered <= names, f"mutants name unknown questions: {covered - names}"
    assert covered == names, f"{chapter.name}: no plausible wrong answer for {sorted(names - covered)}"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_student_notebook_hides_solutions_and_hidden_tests(generated, chapter):
    student = nbformat.read(generated / chapter.stem / "student" / chapter.name, as_version=4)
    text = json.dumps(student)
    tests = assign.embedded_tests(student)
    zip_path = generated / chapter.stem / "autograder" / f"{chapter.stem}-autograder.zip"
    with zipfile.ZipFile(zip_path) as zf:
        all_tests = {n: zf.read(n).decode() for n in zf.namelist() if n.startswith("tests/")}
    assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text
    for q in assign.read_questions(chapter):
        body = [line.strip() for line in q.solution_source.splitlines()]
        inside = False
        for line in body:  # no line of a solution block survives into the hand-out
            if line.endswith("# END SOLUTION"):
                inside = False
            if inside and len(line) > 12:
                assert line not in text, f"solution line leaked into the student notebook: {line}"
            if line.endswith("# BEGIN SOLUTION"):
                inside = True
        cases = ok_test(tests[f"{q.name}.py"])["suites"][0]["cases"]
        assert cases and not any(c["hidden"] for c in cases), "the hand-out carries public tests only"
        for case in ok_test(all_tests[f"tests/{q.name}.py"])["suites"][0]["cases"]:
            if case["hidden"]:
                assert case["code"].strip() not in text, f"a hidden test of {q.name} leaked into the hand-out"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=IDS)
def test_notebooks_carry_their_tests_and_install_otter(generated, chapter):
    """Hand-out and reference run grader.check with nothing beside them (Colab): a locked cell writes
    the notebook's tests to ./tests (all of them in the reference, as in the autograder zip), one
    that grading skips; a cell before it installs the otter-grader that generated them."""
    import otter

    folder = generated / chapter.stem
    with zipfile.ZipFile(folder / "autograder" / f"{chapter.stem}-autograder.zip") as zf:
        zipped = {Path(n).name: zf.read(n).decode() for n in zf.namelist() if n.startswith("tests/")}
    for kind in ("student", "autograder"):
        nb = nbformat.read(folder / kind / chapter.name, as_version=4)
        tests = assign.embedded_tests(nb)
        assert tests == {p.name: p.read_text() for p in (folder / kind / "tests").glob("*.py")}
        assert set(tests) == {f"{q.name}.py" for q in assign.read_questions(chapter)}
        if kind == "autograder":
            assert tests == zipped, "the reference carries the autograder's tests"
        install, writer, init = nb.cells[:3]
        assert f'"otter-grader=={otter.__version__}"' in install.source and "import otter" not in writer.source
        assert assign.IGNORE_TAG in writer.metadata["tags"] and "otter.Notebook()" in init.source
        assert all(c.metadata.get("editable") is False for c in (install, writer, init))
        assert not any("%pip" in c.source for c in nb.cells if c.cell_type == "code")


@pytest.mark.timeout(OTTER_TEST_TIMEOUT_S)
@pytest.mark.parametrize("chapter", CHAPTERS, ids=IDS)
def test_reference_solution_scores_full_marks(generated, otter_grades, chapter):
    grade = otter_grades(generated / chapter.stem / "autograder" / chapter.name, generated)
    assert not grade.error, grade.error
    expected = sum(q.points for q in assign.read_questions(chapter))
    assert grade.max_score == expected
    assert grade.score == grade.max_score, grade.questions


@pytest.mark.timeout(SHARED_TEST_TIMEOUT_S)
@pytest.mark.parametrize("chapter", CHAPTERS, ids=IDS)
def test_student_stub_scores_zero(generated, chapter_grades, otter_grades, chapter):
    stub = chapter_grades(chapter, generated).stub
    assert not stub.error, stub.error
    assert stub.max_score > 0 and stub.score == 0, stub.questions
    if os.environ.get("DLARCH_ASSIGN_STUB_OTTER") == "1":
        by_otter = otter_grades(generated / chapter.stem / "student" / chapter.name, generated)
        assert not by_otter.error, by_otter.error
        assert stub.questions == by_otter.questions, ("graded here", stub.questions, "by otter run", by_otter.questions)


@pytest.mark.timeout(SHARED_TEST_TIMEOUT_S)
@pytest.mark.parametrize("chapter", CHAPTERS, ids=IDS)
def test_wrong_answers_lose_points(generated, chapter_grades, chapter):
    """Each wrong answer of tests/assignment_mutants/NN.yml loses points on its question."""
    wrong = chapter_grades(chapter, generated).wrong
    mutants = mutants_of(chapter)
    assert len(wrong) == len(mutants)
    failures = []
    for index, (mutant, grade) in enumerate(zip(mutants, wrong)):
        name = f"{chapter.stem}-{mutant['question']}-{index}"
        if isinstance(grade, str):
            failures.append(f"{name}: {grade}")
            continue
        if grade.error:
            failures.append(f"{name}: {mutant['wrong']!r} was not graded: {grade.error}")
            continue
        lost, full = grade.questions[mutant["question"]]
        if not lost < full:
            failures.append(f"{name}: wrong answer {mutant['wrong']!r} still scores {lost}/{full}")
    assert not failures, "\n".join(failures)


@pytest.mark.timeout(SHARED_TEST_TIMEOUT_S)
@pytest.mark.parametrize("chapter", CHAPTERS, ids=IDS)
def test_grader_of_variants_agrees_with_otter_run(generated, chapter_grades, otter_grades, chapter):
    """tools/grade_variants.py grades the reference as otter run does, before and after all the
    chapter's other notebooks (each is graded in a fresh copy of the shared state)."""
    graded = chapter_grades(chapter, generated)
    first, last = graded.reference_first, graded.reference_last
    by_otter = otter_grades(generated / chapter.stem / "autograder" / chapter.name, generated)
    assert not (first.error or last.error or by_otter.error), (first.error, last.error, by_otter.error)
    assert by_otter.score == by_otter.max_score > 0, by_otter.questions
    assert first.questions == by_otter.questions, ("graded here", first.questions, "by otter run", by_otter.questions)
    assert last.questions == by_otter.questions, ("graded after the wrong answers", last.questions)
    # torch single-threaded and no other thread alive at a fork (fork-safety)
    report = graded.report
    assert report["torch_threads"] == 1, report
    assert report["threads_at_fork"] == 1 and report["server_threads_at_fork"] == 1, report


def test_markup_errors_are_reported(tmp_path):
    raw, code = nbformat.v4.new_raw_cell, nbformat.v4.new_code_cell
    cases = {
        "no points": [raw("# BEGIN QUESTION\nname: q"), raw("# END QUESTION")],
        "no tests": [
            raw("# BEGIN QUESTION\nname: q\npoints: 1"),
            raw("# BEGIN SOLUTION"),
            code("x = 1  # SOLUTION"),
            raw("# END SOLUTION"),
            raw("# END QUESTION"),
        ],
        "only public tests": [
            raw("# BEGIN QUESTION\nname: q\npoints: 1"),
            raw("# BEGIN SOLUTION"),
            code("x = 1  # SOLUTION"),
            raw("# END SOLUTION"),
            raw("# BEGIN TESTS"),
            code("assert x == 1"),
            raw("# END TESTS"),
            raw("# END QUESTION"),
        ],
        "unclosed": [raw("# BEGIN QUESTION\nname: q\npoints: 1"), raw("# BEGIN SOLUTION")],
        "stray end": [raw("# END TESTS")],
    }
    for why, cells in cases.items():
        path = tmp_path / "99_bad.ipynb"
        nbformat.write(nbformat.v4.new_notebook(cells=cells), path)
        with pytest.raises(ValueError):
            assign.read_questions(path)
            pytest.fail(f"a notebook with a {why} marker was accepted")


@pytest.mark.timeout(OTTER_TEST_TIMEOUT_S + 120)  # two otter runs at once
def test_grade_command_writes_the_score_table(generated, tmp_path):
    """`tools/assign.py grade DIR --csv F`: one row per submission, scores as graded."""
    chapter = CHAPTERS[-1]
    subs = tmp_path / "submissions"
    for who, kind in (("alice", "autograder"), ("bob", "student")):
        (subs / who).mkdir(parents=True)
        (subs / who / chapter.name).write_bytes((generated / chapter.stem / kind / chapter.name).read_bytes())
    table = tmp_path / "scores.csv"
    assign.main(["grade", str(subs), "--csv", str(table), "--assign", str(generated.root), "--jobs", "2"])
    rows = {Path(r["submission"]).parent.name: r for r in csv.DictReader(table.open())}
    full = sum(q.points for q in assign.read_questions(chapter))
    assert set(rows) == {"alice", "bob"}
    assert rows["alice"]["assignment"] == chapter.stem and float(rows["alice"]["score"]) == full
    assert float(rows["alice"]["percent"]) == 100.0 and float(rows["bob"]["score"]) == 0.0
    assert rows["alice"]["error"] == "" and rows["bob"]["error"] == ""
