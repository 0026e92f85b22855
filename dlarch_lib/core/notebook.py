"""Notebook plumbing: the standard setup cell, ``glue`` for numbers quoted in prose and ``verdict`` for claims."""

from __future__ import annotations

from typing import Any

SETUP_CELL = """\
# dlarch setup: the same cell opens every chapter (tests/test_hygiene.py checks it).
# On Colab it installs dlarch_lib (keeping Colab's torch); then it seeds everything and
# picks the device and the run size ("ci" on a CPU, "full" on a GPU; override: DLARCH_SIZE).
import importlib, importlib.util, os, subprocess, sys
if importlib.util.find_spec("dlarch_lib") is None:
    DLARCH_SOURCE = os.environ.get("DLARCH_SOURCE", "git+https://github.com/dlarch/dlarch.git")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", DLARCH_SOURCE], check=True)
    importlib.invalidate_caches()
import dlarch_lib as dl
RUN = dl.setup(seed=0)"""
"""Source of the first code cell of every chapter."""


def glue(name: str, value: Any, display: bool = False) -> Any:
    """Store ``value`` under ``name`` for the page's prose (``{glue:text}`name```).

    Uses myst-nb's ``glue`` when it is installed (the book build); elsewhere (Colab)
    it does nothing but return the value, so chapters run anywhere.
    """
    if not name.isidentifier():
        raise ValueError(f"glue names must be identifiers, got {name!r}")
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()  # numpy / torch scalars -> Python numbers, so {glue:text}`x:.2f` formats
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        return value
    myst_glue(name, value, display=display)
    return value


def verdict(name: str, holds: bool, if_true: str, if_false: str) -> bool:
    """Glue the words that the computed comparison ``holds`` makes true, and return ``holds``.

    A verdict in prose (who wins, whether an effect appears) is never typed: the page writes
    ``{glue:text}`name``` where the claim goes, and this call chooses ``if_true`` or ``if_false``
    from the numbers, on every run and at every size. Assert separately what must hold
    everywhere; the verdict is what this run found, e.g.
    ``dl.verdict("ch27_vae_wins", fd_vae < fd_gan, "is closer to the real digits", "is further from them")``.
    """
    if not isinstance(holds, bool) and not (hasattr(holds, "item") and getattr(holds, "ndim", None) == 0):
        raise TypeError(f"verdict {name!r} needs a computed bool, got {type(holds).__name__}")
    holds = bool(holds)
    if not if_true or not if_false or if_true == if_false:
        raise ValueError(f"verdict {name!r} needs two different phrases, got {if_true!r} and {if_false!r}")
    glue(name, if_true if holds else if_false)
    return holds
