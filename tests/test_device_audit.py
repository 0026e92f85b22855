"""The device audit, proved on throw-away chapters: a chapter that trains a model it did not move to
``RUN.device`` fails under nbval on a CPU, and the same chapter with the model moved passes."""

from __future__ import annotations

import nbformat
import pytest

pytest_plugins = ["pytester"]

SETUP = "import dlarch_lib as dl\nRUN = dl.setup(seed=0, quiet=True)"
TRAIN = """
import torch
from torch import nn
from dlarch_lib import modular
from dlarch_lib.core.train import fit
model = modular.build_model(modular.MLPConfig(in_features=4, num_classes=2, width=8, depth=1)){move}
data = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))] * 3
history = fit(model, data, epochs=2, progress=False)
assert history.steps == 6
"""


def _chapter(path, move: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(SETUP), nbformat.v4.new_code_cell(TRAIN.format(move=move))]
    nbformat.write(nb, path)


@pytest.mark.parametrize(
    ("move", "passes"),
    [("", False), (".to('cpu')", False), (".to(RUN.device)", True)],
    ids=["never moved", "moved to a default device", "moved to RUN.device"],
)
def test_a_chapter_that_trains_off_the_run_device_fails(pytester, monkeypatch, move, passes):
    monkeypatch.setenv("DLARCH_DEVICE_AUDIT", "1")
    _chapter(pytester.path / "chapter.ipynb", move)
    result = pytester.runpytest_subprocess(
        "--nbval-lax", "--nbval-current-env", "-p", "no:cacheprovider", "chapter.ipynb"
    )
    if passes:
        result.assert_outcomes(passed=2)
    else:
        result.assert_outcomes(passed=1, failed=1)
        result.stdout.fnmatch_lines(["*not to the run's device cpu:0*model.to(RUN.device)*"])
