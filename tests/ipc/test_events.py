"""Interprocess CUDA events: handle validation (CPU), and GPU-side ordering of writes across processes
(child → parent, parent → child, and a child working on the peer GPU), with no host sleep.

The writer delays its write with a GPU sleep kernel and records the event right after, without
synchronising; the reader makes its stream wait on the event and snapshots the tensor on that stream.
Without a working cross-process wait the snapshot would hold the old values. The reader also checks
that the event is still pending right after its wait call, which proves the wait did not block the
host and that the writer's record is visible in this process.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import torch

from ipc.errors import HandleError, IpcError, IpcTimeoutError
from ipc.events import SharedEvent
from ipc.handles import close_all, export_tensor, open_tensor, release, shared_empty
from tests.ipc.spawn_utils import CHILD_GPUS, Link, spawn_child

SHAPE = (256, 1024)
DTYPE = torch.bfloat16
OLD_SHIFT, NEW_SHIFT = 1, 101
SLEEP_CYCLES = 1_000_000_000  # ~0.5 s at 2 GHz: far longer than a message takes to arrive


def pattern(shift: int, device: str) -> torch.Tensor:
    """Element k (row-major) holds k % 97 + shift: exact in bfloat16."""
    return (torch.arange(SHAPE[0] * SHAPE[1], device=device) % 97 + shift).reshape(SHAPE).to(DTYPE)


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=0, atol=0)


def delayed_write_and_record(target: torch.Tensor, event: SharedEvent, stream: torch.cuda.Stream,
                             source: torch.Tensor) -> None:
    """On ``stream``: sleep, copy ``source`` into ``target``, record ``event``; the host does not wait."""
    stream.wait_stream(torch.cuda.current_stream(source.device))  # ``source`` was made there
    with torch.cuda.stream(stream):
        torch.cuda._sleep(SLEEP_CYCLES)
        target.copy_(source)
    event.record(stream)


def wait_and_snapshot(target: torch.Tensor, event: SharedEvent, device: int) -> tuple[torch.Tensor, bool]:
    """Make a fresh stream of ``event.device`` wait on ``event`` and copy ``target`` on ``device`` after it.

    Returns the snapshot and whether the event was still pending right after the (non-blocking) wait.
    """
    waiter = torch.cuda.Stream(event.device)
    event.wait(waiter)
    pending = not event.query()
    reader = waiter if device == event.device else torch.cuda.Stream(device)
    if reader is not waiter:
        reader.wait_stream(waiter)  # order the other device's stream after the event's own device
    with torch.cuda.stream(reader):
        snapshot = target.to(f"cuda:{device}", copy=True)  # a peer pull when device != target's device
    reader.synchronize()
    return snapshot, pending


# ----------------------------------------------------------------------------- children

def writer_child(link: Link) -> None:
    """Open the parent's tensor and event; write NEW values late on the GPU and record the event."""
    message = link.recv()
    target = open_tensor(message["tensor"])
    event = SharedEvent.open(message["event"])
    delayed_write_and_record(target, event, torch.cuda.Stream(0), pattern(NEW_SHIFT, "cuda:0"))
    link.send("recorded")
    assert link.recv() == "done"  # keep the context alive until the parent has read
    event.synchronize(timeout_s=30)
    del target
    close_all()


def reader_child(link: Link, device: int) -> None:
    """Work on ``device``; wait (GPU side) for the parent's late write, pull the tensor and check it.
    On the peer GPU, also check a cross-device wait is refused, then write back and record."""
    torch.cuda.set_device(device)
    message = link.recv()
    target = open_tensor(message["tensor"])
    event = SharedEvent.open(message["event"])
    assert event.device == 0 and target.device == torch.device("cuda", 0)
    link.send("ready")  # the parent starts its late write only now, so it is still running below
    assert link.recv() == "recorded"
    snapshot, pending = wait_and_snapshot(target, event, device)
    assert pending, "the event was already complete right after the wait: no cross-process ordering shown"
    assert snapshot.device == torch.device("cuda", device)
    assert_same(snapshot, pattern(NEW_SHIFT, "cpu"))
    if device != event.device:
        with pytest.raises(IpcError, match="of cuda:0 on a stream of cuda:1"):
            event.wait(torch.cuda.current_stream(device))
    # Write back from this process (from the peer GPU when device == 1), ordered by the event again.
    delayed_write_and_record(target, event, torch.cuda.Stream(0), snapshot + 1)
    link.send("recorded")
    assert link.recv() == "done"
    event.synchronize(timeout_s=30)
    del target
    close_all()


# ----------------------------------------------------------------------------- CPU tests

def _valid_looking_handle() -> dict[str, Any]:
    return {"version": 1, "kind": "cuda_event", "pid": os.getpid(), "device": 0,
            "device_uuid": "0" * 32, "ipc_handle": bytes(64)}


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda h: [h], "event handle must be a dict"),
    (lambda h: {k: v for k, v in h.items() if k != "ipc_handle"}, r"missing fields \['ipc_handle'\]"),
    (lambda h: dict(h, callback="os:system"), r"unexpected fields \['callback'\]"),
    (lambda h: dict(h, kind="shm"), "kind 'shm' version 1 is not 'cuda_event'"),
    (lambda h: dict(h, version=7), "version 7 is not"),
    (lambda h: dict(h, device=True), "'device' must be int, got bool"),
    (lambda h: dict(h, device=-2), "'device' is -2"),
    (lambda h: dict(h, ipc_handle="00" * 64), "'ipc_handle' must be bytes, got str"),
    (lambda h: dict(h, ipc_handle=b"x" * 10), "has 10 bytes, expected 64"),
    (lambda h: h, "no CUDA device|cannot see"),
], ids=["not-dict", "missing", "extra", "kind", "version", "bool", "negative", "str-handle", "short",
        "unknown-gpu"])
def test_tampered_event_handle_raises_handle_error(mutate: Callable[[dict[str, Any]], Any],
                                                   message: str) -> None:
    handle = msgpack.unpackb(msgpack.packb(mutate(_valid_looking_handle()), use_bin_type=True), raw=False)
    with pytest.raises(HandleError, match=message):
        SharedEvent.open(handle)


# ----------------------------------------------------------------------------- GPU tests

def _shared_target() -> tuple[torch.Tensor, SharedEvent, dict[str, Any]]:
    target = shared_empty(SHAPE, DTYPE, "cuda:0")
    target.copy_(pattern(OLD_SHIFT, "cuda:0"))
    torch.cuda.synchronize()
    event = SharedEvent.create(0)
    return target, event, {"tensor": export_tensor(target), "event": event.export()}


@pytest.mark.gpu
def test_own_event_handle_round_trips_msgpack_and_opens_to_itself() -> None:
    event = SharedEvent.create("cuda:0")
    handle = event.export()
    assert msgpack.unpackb(msgpack.packb(handle, use_bin_type=True), raw=False) == handle
    assert SharedEvent.open(handle) is event
    event.record()
    event.synchronize(timeout_s=30)
    assert event.query()


@pytest.mark.gpu
def test_synchronize_times_out_with_named_setting() -> None:
    event = SharedEvent.create(0)
    stream = torch.cuda.Stream(0)
    with torch.cuda.stream(stream):
        torch.cuda._sleep(SLEEP_CYCLES)
    event.record(stream)
    with pytest.raises(IpcTimeoutError, match="timeout_s=0.01"):
        event.synchronize(timeout_s=0.01)
    event.synchronize(timeout_s=30)


@pytest.mark.gpu
@pytest.mark.timeout(180)
def test_parent_stream_waits_for_child_write() -> None:
    target, event, handles = _shared_target()
    try:
        with spawn_child(writer_child) as child:
            child.send(handles)
            assert child.recv() == "recorded"
            snapshot, pending = wait_and_snapshot(target, event, 0)
            child.send("done")
        assert pending, "the child's record was not visible here, or the wait blocked the host"
        assert_same(snapshot, pattern(NEW_SHIFT, "cpu"))
    finally:
        release(target)


def _parent_writes_child_reads(device: int) -> None:
    target, event, handles = _shared_target()
    try:
        with spawn_child(reader_child, device) as child:
            child.send(handles)
            assert child.recv() == "ready"
            delayed_write_and_record(target, event, torch.cuda.Stream(0), pattern(NEW_SHIFT, "cuda:0"))
            child.send("recorded")
            assert child.recv() == "recorded"
            snapshot, pending = wait_and_snapshot(target, event, 0)
            child.send("done")
        assert pending
        assert_same(snapshot, pattern(NEW_SHIFT, "cpu") + 1)
    finally:
        release(target)


@pytest.mark.gpu
@pytest.mark.timeout(180)
@pytest.mark.parametrize("device", CHILD_GPUS)
def test_child_stream_waits_for_parent_write(device: int) -> None:
    """On the peer GPU the child waits on a stream of the event's device, then pulls to its own GPU."""
    _parent_writes_child_reads(device)
