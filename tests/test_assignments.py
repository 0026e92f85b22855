"""The course assignments (tools/assign.py, otter-grader): markup, generation and three-way grading.

For every chapter's assignment: the reference solution scores full marks, the unmodified student
stub scores zero, and each plausible wrong answer in tests/assignment_mutants/NN.yml loses points;
and the grade command writes the score table.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import assign  # noqa: E402

CHAPTERS = assign.chapters_with_assignments()
MUTANTS_DIR = Path(__file__).parent / "assignment_mutants"


def mutants_of(chapter: Path) -> list[dict]:
    path = MUTANTS_DIR / f"{chapter.name[:2]}.yml"
    return yaml.safe_load(path.read_text()) if path.exists() else []


MUTANTS = [(c, i, m) for c in CHAPTERS for i, m in enumerate(mutants_of(c))]


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
        cases = student.metadata["otter"]["tests"][q.name]["suites"][0]["cases"]
        assert cases and not any(c["hidden"] for c in cases), "the hand-out carries public tests only"


def _grade(nb_path: Path, generated: Generated) -> assign.Grade:
    grade = assign.grade_one(nb_path, generated.root)
    assert not grade.error, grade.error
    return grade


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_reference_solution_scores_full_marks(generated, chapter):
    grade = _grade(generated / chapter.stem / "autograder" / chapter.name, generated)
    expected = sum(q.points for q in assign.read_questions(chapter))
    assert grade.max_score == expected
    assert grade.score == grade.max_score, grade.questions


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_student_stub_scores_zero(generated, chapter):
    grade = _grade(generated / chapter.stem / "student" / chapter.name, generated)
    assert grade.max_score > 0 and grade.score == 0, grade.questions


@pytest.mark.parametrize("chapter,index,mutant", MUTANTS,
                         ids=[f"{c.stem}-{m['question']}-{i}" for c, i, m in MUTANTS])
def test_wrong_answer_loses_points(generated, tmp_path, chapter, index, mutant):
    reference = generated / chapter.stem / "autograder" / chapter.name
    nb = nbformat.read(reference, as_version=4)
    solutions = [c for c in nb.cells if "otter_assign_solution_cell" in c.metadata.get("tags", [])]
    target = next(q for q in assign.read_questions(chapter) if q.name == mutant["question"]).solution_source
    for old, new in mutant["replace"]:
        assert old in target, f"{mutant['wrong']!r}: {old!r} is not in the solution of {mutant['question']}"
        for cell in solutions:
            cell.source = cell.source.replace(old, new)
    wrong = tmp_path / chapter.name
    nbformat.write(nb, wrong)
    grade = _grade(wrong, generated)
    lost, full = grade.questions[mutant["question"]]
    assert lost < full, f"wrong answer {mutant['wrong']!r} still scores {lost}/{full}"


def test_markup_errors_are_reported(tmp_path):
    raw, code = nbformat.v4.new_raw_cell, nbformat.v4.new_code_cell
    cases = {
        "no points": [raw("# BEGIN QUESTION\nname: q"), raw("# END QUESTION")],
        "no tests": [raw("# BEGIN QUESTION\nname: q\npoints: 1"), raw("# BEGIN SOLUTION"),
                     code("x = 1  # SOLUTION"), raw("# END SOLUTION"), raw("# END QUESTION")],
        "only public tests": [raw("# BEGIN QUESTION\nname: q\npoints: 1"), raw("# BEGIN SOLUTION"),
                              code("x = 1  # SOLUTION"), raw("# END SOLUTION"), raw("# BEGIN TESTS"),
                              code("assert x == 1"), raw("# END TESTS"), raw("# END QUESTION")],
        "unclosed": [raw("# BEGIN QUESTION\nname: q\npoints: 1"), raw("# BEGIN SOLUTION")],
        "stray end": [raw("# END TESTS")],
    }
    for why, cells in cases.items():
        path = tmp_path / "99_bad.ipynb"
        nbformat.write(nbformat.v4.new_notebook(cells=cells), path)
        with pytest.raises(ValueError):
            assign.read_questions(path)


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
