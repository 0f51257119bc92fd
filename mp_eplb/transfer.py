"""Transfer planning and execution of expert weights between EP ranks.

Functions named as in vLLM's ``vllm.distributed.eplb.rebalance_execute`` keep its
semantics. Conventions:

- A *map* (``old_indices``/``new_indices``) is indexed by physical slot and holds a
  logical expert id, ``-1`` for an empty slot. Slot ``p`` lives on group rank
  ``p // num_local_experts`` at local row ``p % num_local_experts``.
- ``expert_weights`` of a layer is a list of tensors whose first dimension is the rank's
  local slots (any trailing shape and dtype); staging buffers have the same shapes.

Deviation from the vLLM reference page: :func:`move_to_buffer` returns one
:class:`TransferMetadata` and :func:`move_from_buffer` takes it as one argument (as
current vLLM does) instead of ``is_unchanged, is_received_locally, recv_metadata``.
Also, :func:`move_to_buffer` stages *every* changed row in the buffer (local copies and
receives), and :func:`move_from_buffer` reads only the buffer, so a process that did no
communication can apply it.

Who sends what to whom is a pure function of the two maps (:func:`plan_layer_transfers`),
computed identically on every rank, so no extra exchange is needed.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mp_eplb.communicator import (
    DEFAULT_MAX_OPS_PER_BATCH,
    EplbCommunicator,
    RowRef,
    default_communicator,
    stream_context,
)

__all__ = [
    "TransferMetadata",
    "PlannedTransfer",
    "get_ep_ranks_with_experts_batch",
    "plan_layer_transfers",
    "move_to_buffer",
    "move_from_buffer",
    "transfer_layer",
    "rearrange_expert_weights_inplace",
]

logger = logging.getLogger(__name__)

_WIRE_MASKS = ("is_unchanged", "is_received_locally", "recv_primary_mask")
_WIRE_KEYS = frozenset(
    ("num_local_experts", "recv_count", "recv_expert_ids", "recv_dst_rows", *_WIRE_MASKS)
)


@dataclass
class TransferMetadata:
    """What :func:`move_to_buffer` staged for one layer on one rank.

    All arrays have shape ``(num_local_experts,)``:

    - ``is_unchanged`` (bool): the row keeps its expert; nothing to do.
    - ``is_received_locally`` (bool): the new expert was already on this rank (includes
      unchanged rows); changed ones are staged at the same row of the buffer.
    - ``recv_primary_mask`` (bool): the row is where a remote expert was received.
    - ``recv_expert_ids`` (int64): the first ``recv_count`` entries are the remote experts
      received (ascending), the rest ``-1``.
    - ``recv_dst_rows`` (int32): buffer row of each received expert, ``-1`` padded.
    """

    is_unchanged: np.ndarray
    is_received_locally: np.ndarray
    recv_primary_mask: np.ndarray
    recv_count: int
    recv_expert_ids: np.ndarray
    recv_dst_rows: np.ndarray

    @property
    def num_local_experts(self) -> int:
        return int(self.is_unchanged.shape[0])

    @classmethod
    def unchanged(cls, num_local_experts: int) -> TransferMetadata:
        """Metadata of a layer whose rows all stay as they are."""
        n = num_local_experts
        return cls(
            is_unchanged=np.ones(n, dtype=np.bool_),
            is_received_locally=np.ones(n, dtype=np.bool_),
            recv_primary_mask=np.zeros(n, dtype=np.bool_),
            recv_count=0,
            recv_expert_ids=np.full(n, -1, dtype=np.int64),
            recv_dst_rows=np.full(n, -1, dtype=np.int32),
        )

    def to_wire(self) -> dict[str, Any]:
        """Plain data for msgpack: masks as bytes of 0/1, ids as little-endian int64
        bytes, rows as little-endian int32 bytes, counts as ints."""
        wire: dict[str, Any] = {
            "num_local_experts": self.num_local_experts,
            "recv_count": int(self.recv_count),
            "recv_expert_ids": self.recv_expert_ids.astype("<i8").tobytes(),
            "recv_dst_rows": self.recv_dst_rows.astype("<i4").tobytes(),
        }
        for key in _WIRE_MASKS:
            wire[key] = getattr(self, key).astype(np.uint8).tobytes()
        return wire

    @classmethod
    def from_wire(cls, wire: object) -> TransferMetadata:
        """Inverse of :meth:`to_wire`; raises ValueError on anything malformed or
        self-inconsistent (never returns metadata that could index out of bounds)."""
        if not isinstance(wire, dict) or set(wire) != _WIRE_KEYS:
            got = sorted(map(str, wire)) if isinstance(wire, dict) else type(wire).__name__
            raise ValueError(f"TransferMetadata wire must have keys {sorted(_WIRE_KEYS)}, got {got}")
        n = _wire_int(wire, "num_local_experts", 1, 1 << 20)
        count = _wire_int(wire, "recv_count", 0, n)
        masks = {}
        for key in _WIRE_MASKS:
            raw = np.frombuffer(_wire_bytes(wire, key, n), dtype=np.uint8)
            if raw.max(initial=0) > 1:
                raise ValueError(f"TransferMetadata wire {key!r} must hold only 0/1 bytes")
            masks[key] = raw.astype(np.bool_)
        ids = np.frombuffer(_wire_bytes(wire, "recv_expert_ids", 8 * n), dtype="<i8").astype(np.int64)
        rows = np.frombuffer(_wire_bytes(wire, "recv_dst_rows", 4 * n), dtype="<i4").astype(np.int32)
        metadata = cls(recv_count=count, recv_expert_ids=ids, recv_dst_rows=rows, **masks)
        metadata.validate()
        return metadata

    def validate(self) -> None:
        """Raise ValueError unless the fields are consistent (shapes, dtypes, padding,
        receive rows in range, unique and matching ``recv_primary_mask``)."""
        n = self.num_local_experts
        for key, dtype in (*((k, np.bool_) for k in _WIRE_MASKS),
                           ("recv_expert_ids", np.int64), ("recv_dst_rows", np.int32)):
            value = getattr(self, key)
            if not isinstance(value, np.ndarray) or value.shape != (n,) or value.dtype != dtype:
                raise ValueError(f"TransferMetadata.{key} must be a ({n},) {np.dtype(dtype)} array")
        count = self.recv_count
        if not 0 <= count <= n:
            raise ValueError(f"TransferMetadata.recv_count must be in [0, {n}], got {count}")
        ids, rows = self.recv_expert_ids, self.recv_dst_rows
        if (ids[:count] < 0).any() or (ids[count:] != -1).any() or (rows[count:] != -1).any():
            raise ValueError("TransferMetadata receive ids must be >= 0 for the first "
                             "recv_count entries and -1 after them")
        if len(np.unique(ids[:count])) != count:
            raise ValueError("TransferMetadata.recv_expert_ids must not repeat an expert")
        primary = np.zeros(n, dtype=np.bool_)
        if ((rows[:count] < 0) | (rows[:count] >= n)).any():
            raise ValueError(f"TransferMetadata.recv_dst_rows must be in [0, {n})")
        primary[rows[:count]] = True
        if int(primary.sum()) != count or not np.array_equal(primary, self.recv_primary_mask):
            raise ValueError("TransferMetadata.recv_primary_mask must mark exactly the "
                             "distinct recv_dst_rows")
        if (self.is_unchanged & ~self.is_received_locally).any():
            raise ValueError("TransferMetadata: an unchanged row must be marked received locally")
        if (self.recv_primary_mask & self.is_received_locally).any():
            raise ValueError("TransferMetadata: a row cannot be both received locally "
                             "and a remote receive")


def _wire_int(wire: dict, key: str, low: int, high: int) -> int:
    value = wire[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"TransferMetadata wire {key!r} must be an int in [{low}, {high}], "
                         f"got {value!r}")
    return value


def _wire_bytes(wire: dict, key: str, size: int) -> bytes:
    value = wire[key]
    if not isinstance(value, (bytes, bytearray)) or len(value) != size:
        raise ValueError(f"TransferMetadata wire {key!r} must be {size} bytes")
    return bytes(value)


@dataclass(frozen=True)
class PlannedTransfer:
    """One expert sent from ``src_rank`` local row ``src_row`` to ``dst_rank``, received
    into its buffer row ``dst_row`` (the first row of ``dst_rank`` that wants it)."""

    expert: int
    src_rank: int
    src_row: int
    dst_rank: int
    dst_row: int


def get_ep_ranks_with_experts_batch(
    expert_ids: np.ndarray,
    num_local_experts: int,
    old_indices: np.ndarray,
    new_indices: np.ndarray,
) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """For each expert of ``expert_ids``: the ranks holding it in ``old_indices``
    (potential senders) and the ranks holding it in ``new_indices`` but not in
    ``old_indices`` (receivers), each ascending and without repeats. Every queried
    expert is a key of both dicts (possibly with an empty list)."""
    experts = np.unique(np.asarray(expert_ids))
    stride = max(len(old_indices), len(new_indices)) // num_local_experts + 1

    def holder_keys(indices: np.ndarray) -> np.ndarray:  # sorted expert * stride + rank
        mask = np.isin(indices, experts)
        ranks = np.nonzero(mask)[0] // num_local_experts
        return np.unique(indices[mask].astype(np.int64) * stride + ranks)

    old_keys = holder_keys(old_indices)
    recv_keys = np.setdiff1d(holder_keys(new_indices), old_keys, assume_unique=True)
    send_map: dict[int, list[int]] = {e: [] for e in experts.tolist()}
    recv_map: dict[int, list[int]] = {e: [] for e in experts.tolist()}
    for keys, out in ((old_keys, send_map), (recv_keys, recv_map)):
        for expert, rank in zip((keys // stride).tolist(), (keys % stride).tolist()):
            out[expert].append(rank)
    return send_map, recv_map


def _first_rows(indices: np.ndarray, num_local_experts: int) -> dict[tuple[int, int], int]:
    """(rank, expert) -> first local row holding the expert, for non-empty slots."""
    rows: dict[tuple[int, int], int] = {}
    for slot, expert in reversed(list(enumerate(np.asarray(indices).tolist()))):
        if expert != -1:
            rows[(slot // num_local_experts, expert)] = slot % num_local_experts
    return rows


def plan_layer_transfers(
    old_indices: np.ndarray,
    new_indices: np.ndarray,
    num_local_experts: int,
    *,
    ranks_per_node: int | None = None,
) -> list[PlannedTransfer]:
    """Every remote transfer of one layer, in the order both sides post them.

    Each rank that needs an expert it does not hold receives it exactly once. The sender
    is chosen among the ranks holding the expert in the old map: one on the receiver's
    node if any (nodes are blocks of ``ranks_per_node`` consecutive ranks; ``None``: all
    one node), then the one with the fewest sends so far in this layer, then the first
    after the receiver in ring order. Order: by expert, then receiving rank. Deterministic
    and identical on every rank. Raises ValueError if a wanted expert has no holder.
    """
    wanted = np.unique(new_indices[new_indices != -1])
    send_map, recv_map = get_ep_ranks_with_experts_batch(
        wanted, num_local_experts, old_indices, new_indices
    )
    world = len(old_indices) // num_local_experts
    node_size = ranks_per_node or world
    old_rows = _first_rows(old_indices, num_local_experts)
    new_rows = _first_rows(new_indices, num_local_experts)
    load = [0] * world
    plan: list[PlannedTransfer] = []
    for expert in wanted.tolist():
        senders, receivers = send_map[expert], recv_map[expert]
        if receivers and not senders:
            raise ValueError(f"expert {expert} is in the new map but in no slot of the old "
                             "map: every expert of the new map must be held by some rank")
        for dst in receivers:
            near = [s for s in senders if s // node_size == dst // node_size]
            src = min(near or senders, key=lambda s: (load[s], (s - dst) % world))
            load[src] += 1
            plan.append(PlannedTransfer(expert, src, old_rows[(src, expert)],
                                        dst, new_rows[(dst, expert)]))
    return plan


def _local_metadata(
    old_local: np.ndarray, new_local: np.ndarray
) -> tuple[TransferMetadata, np.ndarray]:
    """Metadata of one rank's rows plus, for each row, the old local row its expert is
    copied from (``-1`` where not received locally or unchanged)."""
    n = len(new_local)
    rows = np.arange(n, dtype=np.int32)
    is_unchanged = old_local == new_local
    new_valid = new_local != -1
    is_received_locally = is_unchanged | (new_valid & np.isin(new_local, old_local[old_local != -1]))
    local_src = np.full(n, -1, dtype=np.int32)
    first_old = {int(e): r for r, e in reversed(list(enumerate(old_local.tolist()))) if e != -1}
    for row in np.nonzero(is_received_locally & ~is_unchanged)[0].tolist():
        local_src[row] = first_old[int(new_local[row])]
    need = ~is_received_locally & new_valid
    experts, first = np.unique(new_local[need], return_index=True)
    count = len(experts)
    metadata = TransferMetadata.unchanged(n)
    metadata.is_unchanged = is_unchanged
    metadata.is_received_locally = is_received_locally
    metadata.recv_count = count
    metadata.recv_expert_ids[:count] = experts
    metadata.recv_dst_rows[:count] = rows[need][first]
    metadata.recv_primary_mask[metadata.recv_dst_rows[:count]] = True
    return metadata, local_src


def _copy_rows(
    dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor],
    dst_rows: Sequence[int], src_rows: Sequence[int],
) -> None:
    """``dst[i][d] = src[i][s]`` for each pair of rows and every tensor pair ``i``, as one
    batched copy (``torch._foreach_copy_``: on CUDA a few multi-tensor kernel launches for the
    whole layer, queued on the current stream, ``non_blocking``); runs of consecutive rows are
    merged into one view first."""
    pairs = sorted(zip(dst_rows, src_rows))
    runs: list[tuple[int, int, int]] = []  # (dst start, src start, rows)
    for d, s in pairs:
        if runs and d == runs[-1][0] + runs[-1][2] and s == runs[-1][1] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((d, s, 1))
    if not runs:
        return
    targets = [t.narrow(0, d0, n) for t in dst for d0, _, n in runs]
    sources = [t.narrow(0, s0, n) for t in src for _, s0, n in runs]
    torch._foreach_copy_(targets, sources, non_blocking=True)


def _check_map(name: str, indices: np.ndarray, num_slots: int) -> None:
    if indices.ndim != 1 or indices.shape[0] != num_slots:
        raise ValueError(f"{name} must have shape ({num_slots},) = world size x local "
                         f"experts, got {tuple(indices.shape)}")
    if not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"{name} must hold integer expert ids, got {indices.dtype}")
    if num_slots and indices.min() < -1:
        raise ValueError(f"{name} holds id {int(indices.min())}: ids must be >= 0, or -1 "
                         "for an empty slot")


def _check_tensors(
    name: str, tensors: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]
) -> None:
    """Same count, shapes, dtypes and devices as ``reference``; contiguous."""
    if len(tensors) != len(reference):
        raise ValueError(f"{name} has {len(tensors)} tensors, expected {len(reference)} "
                         "(one per weight of a layer)")
    for i, (t, ref) in enumerate(zip(tensors, reference)):
        if (t.shape, t.dtype, t.device) != (ref.shape, ref.dtype, ref.device):
            raise ValueError(
                f"{name}[{i}] is {tuple(t.shape)} {t.dtype} on {t.device}, expected "
                f"{tuple(ref.shape)} {ref.dtype} on {ref.device} like the first layer's weights")
        if not t.is_contiguous():
            raise ValueError(f"{name}[{i}] must be contiguous")


def _first_weights(expert_weights: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    weights = list(expert_weights)
    if not weights or weights[0].dim() == 0:
        raise ValueError("a layer needs at least one weight tensor with a first dimension "
                         "of local expert slots")
    num_local = weights[0].shape[0]
    if num_local < 1 or any(w.dim() == 0 or w.shape[0] != num_local for w in weights):
        raise ValueError("every weight tensor of a layer must have the same first dimension "
                         f"(local expert slots, here {num_local} >= 1)")
    return weights


def _check_layer(
    num_local_experts: int, old_indices: np.ndarray, new_indices: np.ndarray,
    weights: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor] | None, world: int,
) -> None:
    if weights[0].shape[0] != num_local_experts:
        raise ValueError(f"weights have {weights[0].shape[0]} local slots but "
                         f"num_local_experts is {num_local_experts}")
    _check_tensors("expert_weights", weights, weights)
    if buffers is not None:
        _check_tensors("expert_weights_buffers", buffers, weights)
    for name, indices in (("old_indices", old_indices), ("new_indices", new_indices)):
        _check_map(name, indices, world * num_local_experts)
    missing = np.setdiff1d(new_indices[new_indices != -1], old_indices)
    if missing.size:
        raise ValueError(f"experts {missing.tolist()[:8]} are in the new map but in no slot of "
                         "the old map: every expert of the new map must be held by some rank")


def move_to_buffer(
    num_local_experts: int,
    old_indices: np.ndarray,
    new_indices: np.ndarray,
    expert_weights: Iterable[torch.Tensor],
    expert_weights_buffers: Sequence[torch.Tensor],
    cuda_stream: torch.cuda.Stream | None,
    ep_group: dist.ProcessGroup,
    *,
    communicator: EplbCommunicator | None = None,
    layer: int = 0,
    max_ops_per_batch: int = DEFAULT_MAX_OPS_PER_BATCH,
    ranks_per_node: int | None = None,
) -> TransferMetadata:
    """Stage this rank's new rows of one layer in ``expert_weights_buffers``.

    ``old_indices``/``new_indices``: ``(world * num_local_experts,)`` maps of the layer.
    Rows whose expert is already on the rank are copied into the buffer at their row;
    each remote expert is received once into its first wanting row (duplicates are
    filled by :func:`move_from_buffer`). Unchanged rows are not written. A layer whose
    map is unchanged issues no operation and writes nothing. Returns when the received
    data is in the buffers (CPU) or ordered before later work on ``cuda_stream`` (CUDA).
    The caller orders ``cuda_stream`` after earlier writes to weights and buffers.

    ``communicator`` defaults to :func:`default_communicator` with ``max_ops_per_batch``
    (ignored when a communicator is given); ``layer`` is passed to receives as
    :class:`RowRef` ``layer``; ``ranks_per_node`` steers sender choice (see
    :func:`plan_layer_transfers`). Raises ValueError before touching anything if shapes,
    maps or buffers are inconsistent.
    """
    weights = _first_weights(expert_weights)
    buffers = list(expert_weights_buffers)
    old_indices, new_indices = np.asarray(old_indices), np.asarray(new_indices)
    world, rank = ep_group.size(), ep_group.rank()
    _check_layer(num_local_experts, old_indices, new_indices, weights, buffers, world)
    if np.array_equal(old_indices, new_indices):
        return TransferMetadata.unchanged(num_local_experts)
    plan = plan_layer_transfers(old_indices, new_indices, num_local_experts,
                                ranks_per_node=ranks_per_node)
    base = rank * num_local_experts
    metadata, local_src = _local_metadata(old_indices[base : base + num_local_experts],
                                          new_indices[base : base + num_local_experts])
    mine = [t for t in plan if rank in (t.src_rank, t.dst_rank)]
    copy_rows = np.nonzero(local_src >= 0)[0].tolist()
    if copy_rows:
        with stream_context(cuda_stream):
            _copy_rows(buffers, weights, copy_rows, local_src[copy_rows].tolist())
    if mine:
        if communicator is None:
            communicator = default_communicator(ep_group, weights[0].device, stream=cuda_stream,
                                                max_ops_per_batch=max_ops_per_batch)
        elif cuda_stream is not None:
            communicator.set_stream(cuda_stream)
        for t in mine:
            for i, (w, b) in enumerate(zip(weights, buffers)):
                if t.src_rank == rank:
                    communicator.add_send(w[t.src_row], t.dst_rank)
                else:
                    communicator.add_recv(b[t.dst_row], t.src_rank,
                                          source=RowRef(layer, i, t.src_row))
        communicator.execute()
    return metadata



def move_from_buffer(
    expert_weights: Iterable[torch.Tensor],
    expert_weights_buffers: Sequence[torch.Tensor],
    metadata: TransferMetadata,
    new_indices: np.ndarray,
    ep_rank: int,
) -> None:
    """Copy the staged rows of one layer from the buffers into the live weights.

    Reads only ``expert_weights_buffers`` (never another weight row) and does no
    communication: changed rows received locally or as a primary receive come from the
    same buffer row; duplicates of a received expert come from its primary buffer row.
    Unchanged rows and rows whose new slot is empty are not written. Copies are queued
    on the current stream (``non_blocking``). ``new_indices``: the layer's
    ``(world * num_local_experts,)`` new map. Raises ValueError, before writing, if the
    metadata does not fit the tensors or ``new_indices``.
    """
    weights = _first_weights(expert_weights)
    buffers = list(expert_weights_buffers)
    metadata.validate()
    n = metadata.num_local_experts
    new_indices = np.asarray(new_indices)
    if new_indices.ndim != 1 or len(new_indices) % n or not 0 <= ep_rank < len(new_indices) // n:
        raise ValueError(f"new_indices of shape {tuple(new_indices.shape)} and ep_rank {ep_rank} "
                         f"do not fit metadata of {n} local experts")
    _check_layer(n, new_indices, new_indices, weights, buffers, len(new_indices) // n)
    new_local = new_indices[ep_rank * n : (ep_rank + 1) * n]
    changed = ~metadata.is_unchanged & (new_local != -1)
    direct = changed & (metadata.is_received_locally | metadata.recv_primary_mask)
    count = metadata.recv_count
    primary_row = dict(zip(metadata.recv_expert_ids[:count].tolist(),
                           metadata.recv_dst_rows[:count].tolist()))
    if any(primary_row.get(int(new_local[r])) != r for r in np.nonzero(metadata.recv_primary_mask)[0]):
        raise ValueError("metadata receive rows do not match new_indices: pass the new map "
                         "the metadata was made from")
    dst_rows = np.nonzero(direct)[0].tolist()
    src_rows = list(dst_rows)
    for row in np.nonzero(changed & ~direct)[0].tolist():
        src = primary_row.get(int(new_local[row]))
        if src is None:
            raise ValueError(f"row {row} wants expert {int(new_local[row])}, which the metadata "
                             "neither received nor found locally: pass matching metadata")
        dst_rows.append(row)
        src_rows.append(src)
    _copy_rows(weights, buffers, dst_rows, src_rows)


def _check_rank_mapping(rank_mapping: dict[int, int], new_ep_size: int) -> None:
    if not isinstance(rank_mapping, dict) or sorted(rank_mapping) != list(range(len(rank_mapping))):
        raise ValueError("rank_mapping must map every old rank 0..n-1 to a new rank or -1")
    kept = [r for r in rank_mapping.values() if r != -1]
    if any(not 0 <= r < new_ep_size for r in kept) or len(set(kept)) != len(kept):
        raise ValueError(f"rank_mapping values must be distinct new ranks in [0, {new_ep_size}) "
                         f"or -1, got {rank_mapping}")


def _relayout(indices: torch.Tensor, rank_mapping: dict[int, int], local: int,
              num_ranks: int, *, old_to_new: bool) -> torch.Tensor:
    """Copy each mapped rank's block of ``local`` slots to its counterpart's position in a
    ``(layers, num_ranks * local)`` map of ``-1``."""
    mapped = indices.new_full((indices.shape[0], num_ranks * local), -1)
    for old_rank, new_rank in rank_mapping.items():
        if new_rank != -1:
            src, dst = (old_rank, new_rank) if old_to_new else (new_rank, old_rank)
            mapped[:, dst * local : (dst + 1) * local] = indices[:, src * local : (src + 1) * local]
    return mapped


def _map_old_expert_indices_with_rank_mapping(
    old_global_expert_indices: torch.Tensor, rank_mapping: dict[int, int], new_ep_size: int,
) -> torch.Tensor:
    """Scale-up: lay the old map ``(layers, old_ep_size * L)`` out on the new ranks,
    ``(layers, new_ep_size * L)``; slots of ranks no old rank maps to are ``-1``."""
    old_ep_size = len(rank_mapping)
    _check_rank_mapping(rank_mapping, new_ep_size)
    old_slots = old_global_expert_indices.shape[1]
    if old_slots % old_ep_size:
        raise ValueError(f"old map has {old_slots} slots, not divisible by the {old_ep_size} "
                         "old ranks of rank_mapping")
    return _relayout(old_global_expert_indices, rank_mapping, old_slots // old_ep_size,
                     new_ep_size, old_to_new=True)


def _map_new_expert_indices_with_rank_mapping(
    new_global_expert_indices: torch.Tensor, rank_mapping: dict[int, int],
) -> torch.Tensor:
    """Scale-down: lay the new map ``(layers, new_ep_size * L)`` out on the old ranks,
    ``(layers, old_ep_size * L)``; slots of removed ranks (mapped to -1) are ``-1``."""
    new_ep_size = sum(r != -1 for r in rank_mapping.values())
    _check_rank_mapping(rank_mapping, new_ep_size)
    new_slots = new_global_expert_indices.shape[1]
    if new_ep_size == 0 or new_slots % new_ep_size:
        raise ValueError(f"new map has {new_slots} slots, not divisible by the {new_ep_size} "
                         "ranks kept by rank_mapping")
    return _relayout(new_global_expert_indices, rank_mapping, new_slots // new_ep_size,
                     len(rank_mapping), old_to_new=False)


def _global_maps(
    old: torch.Tensor | np.ndarray, new: torch.Tensor | np.ndarray,
    world: int, rank_mapping: dict[int, int] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Both maps as ``(layers, world * L)`` int64 arrays, rank mapping applied as vLLM
    does: a mapping with one entry per group rank is a scale-down (the group is the old
    one), any other a scale-up (the group is the new one)."""
    old_t, new_t = torch.as_tensor(old), torch.as_tensor(new)
    for name, t in (("old_global_expert_indices", old_t), ("new_global_expert_indices", new_t)):
        if t.dim() != 2 or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name} must be a 2-D integer (layers, slots) map, got "
                             f"{tuple(t.shape)} {t.dtype}")
    if rank_mapping is not None:
        if len(rank_mapping) == world:
            new_t = _map_new_expert_indices_with_rank_mapping(new_t, rank_mapping)
        else:
            old_t = _map_old_expert_indices_with_rank_mapping(old_t, rank_mapping, world)
    old_np = old_t.cpu().numpy().astype(np.int64)
    new_np = new_t.cpu().numpy().astype(np.int64)
    if old_np.shape != new_np.shape:
        raise ValueError(f"old map {old_np.shape} and new map {new_np.shape} must have the same "
                         "(layers, slots) shape after rank mapping")
    if old_np.shape[1] % world:
        raise ValueError(f"{old_np.shape[1]} slots are not divisible by the world size {world}")
    return old_np, new_np


def _layer_args(
    old: torch.Tensor | np.ndarray, new: torch.Tensor | np.ndarray,
    expert_weights: Sequence[Iterable[torch.Tensor]], world: int,
    rank_mapping: dict[int, int] | None,
) -> tuple[np.ndarray, np.ndarray, list[list[torch.Tensor]]]:
    """Validated ``(old_map, new_map, weights per layer)``; ValueError if anything differs
    in shape, dtype or device between layers, or does not fit the maps."""
    old_np, new_np = _global_maps(old, new, world, rank_mapping)
    layers = [_first_weights(w) for w in expert_weights]
    if len(layers) != old_np.shape[0]:
        raise ValueError(f"expert_weights has {len(layers)} layers but the maps have "
                         f"{old_np.shape[0]}")
    num_local = layers[0][0].shape[0]
    for i, weights in enumerate(layers):
        _check_tensors(f"expert_weights[{i}]", weights, layers[0])
        _check_layer(num_local, old_np[i], new_np[i], weights, None, world)
    return old_np, new_np, layers


async def transfer_layer(
    old_global_expert_indices: torch.Tensor,
    new_global_expert_indices: torch.Tensor,
    expert_weights: Sequence[Iterable[torch.Tensor]],
    expert_weights_buffer: Sequence[torch.Tensor],
    ep_group: dist.ProcessGroup,
    is_profile: bool = False,
    layer: int = 0,
    cuda_stream: torch.cuda.Stream | None = None,
    rank_mapping: dict[int, int] | None = None,
    *,
    communicator: EplbCommunicator | None = None,
    max_ops_per_batch: int = DEFAULT_MAX_OPS_PER_BATCH,
    ranks_per_node: int | None = None,
) -> TransferMetadata:
    """:func:`move_to_buffer` for layer ``layer`` of the ``(layers, slots)`` maps and the
    per-layer ``expert_weights``, rank mapping applied (see
    :func:`rearrange_expert_weights_inplace`). With ``is_profile`` nothing moves and the
    metadata says every row is unchanged. Runs synchronously inside the coroutine, as
    vLLM's does."""
    old_np, new_np = _global_maps(old_global_expert_indices, new_global_expert_indices,
                                  ep_group.size(), rank_mapping)
    if not 0 <= layer < old_np.shape[0] or len(expert_weights) != old_np.shape[0]:
        raise ValueError(f"layer {layer} is not one of the {old_np.shape[0]} layers of the maps "
                         f"(expert_weights has {len(expert_weights)})")
    weights = _first_weights(expert_weights[layer])
    num_local = weights[0].shape[0]
    if is_profile:
        _check_layer(num_local, old_np[layer], new_np[layer], weights,
                     list(expert_weights_buffer), ep_group.size())
        return TransferMetadata.unchanged(num_local)
    return move_to_buffer(num_local, old_np[layer], new_np[layer], weights, expert_weights_buffer,
                          cuda_stream, ep_group, communicator=communicator, layer=layer,
                          max_ops_per_batch=max_ops_per_batch, ranks_per_node=ranks_per_node)


_SIGNATURE_LEN = 5


def _agree(ep_group: dist.ProcessGroup, device: torch.device, signature: list[int],
           error: ValueError | None) -> None:
    """All-gather each rank's argument signature; raise ValueError on every rank if one
    rank rejected its arguments or the ranks disagree (collective over ``ep_group``)."""
    row = [0] * _SIGNATURE_LEN if error is not None else [1, *signature]
    mine = torch.tensor(row, dtype=torch.int64, device=device)
    rows = [torch.empty_like(mine) for _ in range(ep_group.size())]
    dist.all_gather(rows, mine, group=ep_group)
    table = torch.stack(rows).cpu().tolist()
    bad = [r for r, entry in enumerate(table) if entry[0] == 0]
    if error is not None:
        raise error
    if bad:
        raise ValueError(f"ranks {bad} rejected the rearrangement arguments (see their errors); "
                         "nothing was moved")
    differ = [r for r, entry in enumerate(table) if entry != table[0]]
    if differ:
        raise ValueError(f"ranks {differ} disagree with rank 0 on local slots, weight shapes or "
                         "maps: every rank must pass the same maps and same-shaped weights")


def rearrange_expert_weights_inplace(
    old_global_expert_indices: torch.Tensor,
    new_global_expert_indices: torch.Tensor,
    expert_weights: Sequence[Iterable[torch.Tensor]],
    ep_group: dist.ProcessGroup,
    is_profile: bool = False,
    rank_mapping: dict[int, int] | None = None,
    communicator: EplbCommunicator | None = None,
    *,
    max_ops_per_batch: int = DEFAULT_MAX_OPS_PER_BATCH,
    ranks_per_node: int | None = None,
) -> None:
    """Move every layer's expert rows in place from the old to the new map.

    Maps are ``(layers, slots)`` of logical ids (``-1`` empty); ``expert_weights[layer]``
    is the rank's list of ``(num_local_experts, ...)`` tensors, same shapes in every
    layer. ``rank_mapping`` (old rank -> new rank or -1) follows vLLM: with one entry per
    group rank it is a scale-down (``new`` has the kept ranks' slots, removed ranks only
    send), otherwise a scale-up (``old`` has the old ranks' slots, new ranks only
    receive). Rows whose new slot is empty keep their contents.

    Collective over ``ep_group``: every rank first all-gathers a signature of its
    arguments, so a rank with bad arguments makes *every* rank raise ValueError before
    any weight is touched. ``is_profile``: allocate the staging buffers, move nothing.
    One layer-sized staging buffer per weight is allocated for the call.
    """
    world = ep_group.size()
    error: ValueError | None = None
    signature: list[int] = []
    device = torch.device("cpu")
    try:
        old_np, new_np, layers = _layer_args(old_global_expert_indices, new_global_expert_indices,
                                             expert_weights, world, rank_mapping)
        device = layers[0][0].device
        shapes = repr([(tuple(w.shape), str(w.dtype)) for w in layers[0]]).encode()
        signature = [layers[0][0].shape[0], zlib.crc32(shapes), zlib.crc32(old_np.tobytes()),
                     zlib.crc32(new_np.tobytes())]
    except ValueError as exc:
        error = exc
    backend = str(dist.get_backend(ep_group)).lower()
    if "gloo" in backend:
        agree_device = torch.device("cpu")
    else:
        agree_device = torch.device("cuda", torch.cuda.current_device())
    _agree(ep_group, agree_device, signature, error)
    buffers = [torch.empty_like(w) for w in layers[0]]
    if is_profile:  # the buffers' allocation is what a profiling run must see
        return
    if communicator is None:
        communicator = default_communicator(ep_group, device, max_ops_per_batch=max_ops_per_batch)
    rank = ep_group.rank()
    num_local = layers[0][0].shape[0]
    for layer, weights in enumerate(layers):
        if np.array_equal(old_np[layer], new_np[layer]):
            continue
        metadata = move_to_buffer(num_local, old_np[layer], new_np[layer], weights, buffers, None,
                                  ep_group, communicator=communicator, layer=layer,
                                  ranks_per_node=ranks_per_node)
        move_from_buffer(weights, buffers, metadata, new_np[layer], rank)
