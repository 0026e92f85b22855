"""Authoring helpers for the book's notebooks (the .ipynb files are the source of truth).

    python tools/nb.py new 04 cnn "Convolution and CNNs"   # skeleton book/04_cnn.ipynb
    python tools/nb.py to-md book/04_cnn.ipynb drafts/04_cnn.md   # edit as MyST text ...
    python tools/nb.py from-md drafts/04_cnn.md book/04_cnn.ipynb # ... and convert back
    python tools/nb.py strip book/*.ipynb                  # drop every output but the recorded GPU cells
    python tools/nb.py run book/04_cnn.ipynb               # execute, report time per cell
    python tools/nb.py cache-executed                      # executed notebooks -> the site's cache
    python tools/nb.py check-cached                        # after a site build: it executed nothing
    python tools/nb.py record-gpu gpu_run.tar.gz           # a GPU run's outputs of the gated cells -> book/

``run`` executes like the test machine does (size "ci") and writes the executed copy to
_build/executed/book/ for inspection; it fails on the first error.

``cache-executed`` hands the notebooks that the test run executed (nbval with ``tests/nbrun.py``
writes them to _build/executed/book/) to the websites: it stores each in the jupyter-cache
_build/.jupyter_cache, keyed on the chapter's code, where ``jupyter-book build`` (execution mode
``cache``) finds it and executes nothing. It fails, naming them, when a chapter was not executed,
failed, or changed since it was executed.

``record-gpu`` takes what ``bash tools/gpu.sh`` produced on a machine with a CUDA GPU (its
``gpu_run.tar.gz``, or that archive unpacked) and copies into each chapter the outputs of the cells
whose gating tags held on that machine (one GPU: the cells tagged ``requires-cuda``, not
``requires-2-gpus`` or ``requires-tensorrt``), matched by cell id; it refuses, writing nothing, if
such a cell's code differs from the executed one. Each recorded cell gets a stamp in its metadata
(GPU, torch, CUDA, date, a digest of its code) and a last output line saying which GPU, torch
version and date recorded it; the GPU timing table goes to ``_static/gpu_timings.csv``, which the
execution statistics page shows. ``strip`` keeps exactly those outputs, as long as the cell's code
is the one recorded; ``tests/test_hygiene.py`` fails any other stored output
(:func:`stored_output_problems`). The ``gpu-*`` commands are the steps of ``tools/gpu.sh``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import hashlib
import json
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

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
RECORD_KEY = "dlarch_recorded"  # a recorded cell's stamp in its metadata (record-gpu)
GPU_TIMINGS = ROOT / "_static" / "gpu_timings.csv"  # the GPU timing table the statistics page shows
GPU_TIMINGS_HEADER = ["chapter", "seconds", "outcome", "gpu", "torch", "cuda", "date"]


# --------------------------------------------------------------------------- outputs a notebook may store


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def gating_tags(cell: dict) -> set[str]:
    """The hardware-gating tags of a cell (``requires-cuda``, ...)."""
    return set(cell.get("metadata", {}).get("tags", []) or []) & GATING_TAGS


def source_digest(source: str) -> str:
    """The digest of a cell's code that its recording stamp keeps."""
    return hashlib.sha256(source.encode()).hexdigest()


def is_recorded(cell: dict) -> bool:
    """True when a code cell may keep its outputs: ``record-gpu`` stamped it, on a machine where
    every gating tag of the cell held, and its code is still the code that was recorded."""
    stamp = cell.get("metadata", {}).get(RECORD_KEY)
    tags = gating_tags(cell)
    return (
        bool(tags)
        and isinstance(stamp, dict)
        and tags <= set(stamp.get("hardware", []))
        and stamp.get("source_sha256") == source_digest(_source(cell))
    )


def stored_output_problems(nb: dict) -> list[str]:
    """What a committed notebook stores that it must not: outputs or counts of any cell but a
    recorded GPU cell (:func:`is_recorded`), and stamps that no longer hold. Empty when clean."""
    problems = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        stored = bool(cell.get("outputs")) or cell.get("execution_count") is not None
        stamped = RECORD_KEY in cell.get("metadata", {})
        if is_recorded(cell):
            if cell.get("outputs") and cell.get("execution_count") is None:
                problems.append(f"cell {i}: recorded outputs without an execution count (nbval would refuse the cell)")
        elif stamped:
            problems.append(f"cell {i}: its GPU recording no longer matches its code or tags (strip it, re-record)")
        elif stored:
            why = "a gated cell not recorded by record-gpu" if gating_tags(cell) else "not a GPU-recorded cell"
            problems.append(f"cell {i} stores outputs or an execution count, {why} (strip it)")
    return problems


def strip(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Remove outputs and counts of every code cell but the recorded GPU cells; set the book's metadata.

    A recorded cell whose code changed since it was recorded loses its outputs and stamp (a note
    says so): they no longer show what that code does."""
    for i, cell in enumerate(nb.cells):
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code" or is_recorded(cell):
            continue
        if cell.metadata.pop(RECORD_KEY, None) is not None and cell.outputs:
            print(
                f"note: cell {i} changed since it was recorded on a GPU; its recorded output is dropped",
                file=sys.stderr,
            )
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


# --------------------------------------------------------------------------- the GPU recording


def write_dist_info(pyproject: Path, target: Path) -> Path:
    """Make the checkout importable as an installed ``dlarch_lib`` without building it.

    On the GPU machine (no network, no build backend to rely on) ``tools/gpu.sh`` puts the checkout
    on ``PYTHONPATH``; ``dl.require`` reads the optional groups from the installed metadata, so this
    writes that metadata (``METADATA`` of a ``.dist-info`` in ``target``, also on ``PYTHONPATH``)
    from ``pyproject.toml``."""
    import tomllib  # Python 3.11+, as the tools' environments

    project = tomllib.loads(pyproject.read_text())["project"]
    name, version = project["name"], project["version"]
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    lines += [f"Requires-Dist: {r}" for r in project.get("dependencies", [])]
    for extra, requirements in project.get("optional-dependencies", {}).items():
        lines.append(f"Provides-Extra: {extra}")
        lines += [f'Requires-Dist: {r}; extra == "{extra}"' for r in requirements]
    dist = target / f"{name}-{version}.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("\n".join(lines) + "\n")
    (dist / "INSTALLER").write_text("tools/gpu.sh\n")
    return dist


def has_gated_cells(path: Path, tags: set[str] | frozenset[str] = GATING_TAGS) -> bool:
    """True when a notebook has a code cell with one of ``tags``."""
    cells = json.loads(path.read_text())["cells"]
    return any(c["cell_type"] == "code" and gating_tags(c) & tags for c in cells)


def gpu_order(chapters: list[Path]) -> list[Path]:
    """The chapters in the order a GPU run starts them: those with cells that one GPU records
    (``requires-cuda``) first, then those with other gated cells, then the rest, so that a time
    limit cuts the chapters that record nothing."""
    return sorted(chapters, key=lambda p: (not has_gated_cells(p, {"requires-cuda"}), not has_gated_cells(p), p.name))


def gpu_info() -> dict[str, Any]:
    """The machine a GPU run happens on: GPU, driver, torch, CUDA, Python, date, and the gating tags
    whose hardware is present. Exits when there is no CUDA GPU."""
    import platform
    import subprocess

    import torch

    from dlarch_lib.core.hardware import CELL_REQUIREMENTS

    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: tools/gpu.sh records the cells that need one")
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        driver = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.split("\n")[0].strip()
    except (OSError, subprocess.SubprocessError):
        driver = ""
    return {
        "gpu": torch.cuda.get_device_name(0),
        "gpu_count": torch.cuda.device_count(),
        "driver": driver,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).date().isoformat(),
        "hardware": sorted(tag for tag, req in CELL_REQUIREMENTS.items() if req.present()),
    }


def gpu_summary(run_dir: Path, chapters: list[Path], timed_out: bool, root: Path = ROOT) -> list[list[str]]:
    """After a GPU run: the timing table ``run_dir/gpu_timings.csv`` (one row per chapter: wall time
    and outcome from the executed copy ``tests/nbrun.py`` wrote, with the machine of
    ``run_dir/gpu_run.json``) and the outcome counts added to that JSON. Returns the rows."""
    info = json.loads((run_dir / "gpu_run.json").read_text())
    rows = []
    for src in chapters:
        rel = src.resolve().relative_to(root)
        done = run_dir / "executed" / rel
        if done.exists():
            run = json.loads(done.read_text())["metadata"].get("dlarch_run", {})
            failed = run.get("failed", [])
            outcome = "passed" if run.get("passed") else "FAILED: " + "; ".join(failed)
            seconds = f"{run.get('seconds', 0):.1f}"
        else:
            outcome = "not finished in the time limit" if timed_out else "not executed"
            seconds = ""
        rows.append([rel.as_posix(), seconds, outcome, info["gpu"], info["torch"], info["cuda"], info["date"]])
    with open(run_dir / "gpu_timings.csv", "w", newline="") as f:
        csv.writer(f).writerows([GPU_TIMINGS_HEADER, *rows])
    info["timed_out"] = timed_out
    info["outcomes"] = {
        o: sum(r[2].split(":")[0] == o for r in rows) for o in sorted({r[2].split(":")[0] for r in rows})
    }
    (run_dir / "gpu_run.json").write_text(json.dumps(info, indent=1))
    return rows


@contextlib.contextmanager
def _gpu_run(path: Path) -> Iterator[Path]:
    """The folder of a GPU run: ``path`` itself (or its parent, given the ``executed`` folder), or
    ``gpu_run.tar.gz`` unpacked into a temporary folder."""
    if path.is_dir():
        found = next((d for d in (path, path.parent) if (d / "gpu_run.json").exists()), None)
        if found is None:
            sys.exit(f"{path}: no gpu_run.json here or above (give the folder gpu_run.tar.gz unpacks to)")
        yield found
        return
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(path) as tar:
        tar.extractall(tmp, filter="data")
        yield Path(tmp)


def _record_stamp(info: dict[str, Any]) -> tuple[dict[str, Any], nbformat.NotebookNode]:
    """The stamp for a recorded cell's metadata, and the output line that shows it on the page."""
    stamp = {key: info[key] for key in ("gpu", "torch", "cuda", "date", "hardware")}
    stamp["size"], stamp["by"] = "full", "tools/gpu.sh"
    cuda = f" (CUDA {info['cuda']})" if info["cuda"] else ""
    text = (
        f'Recorded on {info["gpu"]} with torch {info["torch"]}{cuda} on {info["date"]} by tools/gpu.sh (size "full").'
    )
    line = nbformat.v4.new_output(
        "display_data",
        data={"text/markdown": f"*{text}*", "text/plain": text},
        metadata={RECORD_KEY: True},
    )
    return stamp, line


def cmd_record_gpu(
    path: Path, chapters: list[Path], root: Path = ROOT, timings: Path | None = GPU_TIMINGS
) -> dict[str, list[str]]:
    """Copy a GPU run's outputs of the cells it could run into the chapters (see the module doc).

    Checks every chapter first and writes nothing if a recordable cell is missing from the executed
    copy or its code differs. Returns {chapter name: ids of the cells recorded}."""
    with _gpu_run(path) as run_dir:
        info = json.loads((run_dir / "gpu_run.json").read_text())
        present = set(info["hardware"])
        stamp, line = _record_stamp(info)
        problems: list[str] = []
        notes: list[str] = []
        changes: dict[Path, tuple[nbformat.NotebookNode, dict[str, nbformat.NotebookNode]]] = {}
        for src in chapters:
            done = run_dir / "executed" / src.resolve().relative_to(root)
            nb = nbformat.read(src, as_version=4)
            wanted = [c for c in nb.cells if c.cell_type == "code" and gating_tags(c) and gating_tags(c) <= present]
            if not wanted:
                continue
            if not done.exists():
                notes.append(f"{src.name}: not executed on the GPU (time limit?); its cells keep what they had")
                continue
            executed = nbformat.read(done, as_version=4)
            failed = {f.split(" (")[0] for f in executed.metadata.get("dlarch_run", {}).get("failed", [])}
            code_cells = [c for c in executed.cells if c.cell_type == "code"]
            numbers = {c.get("id"): f"Cell {k}" for k, c in enumerate(code_cells)}  # nbval's names of the cells
            by_id = {c.get("id"): c for c in executed.cells}
            recorded = {}
            for cell in wanted:
                ran = by_id.get(cell.id)
                if ran is None or ran.cell_type != "code":
                    problems.append(f"{src.name}: cell {cell.id} is not in the executed copy")
                elif ran.source != cell.source:
                    problems.append(f"{src.name}: cell {cell.id}'s code differs from the code executed on the GPU")
                elif ran.execution_count is None:
                    notes.append(f"{src.name}: cell {cell.id} did not run on the GPU; not recorded")
                elif numbers[cell.id] in failed or any(o.output_type == "error" for o in ran.outputs):
                    notes.append(f"{src.name}: cell {cell.id} failed on the GPU; not recorded")
                else:
                    recorded[cell.id] = ran
            if recorded:
                changes[src] = (nb, recorded)
        if problems:
            sys.exit(
                "record-gpu refused (re-run tools/gpu.sh on this code); nothing was written:\n  "
                + "\n  ".join(problems)
            )
        done_ids: dict[str, list[str]] = {}
        for src, (nb, recorded) in changes.items():
            for cell in nb.cells:
                ran = recorded.get(cell.get("id"))
                if ran is None:
                    continue
                cell.outputs = [*ran.outputs, copy.deepcopy(line)]
                cell.execution_count = ran.execution_count
                cell.metadata[RECORD_KEY] = {**stamp, "source_sha256": source_digest(cell.source)}
            write(nb, src)
            done_ids[src.name] = list(recorded)
        if timings is not None and (run_dir / "gpu_timings.csv").exists():
            timings.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run_dir / "gpu_timings.csv", timings)
    for note in notes:
        print(f"note: {note}")
    total = sum(len(v) for v in done_ids.values())
    print(
        f"recorded {total} cell(s) from {info['gpu']} (torch {info['torch']}, {info['date']}) into "
        f"{', '.join(done_ids) or 'no chapter'}" + (f"; GPU timing table -> {timings}" if timings else "")
    )
    return done_ids


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
    p = sub.add_parser("record-gpu", help="a GPU run's outputs of the gated cells -> the chapters")
    p.add_argument("run", type=Path, help="gpu_run.tar.gz from tools/gpu.sh, or the folder it unpacks to")
    p.add_argument("paths", type=Path, nargs="*")
    p = sub.add_parser("gpu-distinfo", help="(tools/gpu.sh) dlarch_lib's metadata from pyproject.toml")
    p.add_argument("target", type=Path)
    p = sub.add_parser("gpu-order", help="(tools/gpu.sh) chapters with GPU cells first; --gated: only those")
    p.add_argument("--gated", action="store_true")
    p.add_argument("paths", type=Path, nargs="*")
    p = sub.add_parser("gpu-info", help="(tools/gpu.sh) this machine's GPU, torch, CUDA -> a JSON file")
    p.add_argument("out", type=Path)
    p = sub.add_parser("gpu-summary", help="(tools/gpu.sh) the GPU timing table of a run")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--timed-out", action="store_true")
    p.add_argument("paths", type=Path, nargs="*")
    args = parser.parse_args()
    if args.cmd == "new":
        cmd_new(args.number, args.slug, args.title)
    elif args.cmd == "to-md":
        import jupytext

        args.dst.parent.mkdir(parents=True, exist_ok=True)
        jupytext.write(nbformat.read(args.src, as_version=4), args.dst, fmt="md:myst")
    elif args.cmd == "from-md":
        import jupytext

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
    elif args.cmd == "record-gpu":
        cmd_record_gpu(args.run, [p.resolve() for p in args.paths] or CHAPTERS)
    elif args.cmd == "gpu-distinfo":
        print(write_dist_info(ROOT / "pyproject.toml", args.target))
    elif args.cmd == "gpu-order":
        chapters = gpu_order([p.resolve() for p in args.paths] or CHAPTERS)
        print("\n".join(str(p.relative_to(ROOT)) for p in chapters if not args.gated or has_gated_cells(p)))
    elif args.cmd == "gpu-info":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(gpu_info(), indent=1))
    elif args.cmd == "gpu-summary":
        rows = gpu_summary(args.run_dir, [p.resolve() for p in args.paths] or CHAPTERS, args.timed_out)
        width = max(len(r[0]) for r in rows)
        for chapter, seconds, outcome, *_ in rows:
            print(f"{chapter:<{width}}  {seconds:>7} s  {outcome}")


if __name__ == "__main__":
    main()
