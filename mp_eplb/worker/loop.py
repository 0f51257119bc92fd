"""The worker's message loop, shared by process mode and thread mode.

:func:`serve` turns messages from the engine into :class:`~mp_eplb.worker.logic.TransferWorker`
calls and answers with :mod:`mp_eplb.protocol`. It talks through a :class:`Link` (a ZeroMQ
channel in the subprocess, a pair of queues on a thread), so it knows nothing of processes.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
import logging
import queue
import time
from typing import Any, Protocol

import torch

from ipc.errors import IpcTimeoutError
from ipc.schema import Shutdown
from mp_eplb.worker.failpoints import failpoint
from mp_eplb.protocol import (LOAD_EVENT, Abort, BufferFree, LayerReady, Plan, Rebalance,
                              RebalanceDone, free_event, pack_int64, unpack_int64)
from mp_eplb.worker.logic import TransferWorker

__all__ = ["Link", "QueueLink", "StreamEvents", "serve"]

logger = logging.getLogger(__name__)

#: Seconds between checks for new work while idle (bounds how long shutdown waits).
IDLE_POLL_S = 0.5


class Link(Protocol):
    """A bidirectional message pipe (``ipc.channel.Channel`` satisfies it)."""

    def send(self, msg: Any) -> None: ...

    def recv(self, timeout: float | None) -> Any: ...

    def poll(self) -> Any | None: ...


class QueueLink:
    """One end of an in-process link (thread mode): messages are passed as objects."""

    def __init__(self, inbox: queue.Queue, outbox: queue.Queue) -> None:
        self._inbox, self._outbox = inbox, outbox

    @classmethod
    def pair(cls) -> tuple[QueueLink, QueueLink]:
        a, b = queue.Queue(), queue.Queue()
        return cls(a, b), cls(b, a)

    def send(self, msg: Any) -> None:
        self._outbox.put(msg)

    def recv(self, timeout: float | None) -> Any:
        try:
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            raise IpcTimeoutError(f"no message within {timeout} s") from None

    def poll(self) -> Any | None:
        try:
            return self._inbox.get_nowait()
        except queue.Empty:
            return None


class StreamEvents:
    """GPU ordering between the engine's stream and the worker's.

    ``events`` (``ipc.events.SharedEvent``, laid out as :mod:`mp_eplb.protocol` says):
    :data:`~mp_eplb.protocol.LOAD_EVENT` is recorded by the engine when it asks for a
    rebalance, :func:`~mp_eplb.protocol.free_event` of a slot after its last read of that buffer.
    An empty list (CPU) makes every wait a no-op.
    """

    def __init__(self, events: list[Any], timeout_s: float) -> None:
        self._events = events
        self._timeout_s = timeout_s

    def wait_load(self) -> None:
        """Block this thread until the engine's work before the rebalance request is done
        on the GPU: the load window is complete and its last weight writes have landed, so
        once every worker has passed the following collective, peers' rows are safe to read."""
        if self._events:
            self._events[LOAD_EVENT].synchronize(self._timeout_s)

    def wait_free(self, slot: int, stream: torch.cuda.Stream | None) -> None:
        """Order ``stream`` after the engine's last read of ``slot`` (no host wait)."""
        if self._events:
            self._events[free_event(slot)].wait(stream)


def serve(worker: TransferWorker, link: Link, events: StreamEvents, *,
          num_slots: int, layer_timeout_s: float,
          progress: Callable[[], None] = lambda: None) -> None:
    """Run until a ``Shutdown`` message arrives. Exceptions propagate to the caller, which
    reports them to the engine (the loop never swallows an error)."""
    while True:
        progress()
        try:
            msg = link.recv(timeout=IDLE_POLL_S)
        except IpcTimeoutError:
            continue
        if isinstance(msg, Shutdown):
            logger.info("worker rank %d: shutdown requested", worker.topology.rank)
            return
        if isinstance(msg, Rebalance):
            inbox = _Inbox(link, msg.rebalance_id, num_slots)
            _rebalance(worker, inbox, events, msg, layer_timeout_s, progress)
            if inbox.shutdown:
                logger.info("worker rank %d: shutdown requested mid-rebalance",
                            worker.topology.rank)
                return
        else:
            logger.debug("worker rank %d: ignoring %s outside a rebalance",
                         worker.topology.rank, type(msg).__name__)


class _Inbox:
    """Messages from the engine during one rebalance: freed slots, abort, shutdown."""

    def __init__(self, link: Link, rebalance_id: int, num_slots: int) -> None:
        self.link = link
        self.rebalance_id = rebalance_id
        self.free: collections.deque[int] = collections.deque(range(num_slots))
        self.stopped = False
        self.shutdown = False

    def take(self, timeout: float | None, progress: Callable[[], None]) -> None:
        """Handle pending messages, first waiting up to ``timeout`` s for one if given
        (in slices, advancing ``progress``: waiting for the engine is not being stuck)."""
        msg = self.link.poll()
        if timeout is not None:
            deadline = time.monotonic() + timeout
            while msg is None and (remaining := deadline - time.monotonic()) > 0:
                progress()
                msg = _recv_or_none(self.link, min(remaining, IDLE_POLL_S))
        while msg is not None:
            if isinstance(msg, BufferFree) and msg.rebalance_id == self.rebalance_id:
                self.free.append(msg.slot)
            elif isinstance(msg, Abort) and msg.rebalance_id == self.rebalance_id:
                logger.warning("rebalance %d aborted by the engine: %s", msg.rebalance_id,
                               msg.reason)
                self.stopped = True
            elif isinstance(msg, Shutdown):
                self.stopped = self.shutdown = True
            else:
                logger.debug("ignoring stale %s", type(msg).__name__)
            msg = self.link.poll()


def _rebalance(worker: TransferWorker, inbox: _Inbox, events: StreamEvents, msg: Rebalance,
               layer_timeout_s: float, progress) -> None:
    rid = msg.rebalance_id
    events.wait_load()
    plan = worker.plan(rid, unpack_int64(msg.phy2log, msg.shape))
    outcome = plan.outcome
    inbox.link.send(Plan(rebalance_id=rid, layers=outcome.layers,
                         phy2log=pack_int64(outcome.maps.phy2log),
                         shape=list(outcome.maps.phy2log.shape), policy_s=plan.policy_s,
                         balancedness_before=outcome.balancedness_before,
                         balancedness_after=outcome.balancedness_after))
    for index, layer in enumerate(outcome.layers):
        progress()
        inbox.take(None, progress)
        deadline = time.monotonic() + layer_timeout_s
        while not inbox.free and not inbox.stopped:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise IpcTimeoutError(
                    f"no staging buffer came back within layer_timeout_s={layer_timeout_s} s "
                    f"(rebalance {rid}, plan entry {index})")
            inbox.take(remaining, progress)
        if not worker.agree_to_continue(inbox.stopped):
            inbox.stopped = True
            break
        slot = inbox.free.popleft()
        events.wait_free(slot, worker.stream)
        worker.stage(plan, layer, slot)
        inbox.link.send(LayerReady(rebalance_id=rid, index=index, layer=layer, slot=slot,
                                   sent_at=time.monotonic()))
        failpoint("ready", rid)
    inbox.link.send(RebalanceDone(rebalance_id=rid, bytes_staged=plan.bytes_staged,
                                  stage_s=float(sum(plan.stage_s))))


def _recv_or_none(link: Link, timeout: float) -> Any | None:
    try:
        return link.recv(timeout=timeout)
    except IpcTimeoutError:
        return None
