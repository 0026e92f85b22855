"""House rules for the book's notebooks: outputs, table of contents, chapter anatomy."""

from __future__ import annotations

import re
import sys

import pytest

from dlarch_lib.core.hardware import GATING_TAGS
from dlarch_lib.core.notebook import SETUP_CELL
from tests.notebooks import BOOK, ROOT, all_notebooks, chapters, load, source, tags, toc_files

sys.path.insert(0, str(ROOT / "tools"))  # the stored-outputs rule is tools/nb.py's, which strip applies
import nb as nbtool

NOTEBOOKS = all_notebooks()
CHAPTERS = chapters()
ids = lambda paths: [p.name for p in paths]


def test_there_are_chapters():
    assert len(CHAPTERS) >= 3


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_only_gpu_recorded_cells_store_outputs(nb):
    """No cell stores outputs or an execution count, except a gated cell that ``tools/nb.py record-gpu``
    recorded from a GPU run, stamped, with the code it ran (``tools/nb.py strip`` keeps exactly those)."""
    problems = nbtool.stored_output_problems(load(nb))
    assert not problems, f"{nb.name}: " + "; ".join(problems)


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_gated_cells_skip_execution_in_the_site_build(nb):
    for i, cell in enumerate(load(nb)["cells"]):
        if tags(cell) & GATING_TAGS:
            assert "skip-execution" in tags(cell), f"{nb.name} cell {i} is gated but not tagged skip-execution"


def test_every_notebook_is_in_the_toc():
    listed = set(toc_files())
    missing = [str(nb.relative_to(ROOT).with_suffix("")) for nb in NOTEBOOKS]
    missing = [m for m in missing if m not in listed]
    assert not missing, f"not in _toc.yml: {missing}"


def test_every_toc_entry_exists():
    for entry in toc_files():
        candidates = [ROOT / f"{entry}{suffix}" for suffix in (".ipynb", ".md", "")]
        assert any(c.is_file() for c in candidates), f"_toc.yml lists {entry!r}, which does not exist"


@pytest.mark.parametrize("nb", CHAPTERS, ids=ids(CHAPTERS))
def test_chapter_anatomy(nb):
    cells = load(nb)["cells"]
    assert cells[0]["cell_type"] == "markdown" and source(cells[0]).startswith("# "), (
        "first cell: '# Title' in markdown"
    )
    assert "Seed section" in source(cells[0]), "the opening cell names the seed sections it covers"
    code = [c for c in cells if c["cell_type"] == "code"]
    assert source(code[0]).strip() == SETUP_CELL.strip(), "first code cell must be the standard setup cell"
    all_code = "\n".join(source(c) for c in code)
    markdown = "\n".join(source(c) for c in cells if c["cell_type"] == "markdown")
    assert re.search(r"^\s*assert\b", all_code, re.M), "a chapter checks its results with assert"
    assert "glue(" in all_code and "{glue:" in markdown, "numbers in prose come from glue"
    assert "{footcite}" in markdown and "{footbibliography}" in markdown, (
        "a chapter cites its references (footcite + footbibliography)"
    )
    assert re.search(r"prf:(definition|theorem|lemma|proposition)", markdown), "theory in prf: directives"


@pytest.mark.parametrize("nb", CHAPTERS, ids=ids(CHAPTERS))
def test_chapter_has_three_exercises_with_solutions(nb):
    markdown = "\n".join(source(c) for c in load(nb)["cells"] if c["cell_type"] == "markdown")
    exercises = re.findall(r"```\{exercise\}[^\n]*\n:label:\s*(\S+)", markdown)
    solutions = set(re.findall(r"```\{solution\}\s*(\S+)", markdown))
    assert len(exercises) >= 3, f"{nb.name}: {len(exercises)} exercises, need at least 3"
    unsolved = [e for e in exercises if e not in solutions]
    assert not unsolved, f"{nb.name}: exercises without a solution: {unsolved}"


def test_chapter_numbers_are_unique():
    numbers = [p.name[:2] for p in CHAPTERS]
    assert len(numbers) == len(set(numbers)), f"duplicate chapter numbers: {numbers}"


def test_book_folder_has_no_stray_files():
    allowed = {".ipynb", ".md", ".bib", ".png", ".svg"}
    stray = [
        p.name for p in BOOK.rglob("*") if p.is_file() and p.suffix not in allowed and "__pycache__" not in p.parts
    ]
    assert not stray, f"unexpected files in book/: {stray}"


# module a chapter uses -> the optional dependency group of dlarch_lib that provides it
OPTIONAL_MODULES = {"onnx": "onnx", "onnxruntime": "onnx", "optuna": "hpo", "yaml": "config"}
# library calls that need a group though the chapter imports nothing from it
OPTIONAL_CALLS = {r"quant\.(export_onnx|ort_)|deploy\.": "onnx", r"hpo\.optuna_search": "hpo"}


@pytest.mark.parametrize("nb", CHAPTERS, ids=ids(CHAPTERS))
def test_a_chapter_requires_the_optional_groups_it_uses(nb):
    """Colab lacks onnx, onnxruntime, optuna...: a chapter that uses them installs them first,
    with ``dl.require(group)`` before any use, so it runs in a fresh Colab runtime."""
    code = "\n".join(source(c) for c in load(nb)["cells"] if c["cell_type"] == "code")
    needed = {}
    for module, group in OPTIONAL_MODULES.items():
        match = re.search(rf"^\s*(import|from)\s+{module}\b", code, re.M)
        if match:
            needed.setdefault(group, match.start())
    for pattern, group in OPTIONAL_CALLS.items():
        match = re.search(pattern, code)
        if match:
            needed[group] = min(needed.get(group, match.start()), match.start())
    for group, first_use in needed.items():
        call = code.find(f'dl.require("{group}")')
        assert 0 <= call < first_use, f"{nb.name} uses the {group!r} group before dl.require({group!r})"


def test_the_optional_groups_are_declared():
    from dlarch_lib.core.runtime import extra_requirements

    for group in set(OPTIONAL_MODULES.values()) | set(OPTIONAL_CALLS.values()):
        assert extra_requirements(group), group
