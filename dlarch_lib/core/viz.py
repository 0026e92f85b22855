"""Plotting helpers and ``show``, which renders a library object's source in a notebook."""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import numpy as np
import torch

if TYPE_CHECKING:  # the engine imports nothing from here; avoid a cycle at run time
    from dlarch_lib.core.train import History


def set_style() -> None:
    """The book's matplotlib defaults: readable sizes, light grid, tight layout."""
    plt.rcParams.update(
        {
            "figure.figsize": (6.0, 3.6),
            "figure.dpi": 100,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "figure.autolayout": True,
        }
    )


def source(obj: Any) -> str:
    """The source code of a function, class or module, dedented."""
    try:
        return textwrap.dedent(inspect.getsource(obj))
    except (TypeError, OSError) as err:
        raise TypeError(f"cannot show the source of {obj!r}: {err}") from err


def show(obj: Any) -> Any:
    """Render ``obj``'s source with syntax highlighting (plain text outside IPython).

    Chapters call ``show(dlarch_lib.attention.MultiHeadAttention)`` so the code on the
    page is the code that runs: the library is the single source of truth.
    """
    code = source(obj)
    try:
        from IPython.display import Code

        return Code(code, language="python")
    except ImportError:  # pragma: no cover - IPython is always there in a notebook
        print(code)
        return None


def plot_history(history: History, ax: plt.Axes | None = None, title: str = "Training history") -> plt.Axes:
    """Plot a :class:`~dlarch_lib.core.train.History` against the optimisation step.

    The loss of every step (faint), the epoch means at the ends of the epochs, validation loss at
    each evaluation, and validation accuracy on a twin axis when the evaluations recorded ``"acc"``.
    """
    ax = ax or plt.subplots()[1]
    steps = np.arange(1, len(history.loss) + 1)
    ax.plot(steps, history.loss, color="tab:blue", alpha=0.3, linewidth=0.8, label="train loss (step)")
    if history.epoch_loss:
        ax.plot(history.epoch_steps, history.epoch_loss, "o-", color="tab:blue", label="train loss (epoch mean)")
    if history.val_loss:
        ax.plot(history.eval_steps, history.val_loss, "s-", color="tab:orange", label="validation loss")
    ax.set_xlabel("optimisation step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(loc="upper left")
    if history.val_acc:
        twin = ax.twinx()
        twin.plot(history.eval_steps, history.val_acc, "^--", color="tab:green", label="validation accuracy")
        twin.set_ylabel("accuracy")
        twin.grid(False)
        twin.legend(loc="upper right")
    return ax


def image_grid(
    images: torch.Tensor | np.ndarray,
    titles: Sequence[str] | None = None,
    ncols: int = 8,
    cmap: str = "gray_r",
    suptitle: str | None = None,
    size: float = 1.1,
) -> plt.Figure:
    """Show a batch of images ``(N, H, W)``, ``(N, 1, H, W)`` or ``(N, 3, H, W)`` in a grid."""
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.ndim == 4 and array.shape[1] in (1, 3):
        array = array[:, 0] if array.shape[1] == 1 else array.transpose(0, 2, 3, 1)
    if array.ndim not in (3, 4):
        raise ValueError(f"expected images (N, H, W), (N, 1, H, W) or (N, 3, H, W); got shape {images.shape}")
    if titles is not None and len(titles) != len(array):
        raise ValueError(f"got {len(titles)} titles for {len(array)} images")
    n = len(array)
    ncols = max(1, min(ncols, n))
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(size * ncols, size * nrows + (0.4 if suptitle else 0)), squeeze=False
    )
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(array[i], cmap=None if array.ndim == 4 else cmap)
            if titles is not None:
                ax.set_title(titles[i], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    return fig
