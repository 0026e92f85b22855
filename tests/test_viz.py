import matplotlib

matplotlib.use("Agg")
import numpy as np
import pytest
import torch

from dlarch_lib.core.train import History
from dlarch_lib.core.viz import image_grid, plot_history, show, source


def test_show_renders_library_source():
    code = show(plot_history)
    assert "def plot_history" in code.data


def test_source_of_builtin_is_a_clear_error():
    with pytest.raises(TypeError, match="cannot show the source"):
        source(len)


def test_plot_history_labels_axes():
    history = History(
        loss=[1.2, 0.9, 0.6, 0.4],
        epoch_loss=[1.0, 0.5],
        epoch_steps=[2, 4],
        evals={"loss": [1.1, 0.6], "acc": [0.5, 0.8]},
        eval_steps=[2, 4],
    )
    ax = plot_history(history, title="t")
    assert ax.get_xlabel() == "optimisation step" and ax.get_ylabel() == "loss" and ax.get_title() == "t"
    assert [tuple(line.get_xdata()) for line in ax.get_lines()] == [(1, 2, 3, 4), (2, 4), (2, 4)]
    assert len(ax.figure.axes) == 2  # accuracy on a twin axis


def test_image_grid_accepts_channel_first_and_checks_titles():
    fig = image_grid(torch.rand(5, 1, 8, 8), titles=list("abcde"), ncols=3)
    assert len(fig.axes) == 6
    with pytest.raises(ValueError, match="titles"):
        image_grid(np.zeros((2, 8, 8)), titles=["a"])
    with pytest.raises(ValueError, match="expected images"):
        image_grid(np.zeros((8, 8)))
