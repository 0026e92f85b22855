"""Recording the GPU cells, offline: ``tools/nb.py record-gpu`` on a tiny executed notebook, the
stored-outputs rule that ``strip`` and the hygiene test share, the steps of ``tools/gpu.sh`` that
need no GPU, and the lock that makes a gated cell run alone (``tests/nbrun.py``)."""

from __future__ import annotations

import copy
import csv
import importlib.metadata
import json
import re
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import nbformat
import pytest

from tests.nbrun import cell_turn
from tests.notebooks import ROOT

sys.path.insert(0, str(ROOT / "tools"))  # as tests/test_nbrun.py imports tools/nb.py
import nb as nbtool

code, md, out = nbformat.v4.new_code_cell, nbformat.v4.new_markdown_cell, nbformat.v4.new_output
GPU_SH = ROOT / "tools" / "gpu.sh"
INFO = {
    "gpu": "NVIDIA H200",
    "gpu_count": 1,
    "driver": "580.1",
    "torch": "2.11.0+cu130",
    "cuda": "13.0",
    "python": "3.12.3",
    "date": "2026-11-20",
    "hardware": ["requires-cuda"],
}


def _gated(source: str, tag: str, cell_id: str) -> nbformat.NotebookNode:
    cell = code(source)
    cell.id = cell_id
    cell.metadata["tags"] = [tag, "skip-execution"]
    return cell


def _source_notebook() -> nbformat.NotebookNode:
    plain = code("print('trained')")
    plain.id = "plain"
    cells = [
        md("# tiny"),
        plain,
        _gated("print(torch.cuda.get_device_name())", "requires-cuda", "cuda"),
        _gated("print('nccl')", "requires-2-gpus", "twogpus"),
    ]
    return nbformat.v4.new_notebook(cells=cells)


def _executed(source: nbformat.NotebookNode, cuda_outputs: list | None = None) -> nbformat.NotebookNode:
    """What tests/nbrun.py writes on a 1-GPU machine: every cell that ran has outputs and a count."""
    nb = copy.deepcopy(source)
    plain, cuda, twogpus = (c for c in nb.cells if c.cell_type == "code")
    plain.outputs, plain.execution_count = [out("stream", name="stdout", text="trained\n")], 1
    cuda.outputs = cuda_outputs or [
        out("stream", name="stdout", text="NVIDIA H200\n"),
        out("display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"}),
    ]
    cuda.execution_count = 2
    # as if it had run (it is skipped on one GPU): still not recorded, the run lacked its hardware
    twogpus.outputs, twogpus.execution_count = [out("stream", name="stdout", text="nccl\n")], 3
    failed = [] if cuda_outputs is None else ["Cell 1 (call)"]
    nb.metadata["dlarch_run"] = {"passed": not failed, "failed": failed, "seconds": 12.5}
    return nb


def _run(tmp_path: Path, executed: nbformat.NotebookNode, name: str = "01_tiny.ipynb") -> Path:
    """A GPU run as tools/gpu.sh packs it: gpu_run.tar.gz of executed/book/, gpu_run.json, gpu_timings.csv."""
    run = tmp_path / "run"
    (run / "executed" / "book").mkdir(parents=True)
    nbformat.write(executed, run / "executed" / "book" / name)
    (run / "gpu_run.json").write_text(json.dumps(INFO))
    nbtool.gpu_summary(run, [tmp_path / "book" / name], timed_out=False, root=tmp_path)
    archive = tmp_path / "gpu_run.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(run, arcname=".")
    return archive


@pytest.fixture
def book(tmp_path: Path) -> Path:
    (tmp_path / "book").mkdir()
    nbtool.write(_source_notebook(), tmp_path / "book" / "01_tiny.ipynb")
    return tmp_path / "book" / "01_tiny.ipynb"


def _cells(path: Path) -> dict[str, nbformat.NotebookNode]:
    return {c.id: c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"}


def test_only_the_requires_cuda_outputs_are_recorded_with_the_stamp(tmp_path, book):
    archive = _run(tmp_path, _executed(nbformat.read(book, as_version=4)))
    timings = tmp_path / "_static" / "gpu_timings.csv"
    done = nbtool.cmd_record_gpu(archive, [book], root=tmp_path, timings=timings)
    assert done == {"01_tiny.ipynb": ["cuda"]}
    cells = _cells(book)
    assert cells["plain"].outputs == [] and cells["plain"].execution_count is None
    assert cells["twogpus"].outputs == [] and cells["twogpus"].execution_count is None
    cuda = cells["cuda"]
    assert [o.output_type for o in cuda.outputs] == ["stream", "display_data", "display_data"]
    assert cuda.outputs[0].text == "NVIDIA H200\n" and "image/png" in cuda.outputs[1].data
    shown = cuda.outputs[-1].data["text/markdown"]  # the line the page shows under the outputs
    assert "NVIDIA H200" in shown and "torch 2.11.0+cu130" in shown and "2026-11-20" in shown
    stamp = cuda.metadata[nbtool.RECORD_KEY]
    assert {k: stamp[k] for k in ("gpu", "torch", "cuda", "date")} == {
        k: INFO[k] for k in ("gpu", "torch", "cuda", "date")
    }
    assert stamp["source_sha256"] == nbtool.source_digest(cuda.source)
    assert cuda.execution_count == 2  # nbval refuses to run a cell with outputs and no count
    rows = list(csv.reader(timings.open()))
    assert rows[0] == nbtool.GPU_TIMINGS_HEADER and rows[1][:3] == ["book/01_tiny.ipynb", "12.5", "passed"]
    assert nbtool.stored_output_problems(nbformat.read(book, as_version=4)) == []


def test_a_changed_source_is_refused_and_nothing_is_written(tmp_path, book):
    archive = _run(tmp_path, _executed(nbformat.read(book, as_version=4)))
    nb = nbformat.read(book, as_version=4)
    next(c for c in nb.cells if c.get("id") == "cuda").source += "\nprint('edited after the GPU run')"
    nbtool.write(nb, book)
    before = book.read_bytes()
    timings = tmp_path / "_static" / "gpu_timings.csv"
    with pytest.raises(SystemExit, match="cell cuda's code differs from the code executed on the GPU"):
        nbtool.cmd_record_gpu(archive, [book], root=tmp_path, timings=timings)
    assert book.read_bytes() == before and not timings.exists()


@pytest.mark.parametrize(
    "outputs",
    [
        [out("error", ename="AssertionError", evalue="", traceback=["AssertionError"])],
        [out("stream", name="stdout", text="partial\n")],  # nbval failed it (a timeout, say) with no error output
    ],
    ids=["error output", "failed by nbval"],
)
def test_a_cell_that_failed_on_the_gpu_is_not_recorded(tmp_path, book, outputs):
    archive = _run(tmp_path, _executed(nbformat.read(book, as_version=4), cuda_outputs=outputs))
    assert nbtool.cmd_record_gpu(archive, [book], root=tmp_path, timings=None) == {}
    assert _cells(book)["cuda"].outputs == []


def test_record_gpu_takes_the_unpacked_folder_too(tmp_path, book):
    _run(tmp_path, _executed(nbformat.read(book, as_version=4)))
    for folder in (tmp_path / "run", tmp_path / "run" / "executed"):
        assert nbtool.cmd_record_gpu(folder, [book], root=tmp_path, timings=None) == {"01_tiny.ipynb": ["cuda"]}
    with pytest.raises(SystemExit, match="no gpu_run.json"):
        nbtool.cmd_record_gpu(tmp_path / "book", [book], root=tmp_path, timings=None)


def test_strip_keeps_recorded_outputs_and_the_hygiene_rule_rejects_any_other(tmp_path, book):
    nbtool.cmd_record_gpu(
        _run(tmp_path, _executed(nbformat.read(book, as_version=4))), [book], root=tmp_path, timings=None
    )
    recorded = nbformat.read(book, as_version=4)
    code_cells = [c for c in recorded.cells if c.cell_type == "code"]
    plain, cuda, twogpus = code_cells

    dirty = copy.deepcopy(recorded)  # an ungated output, and an unrecorded one on a gated cell
    dirty.cells[1].outputs = [out("stream", name="stdout", text="trained\n")]
    dirty.cells[1].execution_count = 1
    dirty.cells[3].outputs = [out("stream", name="stdout", text="nccl\n")]
    problems = nbtool.stored_output_problems(dirty)
    assert len(problems) == 2 and "cell 1" in problems[0] and "cell 3" in problems[1], problems
    stripped = nbtool.strip(dirty)
    assert nbtool.stored_output_problems(stripped) == []
    assert stripped.cells[2].outputs == cuda.outputs and stripped.cells[2].execution_count == cuda.execution_count
    assert stripped.cells[1].outputs == [] and stripped.cells[3].outputs == []

    forged = copy.deepcopy(recorded)  # a stamp copied onto a requires-2-gpus cell: not that hardware
    forged.cells[3].outputs = [out("stream", name="stdout", text="nccl\n")]
    forged.cells[3].metadata[nbtool.RECORD_KEY] = {
        **cuda.metadata[nbtool.RECORD_KEY],
        "source_sha256": nbtool.source_digest(twogpus.source),
    }
    assert any("cell 3" in p for p in nbtool.stored_output_problems(forged))
    assert nbtool.strip(forged).cells[3].outputs == []

    no_count = copy.deepcopy(recorded)
    no_count.cells[2].execution_count = None
    assert any("without an execution count" in p for p in nbtool.stored_output_problems(no_count))

    edited = copy.deepcopy(recorded)  # the recorded cell's code changed: its outputs are stale
    edited.cells[2].source += "\nprint('more')"
    assert any("no longer matches" in p for p in nbtool.stored_output_problems(edited))
    stale = nbtool.strip(edited)
    assert stale.cells[2].outputs == [] and nbtool.RECORD_KEY not in stale.cells[2].metadata
    assert nbtool.stored_output_problems(stale) == []


def test_the_gpu_timing_table_reports_failed_and_unfinished_chapters(tmp_path):
    run = tmp_path / "run"
    (run / "executed" / "book").mkdir(parents=True)
    (run / "gpu_run.json").write_text(json.dumps(INFO))
    for name, passed in (("01_a.ipynb", True), ("02_b.ipynb", False)):
        nb = nbformat.v4.new_notebook()
        nb.metadata["dlarch_run"] = {"passed": passed, "failed": [] if passed else ["Cell 3 (call)"], "seconds": 7}
        nbformat.write(nb, run / "executed" / "book" / name)
    chapters = [tmp_path / "book" / n for n in ("01_a.ipynb", "02_b.ipynb", "03_c.ipynb")]
    rows = nbtool.gpu_summary(run, chapters, timed_out=True, root=tmp_path)
    assert [r[:3] for r in rows] == [
        ["book/01_a.ipynb", "7.0", "passed"],
        ["book/02_b.ipynb", "7.0", "FAILED: Cell 3 (call)"],
        ["book/03_c.ipynb", "", "not finished in the time limit"],
    ]
    assert all(r[3:] == ["NVIDIA H200", "2.11.0+cu130", "13.0", "2026-11-20"] for r in rows)
    info = json.loads((run / "gpu_run.json").read_text())
    assert info["timed_out"] and info["outcomes"] == {"FAILED": 1, "not finished in the time limit": 1, "passed": 1}


def test_chapters_with_gpu_cells_run_first(tmp_path, book):
    plain, two = tmp_path / "book" / "00_plain.ipynb", tmp_path / "book" / "00_two.ipynb"
    nbtool.write(nbformat.v4.new_notebook(cells=[code("1")]), plain)
    nbtool.write(nbformat.v4.new_notebook(cells=[_gated("2", "requires-2-gpus", "two")]), two)
    assert nbtool.gpu_order([plain, two, book]) == [book, two, plain]
    assert nbtool.has_gated_cells(book) and nbtool.has_gated_cells(two) and not nbtool.has_gated_cells(plain)


def test_the_written_metadata_gives_dl_require_the_declared_groups(tmp_path, monkeypatch):
    from dlarch_lib.core import runtime

    dist = nbtool.write_dist_info(ROOT / "pyproject.toml", tmp_path)
    (found,) = importlib.metadata.distributions(path=[str(tmp_path)])
    assert found.metadata["Name"] == "dlarch_lib" and dist.name.startswith("dlarch_lib-")
    monkeypatch.setattr(importlib.metadata, "requires", lambda name: found.requires)
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for group, requirements in declared.items():
        assert runtime.extra_requirements(group) == [r for r in requirements if not r.startswith("dlarch_lib")]
    assert runtime.extra_requirements("hpo") == ["optuna>=4.1"]


@pytest.mark.timeout(60)
def test_a_gated_cell_waits_for_the_running_cells_and_then_runs_alone(tmp_path):
    events: list[str] = []

    def cell(name: str, alone: bool, hold: float) -> threading.Thread:
        def body() -> None:
            with cell_turn(str(tmp_path), alone):
                events.append(f"{name} start")
                time.sleep(hold)
                events.append(f"{name} end")

        thread = threading.Thread(target=body)
        thread.start()
        return thread

    first = cell("plain1", alone=False, hold=0.6)  # already running when the gated cell asks
    time.sleep(0.15)
    gated = cell("gated", alone=True, hold=0.4)
    time.sleep(0.15)
    later = cell("plain2", alone=False, hold=0.1)  # asks after the gated cell: waits for it
    for thread in (first, gated, later):
        thread.join(timeout=20)
    assert events == ["plain1 start", "plain1 end", "gated start", "gated end", "plain2 start", "plain2 end"]


def test_gpu_sh_parses_and_refers_to_what_it_needs():
    subprocess.run(["bash", "-n", str(GPU_SH)], check=True, timeout=30)
    script = GPU_SH.read_text()
    commands = set(re.findall(r"tools/nb\.py ([a-z-]+)", script))
    defined = set(re.findall(r'sub\.add_parser\("([a-z-]+)"', (ROOT / "tools" / "nb.py").read_text()))
    assert {"gpu-distinfo", "gpu-info", "gpu-order", "gpu-summary", "record-gpu"} <= commands
    assert commands <= defined, f"tools/gpu.sh calls tools/nb.py commands that do not exist: {commands - defined}"
    assert "WHEEL_LIST=tools/gpu_wheels.txt" in script and (ROOT / "tools" / "gpu_wheels.txt").is_file()
    nbrun = (ROOT / "tests" / "nbrun.py").read_text()
    for variable in ("DLARCH_EXECUTED_DIR", "DLARCH_TIMINGS_DIR", "DLARCH_GATED_ALONE_DIR"):
        assert variable in script and variable in nbrun, variable
    assert re.search(r"--nbval-lax --nbval-current-env", script) and "DLARCH_SIZE=full" in script


def test_the_wheel_list_pins_one_version_of_each_package():
    lines = [line.strip() for line in (ROOT / "tools" / "gpu_wheels.txt").read_text().splitlines()]
    pins = [line for line in lines if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*", p) for p in pins), pins
    names = [re.sub(r"[-_.]+", "-", p.split("==")[0]).lower() for p in pins]
    assert len(names) == len(set(names)) and {"nbval", "ipykernel", "nbformat", "optuna"} <= set(names)
