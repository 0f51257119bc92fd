"""The worker host on its own, as torchft tests its process-group wrapper: a one-rank
``ProcessBackend`` is started, restarted (the old child is killed and reaped, a new one
finishes its handshake and is healthy), and closed without leaving a process behind."""

from __future__ import annotations

import time

import torch

from mp_eplb.config import EplbConfig
from mp_eplb.engine.host import Health, ProcessBackend, WorkerSpec, rendezvous
from mp_eplb.protocol import WorkerTopology

WAIT_S = 120.0


def _spec() -> WorkerSpec:
    topology = WorkerTopology(rank=0, world_size=1, num_logical=3, num_groups=1,
                              num_redundant=1, ranks_per_node=1, max_ops_per_batch=8)
    return WorkerSpec(device=torch.device("cpu"),
                      config=EplbConfig(num_redundant_experts=1), topology=topology,
                      communicator="gloo", expert_weights=[[torch.zeros(4, 2)] for _ in range(2)],
                      group=None)


def _until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def test_restart_kills_the_old_child_and_brings_up_a_new_one() -> None:
    spec = _spec()
    backend = ProcessBackend(spec)  # blocks until the first worker is set up
    try:
        old = backend.proc
        assert backend.ready and backend.health() is Health.OK and old.poll() is None
        backend.restart(rendezvous(spec))  # returns at once
        new = backend.proc
        assert new is not old and new.pid != old.pid
        assert not backend.ready and backend.health() is Health.STARTING
        _until(lambda: old.poll() is not None, "the old worker is gone")
        assert old.returncode == -9  # SIGKILLed: its group is broken, no grace
        backend.stopping.join(WAIT_S)
        _until(lambda: backend.poll() is None and backend.ready, "the new worker is set up")
        assert backend.health() is Health.OK and new.poll() is None
    finally:
        backend.close()
    backend.stopping.join(WAIT_S)
    assert new.poll() is not None and not backend.alive()
