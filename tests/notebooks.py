"""Helpers for tests that read the book's notebooks and table of contents."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
CHAPTER_RE = re.compile(r"^\d\d_[a-z0-9_]+\.ipynb$")


def all_notebooks() -> list[Path]:
    """Every notebook under book/ (checkpoints excluded)."""
    return sorted(
        p for p in BOOK.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts and not p.name.endswith(".nbval.ipynb")
    )


def chapters() -> list[Path]:
    """The chapter notebooks, book/NN_slug.ipynb."""
    return [p for p in all_notebooks() if p.parent == BOOK and CHAPTER_RE.match(p.name)]


def load(path: Path) -> dict:
    """A notebook as plain JSON."""
    return json.loads(path.read_text())


def tags(cell: dict) -> set[str]:
    """A cell's tags."""
    return set(cell.get("metadata", {}).get("tags", []) or [])


def source(cell: dict) -> str:
    """A cell's source as one string."""
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def toc_files() -> list[str]:
    """Every ``file:`` entry of _toc.yml (root included), without suffix."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    found = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                found.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk({k: v for k, v in toc.items() if k != "root"})
    return found


SOLUTION_START = re.compile(r"^`{3,}\{solution-start\}\s+(\S+)", re.M)
SOLUTION_END = re.compile(r"^`{3,}\{solution-end\}", re.M)


def executed_solutions(nb: dict) -> dict[str, list[str]]:
    """Exercise label -> sources of the code cells of its gated solution (``solution-start`` ... ``solution-end``).

    Raises ``ValueError`` for a start without an end, or an end without a start."""
    found: dict[str, list[str]] = {}
    label: str | None = None
    for cell in nb["cells"]:
        text = source(cell)
        if cell["cell_type"] == "code":
            if label is not None:
                found[label].append(text)
            continue
        marks = [(m.start(), "start", m) for m in SOLUTION_START.finditer(text)]
        marks += [(m.start(), "end", m) for m in SOLUTION_END.finditer(text)]
        for _, what, m in sorted(marks, key=lambda mark: mark[0]):
            if what == "start":
                if label is not None:
                    raise ValueError(f"solution of {m.group(1)} starts inside the solution of {label}")
                label = m.group(1)
                found[label] = []
            else:
                if label is None:
                    raise ValueError("a solution-end without a solution-start")
                label = None
    if label is not None:
        raise ValueError(f"the solution of {label} has no solution-end")
    return found
