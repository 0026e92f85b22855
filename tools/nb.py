"""Authoring helpers for the book's notebooks (the .ipynb files are the source of truth).

    python tools/nb.py new 04 cnn "Convolution and CNNs"   # skeleton book/04_cnn.ipynb
    python tools/nb.py to-md book/04_cnn.ipynb drafts/04_cnn.md   # edit as MyST text ...
    python tools/nb.py from-md drafts/04_cnn.md book/04_cnn.ipynb # ... and convert back
    python tools/nb.py strip book/*.ipynb                  # drop outputs of ungated cells
    python tools/nb.py run book/04_cnn.ipynb               # execute, report time per cell
    python tools/nb.py cache-executed                      # executed notebooks -> the site's cache
    python tools/nb.py check-cached                        # after a site build: it executed nothing

``run`` executes like the test machine does (size "ci") and writes the executed copy to
_build/executed/book/ for inspection; it fails on the first error.

``cache-executed`` hands the notebooks that the test run executed (nbval with ``tests/nbrun.py``
writes them to _build/executed/book/) to the websites: it stores each in the jupyter-cache
_build/.jupyter_cache, keyed on the chapter's code, where ``jupyter-book build`` (execution mode
``cache``) finds it and executes nothing. It fails, naming them, when a chapter was not executed,
failed, or changed since it was executed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from dlarch_lib.core.hardware import GATING_TAGS  # noqa: E402
from dlarch_lib.core.notebook import SETUP_CELL  # noqa: E402

CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))
EXECUTED = ROOT / "_build" / "executed"
CACHE = ROOT / "_build" / ".jupyter_cache"
MANIFEST = EXECUTED / "cached.json"  # {chapter: cache record id and time}, written by cache-executed
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
    client = NotebookClient(
        nb, timeout=600, resources={"metadata": {"path": str(path.parent)}}, skip_cells_with_tag="skip-execution"
    )
    start = time.perf_counter()
    client.execute()
    total = time.perf_counter() - start
    out = EXECUTED / path.resolve().relative_to(ROOT)
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    print(f"{path.name}: {total:.1f} s (executed copy: {out.relative_to(ROOT)})")


def code_of(nb: nbformat.NotebookNode) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


def cmd_cache_executed(
    chapters: list[Path],
    executed: Path = EXECUTED,
    cache_path: Path = CACHE,
    root: Path = ROOT,
    manifest: Path = MANIFEST,
) -> None:
    """Store the executed copy of each chapter in the jupyter-cache the site builds read.

    ``executed`` mirrors ``root``: the copy of ``root/book/x.ipynb`` is ``executed/book/x.ipynb``."""
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    cache = get_cache(str(cache_path))
    problems, total = [], 0.0
    for src in chapters:
        src = src.resolve()
        done = executed / src.relative_to(root)
        if not done.exists():
            problems.append(f"{src.name}: not executed (no {done})")
            continue
        nb, source = nbformat.read(done, as_version=4), nbformat.read(src, as_version=4)
        run = nb.metadata.pop("dlarch_run", {})
        if not run.get("passed"):
            problems.append(f"{src.name}: failed when executed ({', '.join(run.get('failed', [])) or 'no verdict'})")
        elif code_of(nb) != code_of(source):
            problems.append(f"{src.name}: its code changed since it was executed")
        else:
            cache.cache_notebook_bundle(
                CacheBundleIn(nb, str(src), data={"execution_seconds": run["seconds"]}),
                check_validity=False,
                overwrite=True,
            )
            cache.match_cache_notebook(source)  # KeyError if the site build would not find it
            total += run["seconds"]
    if problems:
        sys.exit("not cached for the website:\n  " + "\n  ".join(problems))
    manifest.write_text(json.dumps(_cache_ids(cache, chapters), indent=1))
    print(f"cached {len(chapters)} executed notebooks ({total:.0f} s of execution) in {cache_path}")


def _cache_ids(cache, chapters: list[Path]) -> dict[str, str]:
    """{chapter: id and creation time of the cache record a site build uses for it} (KeyError if none).

    The time is part of the id: SQLite may give a replacing record the id of the one it replaced."""
    ids = {}
    for src in chapters:
        record = cache.match_cache_notebook(nbformat.read(src, as_version=4))
        ids[str(src)] = f"{record.pk}@{record.created.isoformat()}"
    return ids


def cmd_check_cached(chapters: list[Path], cache_path: Path = CACHE, manifest: Path = MANIFEST) -> None:
    """After a site build: every chapter was rendered from the record the test run stored.

    A build that executed a chapter (in ``cache`` mode, because it did not find it) replaces the
    record with a new one, with a new id; that is a second execution, and an error here."""
    from jupyter_cache import get_cache

    stored = json.loads(manifest.read_text())
    try:
        now = _cache_ids(get_cache(str(cache_path)), chapters)
    except KeyError as err:
        sys.exit(f"a chapter is no longer in the cache after the site build: {err}")
    again = [Path(c).name for c in now if stored.get(c) != now[c]]
    if again:
        sys.exit(f"the site build executed these notebooks again: {', '.join(again)}")
    print(f"the site build executed no chapter: all {len(now)} rendered from the test run's execution")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("new")
    p.add_argument("number")
    p.add_argument("slug")
    p.add_argument("title")
    p = sub.add_parser("to-md")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p = sub.add_parser("from-md")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p = sub.add_parser("strip")
    p.add_argument("paths", type=Path, nargs="+")
    p = sub.add_parser("run")
    p.add_argument("path", type=Path)
    p = sub.add_parser("cache-executed")
    p.add_argument("paths", type=Path, nargs="*")
    p = sub.add_parser("check-cached")
    p.add_argument("paths", type=Path, nargs="*")
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
    elif args.cmd == "cache-executed":
        cmd_cache_executed([p.resolve() for p in args.paths] or CHAPTERS)
    elif args.cmd == "check-cached":
        cmd_check_cached([p.resolve() for p in args.paths] or CHAPTERS)


if __name__ == "__main__":
    main()
