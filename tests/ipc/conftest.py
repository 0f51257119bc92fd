"""Fixtures of the ipc tests: every test names its segments and socket directories with the
ipc tests' own prefix (:data:`tests.ipc.spawn_utils.TEST_PREFIX`), whatever a package imported
earlier in the session set, and restores that prefix after."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ipc import naming
from tests.ipc.spawn_utils import TEST_PREFIX


@pytest.fixture(autouse=True)
def test_name_prefix() -> Iterator[str]:
    previous = naming.name_prefix()
    naming.set_name_prefix(TEST_PREFIX)
    try:
        yield TEST_PREFIX
    finally:
        naming.set_name_prefix(previous)
