"""Checks of the built website in _build/html (run after `jupyter-book build`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.notebooks import ROOT, chapters

HTML = ROOT / "_build" / "html"
if not (HTML / "index.html").exists():
    if os.environ.get("DLARCH_REQUIRE_SITE"):
        raise RuntimeError("no built site in _build/html: run `bash tools/dev.sh book` first")
    pytest.skip("site not built", allow_module_level=True)

CHAPTERS = chapters()
PAGES = sorted(HTML.rglob("*.html"))


def chapter_page(nb: Path) -> str:
    return (HTML / "book" / f"{nb.stem}.html").read_text()


@pytest.mark.parametrize("nb", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_chapter_page_has_outputs_figures_math_and_colab(nb):
    page = chapter_page(nb)
    assert 'class="cell_output' in page, "executed outputs are on the page"
    images = re.findall(r'<img[^>]+src="([^"]+)"', page)
    figures = [src for src in images if "_static/" not in src]  # not the theme's logos and buttons
    assert figures, "a chapter shows at least one executed figure (not only the Colab logo)"
    for src in images:
        if not src.startswith(("http", "data:")):
            assert (HTML / "book" / src).resolve().exists(), f"missing image {src}"
    assert "\\(" in page or "\\[" in page or "math notranslate" in page, "math is on the page"
    assert "colab.research.google.com/github/dlarch/dlarch/blob/main/book/" in page, "Colab launch button"
    assert "Traceback (most recent call last)" not in page


def test_no_page_loads_scripts_from_a_cdn():
    offenders = []
    for page in PAGES:
        for src in re.findall(r'<script[^>]+src="([^"]+)"', page.read_text()):
            if src.startswith(("http:", "https:", "//")):
                offenders.append(f"{page.relative_to(HTML)}: {src}")
    assert not offenders, offenders[:5]


def test_mathjax_is_served_by_the_site():
    assert (HTML / "mathjax" / "tex-mml-chtml.js").exists()
    assert (HTML / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").is_dir()
    for nb in CHAPTERS:
        assert "mathjax/tex-mml-chtml.js" in chapter_page(nb), f"{nb.stem}: MathJax not loaded from the site"


def test_execution_statistics_page_shows_timing_tables():
    """The test run's tables are HTML tables on the page (not Markdown pipes in a paragraph)."""
    page = (HTML / "book" / "execution_times.html").read_text()
    assert "|---|" not in page and "| notebook |" not in page, "a table rendered as raw pipes"
    timings = ROOT / "_build" / "timings" / "notebooks.csv"
    if not timings.exists():
        assert "No timing table yet" in page
        return
    tables = re.findall(r"<table.*?</table>", page, flags=re.S)
    notebooks = next((t for t in tables if "Wall time per notebook" in t), None)
    assert notebooks, "no timing table on the statistics page"
    rows = re.findall(r"<tr>(.*?)</tr>", notebooks, flags=re.S)
    for nb in CHAPTERS:
        assert any(f"book/{nb.name}" in r for r in rows), f"{nb.name} has no row in the timing table"
    if (ROOT / "_build" / "timings" / "phases.csv").exists():
        assert any("Phases of the test command" in t and ">notebooks<" in t for t in tables)


@pytest.mark.parametrize("nb", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_items_are_numbered_per_chapter(nb):
    # Definition 6.1, Exercise 6.2, Eq. (6.3): every numbered item of chapter N carries N (sphinxext/dlarch_site.py)
    page, n = chapter_page(nb), int(nb.name[:2])
    own = re.findall(r'<span class="caption-number">[^<]*?(\d+)\.\d+', page)  # admonition titles of this page
    own += re.findall(r'class="eqno">\((\d+)\.\d+\)', page)
    assert own, "the chapter has numbered items"
    assert all(int(x) == n for x in own), f"items numbered for other chapters: {sorted(set(own))}"
