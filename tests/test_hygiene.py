"""House rules for the book's notebooks: outputs, table of contents, chapter anatomy."""

from __future__ import annotations

import re
import sys

import pytest

from dlarch_lib.core.hardware import GATING_TAGS
from dlarch_lib.core.notebook import SETUP_CELL
from tests.notebooks import BOOK, ROOT, all_notebooks, chapters, executed_solutions, load, source, tags, toc_files

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
    solutions = set(re.findall(r"```\{solution(?:-start)?\}\s*(\S+)", markdown))
    assert len(exercises) >= 3, f"{nb.name}: {len(exercises)} exercises, need at least 3"
    unsolved = [e for e in exercises if e not in solutions]
    assert not unsolved, f"{nb.name}: exercises without a solution: {unsolved}"


# a solution written in markdown (```{solution} ... ```) must not hold code: code in a solution is run
CODE_IN_MARKDOWN = re.compile(r"^\s*(`{3,}|~{3,})\s*(python|py|ipython3?)\s*$|\n\n {4}\S", re.M)


@pytest.mark.parametrize("nb", CHAPTERS, ids=ids(CHAPTERS))
def test_exercise_solutions_with_code_are_executed(nb):
    """Code in a solution is a real code cell between ``solution-start`` and ``solution-end`` (gated
    directives), executed with the chapter, with an ``assert`` of what the solution claims; no
    solution shows code in markdown, where nothing would run it."""
    cells = load(nb)["cells"]
    markdown = "\n".join(source(c) for c in cells if c["cell_type"] == "markdown")
    for m in re.finditer(r"^(`{3,})\{solution\}\s*(\S+)\n(.*?)^\1\s*$", markdown, re.M | re.S):
        assert not CODE_IN_MARKDOWN.search(m.group(3)), (
            f"{nb.name}: the solution of {m.group(2)} shows code in markdown"
        )
    for label, code in executed_solutions(load(nb)).items():
        assert code, f"{nb.name}: the gated solution of {label} has no code cell"
        assert any(re.search(r"^\s*assert\b", c, re.M) for c in code), f"{nb.name}: {label}'s code asserts nothing"
    solution_cells = [c for c in cells if "solution" in tags(c)]
    assert len(solution_cells) == sum(len(v) for v in executed_solutions(load(nb)).values()), (
        f"{nb.name}: the code cells of solutions (and only they) are tagged 'solution'"
    )


# Verdicts (who wins, whether an effect appears) are computed: a sentence that states one carries a glued value
# or verdict (dl.verdict), a citation, or a reference to a proof. A sentence that only looks like one (a
# question, a statement about the literature, a definition) is listed with its reason in
# tests/verdict_allowlist/NN.txt, one per line: "<start of the sentence> | <why it is not a computed verdict>".
VERDICT_WORDS = re.compile(
    r"\b(wins?|won|beats?|outperforms?|better than|worse than|most accurate|least accurate|negative result|"
    r"no gain|does not help|buys (?:next to )?nothing|faster than|slower than|higher than|lower than|"
    r"more accurate|less accurate|close to|closer to|below the|above the)\b"
    r"(?! (?:cell|figure|table|code|plot|next|following|list|definition|section))",
    re.I,
)
BACKING = re.compile(r"\{glue:|\{footcite|\{prf:ref|\{eq\}|\{cite")


def prose_sentences(markdown: str) -> list[str]:
    """The sentences of a chapter's prose: no code, display math, directive headers or options."""
    text = re.sub(r"(`{3,}|~{3,}).*?\1", " ", markdown, flags=re.S)
    text = re.sub(r"\$\$.*?\$\$", " ", text, flags=re.S)
    text = re.sub(r"^\s*:[\w-]+:[^\n]*$|^ {4}.*$", " ", text, flags=re.M)
    sentences = []
    for paragraph in re.split(r"\n\s*\n|\n(?=#|\s*[-*] |\s*\d+\. )", text):  # paragraphs, headings, list items
        sentences += re.split(r"(?<=[.!])\s+(?=[A-Z*(])", re.sub(r"\s+", " ", paragraph).strip())
    return [s for s in sentences if s]


def unbacked_verdicts(markdown: str) -> list[str]:
    """Sentences that state a verdict with nothing computed or cited behind them."""
    found = []
    for sentence in prose_sentences(markdown):
        words = re.sub(r"\$[^$]*\$|`[^`]*`", "", sentence)
        if VERDICT_WORDS.search(words) and not BACKING.search(sentence) and not sentence.rstrip().endswith("?"):
            found.append(sentence.strip())
    return found


def test_verdict_rule_catches_a_typed_verdict():
    assert unbacked_verdicts("Trained for 3 epochs, the LSTM beats the GPT. The cell below plots it.") == [
        "Trained for 3 epochs, the LSTM beats the GPT."
    ]
    assert not unbacked_verdicts("The LSTM {glue:text}`ch06_verdict` the GPT. Which one wins?")


@pytest.mark.parametrize("nb", CHAPTERS, ids=ids(CHAPTERS))
def test_verdicts_in_prose_are_computed(nb):
    markdown = "\n".join(source(c) for c in load(nb)["cells"] if c["cell_type"] == "markdown")
    allow_file = ROOT / "tests" / "verdict_allowlist" / f"{nb.name[:2]}.txt"
    allowed = (
        [line.split(" | ")[0].strip() for line in allow_file.read_text().splitlines()] if allow_file.exists() else []
    )
    typed = [s for s in unbacked_verdicts(markdown) if not any(s.startswith(a) for a in allowed if a)]
    assert not typed, f"{nb.name}: verdicts typed into prose (glue them with dl.verdict, cite, or allow-list): {typed}"


@pytest.mark.parametrize("nb", CHAPTERS, ids=ids(CHAPTERS))
def test_no_claim_depends_on_the_run_size(nb):
    """Sizes come from RUN.pick(ci=..., full=...); a chapter never branches on the size, so every assert
    and every verdict holds, and is checked, at "ci" and at "full" alike."""
    code = "\n".join(source(c) for c in load(nb)["cells"] if c["cell_type"] == "code")
    assert not re.search(r"\bRUN\.(is_ci|size\b)", code), f"{nb.name}: branches on the run size; use RUN.pick"


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
OPTIONAL_MODULES = {
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxscript": "onnx",
    "optuna": "hpo",
    "yaml": "config",
    "tokenizers": "text",
    "torchao": "quant",
    "keras": "keras",
}
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


GLUE_KEY = re.compile(r"""\bdl\.(?:glue|verdict)\(\s*["']([A-Za-z0-9_]+)["']""")


@pytest.mark.parametrize("nb", CHAPTERS, ids=ids(CHAPTERS))
def test_no_glue_key_is_set_in_two_cells(nb):
    """myst-nb refuses a glue key set twice (the site build fails), so no two code cells set one key."""
    cells_of: dict[str, set[int]] = {}
    for i, cell in enumerate(load(nb)["cells"]):
        if cell["cell_type"] == "code":
            for key in GLUE_KEY.findall(source(cell)):
                cells_of.setdefault(key, set()).add(i)
    twice = {key: sorted(cells) for key, cells in cells_of.items() if len(cells) > 1}
    assert not twice, f"{nb.name}: glue keys set in two cells: {twice}"
