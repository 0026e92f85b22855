"""Notebook plumbing: the standard setup cell and ``glue`` for numbers quoted in prose."""

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
