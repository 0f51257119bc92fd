"""Supervision of the transfer subprocess never blocks the engine (real processes, gloo and
ZeroMQ). Every wait is on a condition with a generous bound; the only time asserted is that
of a single call the engine makes (step, shutdown), against a bound well below what a blocking
wait on the process would take (5 s grace, 120 s start timeout)."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ipc import handles
from ipc.procs import is_stopped
from mp_eplb.engine import host as backends
from mp_eplb import (EplbConfig, EplbState, PeerFailedError, WorkerFailedError,
                     WorkerStartError)
from tests.mp_eplb.dist_utils import run_distributed
from tests.mp_eplb.state_utils import encode_rows, skewed_load

pytestmark = pytest.mark.timeout(300)

#: What one engine call may take here; blocking on a process exit took 5 s or more.
CALL_BOUND_S = 2.0
#: Generous bound on conditions that happen in well under a second on an idle machine.
WAIT_S = 90.0
NUM_LOGICAL = 4
SLOTS = 6


#: Each test that runs on CUDA too (weights on the GPU, CUDA IPC, the worker's CUDA context).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _weights(device: str = "cpu", rank: int = 0) -> list[list[torch.Tensor]]:
    ids = np.arange(SLOTS) % NUM_LOGICAL
    where = torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")
    return [[encode_rows(layer, ids, torch.float32, (3,)).to(where)] for layer in range(2)]


def _state(device: str = "cpu", **config) -> EplbState:
    """A single-rank process-mode state (no process group needed) that rebalances often."""
    weights = _weights(device)
    settings = dict(mode="process", num_redundant_experts=SLOTS - NUM_LOGICAL, window_size=2,
                    step_interval=4)
    settings.update(config)
    return EplbState(weights, rank=0, world_size=1, num_logical_experts=NUM_LOGICAL,
                     config=EplbConfig(**settings))


def _load(state: EplbState, step: int, rank: int = 0) -> torch.Tensor:
    return torch.as_tensor(skewed_load(state.physical_to_logical_map.cpu().numpy(), step, rank))


def _step_until(state: EplbState, done: Callable[[], bool], what: str) -> float:
    """Step (1 ms apart) until ``done()``; returns the longest single step() in seconds."""
    longest, deadline, step = 0.0, time.monotonic() + WAIT_S, 0
    while not done():
        assert time.monotonic() < deadline, (f"no {what} within {WAIT_S} s; last records: "
                                             f"{state.history[-3:]}")
        t0 = time.monotonic()
        state.step(_load(state, step))
        longest = max(longest, time.monotonic() - t0)
        step += 1
        time.sleep(0.001)
    return longest


def _completed(state: EplbState, after: int = -1) -> bool:
    """Whether a rebalance with an id above ``after`` completed (not abandoned)."""
    return any(r.rebalance_id > after and r.end_step is not None and not r.aborted
               for r in state.history)


def _wait_gone(pid: int) -> None:
    """Wait until ``pid`` no longer exists (reaped) or is a zombie; fail past WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return
        time.sleep(0.05)
    pytest.fail(f"process {pid} still runs after {WAIT_S} s")


def _children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == str(pid) and fields[0] not in ("Z", "X"):
            found.append(int(stat.parent.name))
    return found


def _no_escalation(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if "escalating" in r.getMessage()]


@pytest.mark.parametrize("device", DEVICES)
def test_a_stopped_worker_is_killed_at_once_and_no_step_blocks(
        device: str, caplog: pytest.LogCaptureFixture) -> None:
    """SIGSTOP: the heartbeat judges it hung, the restart SIGKILLs it (SIGTERM would wait 5 s
    on a stopped process) and a later rebalance completes with the new worker."""
    with _state(device, heartbeat_timeout_s=2.0) as state:
        _step_until(state, lambda: _completed(state), "first rebalance")
        old = state.worker_pid
        os.kill(old, signal.SIGSTOP)  # on a failure, shutdown kills it (it is stopped)
        longest = _step_until(state, lambda: state.worker_restarts == 1,
                              "restart of the hung worker")
        assert isinstance(state.last_error, WorkerFailedError)
        assert not isinstance(state.last_error, PeerFailedError)
        assert "heartbeat_timeout_s" in str(state.last_error)
        assert state.worker_pid != old
        _wait_gone(old)
        last = state.history[-1].rebalance_id
        longest = max(longest, _step_until(state, lambda: _completed(state, last),
                                           "rebalance after the restart"))
    assert longest < CALL_BOUND_S, f"a step() took {longest:.1f} s"
    _no_escalation(caplog)


def test_shutdown_with_a_stopped_worker_returns_at_once_and_kills_it() -> None:
    """A stopped worker would ignore Shutdown and SIGTERM (10 s of escalation): it is
    SIGKILLed at once, and shutdown() does not even wait for that."""
    state = _state()
    pid = state.worker_pid
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + WAIT_S
    while not is_stopped(pid):
        assert time.monotonic() < deadline, "SIGSTOP did not stop the worker"
        time.sleep(0.01)
    t0 = time.monotonic()
    state.shutdown()
    took = time.monotonic() - t0
    state.shutdown(wait=True)  # idempotent; joins the reaper
    reaped = time.monotonic() - t0
    _wait_gone(pid)
    assert took < CALL_BOUND_S, f"shutdown() took {took:.1f} s"
    assert reaped < CALL_BOUND_S, f"the stopped worker was not killed at once ({reaped:.1f} s)"


def test_shutdown_during_a_restart_returns_at_once(caplog: pytest.LogCaptureFixture) -> None:
    """A killed worker is recorded (not restarted silently), then restarted; a shutdown while
    the new one starts kills it at once instead of granting it a grace period."""
    state = _state()
    old = state.worker_pid
    os.kill(old, signal.SIGKILL)
    _step_until(state, lambda: state.worker_restarts == 1, "restart")
    assert isinstance(state.last_error, WorkerFailedError)
    assert "killed by signal 9" in str(state.last_error)
    assert not state._backend.ready, "the new worker finished starting before the shutdown"
    new = state.worker_pid
    t0 = time.monotonic()
    state.shutdown()
    took = time.monotonic() - t0
    _wait_gone(new)
    assert took < CALL_BOUND_S, f"shutdown() during start took {took:.1f} s"
    assert any(r.levelno >= logging.ERROR and "killed by signal 9" in r.getMessage()
               for r in caplog.records)
    _no_escalation(caplog)


def test_a_start_up_hang_is_caught_by_the_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker spinning before torch is imported stops its progress counter: the start
    fails on heartbeat_timeout_s, far before start_timeout_s."""
    monkeypatch.setenv("MP_EPLB_FAILPOINTS", "boot:hang")
    before = set(_children(os.getpid()))
    t0 = time.monotonic()
    with pytest.raises(WorkerStartError, match=r"heartbeat_timeout_s=2\.0"):
        _state(heartbeat_timeout_s=2.0, start_timeout_s=120.0)
    assert time.monotonic() - t0 < 60.0
    for pid in set(_children(os.getpid())) - before:
        _wait_gone(pid)
    assert handles.live_segments() == []


def _engine_starting(ready: mp.Event) -> None:
    os.environ["MP_EPLB_FAILPOINTS"] = "boot:hang"
    ready.set()
    _state(heartbeat_timeout_s=300.0)


def test_a_starting_worker_dies_with_its_killed_engine() -> None:
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    engine = ctx.Process(target=_engine_starting, args=(ready,), daemon=True)
    engine.start()
    try:
        assert ready.wait(WAIT_S)
        deadline = time.monotonic() + WAIT_S
        while not (workers := _children(engine.pid)):
            assert time.monotonic() < deadline, "the engine spawned no worker"
            time.sleep(0.05)
        os.kill(engine.pid, signal.SIGKILL)
        for pid in workers:
            _wait_gone(pid)
    finally:
        engine.kill()
        engine.join(WAIT_S)


@pytest.mark.parametrize("device", DEVICES)
def test_a_state_built_on_an_ended_thread_keeps_its_worker(device: str) -> None:
    """PR_SET_PDEATHSIG follows the spawning thread: the worker must not die with it."""
    built: list[EplbState] = []
    builder = threading.Thread(target=lambda: built.append(_state(device)))
    builder.start()
    builder.join(WAIT_S)
    (state,) = built
    with state:
        pid = state.worker_pid
        _step_until(state, lambda: _completed(state), "rebalance")
        first = state.history[-1].rebalance_id
        _step_until(state, lambda: _completed(state, first), "second rebalance")
        assert (state.worker_pid, state.worker_restarts, state.last_error) == (pid, 0, None)


def test_the_session_key_is_not_in_the_worker_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    key = bytes(range(32))
    monkeypatch.setattr(backends, "new_session_key", lambda: key)
    with _state() as state:
        pid = state.worker_pid
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert b"IPC_SESSION_KEY=" not in environ
    for text in (key.hex().encode(), key.hex().upper().encode()):
        assert text not in environ and text not in cmdline


def test_health_counters_and_restarts_survive_shutdown() -> None:
    state = _state()
    assert (state.healthy, state.error_count, state.worker_restarts) == (True, 0, 0)
    os.kill(state.worker_pid, signal.SIGKILL)
    _step_until(state, lambda: state.last_error is not None, "report of the death")
    assert (state.healthy, state.error_count) == (False, 1)
    _step_until(state, lambda: state.worker_restarts == 1 and state.healthy,
                "restart that reaches SetupDone")
    assert state.error_count == 1 and isinstance(state.last_error, WorkerFailedError)
    state.shutdown()
    assert state.worker_restarts == 1


def _attribution(rank: int, world: int, device: str) -> dict:
    """Both ranks rebalance; rank 0 SIGKILLs its own worker as a rebalance starts."""
    weights = _weights(device, rank)
    config = EplbConfig(mode="process", num_redundant_experts=2 * SLOTS - NUM_LOGICAL,
                        window_size=2, step_interval=4)
    state = EplbState(weights, rank=rank, world_size=world, num_logical_experts=NUM_LOGICAL,
                      config=config, cpu_group=dist.group.WORLD)
    killed = None
    step = 0
    with state:
        while not any(r.aborted for r in state.history):
            assert step < 100_000, f"no abandoned rebalance: {state.history}"
            report = state.step(_load(state, step, rank))
            if rank == 0 and killed is None and report.rebalance_active:
                killed = state.worker_pid
                os.kill(killed, signal.SIGKILL)
            step += 1
            time.sleep(0.001)
        return {"error": type(state.last_error).__name__, "message": str(state.last_error),
                "healthy": state.healthy}


@pytest.mark.parametrize("device", DEVICES)
def test_the_rank_whose_worker_died_reports_it_and_its_peer_a_peer_failure(device: str) -> None:
    if device == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    killed, peer = run_distributed(_attribution, 2, device, timeout_s=240)
    assert killed["error"] == WorkerFailedError.__name__, killed
    assert "killed by signal 9" in killed["message"], killed
    assert peer["error"] == PeerFailedError.__name__, peer
    assert not killed["healthy"] and not peer["healthy"]
