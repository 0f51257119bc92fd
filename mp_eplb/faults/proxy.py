"""Message faults: :class:`FrameProxy`, a ZeroMQ man in the middle between an engine's channel
and its worker, put there by :class:`ChannelTracker` (which wraps ``Channel.bind`` as
:mod:`mp_eplb.engine.host` sees it; no production hook), and :func:`inject_wrong_key`."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from ipc.channel import Channel
from ipc.codec import MAC_BYTES, Codec, new_session_key
from mp_eplb.engine import host as backends
from mp_eplb.faults.scenarios import WRONG_KEY_FRAMES
from mp_eplb.protocol import RebalanceDone

__all__ = ["ChannelTracker", "FrameProxy", "inject_wrong_key"]

#: Longest time the proxy holds a reordered frame when nothing overtakes it.
REORDER_HOLD_S = 1.0
#: Seconds :meth:`FrameProxy.stop` waits for its thread.
EXIT_WAIT_S = 10.0


@dataclass
class _ProxyFault:
    action: str      # delay | duplicate | drop | reorder | corrupt
    direction: str   # up (worker -> engine) | down (engine -> worker) | both
    tag: str | None
    delay_s: float = 0.02
    spent: bool = False


class FrameProxy:
    """ZeroMQ man in the middle: the worker's DEALER connects to :attr:`endpoint` (a ROUTER
    here), and frames go on to the engine's ROUTER at ``upstream`` through a DEALER. It
    reads only the message tag of a frame (no key needed) and, once armed, delays,
    duplicates, drops, reorders or corrupts frames. Runs on a daemon thread of the rank
    process until :meth:`stop`, which also removes its socket directory."""

    def __init__(self, upstream: str) -> None:
        self._dir = tempfile.mkdtemp(prefix="eplb-proxy-")
        self.endpoint = f"ipc://{self._dir}/p.sock"
        self.upstream = upstream
        self._ctx = zmq.Context(io_threads=1)
        self._front = self._ctx.socket(zmq.ROUTER)
        self._back = self._ctx.socket(zmq.DEALER)
        for sock in (self._front, self._back):
            sock.setsockopt(zmq.LINGER, 0)
        self._front.bind(self.endpoint)
        self._back.connect(upstream)
        self._worker_id: bytes | None = None
        self._lock = threading.Lock()
        self._fault: _ProxyFault | None = None
        self._held: list[tuple[float, str, bytes, bool]] = []
        self.injected_at: float | None = None
        self.frames = {"up": 0, "down": 0, "faulted": 0}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="eplb-fault-proxy", daemon=True)
        self._thread.start()

    def arm(self, text: str) -> None:
        """Arm ``ACTION:DIRECTION[:TAG]`` (e.g. ``drop:up:eplb.ready``)."""
        action, direction, *tag = text.split(":")
        if action not in ("delay", "duplicate", "drop", "reorder", "corrupt") or \
                direction not in ("up", "down", "both"):
            raise ValueError(f"proxy fault {text!r}: expected ACTION:DIRECTION[:TAG]")
        with self._lock:
            self._fault = _ProxyFault(action, direction, tag[0] if tag else None)
            self.injected_at = None

    def disarm(self) -> None:
        """Pass every frame unchanged from now on."""
        with self._lock:
            self._fault = None

    def stop(self) -> None:
        """Stop the thread, close the sockets, remove the socket directory (idempotent)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._thread.join(EXIT_WAIT_S)
        self._front.close(linger=0)
        self._back.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def socket_path(self) -> str:
        """The file of the proxy's socket (a leftover once stopped)."""
        return self.endpoint.removeprefix("ipc://")

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._front, zmq.POLLIN)
        poller.register(self._back, zmq.POLLIN)
        while not self._stopping.is_set():
            for sock, _ in poller.poll(timeout=5):
                if sock is self._front:
                    self._worker_id, frame = sock.recv_multipart()[:2]
                    self._route("up", frame)
                else:
                    self._route("down", sock.recv())
            self._release(time.monotonic())

    def _route(self, direction: str, frame: bytes) -> None:
        self.frames[direction] += 1
        with self._lock:
            fault = self._fault
        if (fault is None or fault.spent or fault.direction not in (direction, "both")
                or (fault.tag is not None and _frame_tag(frame) != fault.tag)):
            self._queue(direction, frame)
            return
        self.frames["faulted"] += 1
        if self.injected_at is None:
            self.injected_at = time.time()
        if fault.action == "delay":
            self._queue(direction, frame, fault.delay_s)
        elif fault.action == "duplicate":
            self._queue(direction, frame)
            self._queue(direction, frame)
        elif fault.action == "corrupt":
            fault.spent = True
            body = bytearray(frame)
            body[MAC_BYTES + (len(body) - MAC_BYTES) // 2] ^= 0x01
            self._queue(direction, bytes(body))
        elif fault.action == "reorder":
            fault.spent = True
            self._queue(direction, frame, REORDER_HOLD_S, overtakable=True)
        else:  # drop
            fault.spent = True

    def _queue(self, direction: str, frame: bytes, delay_s: float = 0.0,
               overtakable: bool = False) -> None:
        self._held.append((time.monotonic() + delay_s, direction, frame, overtakable))
        self._release(time.monotonic())

    def _release(self, now: float) -> None:
        """Emit due frames, first in first out per direction; an overtakable (reordered)
        frame goes right after the next frame of its direction, or when its hold ends."""
        keep: list[tuple[float, str, bytes, bool]] = []
        blocked: set[str] = set()
        for item in self._held:
            due, direction, frame, overtakable = item
            if due > now or (direction in blocked and not overtakable):
                keep.append(item)
                if not overtakable:
                    blocked.add(direction)
                continue
            self._emit(direction, frame)
            if not overtakable:
                for held in [k for k in keep if k[3] and k[1] == direction]:
                    keep.remove(held)
                    self._emit(direction, held[2])
        self._held = keep

    def _emit(self, direction: str, frame: bytes) -> None:
        if direction == "up":
            self._back.send(frame)
        elif self._worker_id is not None:
            self._front.send_multipart([self._worker_id, frame])


def _frame_tag(frame: bytes) -> str | None:
    try:
        body = msgpack.unpackb(frame[MAC_BYTES:], raw=False)
        return body[1] if isinstance(body, list) and len(body) > 1 else None
    except (ValueError, msgpack.UnpackException):
        return None


class ChannelTracker:
    """Wraps ``Channel.bind`` as :mod:`mp_eplb.engine.host` sees it: records every channel the
    backend binds (for drop counters and socket-file checks) and, with ``proxy``, puts a
    :class:`FrameProxy` between it and the worker (the worker is told the proxy's endpoint)."""

    def __init__(self, proxy: bool) -> None:
        self.channels: list[tuple[Channel, str]] = []
        self.proxies: list[tuple[Channel, FrameProxy]] = []
        tracker = self

        class TrackedChannel(Channel):
            @classmethod
            def bind(cls, key: bytes, endpoint: str | None = None, **kwargs: Any) -> Channel:
                channel = Channel.bind(key, endpoint, **kwargs)
                tracker.channels.append((channel, channel.endpoint))
                tracker.stop_closed()
                if proxy:
                    front = FrameProxy(channel.endpoint)
                    tracker.proxies.append((channel, front))
                    channel.endpoint = front.endpoint  # what _spawn hands to the worker
                return channel

        self._original = backends.Channel
        backends.Channel = TrackedChannel

    @property
    def proxy(self) -> FrameProxy | None:
        """The proxy of the last channel bound, if any."""
        return self.proxies[-1][1] if self.proxies else None

    def stop_closed(self) -> None:
        """Stop the proxies of channels that were closed."""
        for channel, front in self.proxies:
            if channel.closed:
                front.stop()

    def stats(self) -> dict[str, int]:
        """Drop and traffic counters summed over every channel bound."""
        total: dict[str, int] = {}
        for channel, _ in self.channels:
            for key, value in channel.stats.items():
                total[key] = total.get(key, 0) + value
        return total

    def stale_sockets(self) -> list[str]:
        """Socket files of closed channels and their proxies still on disk."""
        self.stop_closed()
        paths = [endpoint.removeprefix("ipc://") for channel, endpoint in self.channels
                 if channel.closed and endpoint.startswith("ipc://")]
        paths += [front.socket_path for channel, front in self.proxies if channel.closed]
        return [p for p in paths if os.path.exists(p)]

    def close(self) -> None:
        """Stop every proxy and restore ``backends.Channel``."""
        for _, front in self.proxies:
            front.stop()
        backends.Channel = self._original


def inject_wrong_key(endpoint: str, frames: int = WRONG_KEY_FRAMES) -> int:
    """Connect to a channel's ``endpoint`` as a stranger and send ``frames`` well-formed
    messages sealed with a wrong key plus two frames of random bytes; returns how many were
    sent (each must be counted as ``unauthenticated`` and ignored)."""
    codec = Codec(new_session_key(), "child")
    ctx = zmq.Context(io_threads=1)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    try:
        sock.connect(endpoint)
        for seq in range(1, frames + 1):
            sock.send(codec.encode(RebalanceDone(rebalance_id=10**6 + seq, bytes_staged=0,
                                                 stage_s=0.0),
                                   10**9 + seq))
        for _ in range(2):
            sock.send(os.urandom(MAC_BYTES + 64))
    finally:
        sock.close()
        ctx.term()
    return frames + 2
