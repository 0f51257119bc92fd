"""``mp-eplb faults`` (:mod:`mp_eplb.faults.cli`): ``--list``, refused options, and the
parent-kill scenario end to end with ``--json`` and ``--log-dir``."""

from __future__ import annotations

import argparse
import json

import pytest

from mp_eplb.faults import add_faults_arguments, run_faults, scenarios

#: The scenario run end to end here (its own run: it ends a rank).
CLI_SCENARIO = "parent-kill"


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_faults_arguments(parser)
    return parser.parse_args(list(argv))


def test_list_prints_every_scenario(capsys) -> None:
    assert run_faults(_args("--list")) == 0
    out = capsys.readouterr().out
    assert all(sc.name in out for sc in scenarios(2))


def test_unknown_scenario_and_single_rank_are_refused(capsys) -> None:
    assert run_faults(_args("--scenario", "nope")) == 2
    assert "unknown scenario(s) ['nope']" in capsys.readouterr().err
    assert run_faults(_args("--ranks", "1", "--scenario", "sigkill@stage")) == 2
    assert "--ranks >= 2" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_cli_parent_kill_worker_exits_within_a_second(tmp_path, capsys) -> None:
    """An engine rank SIGKILLed mid-rebalance: its worker exits within 1 s, the surviving
    rank shuts down cleanly; the killed rank leaves nothing in /dev/shm and its socket
    directory is swept (as the next start does) and reported."""
    path = tmp_path / "faults.json"
    code = run_faults(_args("--scenario", CLI_SCENARIO, "--timeout", "100", "--json", str(path),
                            "--log-dir", str(tmp_path / "logs")))
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, out
    # one line per scenario on stderr; the ranks' logs in --log-dir, not in the output
    assert f"faults: {CLI_SCENARIO} finished: ok" in captured.err
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [
        "parent_kill-rank0.log", "parent_kill-rank1.log"]
    assert "Traceback" not in out and " WARNING " not in out
    assert f"| {CLI_SCENARIO} | abandon | worker exited |" in out
    assert "1/1 scenarios kept every invariant" in out
    (row,) = json.loads(path.read_text())
    assert row["name"] == CLI_SCENARIO and row["ok"] and 0 <= row["detection_s"] <= 1.0
    assert row["leftovers"] == "none" and "swept 1 socket dir" in row["notes"]
