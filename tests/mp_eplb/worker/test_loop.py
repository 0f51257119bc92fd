"""The worker's message loop over the in-process link (``QueueLink``), driven as the engine
drives it: Rebalance -> Plan -> LayerReady / BufferFree -> RebalanceDone, an Abort, stale
messages, and a malformed message (the loop raises; the host turns it into ``WorkerError``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ipc.errors import IpcTimeoutError
from ipc.schema import Shutdown
from mp_eplb.config import EplbConfig
from mp_eplb.engine.host import ThreadBackend, WorkerSpec
from mp_eplb.maps import maps_from_phy2log
from mp_eplb.policy import RebalanceOutcome
from mp_eplb.protocol import (Abort, BufferFree, LayerReady, Plan, Rebalance, RebalanceDone,
                              WorkerError, WorkerTopology, pack_int64)
from mp_eplb.worker.logic import RebalancePlan
from mp_eplb.worker.loop import QueueLink, StreamEvents, serve

TOPOLOGY = WorkerTopology(rank=0, world_size=1, num_logical=3, num_groups=1, num_redundant=1,
                          ranks_per_node=1, max_ops_per_batch=8)
OLD = np.array([[0, 1, 2, 0]] * 3)
NEW = np.array([[0, 1, 2, 2]] * 3)
WAIT_S = 5.0


@dataclass
class FakeWorker:
    """Stands in for ``TransferWorker``: every layer changes; records what it staged."""

    topology: WorkerTopology = TOPOLOGY
    stream: None = None
    staged: list[tuple[int, int]] = field(default_factory=list)
    agreed: list[bool] = field(default_factory=list)

    def plan(self, rebalance_id: int, old_phy2log: np.ndarray) -> RebalancePlan:
        outcome = RebalanceOutcome(maps=maps_from_phy2log(NEW, 3, 2), layers=[0, 1, 2],
                                   balancedness_before=0.5, balancedness_after=1.0)
        return RebalancePlan(rebalance_id=rebalance_id, old_phy2log=old_phy2log, outcome=outcome)

    def agree_to_continue(self, stop_requested: bool) -> bool:
        self.agreed.append(not stop_requested)
        return not stop_requested

    def stage(self, plan: RebalancePlan, layer: int, slot: int) -> None:
        self.staged.append((layer, slot))
        plan.bytes_staged += 8


class Engine:
    """The engine's end of the link, with the loop running on a thread."""

    def __init__(self, worker: FakeWorker, num_slots: int) -> None:
        self.link, worker_link = QueueLink.pair()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, args=(worker, worker_link, num_slots),
                                       daemon=True)
        self.thread.start()

    def _serve(self, worker: FakeWorker, link: QueueLink, num_slots: int) -> None:
        try:
            serve(worker, link, StreamEvents([], WAIT_S), num_slots=num_slots,
                  layer_timeout_s=WAIT_S)
        except BaseException as err:  # noqa: BLE001 - the test inspects it
            self.error = err

    def next(self) -> object:
        return self.link.recv(timeout=WAIT_S)

    def nothing_for(self, seconds: float) -> bool:
        try:
            self.link.recv(timeout=seconds)
        except IpcTimeoutError:
            return True
        return False

    def stop(self) -> None:
        self.link.send(Shutdown(reason="test"))
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive()


def _rebalance(rid: int = 7, phy2log: np.ndarray = OLD) -> Rebalance:
    return Rebalance(rebalance_id=rid, step=1, phy2log=pack_int64(phy2log), shape=list(phy2log.shape))


@pytest.fixture
def worker() -> FakeWorker:
    return FakeWorker()


def test_rebalance_stages_into_free_slots_and_finishes(worker: FakeWorker) -> None:
    engine = Engine(worker, num_slots=2)
    engine.link.send(_rebalance())
    plan = engine.next()
    assert isinstance(plan, Plan) and plan.layers == [0, 1, 2] and plan.balancedness_after == 1.0
    first, second = engine.next(), engine.next()
    assert [(m.index, m.layer, m.slot) for m in (first, second)] == [(0, 0, 0), (1, 1, 1)]
    assert all(isinstance(m, LayerReady) and m.rebalance_id == 7 for m in (first, second))
    assert engine.nothing_for(0.3), "staged a third layer without a free buffer"
    engine.link.send(BufferFree(rebalance_id=6, slot=0))  # stale: another rebalance
    assert engine.nothing_for(0.3), "a stale BufferFree freed a slot"
    engine.link.send(BufferFree(rebalance_id=7, slot=1))
    third = engine.next()
    assert (third.index, third.layer, third.slot) == (2, 2, 1)
    done = engine.next()
    assert isinstance(done, RebalanceDone) and done.rebalance_id == 7 and done.bytes_staged == 24
    assert worker.staged == [(0, 0), (1, 1), (2, 1)]
    engine.stop()
    assert engine.error is None


def test_abort_stops_every_worker_at_the_next_layer(worker: FakeWorker) -> None:
    engine = Engine(worker, num_slots=1)
    engine.link.send(_rebalance())
    assert isinstance(engine.next(), Plan)
    assert engine.next().layer == 0
    engine.link.send(Abort(rebalance_id=7, reason="test"))
    done = engine.next()
    assert isinstance(done, RebalanceDone) and done.bytes_staged == 8
    assert worker.staged == [(0, 0)] and worker.agreed == [True, False]
    engine.stop()


def test_messages_outside_a_rebalance_are_ignored(worker: FakeWorker) -> None:
    engine = Engine(worker, num_slots=1)
    engine.link.send(BufferFree(rebalance_id=1, slot=0))
    engine.link.send(Abort(rebalance_id=1, reason="late"))
    assert engine.nothing_for(0.3)
    engine.stop()
    assert engine.error is None and worker.staged == []


def test_malformed_rebalance_raises_out_of_the_loop(worker: FakeWorker) -> None:
    engine = Engine(worker, num_slots=1)
    engine.link.send(Rebalance(rebalance_id=1, step=1, phy2log=b"\0" * 8, shape=[2, 4]))
    engine.thread.join(WAIT_S)
    assert isinstance(engine.error, ValueError) and worker.staged == []


@pytest.fixture
def one_rank_group() -> Iterator[dist.ProcessGroup]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_thread_host_reports_a_malformed_message_as_worker_error(
        one_rank_group: dist.ProcessGroup) -> None:
    weights = [[torch.zeros(4, 2)] for _ in range(3)]
    spec = WorkerSpec(device=torch.device("cpu"),
                      config=EplbConfig(mode="thread", num_redundant_experts=1),
                      topology=TOPOLOGY, communicator="gloo", expert_weights=weights,
                      group=one_rank_group)
    backend = ThreadBackend(spec)
    try:
        backend.send(Rebalance(rebalance_id=1, step=1, phy2log=b"\0" * 8, shape=[3, 4]))
        deadline = time.monotonic() + WAIT_S
        while (msg := backend.poll()) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert isinstance(msg, WorkerError) and msg.kind == "ValueError"
        backend._thread.join(WAIT_S)
        assert not backend.alive() and "ValueError" in backend.exit_description()
    finally:
        backend.close()
