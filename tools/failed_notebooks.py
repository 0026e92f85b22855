"""Print the notebooks that failed in the last pytest run, for ``tools/dev.sh test`` to rerun.

Reads the node ids of the failed tests, which conftest.py writes to
``_build/timings/failed.txt`` at the end of every run that executes notebooks. Exits with
status 1, printing nothing on stdout, when nothing failed or when a failure is not a notebook
cell: only notebooks get a second run, since their timing asserts can be disturbed by a shared
machine; a library test must pass the first time.
"""

from __future__ import annotations

import sys
from pathlib import Path

FAILED = Path(__file__).resolve().parent.parent / "_build" / "timings" / "failed.txt"


def failed_notebooks(nodes: list[str]) -> list[str] | None:
    """The sorted notebook paths among the failed node ids, or None if any failure is not one."""
    paths = {node.split("::", 1)[0] for node in nodes}
    if not paths or any(not p.endswith(".ipynb") for p in paths):
        return None
    return sorted(paths)


def main() -> int:
    nodes = FAILED.read_text().split("\n") if FAILED.exists() else []
    nodes = [node for node in nodes if node]
    notebooks = failed_notebooks(nodes)
    if notebooks is None:
        print(f"not rerun: failures other than notebooks, or none recorded: {nodes}", file=sys.stderr)
        return 1
    print(" ".join(notebooks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
