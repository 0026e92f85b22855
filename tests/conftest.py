"""Library tests start with no run device recorded: a test's ``dl.setup`` must not audit the next test."""

from __future__ import annotations

import pytest

from dlarch_lib.core import runtime


@pytest.fixture(autouse=True)
def _no_recorded_run_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "_run_device", None)
