"""Library tests start with no run device recorded: a test's ``dl.setup`` must not audit the next test."""

from __future__ import annotations

import pytest
import torch

from dlarch_lib.core import runtime


@pytest.fixture(autouse=True)
def _no_recorded_run_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "_run_device", None)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny networks (extra threads only add overhead); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
