"""Fault injection: failpoint parsing and firing, then every scenario of ``mp-eplb faults``
as a real 2-rank CPU run (gloo, process mode), each batch bounded by a timeout.

A scenario passes only if the fault was injected, detected on every rank within its bound,
every layer stayed consistent on every rank (rows checked against the maps after every
step, maps and rebalance records identical across ranks), a later rebalance committed
layers, and no process, shm segment or socket file was left behind.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from mp_eplb.worker import failpoints
from mp_eplb.faults import (FaultOptions, ScenarioResult, add_faults_arguments, format_table,
                            run_faults, run_scenarios, scenarios)

OPTIONS = FaultOptions(ranks=2, timeout_s=240.0, heartbeat_timeout_s=1.5, layer_timeout_s=30.0)


# -- failpoints -------------------------------------------------------------------------------

def test_parse_reads_point_action_and_conditions() -> None:
    specs = failpoints.parse("stage:sigkill@rebalance=3@hit=2, plan:raise")
    assert [(f.point, f.action, f.rebalance, f.hit) for f in specs] == [
        ("stage", "sigkill", 3, 2), ("plan", "raise", None, 1)]
    assert failpoints.parse("") == []


@pytest.mark.parametrize("text,fragment", [
    ("stage", "expected POINT:ACTION"), ("nowhere:sigkill", "expected POINT:ACTION"),
    ("stage:explode", "expected POINT:ACTION"), ("stage:exit@when=3", "rebalance=N or hit=K"),
    ("stage:exit@hit=x", "rebalance=N or hit=K"), ("stage:exit@hit=0", "hit counts from 1")])
def test_parse_rejects_bad_specs(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        failpoints.parse(text)


def test_failpoint_fires_once_on_matching_rebalance_and_hit(tmp_path) -> None:
    log = tmp_path / "fp.jsonl"
    failpoints.arm(failpoints.parse("stage:raise@rebalance=2@hit=2"), str(log))
    try:
        failpoints.failpoint("stage", 1)  # other rebalance
        failpoints.failpoint("plan", 2)   # other point
        failpoints.failpoint("stage", 2)  # first hit
        with pytest.raises(failpoints.FailpointError, match="stage:raise@rebalance=2@hit=2"):
            failpoints.failpoint("stage", 2)
        failpoints.failpoint("stage", 2)  # fired already
    finally:
        failpoints.disarm()
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["point"], e["action"], e["rebalance"]) for e in entries] == [("stage", "raise", 2)]


def test_unarmed_failpoints_do_nothing_even_with_the_variable_set(monkeypatch) -> None:
    monkeypatch.setenv(failpoints.ENV, "stage:raise")
    failpoints.failpoint("stage", 0)  # only the worker process arms from the environment
    assert failpoints.arm_from_env({failpoints.ENV: "stage:exit,plan:hang"}) == 2
    failpoints.disarm()
    failpoints.failpoint("stage", 0)


# -- scenarios --------------------------------------------------------------------------------

def _names(predicate) -> list[str]:
    return [sc.name for sc in scenarios(2) if predicate(sc)]


BATCHES = {
    "kill-plan-policy": _names(lambda sc: sc.kind == "failpoint"
                               and sc.spec.split(":")[0] in ("plan", "policy")),
    "kill-stage-ready-hang-setup": _names(lambda sc: sc.kind == "failpoint"
                                          and sc.spec.split(":")[0] in ("stage", "ready")),
    "messages": _names(lambda sc: sc.kind in ("proxy", "wrong_key")),
}
#: Run through the command line (its own run: it ends a rank).
CLI_SCENARIO = "parent-kill"


def test_batches_cover_every_scenario() -> None:
    covered = sorted([CLI_SCENARIO] + [n for names in BATCHES.values() for n in names])
    assert covered == sorted(sc.name for sc in scenarios(2))


def _check(rows: list[ScenarioResult]) -> dict[str, ScenarioResult]:
    table = format_table(rows)
    assert all(r.ok for r in rows), f"scenarios broke an invariant:\n{table}"
    return {r.name: r for r in rows}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("batch", list(BATCHES))
def test_scenarios_keep_every_invariant(batch: str) -> None:
    rows = _check(run_scenarios(BATCHES[batch], OPTIONS))
    for name, row in rows.items():
        assert row.consistent and row.recovered and row.leftovers == "none", name
        if row.expect == "abandon":
            assert row.outcome in ("abandoned", "worker exited"), name
            assert row.detection_s is not None and 0 <= row.detection_s <= row.bound_s, name
    if "hang@stage" in rows:  # only the progress counter can see a spinning worker
        assert rows["hang@stage"].detection_s >= OPTIONS.heartbeat_timeout_s
    for name in ("proxy-delay", "proxy-duplicate", "wrong-key"):
        if name in rows:
            assert rows[name].outcome == "completed", name
    if "wrong-key" in rows:
        assert "unauthenticated=7" in rows["wrong-key"].notes
    if "proxy-corrupt" in rows:
        assert "unauthenticated=1" in rows["proxy-corrupt"].notes


@pytest.mark.gpu
@pytest.mark.timeout(900)
@pytest.mark.parametrize("communicator", ["cuda_ipc", "nccl"])
def test_gpu_worker_killed_during_transfer_recovers_and_returns_gpu_memory(
        communicator: str) -> None:
    """Kills during a CUDA transfer (stage, ready), a hang and the parent killer, on 2 GPUs:
    detection, consistency, recovery, and each GPU's free memory right after every kill
    staying flat (checked by the runner; the readings are in the notes)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    options = FaultOptions(ranks=2, device="cuda", communicator=communicator, timeout_s=800.0,
                           heartbeat_timeout_s=5.0, layer_timeout_s=60.0)
    names = ["sigkill@stage", "sigsegv@stage", "sigkill@ready", "exit@plan", "hang@stage",
             "parent-kill"]
    rows = _check(run_scenarios(names, options))
    assert "GPU free after kill" in rows["sigkill@stage"].notes


# -- command line ------------------------------------------------------------------------------

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
