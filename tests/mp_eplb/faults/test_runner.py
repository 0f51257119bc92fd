"""Every scenario of ``mp-eplb faults`` (:func:`mp_eplb.faults.run_scenarios`) as a real
2-rank CPU run (gloo, process mode), in batches, each bounded by a timeout.

A scenario passes only if the fault was injected, detected on every rank within its bound,
every layer stayed consistent on every rank (rows checked against the maps after every
step, maps and rebalance records identical across ranks), a later rebalance committed
layers, and no process, shm segment or socket file was left behind.
"""

from __future__ import annotations

import pytest
import torch

from mp_eplb.faults import FaultOptions, ScenarioResult, format_table, run_scenarios, scenarios

OPTIONS = FaultOptions(ranks=2, timeout_s=240.0, heartbeat_timeout_s=1.5, layer_timeout_s=30.0)


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
#: Run through the command line by test_cli.py (its own run: it ends a rank).
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
