"""One log switch for all processes: ``-v`` reaches rank processes and transfer workers."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from mp_eplb import logs


def test_verbosity_maps_to_levels() -> None:
    assert [logs.verbosity_level(v) for v in (0, 1, 2, 5)] == [
        logging.WARNING, logging.INFO, logging.DEBUG, logging.DEBUG]


def test_bad_level_in_the_environment_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(logs.LOG_ENV, "chatty")
    with pytest.raises(ValueError, match="MP_EPLB_LOG='chatty' is not a log level"):
        logs.level_from_env(logging.WARNING)
    monkeypatch.setenv(logs.LOG_ENV, "debug")
    assert logs.level_from_env(logging.WARNING) == logging.DEBUG
    monkeypatch.delenv(logs.LOG_ENV)
    assert logs.level_from_env(logging.ERROR) == logging.ERROR


@pytest.mark.timeout(200)
def test_dash_v_reaches_every_rank_and_worker() -> None:
    env = {k: v for k, v in os.environ.items() if k != logs.LOG_ENV}
    run = subprocess.run(
        [sys.executable, "-m", "mp_eplb", "-v", "demo", "--ranks", "2", "--steps", "25",
         "--step-interval", "10", "--layers", "2", "--quiet"],
        capture_output=True, text=True, timeout=180, env=env, check=True)
    err = run.stderr
    for rank in (0, 1):
        assert f" rank{rank} mp_eplb.engine.host INFO rank {rank}: transfer worker pid" in err
        assert f"mp_eplb.worker.logic INFO rank {rank} rebalance 0:" in err
    assert err.count(" worker[") >= 4  # both workers, both rebalances
    assert "weights verified" in run.stdout
