"""dlarch_lib: the small shared library behind the *dlarch* textbook.

One idea per module, each short enough to read in one sitting:

- :mod:`dlarch_lib.runtime`   seeding, device and run-size selection (``setup``)
- :mod:`dlarch_lib.hardware`  what hardware is present; the cell-tag gating rules
- :mod:`dlarch_lib.data`      offline datasets (handwritten digits) as tensors and loaders
- :mod:`dlarch_lib.train`     a small, readable training loop with history
- :mod:`dlarch_lib.viz`       plotting helpers and ``show`` (render a library object's source)
- :mod:`dlarch_lib.notebook`  the standard setup cell and ``glue`` for numbers in prose

Chapter modules (``approx``, ``modular``, ``residual``, ...) hold the code each chapter teaches.
"""

from dlarch_lib.runtime import RunConfig, pick_device, run_size, seed_everything, setup
from dlarch_lib.notebook import glue
from dlarch_lib.viz import show

__version__ = "0.1.0"

__all__ = [
    "RunConfig",
    "glue",
    "pick_device",
    "run_size",
    "seed_everything",
    "setup",
    "show",
    "__version__",
]
