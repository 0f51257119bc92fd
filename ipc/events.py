"""CUDA events shared between processes, for GPU-side ordering of work across processes.

A producer records a :class:`SharedEvent` on its stream after writing a buffer; a consumer makes its
own stream wait on the event (no host synchronisation) before reading the buffer. Built on
``torch.cuda.Event(interprocess=True)``, ``Event.ipc_handle()`` and ``torch.cuda.Event.from_ipc_handle``
(the route torch's own multiprocessing uses to share events).

Contracts and pitfalls:

- The event lives on one GPU. Only streams of that GPU may record it, and :meth:`SharedEvent.wait`
  accepts only streams of that GPU too: a stream of another GPU waiting on an interprocess event was
  seen to hang, so such a wait raises IpcError instead. Wait on the event's own device, then order the
  other device's stream after that one (e.g. an ordinary event).
- Waiting on an event that was never recorded completes at once (a silent no-op in CUDA): the protocol
  around it must say *which* record a wait is for.
- Interprocess events cannot time (``enable_timing`` is always False).
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Mapping
from typing import Any

import torch

from ipc import _cuda
from ipc.errors import HandleError, IpcError, IpcTimeoutError
from ipc.handles import check_fields

__all__ = ["EVENT_HANDLE_VERSION", "SharedEvent"]

logger = logging.getLogger(__name__)

EVENT_HANDLE_VERSION = 1
_FIELDS: dict[str, type] = {
    "version": int, "kind": str, "pid": int, "device": int, "device_uuid": str, "ipc_handle": bytes,
}
_POLL_START_S = 20e-6
_POLL_MAX_S = 1e-3

# Events created by this process, by IPC handle: opening one's own handle returns the original.
_own_events: weakref.WeakValueDictionary[bytes, SharedEvent] = weakref.WeakValueDictionary()


class SharedEvent:
    """An interprocess CUDA event on one device; create it with :meth:`create`, ship :meth:`export`'s
    plain-data handle to another process, and :meth:`open` it there."""

    def __init__(self, event: torch.cuda.Event, device: int, ipc_handle: bytes, owner_pid: int) -> None:
        self.event = event
        self.device = device
        self.ipc_handle = ipc_handle
        self.owner_pid = owner_pid

    @classmethod
    def create(cls, device: torch.device | str | int | None = None) -> SharedEvent:
        """A new interprocess event on ``device`` (default: the current CUDA device), owned by this process."""
        if device is None:
            ordinal = torch.cuda.current_device()
        else:
            dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
            if dev.type != "cuda":
                raise ValueError(f"an interprocess event needs a CUDA device, got {dev}")
            ordinal = torch.cuda.current_device() if dev.index is None else dev.index
        with torch.cuda.device(ordinal):
            event = torch.cuda.Event(enable_timing=False, interprocess=True)
            ipc_handle = bytes(event.ipc_handle())  # creates the CUDA event on the current device
        shared = cls(event, ordinal, ipc_handle, os.getpid())
        _own_events[ipc_handle] = shared
        return shared

    def export(self) -> dict[str, Any]:
        """Plain data (msgpack-packable): version, kind "cuda_event", pid, device, device_uuid, ipc_handle."""
        return {"version": EVENT_HANDLE_VERSION, "kind": "cuda_event", "pid": self.owner_pid,
                "device": self.device, "device_uuid": _cuda.device_uuid(self.device),
                "ipc_handle": self.ipc_handle}

    @classmethod
    def open(cls, handle: Mapping[str, Any]) -> SharedEvent:
        """Open an exported event in this process, on the GPU it lives on (found by UUID).

        Raises HandleError for a malformed handle, a GPU not visible here, or a handle CUDA refuses.
        """
        h = check_fields(handle, _FIELDS, "event handle")
        if h["kind"] != "cuda_event" or h["version"] != EVENT_HANDLE_VERSION:
            raise HandleError(f"event handle kind {h['kind']!r} version {h['version']} is not "
                              f"'cuda_event' version {EVENT_HANDLE_VERSION}")
        if len(h["ipc_handle"]) != _cuda.IPC_HANDLE_BYTES:
            raise HandleError(f"event handle ipc_handle has {len(h['ipc_handle'])} bytes, "
                              f"expected {_cuda.IPC_HANDLE_BYTES}")
        own = _own_events.get(h["ipc_handle"])
        if own is not None:
            return own
        if not torch.cuda.is_available():
            raise HandleError("event handle cannot be opened: this process has no CUDA device")
        ordinal = _cuda.ordinal_of_uuid(h["device_uuid"])
        if ordinal is None:
            raise HandleError(f"event handle names GPU {h['device_uuid']!r} (cuda:{h['device']} of its owner), "
                              f"which this process cannot see: check CUDA_VISIBLE_DEVICES="
                              f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}")
        try:
            event = torch.cuda.Event.from_ipc_handle(torch.device("cuda", ordinal), h["ipc_handle"])
        except RuntimeError as exc:
            raise HandleError(f"cannot open event handle of pid {h['pid']} on cuda:{ordinal}: {exc}") from exc
        logger.debug("opened interprocess event of pid %d on cuda:%d", h["pid"], ordinal)
        return cls(event, ordinal, h["ipc_handle"], h["pid"])

    def _stream(self, stream: torch.cuda.Stream | None, action: str) -> torch.cuda.Stream:
        stream = torch.cuda.current_stream(self.device) if stream is None else stream
        if stream.device_index != self.device:
            raise IpcError(f"cannot {action} an interprocess event of cuda:{self.device} on a stream of "
                           f"cuda:{stream.device_index} (cross-device waits were seen to hang): use a "
                           f"stream of cuda:{self.device}")
        return stream

    def record(self, stream: torch.cuda.Stream | None = None) -> None:
        """Record the event on ``stream`` (default: the current stream of the event's device)."""
        self.event.record(self._stream(stream, "record"))

    def wait(self, stream: torch.cuda.Stream | None = None) -> None:
        """Make later work on ``stream`` (default: the current stream of the event's device) wait on the
        GPU for the last record; the host does not block."""
        self.event.wait(self._stream(stream, "wait on"))

    def query(self) -> bool:
        """True when the work captured by the last record is complete (or nothing was recorded)."""
        return bool(self.event.query())

    def synchronize(self, timeout_s: float) -> None:
        """Block the host until :meth:`query` is true; IpcTimeoutError after ``timeout_s`` seconds."""
        deadline = time.monotonic() + timeout_s
        delay = _POLL_START_S
        while not self.query():
            if time.monotonic() >= deadline:
                raise IpcTimeoutError(f"interprocess event on cuda:{self.device} not complete after "
                                      f"timeout_s={timeout_s}; the producer (pid {self.owner_pid}) may be "
                                      f"stuck or dead")
            time.sleep(delay)
            delay = min(delay * 2, _POLL_MAX_S)

    def __repr__(self) -> str:
        return f"SharedEvent(device=cuda:{self.device}, owner_pid={self.owner_pid})"
