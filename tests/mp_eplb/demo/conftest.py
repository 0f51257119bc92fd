"""Fixtures of the demo engine's tests."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def _importable_test_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spawned ranks import the test module that holds their target by name
    (``tests.mp_eplb.demo.test_...``): keep the repository root on their sys.path."""
    monkeypatch.syspath_prepend(str(ROOT))
