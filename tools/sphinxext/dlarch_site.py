"""Small Sphinx extension for the dlarch website.

- Removes duplicate inline scripts: with Jupyter Book 1, sphinx-thebe registers its config
  script twice, and browsers then report "Identifier 'THEBE_JS_URL' has already been declared".
- Shows the graded-assignment cells (otter-grader markup, tools/assign.py) per edition: the book
  drops the ``# BEGIN/END SOLUTION`` marker lines; the student edition (``dlarch_edition =
  "student"``, set by ``tools/assign.py generate --site``) shows otter's stub instead of the solution,
  without its outputs.
- Removes every exercise solution from the student edition, the gated ones (``solution-start`` ...
  ``solution-end``, which hold executed code cells) included: sphinx-exercise's ``hide_solutions``
  drops only a solution's own directive, not the cells between a gated pair, so the student
  edition keeps ``hide_solutions`` off and drops the merged solution nodes itself.
- Numbers definitions, theorems, exercises, figures and equations per chapter, as a textbook does
  (Definition 6.1, Eq. (6.3)): Sphinx numbers them across the whole book unless the toctree is
  numbered, and a numbered toctree would restart at each part and number every heading too. So
  after Sphinx assigns its book-wide numbers, each chapter's are replaced by (chapter, position in
  the chapter), the chapter taken from the file name ``NN_slug``; cross-references follow.
- Adds the book's stylesheet, which labels every cell whose output was recorded on a GPU
  machine (cells tagged requires-cuda / requires-2-gpus / requires-tensorrt).
"""

from __future__ import annotations

import re
from pathlib import Path

from docutils import nodes

MARKER_LINE = re.compile(r"^\s*#\s*(BEGIN|END) SOLUTION( NO PROMPT)?\s*$")
SOLUTION_SUFFIX = re.compile(r"\s*#\s*SOLUTION\s*$")
HAS_SOLUTION = re.compile(r"#\s*BEGIN SOLUTION|#\s*SOLUTION\s*$", re.M)


def _dedupe_scripts(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for script in scripts:
        # the duplicate differs only in filename None vs '' (an inline script either way)
        key = (getattr(script, "filename", str(script)) or "", repr(getattr(script, "attributes", {})))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    scripts[:] = unique  # in place: later handlers (MathJax) append to this same list


def without_markers(code: str) -> str:
    """The reference solution as the book shows it: otter's marker comments removed."""
    lines = [SOLUTION_SUFFIX.sub("", line) for line in code.splitlines() if not MARKER_LINE.match(line)]
    return "\n".join(lines)


def student_stub(code: str) -> str:
    """What the student's notebook holds for this cell: otter-grader's own stub."""
    from otter.assign.solutions import replace_solutions  # the function otter assign applies

    return "\n".join(replace_solutions(code.splitlines(), "python"))


CHAPTER_DOC = re.compile(r"(?:^|/)(\d\d)_[^/]+$")


def number_per_chapter(toc_fignumbers: dict) -> None:
    """Renumber, in place, each chapter's enumerable items ``(chapter, 1..k)`` per kind, in document order."""
    for docname, by_type in toc_fignumbers.items():
        match = CHAPTER_DOC.search(docname)
        if not match:
            continue
        for numbers in by_type.values():
            for position, key in enumerate(sorted(numbers, key=numbers.__getitem__), start=1):
                numbers[key] = (int(match.group(1)), position)


def _number_per_chapter(app, env):
    number_per_chapter(env.toc_fignumbers)
    return []


def _drop_solutions(app, doctree):
    """Student edition: remove each exercise solution (gated ones were merged into one node when read)."""
    if app.config.dlarch_edition != "student":
        return
    from sphinx_exercise.nodes import solution_end_node, solution_node, solution_start_node

    for kind in (solution_node, solution_start_node, solution_end_node):
        for node in list(doctree.findall(kind)):
            node.parent.remove(node)


def _assignment_cells(app, doctree):
    student = app.config.dlarch_edition == "student"
    for cell in list(doctree.findall(nodes.container)):
        if cell.get("nb_element") != "cell_code":
            continue
        for block in cell.findall(nodes.literal_block):
            code = block.astext()
            if not HAS_SOLUTION.search(code):
                continue
            new = student_stub(code) if student else without_markers(code)
            block.children = [nodes.Text(new)]
            block.rawsource = new
            if student:
                for out in [c for c in cell.children if c.get("nb_element") == "cell_code_output"]:
                    cell.remove(out)


def setup(app):
    app.add_config_value("dlarch_edition", "book", "env", [str])
    app.connect("doctree-read", _assignment_cells)
    app.connect("doctree-read", _drop_solutions)
    app.connect("env-get-updated", _number_per_chapter, priority=900)  # after Sphinx's TocTreeCollector (500)
    app.connect("builder-inited", lambda app: app.config.html_static_path.append(str(Path(__file__).parent / "static")))
    app.add_css_file("dlarch.css")
    app.connect(
        "html-page-context", _dedupe_scripts, priority=100
    )  # early: emit_firstresult stops at the first handler that returns
    return {"parallel_read_safe": True, "parallel_write_safe": True}
