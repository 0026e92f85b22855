"""The hardware gating of notebook cells, proved both ways on a throw-away notebook."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from dlarch_lib.core import hardware

pytest_plugins = ["pytester"]

REPO = str(Path(__file__).resolve().parents[1])

CONFTEST = """
import os
from dlarch_lib.core import hardware
if os.environ.get("FAKE_PRESENT"):
    for tag in os.environ["FAKE_PRESENT"].split(","):
        hardware.CELL_REQUIREMENTS[tag] = hardware.Requirement(lambda: True, "faked present")

import sys
sys.path.insert(0, REPO)  # the repository root, for the test suite's own gating plumbing
from tests.gating import apply_cell_gating

def pytest_collection_modifyitems(config, items):
    apply_cell_gating(items)
"""


def _notebook(path):
    nb = nbformat.v4.new_notebook()
    gated = nbformat.v4.new_code_cell("open('gated_cell_ran.txt', 'w').write('yes')")
    gated.metadata["tags"] = ["requires-cuda", "skip-execution"]
    nb.cells = [nbformat.v4.new_code_cell("x = 1"), gated, nbformat.v4.new_code_cell("assert x == 1")]
    nbformat.write(nb, path)


def test_skip_reason_rules(monkeypatch):
    monkeypatch.setitem(
        hardware.CELL_REQUIREMENTS, "requires-cuda", hardware.Requirement(lambda: False, "needs a CUDA GPU")
    )
    assert hardware.skip_reason(["hide-input", "requires-cuda"]) == "[requires-cuda] needs a CUDA GPU"
    assert hardware.skip_reason(["hide-input"]) is None
    monkeypatch.setitem(hardware.CELL_REQUIREMENTS, "requires-cuda", hardware.Requirement(lambda: True, "x"))
    assert hardware.skip_reason(["requires-cuda"]) is None


def test_explain_missing_rejects_unknown_tag():
    with pytest.raises(KeyError, match="unknown gating tag"):
        hardware.explain_missing("requires-tpu")
    assert "CUDA GPU" in hardware.explain_missing("requires-cuda")


@pytest.mark.skipif(hardware.gpu_count() > 0, reason="this machine has a GPU, so the cell would run")
def test_gated_cell_is_skipped_without_hardware(pytester):
    pytester.makeconftest(CONFTEST.replace("REPO)", repr(REPO) + ")"))
    _notebook(pytester.path / "demo.ipynb")
    result = pytester.runpytest_subprocess(
        "--nbval-lax", "--nbval-current-env", "-rs", "-p", "no:cacheprovider", "demo.ipynb"
    )
    result.assert_outcomes(passed=2, skipped=1)
    result.stdout.fnmatch_lines(["*SKIPPED*[[]requires-cuda[]] needs a CUDA GPU*"])
    assert not (pytester.path / "gated_cell_ran.txt").exists()


def test_gated_cell_runs_when_hardware_is_present(pytester, monkeypatch):
    monkeypatch.setenv("FAKE_PRESENT", "requires-cuda")
    pytester.makeconftest(CONFTEST.replace("REPO)", repr(REPO) + ")"))
    _notebook(pytester.path / "demo.ipynb")
    result = pytester.runpytest_subprocess("--nbval-lax", "--nbval-current-env", "-p", "no:cacheprovider", "demo.ipynb")
    result.assert_outcomes(passed=3)
    assert (pytester.path / "gated_cell_ran.txt").read_text() == "yes"
