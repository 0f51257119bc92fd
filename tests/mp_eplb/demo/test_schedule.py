"""The demo's default schedule: every rebalance settles before the end and away from drifts,
and a real run on it finishes every rebalance it starts."""

from __future__ import annotations

import argparse

import pytest

from mp_eplb.demo.launch import add_demo_arguments, run_ranks
from mp_eplb.demo.schedule import Schedule, default_schedule, settle_steps


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_demo_arguments(parser)
    return parser.parse_args(list(argv))


def test_default_schedule_has_no_cut_off_rebalance_and_no_drift_inside_one() -> None:
    schedule = default_schedule(4)
    assert schedule.rebalance_starts() == [49, 99, 149, 199, 249, 299, 349, 399]
    assert schedule.drifts() == [175, 375]
    assert schedule.conflicts(settle_steps(4)) == []
    args = _args()
    assert (args.steps, args.rebalance_interval, args.drift_interval, args.drift_offset) == (
        schedule.steps, schedule.rebalance_interval, schedule.drift_interval,
        schedule.drift_offset)


def test_conflicts_name_the_old_defaults_faults() -> None:
    old = Schedule(steps=430, rebalance_interval=50, drift_interval=175, drift_offset=0)
    assert old.conflicts(settle_steps(4)) == [
        "the drift at step 350 lands inside the rebalance starting at step 349"]
    short = Schedule(steps=150, rebalance_interval=50, drift_interval=1000, drift_offset=0)
    assert short.conflicts(settle_steps(4)) == [
        "the rebalance starting at step 149 may be cut off by the end at step 149"]


def test_default_schedule_refuses_an_interval_too_short_to_settle() -> None:
    with pytest.raises(ValueError, match="40 layers need 50 steps to settle"):
        default_schedule(40)


@pytest.mark.timeout(200)
def test_a_run_on_the_default_schedule_finishes_every_rebalance() -> None:
    schedule = default_schedule(2, rebalances=2, rebalance_interval=30)
    args = _args("--ranks", "2", "--quiet", "--layers", "2", "--steps", str(schedule.steps),
                 "--step-interval", str(schedule.rebalance_interval),
                 "--drift-interval", str(schedule.drift_interval),
                 "--drift-offset", str(schedule.drift_offset))
    for result in run_ranks(args):
        assert result.started == schedule.rebalance_starts()
        assert len(result.finished) == len(result.started)


def test_a_conflicting_schedule_is_warned_about_before_the_run(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr("mp_eplb.demo.launch.spawn_ranks", lambda *a, **k: [])
    assert run_ranks(_args("--steps", "60", "--step-interval", "20", "--layers", "2",
                           "--quiet")) == []
    assert ("schedule: the rebalance starting at step 59 may be cut off by the end at step 59"
            in caplog.text)
