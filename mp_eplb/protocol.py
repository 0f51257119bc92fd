"""Wire types between an engine rank and its transfer worker (schema only, no transport).

Arrays travel as raw little-endian int64 bytes with their shape (see :func:`pack_int64`);
tensor and event handles travel as the plain dicts :mod:`ipc` exports. Sequence numbers,
versioning and authentication are the channel's business (:mod:`ipc.channel`).

Engine -> worker: :class:`Setup`, :class:`Rebalance`, :class:`BufferFree`, :class:`Abort`,
``ipc.schema.Shutdown``. Worker -> engine: :class:`SetupDone`, :class:`Plan`,
:class:`LayerReady`, :class:`RebalanceDone`, :class:`WorkerError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ipc.schema import message

__all__ = [
    "PROTOCOL_VERSION", "WorkerTopology", "Setup", "SetupDone", "Rebalance", "Plan", "LayerReady", "BufferFree", "Abort",
    "RebalanceDone", "WorkerError", "PEER_FAILED_KIND", "PEER_FAILED_EXIT", "LOAD_EVENT",
    "free_event", "num_events", "pack_int64", "unpack_int64",
]

#: Version of this application protocol, exchanged in ``ipc.schema.Hello``. 2: ``Setup`` lost
#: ``progress`` (the counter is inherited at spawn, see :mod:`mp_eplb.worker.boot`); ``Plan``
#: carries the policy's balancedness before/after. 3: ``LayerReady`` lost ``metadata`` (the
#: engine derives it from the two maps); unread fields dropped (``BufferFree.layer/committed``,
#: ``RebalanceDone.layers_staged/aborted``, ``WorkerError.rebalance_id``);
#: ``Setup.collective_timeout_s`` renamed ``layer_timeout_s``, what it carries.
PROTOCOL_VERSION = 3


def pack_int64(array: np.ndarray) -> bytes:
    """Raw little-endian int64 bytes of ``array`` (C order)."""
    return np.ascontiguousarray(array, dtype="<i8").tobytes()


def unpack_int64(data: bytes, shape: tuple[int, ...] | list[int]) -> np.ndarray:
    """Inverse of :func:`pack_int64`; ``ValueError`` if the byte count does not fit ``shape``."""
    shape = tuple(int(s) for s in shape)
    expected = 8 * int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise ValueError(f"int64 array of shape {shape} needs {expected} bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<i8").reshape(shape).astype(np.int64)


@message("eplb.topology")
@dataclass(frozen=True)
class WorkerTopology:
    """The model and expert-parallel layout a worker serves."""

    rank: int
    world_size: int
    num_logical: int
    num_groups: int
    num_redundant: int
    ranks_per_node: int
    max_ops_per_batch: int

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.ranks_per_node


@message("eplb.setup")
@dataclass(frozen=True)
class Setup:
    """Everything the worker needs, sent once after the handshake.

    ``weights[layer][i]``, ``buffers[slot][i]``: tensor handles (engine-owned memory).
    ``load_total``: handle of the ``[layers, logical]`` int64 window sum (engine writes it
    before recording ``events[0]`` and sending ``Rebalance``).
    ``events``: interprocess CUDA event handles: ``events[0]`` is recorded by the engine when
    it asks for a rebalance (the load window is complete up to then), ``events[1 + slot]``
    after its last read of staging buffer ``slot``. Empty on CPU.
    ``layer_timeout_s``: ``EplbConfig.layer_timeout_s``, the worker's bound on waiting for a
    free staging buffer, and the timeout of its process group's collectives (and of the
    declared waits of its start: CUDA context creation, rendezvous).
    """

    topology: WorkerTopology
    communicator: str
    rendezvous: str
    device: str
    weights: list[list[dict[str, Any]]]
    buffers: list[list[dict[str, Any]]]
    load_total: dict[str, Any]
    events: list[dict[str, Any]]
    layer_timeout_s: float


@message("eplb.setup_done")
@dataclass(frozen=True)
class SetupDone:
    """The worker opened every handle and joined its process group."""

    pid: int


@message("eplb.rebalance")
@dataclass(frozen=True)
class Rebalance:
    """Start rebalance ``rebalance_id`` from the engine's current placement ``phy2log``
    (int64 ``[layers, physical]``, :func:`pack_int64`), asked at engine step ``step``."""

    rebalance_id: int
    step: int
    phy2log: bytes
    shape: list[int]


@message("eplb.plan")
@dataclass(frozen=True)
class Plan:
    """The new placement of every layer (identical on all ranks) and the layers that change,
    in the order they will be staged. ``balancedness_before``/``_after``: mean over layers of
    mean / max tokens per rank on the load window the policy read, under the old and the new
    placement (:func:`mp_eplb.policy.mean_balancedness`)."""

    rebalance_id: int
    layers: list[int]
    phy2log: bytes
    shape: list[int]
    policy_s: float
    balancedness_before: float
    balancedness_after: float


@message("eplb.ready")
@dataclass(frozen=True)
class LayerReady:
    """Plan entry ``index`` (layer ``layer``) is complete in staging buffer ``slot``.

    The engine derives the layer's ``TransferMetadata`` from the old and new maps itself;
    ``sent_at`` is the sender's ``time.monotonic()`` (system-wide on Linux, so the engine can time delivery).
    """

    rebalance_id: int
    index: int
    layer: int
    slot: int
    sent_at: float


@message("eplb.free")
@dataclass(frozen=True)
class BufferFree:
    """The engine is done with ``slot`` (its event is recorded after the last read)."""

    rebalance_id: int
    slot: int


@message("eplb.abort")
@dataclass(frozen=True)
class Abort:
    """Stop rebalance ``rebalance_id``: every rank abandons the layers not yet committed."""

    rebalance_id: int
    reason: str


@message("eplb.done")
@dataclass(frozen=True)
class RebalanceDone:
    """The worker has finished (or stopped) ``rebalance_id``; figures for the engine's record:
    bytes of this rank's rows it staged and the time staging took."""

    rebalance_id: int
    bytes_staged: int
    stage_s: float


#: ``WorkerError.kind`` of a worker whose collective with the peer workers failed (a peer
#: rank's worker died or hung); it exits with :data:`PEER_FAILED_EXIT`.
PEER_FAILED_KIND = "PeerFailed"
#: Exit status of such a worker (1: any other error; 3: its engine is gone,
#: ``mp_eplb.worker.boot.PARENT_GONE_EXIT``, defined there so the boot stays standard library only).
PEER_FAILED_EXIT = 4

#: Event slots of ``Setup.events``: the engine records :data:`LOAD_EVENT` when it asks for a
#: rebalance (the load window is complete), and :func:`free_event` of a staging slot after its
#: last read of that buffer.
LOAD_EVENT = 0


def free_event(slot: int) -> int:
    """Index in ``Setup.events`` of staging buffer ``slot``'s *buffer free* event."""
    return 1 + slot


def num_events(num_slots: int) -> int:
    """Length of ``Setup.events`` (on CUDA; empty on CPU) for ``num_slots`` staging buffers."""
    return free_event(num_slots)


@message("eplb.error")
@dataclass(frozen=True)
class WorkerError:
    """The worker hit an exception; it sends this before it exits. ``kind``: the exception's
    type name, or :data:`PEER_FAILED_KIND`."""

    kind: str
    detail: str
