"""The notebook run executes each notebook once: tests/nbrun.py keeps what nbval executed, and
``tools/nb.py cache-executed`` hands it to the websites' jupyter-cache (only if it passed)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from tests.notebooks import ROOT

sys.path.insert(0, str(ROOT / "tools"))  # as tests/test_assignments.py imports tools/assign.py
import nb as nbtool

code, md = nbformat.v4.new_code_cell, nbformat.v4.new_markdown_cell


def _notebook(path: Path, last: str) -> None:
    gated = code("print('recorded on a GPU')")
    gated.metadata["tags"] = ["nbval-skip"]  # nbval does not run it, as a gated cell on a CPU
    gated.outputs = [nbformat.v4.new_output("stream", name="stdout", text="cuda:0\n")]
    cells = [
        md("# demo"),
        code("print('hello')"),
        code("from myst_nb import glue\nglue('answer', 42, display=False)"),
        code("import matplotlib.pyplot as plt\nplt.plot([1, 2]); plt.title('t'); plt.show()"),
        code("6 * 7"),
        gated,
        code(last),
    ]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nbformat.write(nb, path)


def _run_nbval(tmp_path: Path, *paths: Path, append: bool = False) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        DLARCH_EXECUTED_DIR=str(tmp_path / "executed"),
        DLARCH_TIMINGS_DIR=str(tmp_path / "timings"),
        PYTHONPATH=str(ROOT),
        DLARCH_NB_APPEND="1" if append else "0",
    )
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "tests.nbrun",
        "--nbval-lax",
        "--nbval-current-env",
        "--nbval-cell-timeout=60",
        "--rootdir",
        str(tmp_path),
        "-c",
        os.devnull,
        *[str(p) for p in (paths or (tmp_path / "book",))],
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def _book(tmp_path, sources: dict[str, str]):
    """A book/ folder under tmp_path holding one notebook per (file name, code of its cell)."""
    book = tmp_path / "book"
    book.mkdir()
    for name, code in sources.items():
        _notebook(book / name, code)
    return book


@pytest.mark.timeout(300)
def test_executed_notebooks_keep_outputs_and_verdict_and_feed_the_cache(tmp_path):
    book = _book(tmp_path, {"01_good.ipynb": "assert 6 * 7 == 42", "02_bad.ipynb": "assert 6 * 7 == 41, 'wrong'"})
    run = _run_nbval(tmp_path)
    assert run.returncode == 1, run.stdout[-2000:]  # the bad notebook's last cell fails
    assert "02_bad.ipynb" in run.stdout and "FAILED" in run.stdout

    good = nbformat.read(tmp_path / "executed" / "book" / "01_good.ipynb", as_version=4)
    assert good.metadata["dlarch_run"]["passed"] and good.metadata["dlarch_run"]["seconds"] > 0
    outs = [c.outputs for c in good.cells if c.cell_type == "code"]
    assert outs[0][0].text == "hello\n"
    assert outs[1][0].metadata["scrapbook"]["name"] == "answer"  # glue data reaches the site
    assert any("image/png" in o.get("data", {}) for o in outs[2])  # the figure
    assert outs[3][0].data["text/plain"] == "42" and outs[3][0].execution_count
    assert outs[4][0].text == "cuda:0\n", "a cell nbval skipped keeps its recorded output"
    nbformat.validate(good)
    bad = nbformat.read(tmp_path / "executed" / "book" / "02_bad.ipynb", as_version=4)
    assert not bad.metadata["dlarch_run"]["passed"] and bad.metadata["dlarch_run"]["failed"]
    assert bad.cells[-1].outputs[-1].output_type == "error"
    table = (tmp_path / "timings" / "notebooks.csv").read_text()
    assert "book/01_good.ipynb" in table and "FAILED" in table
    runtime = dict(line.split(",", 1) for line in (tmp_path / "timings" / "runtime.csv").read_text().splitlines()[1:])
    assert runtime["Python"] == sys.version.split()[0] and runtime["torch"] == importlib.metadata.version("torch")

    kw = dict(
        executed=tmp_path / "executed", cache_path=tmp_path / "cache", root=tmp_path, manifest=tmp_path / "cached.json"
    )
    nbtool.cmd_cache_executed([book / "01_good.ipynb"], **kw)
    with pytest.raises(SystemExit, match="02_bad.ipynb: failed when executed"):
        nbtool.cmd_cache_executed([book / "01_good.ipynb", book / "02_bad.ipynb"], **kw)
    source = nbformat.read(book / "01_good.ipynb", as_version=4)
    source.cells[1].source = "print('changed')"
    nbformat.write(source, book / "01_good.ipynb")
    with pytest.raises(SystemExit, match="01_good.ipynb: its code changed since it was executed"):
        nbtool.cmd_cache_executed([book / "01_good.ipynb"], **kw)


def test_check_cached_reports_a_second_execution(tmp_path):
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    book = tmp_path / "book"
    book.mkdir()
    _notebook(book / "01_good.ipynb", "pass")
    nb = nbformat.read(book / "01_good.ipynb", as_version=4)
    nb.metadata["dlarch_run"] = {"passed": True, "failed": [], "seconds": 1.0}
    (tmp_path / "executed" / "book").mkdir(parents=True)
    nbformat.write(nb, tmp_path / "executed" / "book" / "01_good.ipynb")
    kw = dict(cache_path=tmp_path / "cache", manifest=tmp_path / "cached.json")
    nbtool.cmd_cache_executed([book / "01_good.ipynb"], executed=tmp_path / "executed", root=tmp_path, **kw)
    nbtool.cmd_check_cached([book / "01_good.ipynb"], **kw)  # nothing executed since
    cache = get_cache(str(tmp_path / "cache"))  # as a site build that executed the chapter again would
    cache.cache_notebook_bundle(CacheBundleIn(nb, "again"), check_validity=False, overwrite=True)
    with pytest.raises(SystemExit, match="executed these notebooks again: 01_good.ipynb"):
        nbtool.cmd_check_cached([book / "01_good.ipynb"], **kw)


@pytest.mark.timeout(300)
def test_a_run_in_two_sessions_writes_one_timing_table(tmp_path):
    book = _book(tmp_path, {"01_first.ipynb": "pass", "02_second.ipynb": "pass"})
    assert _run_nbval(tmp_path, book / "01_first.ipynb", append=True).returncode == 0
    assert _run_nbval(tmp_path, book / "02_second.ipynb", append=True).returncode == 0
    rows = (tmp_path / "timings" / "notebooks.csv").read_text().splitlines()
    assert rows[0] == "notebook,seconds,status" and [r.split(",")[0] for r in rows[1:]] == [
        "book/01_first.ipynb",
        "book/02_second.ipynb",
    ]
    assert _run_nbval(tmp_path, book / "02_second.ipynb").returncode == 0  # without append: this session only
    assert len((tmp_path / "timings" / "notebooks.csv").read_text().splitlines()) == 2
