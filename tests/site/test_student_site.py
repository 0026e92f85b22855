"""Checks of the two editions' assignment cells (built by `jupyter-book build` and `tools/assign.py site`).

The book shows each graded assignment's reference solution without otter's marker comments; the
student edition (_student/_build/html) shows, in its place, exactly the stub of the students'
notebook (otter's own replacement), hides every exercise solution, and neither edition shows a
hidden test.
"""

from __future__ import annotations

import os
import re
import sys

import pytest
from bs4 import BeautifulSoup

from tests.notebooks import ROOT, executed_solutions, load

sys.path.insert(0, str(ROOT / "tools"))
import assign

BOOK_HTML = ROOT / "_build" / "html" / "book"
STUDENT_HTML = ROOT / "_student" / "_build" / "html" / "book"
if not (STUDENT_HTML.parent / "index.html").exists() or not (BOOK_HTML.parent / "index.html").exists():
    if os.environ.get("DLARCH_REQUIRE_SITE"):
        raise RuntimeError("build both editions first: `bash tools/dev.sh book` and `python tools/assign.py site`")
    pytest.skip("student edition not built", allow_module_level=True)

CHAPTERS = assign.chapters_with_assignments()


sys.path.insert(0, str(ROOT / "tools" / "sphinxext"))
from dlarch_site import student_stub, without_markers  # noqa: E402


def normal(code: str) -> str:
    return "\n".join(line.rstrip() for line in code.strip().splitlines())


def page(path) -> tuple[list[str], str]:
    """(normalised text of every code cell's input, whole page HTML)."""
    html = path.read_text()
    cells = [normal(div.get_text()) for div in BeautifulSoup(html, "html.parser").select("div.cell_input")]
    return cells, html


def solution_cells(chapter) -> list[tuple[str, str]]:
    """(question name, source) of every solution code cell of a chapter's assignment."""
    return [(q.name, source) for q in assign.read_questions(chapter) for source in q.solution_cells]


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_book_shows_solutions_without_markers(chapter):
    cells, html = page(BOOK_HTML / f"{chapter.stem}.html")
    assert "BEGIN SOLUTION" not in html and "END SOLUTION" not in html
    assert "BEGIN TEST CONFIG" not in html, "a hidden test is visible on the website"
    for name, source in solution_cells(chapter):
        assert normal(without_markers(source)) in cells, f"{name}: the reference solution is not on the page"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_student_edition_hides_solutions(chapter):
    cells, html = page(STUDENT_HTML / f"{chapter.stem}.html")
    assert "BEGIN SOLUTION" not in html and "BEGIN TEST CONFIG" not in html
    assert "Solution to" not in html, "exercise solutions are hidden in the student edition"
    for name, source in solution_cells(chapter):
        assert normal(student_stub(source)) in cells, f"{name}: the student edition does not show the stub"
        assert normal(without_markers(source)) not in cells, f"{name}: the student edition shows the solution"


@pytest.mark.parametrize("chapter", sorted(assign.BOOK.glob("[0-3][0-9]_*.ipynb")), ids=lambda p: p.stem)
def test_exercise_solutions_run_in_the_book_and_are_hidden_from_students(chapter):
    book_cells, book_html = page(BOOK_HTML / f"{chapter.stem}.html")
    student_cells, _ = page(STUDENT_HTML / f"{chapter.stem}.html")
    for label, code in executed_solutions(load(chapter)).items():
        for source in code:
            assert normal(source) in book_cells, f"{label}: the book does not show the solution's code"
            assert normal(source) not in student_cells, f"{label}: the student edition shows the solution's code"
    assert ("Solution to" in book_html) == bool(re.search(r"\{solution(-start)?\}", chapter.read_text()))


def test_student_edition_is_labelled():
    assert "student edition" in (STUDENT_HTML.parent / "index.html").read_text()
