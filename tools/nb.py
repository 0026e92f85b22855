"""Authoring helpers for the book's notebooks (the .ipynb files are the source of truth).

    python tools/nb.py new 04 cnn "Convolution and CNNs"   # skeleton book/04_cnn.ipynb
    python tools/nb.py to-md book/04_cnn.ipynb drafts/04_cnn.md   # edit as MyST text ...
    python tools/nb.py from-md drafts/04_cnn.md book/04_cnn.ipynb # ... and convert back
    python tools/nb.py strip book/*.ipynb                  # drop outputs of ungated cells
    python tools/nb.py run book/04_cnn.ipynb               # execute, report time per cell

``run`` executes like the test machine does (size "ci") and writes the executed copy to
_build/executed/ for inspection; it fails on the first error.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from dlarch_lib.hardware import GATING_TAGS  # noqa: E402
from dlarch_lib.notebook import SETUP_CELL  # noqa: E402

KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
COLAB = {"provenance": [], "gpuType": "T4"}


def strip(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Remove outputs and counts of every ungated code cell; set the book's metadata."""
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code" and not (set(cell.metadata.get("tags", [])) & GATING_TAGS):
            cell.outputs, cell.execution_count = [], None
    nb.metadata = {
        "kernelspec": KERNELSPEC,
        "language_info": {"name": "python"},
        "accelerator": "GPU",
        "colab": COLAB,
    }
    return nb


def write(nb: nbformat.NotebookNode, path: Path) -> None:
    nbformat.validate(nb)
    nbformat.write(strip(nb), path)


def cmd_new(number: str, slug: str, title: str) -> None:
    path = ROOT / "book" / f"{number}_{slug}.ipynb"
    if path.exists():
        raise SystemExit(f"{path} exists")
    md = nbformat.v4.new_markdown_cell
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        md(f"# {int(number)} {title}\n\nWhat the reader will build.\n\n*Seed sections:* ..."),
        nbformat.v4.new_code_cell(SETUP_CELL),
        md("## Summary\n\n## Exercises\n\n## References\n"),
    ]
    write(nb, path)
    print(f"wrote {path}")


def cmd_run(path: Path) -> None:
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    skipped = [c for c in nb.cells if set(c.metadata.get("tags", [])) & GATING_TAGS]
    for cell in skipped:
        cell.metadata.setdefault("tags", []).append("skip-execution")
    client = NotebookClient(nb, timeout=600, resources={"metadata": {"path": str(path.parent)}},
                            skip_cells_with_tag="skip-execution")
    start = time.perf_counter()
    client.execute()
    total = time.perf_counter() - start
    out = ROOT / "_build" / "executed" / path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    print(f"{path.name}: {total:.1f} s (executed copy: {out.relative_to(ROOT)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("new"); p.add_argument("number"); p.add_argument("slug"); p.add_argument("title")
    p = sub.add_parser("to-md"); p.add_argument("src", type=Path); p.add_argument("dst", type=Path)
    p = sub.add_parser("from-md"); p.add_argument("src", type=Path); p.add_argument("dst", type=Path)
    p = sub.add_parser("strip"); p.add_argument("paths", type=Path, nargs="+")
    p = sub.add_parser("run"); p.add_argument("path", type=Path)
    args = parser.parse_args()
    if args.cmd == "new":
        cmd_new(args.number, args.slug, args.title)
    elif args.cmd == "to-md":
        args.dst.parent.mkdir(parents=True, exist_ok=True)
        jupytext.write(nbformat.read(args.src, as_version=4), args.dst, fmt="md:myst")
    elif args.cmd == "from-md":
        write(jupytext.read(args.src), args.dst)
    elif args.cmd == "strip":
        for path in args.paths:
            write(nbformat.read(path, as_version=4), path)
    elif args.cmd == "run":
        cmd_run(args.path)


if __name__ == "__main__":
    main()
