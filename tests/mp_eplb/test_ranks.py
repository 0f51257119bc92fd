"""The rank launcher (:mod:`mp_eplb.ranks`): values by rank, messages on the way, a rank's error
with its traceback, dead and hung ranks, no process left; and the ipc name prefix that
importing mp_eplb sets."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time

import pytest

from mp_eplb import ranks


def _echo_env(rank: int, world_size: int, scale: int) -> dict:
    ranks.post({"rank": rank, "hello": True})
    return {"value": rank * scale, "world": world_size, "rank_env": os.environ["RANK"],
            "master": (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])}


def _fail_on_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise KeyError("planted on rank one")
    return rank


def _unpicklable(rank: int, world_size: int) -> object:
    return lambda: rank


def _exit_or_hang(rank: int, world_size: int) -> None:
    if rank == 0:
        os._exit(3)
    time.sleep(600)


@pytest.mark.timeout(60)
def test_values_come_back_by_rank_with_the_messages_posted_on_the_way() -> None:
    posted: list[tuple[int, dict]] = []
    run = ranks.launch_ranks(_echo_env, 2, (10,), timeout_s=45,
                             on_message=lambda rank, msg: posted.append((rank, msg)))
    values = run.values()
    assert [v["value"] for v in values] == [0, 10] and {v["world"] for v in values} == {2}
    assert [v["rank_env"] for v in values] == ["0", "1"]
    assert len({v["master"] for v in values}) == 1  # one rendezvous for the group
    assert sorted(posted) == [(0, {"rank": 0, "hello": True}), (1, {"rank": 1, "hello": True})]
    assert set(run.exitcodes.values()) == {0} and set(run.pids) == {0, 1}


@pytest.mark.timeout(60)
def test_a_rank_error_comes_back_typed_with_its_traceback() -> None:
    with pytest.raises(ranks.RankFailure, match="rank 1: KeyError: 'planted on rank one'") as err:
        ranks.launch_ranks(_fail_on_one, 2, timeout_s=45).values()
    assert list(err.value.errors) == [1]
    assert "in _fail_on_one" in err.value.tracebacks[1]


@pytest.mark.timeout(60)
def test_a_result_that_cannot_travel_is_an_error_of_its_rank() -> None:
    run = ranks.launch_ranks(_unpicklable, 1, timeout_s=45)
    assert "the rank's result cannot be pickled" in run.errors[0] and not run.results


@pytest.mark.timeout(60)
def test_a_dead_rank_and_a_hung_one_are_reported_and_none_is_left() -> None:
    start = time.monotonic()
    run = ranks.launch_ranks(_exit_or_hang, 2, timeout_s=40, failure_grace_s=1.0)
    assert run.errors == {0: "exited (code 3) without a result",
                          1: "stopped after another rank failed"}
    assert time.monotonic() - start < 30  # the grace, not the timeout, ended the wait
    assert run.exitcodes[0] == 3 and run.exitcodes[1] is not None
    assert multiprocessing.active_children() == []


def test_post_outside_a_rank_process_is_refused() -> None:
    with pytest.raises(RuntimeError, match="for a rank process started by launch_ranks"):
        ranks.post("nobody listens")


def test_importing_mp_eplb_names_ipc_segments_mp_eplb_without_importing_torch() -> None:
    code = ("import sys, mp_eplb, ipc.naming; "
            "print(ipc.naming.segment_prefix(), ipc.naming.private_dir_prefix(), "
            "'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    assert out == ["mp_eplb_", "mp_eplb-ipc-", "False"]
