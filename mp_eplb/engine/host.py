"""Where the transfer worker runs: a subprocess (process mode) or a thread (thread mode).

A backend is built from a :class:`WorkerSpec` (what the engine fixed at construction), never
from the state itself. Both give :class:`~mp_eplb.engine.state.EplbState` the same surface: the staging buffers
and load window it writes, ``send``/``poll`` of :mod:`mp_eplb.protocol`, liveness, GPU event
hooks, and ``close``. The worker logic itself (:mod:`mp_eplb.worker.loop`, :mod:`mp_eplb.worker.logic`)
is the same in both.
"""

from __future__ import annotations

import abc
import enum
import logging
import os
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ipc import handles
from ipc import procs
from ipc.channel import Channel
from ipc.codec import new_session_key
from ipc.errors import ChannelClosedError, IpcError
from ipc.events import SharedEvent
from ipc.schema import Hello, Shutdown
from mp_eplb.config import EplbConfig
from mp_eplb.errors import WorkerStartError
from mp_eplb.protocol import (LOAD_EVENT, PROTOCOL_VERSION, Setup, SetupDone, WorkerError,
                              WorkerTopology, free_event, num_events)
from mp_eplb.ranks import free_port
from mp_eplb.worker.loop import QueueLink, StreamEvents, serve
from mp_eplb.worker.logic import build_worker
from mp_eplb.worker.boot import ProgressCounter, StartInfo

__all__ = ["Health", "Phase", "WorkerSpec", "WorkerBackend", "ProcessBackend", "ThreadBackend",
           "make_backend", "rendezvous"]

logger = logging.getLogger(__name__)

#: Seconds a worker gets to exit after ``Shutdown`` before terminate, then kill.
SHUTDOWN_GRACE_S = 5.0


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker host needs from its engine rank, fixed when the state is built.

    ``expert_weights[layer][i]``: this rank's ``[local slots, ...]`` tensors (shared with the
    worker in place, never re-homed); ``group``: the engine's CPU group over the EP ranks
    (``None`` for one rank in process mode), used for the rendezvous broadcast and to build
    the thread mode's own group.
    """

    device: torch.device
    config: EplbConfig
    topology: WorkerTopology
    communicator: str | None
    expert_weights: Sequence[Sequence[torch.Tensor]]
    group: dist.ProcessGroup | None

    @property
    def rank(self) -> int:
        return self.topology.rank

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    @property
    def num_logical(self) -> int:
        return self.topology.num_logical

    @property
    def num_layers(self) -> int:
        return len(self.expert_weights)


class Phase(enum.Enum):
    """Where a worker's start-up handshake stands (``Hello`` -> ``Setup`` -> ``SetupDone``)."""

    HELLO = "waiting for Hello"
    SETUP = "waiting for SetupDone"
    READY = "ready"
    STOPPED = "stopped"


class Health(enum.Enum):
    """A worker's health as the engine judges it (:meth:`WorkerBackend.health`)."""

    STARTING = "starting"  # handshake in progress, bounded by start_timeout_s
    OK = "ok"
    EXITED = "exited"  # exited, ended or failed to start: exit_description() says how
    HUNG = "hung"  # its progress counter stood still for heartbeat_timeout_s


class WorkerBackend(abc.ABC):
    """The engine's side of one transfer worker.

    ``buffers[slot][i]`` mirror ``expert_weights[layer][i]`` (one layer of this rank's slots);
    ``load_total`` is ``[layers, logical]`` int64: the window's sum, written by the engine when
    it asks for a rebalance (never while the worker may read it). The engine owns all of them.
    """

    def __init__(self, spec: WorkerSpec, empty: Callable[..., torch.Tensor]) -> None:
        """Allocate staging buffers, load window and events with ``empty(shape, dtype,
        device)`` (shareable memory for a subprocess, plain tensors for a thread)."""
        self.spec = spec
        self._cuda = spec.device.type == "cuda"
        device = spec.device
        slots = spec.config.num_staging_buffers
        self.buffers = [[empty(t.shape, t.dtype, device) for t in spec.expert_weights[0]]
                        for _ in range(slots)]
        self.load_total = empty((spec.num_layers, spec.num_logical), torch.int64, device)
        self.load_total.zero_()
        self.events = ([SharedEvent.create(device) for _ in range(num_events(slots))]
                       if self._cuda else [])
        self.progress = ProgressCounter.create()
        self._forget_progress()

    @abc.abstractmethod
    def send(self, msg: Any) -> None:
        """Queue ``msg`` (a :mod:`mp_eplb.protocol` message) for the worker without blocking.
        Sent before the worker is ready, it is delivered once it is; to a worker that is gone,
        it is dropped (:meth:`health` reports the exit at the next check)."""

    @abc.abstractmethod
    def poll(self) -> Any | None:
        """The worker's next message, or ``None`` at once if there is none (never blocks).
        Also advances a start-up handshake."""

    @abc.abstractmethod
    def alive(self) -> bool:
        """False once the worker has exited, failed to start, or ended."""

    @abc.abstractmethod
    def exit_description(self) -> str:
        """How the worker ended (exit code, signal, start-up error), for error messages."""

    @abc.abstractmethod
    def close(self, kill: bool = False) -> None:
        """Stop the worker without waiting for it (``kill``: it is judged dead or hung, stop
        it at once) and free what this backend allocated once it is gone. Idempotent."""

    #: Whether :meth:`restart` can replace a failed worker.
    restartable = False

    def restart(self, rendezvous: str) -> None:
        """Replace the worker by a new one meeting its peers at ``rendezvous``; returns at once
        (the handshake advances in :meth:`poll`). Collective: every rank restarts together."""
        raise NotImplementedError(f"{type(self).__name__} cannot restart its worker")

    @property
    def ready(self) -> bool:
        """Whether the worker finished its start-up handshake."""
        return True

    def health(self) -> Health:
        """Judge the worker now (an observation of its progress counter: call it regularly)."""
        if not self.alive():
            return Health.EXITED
        if not self.ready:
            return Health.STARTING
        return Health.HUNG if self.silent_s() > self.spec.config.heartbeat_timeout_s else Health.OK

    def silent_s(self) -> float:
        """Seconds since the worker's progress counter was last seen to change or to declare
        a long wait (it advances from the first moment of a start and while the worker's loop
        runs, idle or busy; a stuck or stopped worker stops it). Call it regularly: each call
        is an observation."""
        now, count = time.monotonic(), self.progress.value
        if count != self._progress_seen[0] or now < self.progress.waiting_until:
            self._progress_seen = (count, now)
        return now - self._progress_seen[1]

    def hang_description(self) -> str:
        """Why the worker counts as hung, for the error of :attr:`Health.HUNG`."""
        return (f"transfer worker made no progress for {self.silent_s():.1f} s "
                f"(EplbConfig.heartbeat_timeout_s={self.spec.config.heartbeat_timeout_s}); "
                "treating it as hung")

    def _forget_progress(self) -> None:
        """A new worker starts: its silence counts from now."""
        self._progress_seen = (-1, time.monotonic())

    # GPU ordering (slots as protocol.LOAD_EVENT / protocol.free_event say): the load event
    # after the load window is written, a slot's event after the engine's last read of its
    # staging buffer. Recorded on the engine's current stream.
    def record_load_event(self) -> None:
        if self.events:
            self.events[LOAD_EVENT].record(torch.cuda.current_stream(self.spec.device))

    def release_slot(self, slot: int) -> None:
        if self.events:
            self.events[free_event(slot)].record(torch.cuda.current_stream(self.spec.device))


def make_backend(spec: WorkerSpec) -> WorkerBackend:
    """Start the worker of ``spec.config.mode`` (collective over the engine's ranks)."""
    if spec.config.mode == "process":
        return ProcessBackend(spec)
    return ThreadBackend(spec)


def rendezvous(spec: WorkerSpec) -> str:
    """The workers' process-group address: the configured one, or a free port picked by
    rank 0 on 127.0.0.1 and shared over the engine's CPU group (single node only)."""
    if spec.config.rendezvous is not None:
        return spec.config.rendezvous
    port = torch.zeros(1, dtype=torch.int64)
    if spec.rank == 0:
        port[0] = free_port("127.0.0.1")
    if spec.world_size > 1:
        dist.broadcast(port, src=dist.get_global_rank(spec.group, 0), group=spec.group)
    return f"tcp://127.0.0.1:{int(port.item())}"


class ProcessBackend(WorkerBackend):
    """A transfer subprocess (``python -m mp_eplb.worker.boot``) talking over ZeroMQ.

    The weights are shared where they are (:func:`ipc.handles.share_storage`); staging buffers,
    load window and events are allocated here and exported as handles; the progress counter
    and the start info (session key included) are inherited fds, never the environment or
    the command line. The worker is forked by ``ipc.procs.spawn``'s long-lived thread, so it
    dies with this process, not with the thread that built the state. The first start
    blocks (up to ``start_timeout_s``, or ``heartbeat_timeout_s`` of silence); :meth:`restart`
    does not: the handshake advances in :meth:`poll`, and messages sent meanwhile are queued
    until the worker is set up. No method waits for a process exit (``ipc.procs.reap``).
    """

    def __init__(self, spec: WorkerSpec) -> None:
        # Shared in place: no weight changes address (CUDA) or storage (CPU), so views taken
        # before, the Parameters behind them and CUDA graphs captured before all stay valid.
        self._shared_weights: list[torch.Tensor] = []
        try:
            for t in (t for layer in spec.expert_weights for t in layer):
                handles.share_storage(t)  # one reference each, given back at close
                self._shared_weights.append(t)
        except BaseException:
            for t in self._shared_weights:
                handles.release(t)
            raise
        super().__init__(spec, handles.shared_empty)
        self.proc: subprocess.Popen | None = None
        self.channel: Channel | None = None
        try:
            self._spawn(rendezvous(spec))
            while not self.ready:
                self._pump()
                if self._start_error:
                    raise WorkerStartError(self._start_error)
                time.sleep(0.005)
        except BaseException:
            self.close(kill=True)
            if self.stopping is not None:  # a failed start leaves nothing behind: a killed
                self.stopping.join()       # worker exits at once
            raise

    # -- start-up -------------------------------------------------------------------------

    def _spawn(self, rendezvous: str) -> None:
        cfg = self.spec.config
        key = new_session_key()
        self.channel = Channel.bind(key, cfg.endpoint)
        self._rendezvous_addr = rendezvous
        self._phase = Phase.HELLO
        self._pending: list[Any] = []
        self._start_error = ""
        self._started_at = time.monotonic()
        self._forget_progress()
        start_fd = procs.inheritable_pipe(StartInfo(
            key=key.hex(), endpoint=self.channel.endpoint, parent_pid=os.getpid(),
            progress_fd=self.progress.fd, start_timeout_s=cfg.start_timeout_s).to_json())
        try:
            self.proc = procs.spawn(
                [sys.executable, "-m", "mp_eplb.worker.boot", "--start-fd", str(start_fd)],
                pass_fds=(start_fd, self.progress.fd))
        finally:
            os.close(start_fd)

    restartable = True

    @property
    def ready(self) -> bool:
        return self._phase is Phase.READY

    def _pump(self) -> None:
        """Advance the handshake without blocking: Hello -> Setup -> SetupDone."""
        while not self.ready and not self._start_error:
            if self.proc.poll() is not None:
                self._start_error = (f"transfer worker exited during start-up "
                                     f"({self.exit_description()}); see its log")
                return
            limit = self.spec.config.start_timeout_s
            if self.silent_s() > self.spec.config.heartbeat_timeout_s:
                self._start_error = self.hang_description()
            elif time.monotonic() - self._started_at > limit:
                self._start_error = ("transfer worker did not finish its handshake within "
                                     f"EplbConfig.start_timeout_s={limit} s")
            if self._start_error:
                return
            msg = self.channel.poll()
            if msg is None:
                return
            if isinstance(msg, WorkerError):
                self._start_error = f"transfer worker failed to start: {msg.kind}: {msg.detail}"
            elif self._phase is Phase.HELLO and isinstance(msg, Hello):
                if msg.protocol_version != PROTOCOL_VERSION:
                    self._start_error = (
                        f"transfer worker speaks protocol {msg.protocol_version}, this engine "
                        f"{PROTOCOL_VERSION}: install the same mp_eplb for both")
                    return
                self.channel.send(self._setup_message(self._rendezvous_addr))
                self._phase = Phase.SETUP
            elif self._phase is Phase.SETUP and isinstance(msg, SetupDone):
                self._phase = Phase.READY
                self.start_s = time.monotonic() - self._started_at
                logger.info("rank %d: transfer worker pid %d ready in %.2f s", self.spec.rank,
                            msg.pid, self.start_s)
                for queued in self._pending:
                    self.channel.send(queued)
                self._pending.clear()
            else:
                logger.warning("rank %d: unexpected %s during worker start-up",
                               self.spec.rank, type(msg).__name__)

    def _setup_message(self, rendezvous: str) -> Setup:
        s = self.spec
        return Setup(
            topology=s.topology, communicator=s.communicator,
            rendezvous=rendezvous, device=str(s.device),
            weights=[[handles.export_tensor(t) for t in layer] for layer in s.expert_weights],
            buffers=[[handles.export_tensor(t) for t in slot] for slot in self.buffers],
            load_total=handles.export_tensor(self.load_total),
            events=[e.export() for e in self.events],
            layer_timeout_s=float(s.config.layer_timeout_s))

    # -- running --------------------------------------------------------------------------

    def send(self, msg: Any) -> None:
        if not self.ready:
            self._pending.append(msg)
            return
        try:
            self.channel.send(msg)
        except ChannelClosedError as err:
            # The worker is gone: alive() reports it at the next check and the rebalance is
            # abandoned there, on every rank, instead of this step failing.
            logger.warning("rank %d: %s not delivered: %s", self.spec.rank,
                           type(msg).__name__, err)

    def poll(self) -> Any | None:
        if not self.ready:
            self._pump()
            return None
        return self.channel.poll()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and not self._start_error

    def exit_description(self) -> str:
        if self._start_error:
            return self._start_error
        code = None if self.proc is None else self.proc.poll()
        if code is None:
            return "still running"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    @property
    def exit_code(self) -> int | None:
        """The worker's exit status (negative: the signal), ``None`` while it runs."""
        return None if self.proc is None else self.proc.poll()

    def restart(self, rendezvous: str) -> None:
        """Kill the current worker at once (its rebalance was abandoned; its process group
        is broken) and start a new one; returns at once, the old one is reaped elsewhere."""
        self._stop_worker(kill=True)
        self._spawn(rendezvous)

    def _stop_worker(self, kill: bool, then: Callable[[], None] = lambda: None) -> None:
        """Stop the worker without waiting: SIGKILL at once if ``kill``, it is not set up or
        it is stopped (SIGSTOP), else ask it (``Shutdown``) and give it SHUTDOWN_GRACE_S before SIGTERM, then SIGKILL,
        on a reaper thread, which calls ``then`` once it is gone. Closes the channel."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            polite = self.ready and not kill and not procs.is_stopped(proc.pid)
            if polite:
                try:
                    self.channel.send(Shutdown(reason="engine shutdown"))
                except IpcError:
                    polite = False
            if not polite:
                proc.kill()
            self.stopping = procs.reap(proc, SHUTDOWN_GRACE_S if polite else 0.0,
                                       SHUTDOWN_GRACE_S, then)
        else:
            then()
        self._phase = Phase.STOPPED
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    #: The reaper thread of the last worker stopped (join it to wait for its exit).
    stopping: threading.Thread | None = None

    def close(self, kill: bool = False) -> None:
        """Stop the worker (see :meth:`_stop_worker`; ``kill``: it is judged dead or hung)
        and free the shared memory once it is gone. Returns at once. Idempotent."""
        buffers, self.buffers = self.buffers, []
        owned = [t for slot in buffers for t in slot] + ([self.load_total] if buffers else [])
        weights, self._shared_weights = self._shared_weights, []

        def release() -> None:
            for t in owned + weights:
                handles.release(t)
            if buffers:
                self.progress.close()

        self._stop_worker(kill, release)

class ThreadBackend(WorkerBackend):
    """The same worker on a thread of the engine process (vLLM-style baseline). The thread
    gets its own process group (created here, collectively) so its P2P traffic never
    interleaves with the engine's collectives."""

    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec, lambda shape, dtype, device: torch.empty(shape, dtype=dtype,
                                                                         device=device))
        self._link, worker_link = QueueLink.pair()
        self._error: BaseException | None = None
        worker = build_worker(
            topology=spec.topology, communicator=spec.communicator, device=spec.device,
            weights=spec.expert_weights, buffers=self.buffers, load_total=self.load_total,
            group=_thread_group(spec))
        self._thread = threading.Thread(
            target=self._run, args=(worker, worker_link), name=f"eplb-transfer-{spec.rank}",
            daemon=True)
        self._thread.start()

    def _run(self, worker, link: QueueLink) -> None:
        if self._cuda:
            torch.cuda.set_device(self.spec.device)
        try:
            serve(worker, link, StreamEvents(self.events, self.spec.config.layer_timeout_s),
                  num_slots=self.spec.config.num_staging_buffers,
                  layer_timeout_s=self.spec.config.layer_timeout_s,
                  progress=self.progress.add)
        except BaseException as err:  # reported to the engine, which abandons the rebalance
            self._error = err
            logger.error("transfer thread failed:\n%s", traceback.format_exc())
            link.send(WorkerError(kind=type(err).__name__, detail=str(err)))

    def send(self, msg: Any) -> None:
        self._link.send(msg)

    def poll(self) -> Any | None:
        return self._link.poll()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def exit_description(self) -> str:
        return "running" if self.alive() else f"thread ended ({self._error!r})"

    def close(self, kill: bool = False) -> None:
        """Ask the thread to stop and join it (a thread cannot be killed: ``kill`` changes
        nothing)."""
        if self._thread.is_alive():
            self._link.send(Shutdown(reason="engine shutdown"))
            self._thread.join(timeout=SHUTDOWN_GRACE_S + self.spec.config.layer_timeout_s)
            if self._thread.is_alive():
                logger.warning("rank %d: transfer thread did not stop; leaving it (daemon)",
                               self.spec.rank)
                return
        self.progress.close()


def _thread_group(spec: WorkerSpec) -> dist.ProcessGroup:
    """A gloo group of the transfer threads' own over the engine's EP ranks (thread mode moves
    weights with gloo), in the engine group's rank order; only those ranks take part."""
    ranks = dist.get_process_group_ranks(spec.group)
    return dist.new_group(ranks=ranks, backend="gloo", use_local_synchronization=True)
