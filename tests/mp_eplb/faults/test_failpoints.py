"""Failpoints (:mod:`mp_eplb.worker.failpoints`), the worker-side injection the fault scenarios arm:
parsing, firing on the matching rebalance and hit, and staying off unless armed."""

from __future__ import annotations

import json

import pytest

from mp_eplb.worker import failpoints


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
