"""Transfer planning: who sends which expert row to whom, as a pure function of two maps.

Conventions:

- A *map* (``old_indices``/``new_indices``) is indexed by physical slot and holds a
  logical expert id, ``-1`` for an empty slot. Slot ``p`` lives on group rank
  ``p // num_local_experts`` at local row ``p % num_local_experts``.
- ``expert_weights`` of a layer is a list of tensors whose first dimension is the rank's
  local slots (any trailing shape and dtype); staging buffers have the same shapes.

Who sends what to whom is a pure function of the two maps (:func:`plan_layer_transfers`),
computed identically on every rank, so no extra exchange is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "TransferMetadata",
    "PlannedTransfer",
    "get_ep_ranks_with_experts_batch",
    "layer_metadata",
    "plan_layer_transfers",
]

_MASKS = ("is_unchanged", "is_received_locally", "recv_primary_mask")


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

    def validate(self) -> None:
        """Raise ValueError unless the fields are consistent (shapes, dtypes, padding,
        receive rows in range, unique and matching ``recv_primary_mask``)."""
        n = self.num_local_experts
        for key, dtype in (*((k, np.bool_) for k in _MASKS),
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


def layer_metadata(old_indices: np.ndarray, new_indices: np.ndarray, num_local_experts: int,
                   rank: int) -> TransferMetadata:
    """What :func:`~mp_eplb.transfer.execute.move_to_buffer` stages on ``rank`` for one layer
    going from map ``old_indices`` to ``new_indices``: a pure function of the two maps (the
    engine computes it for its commit instead of receiving it)."""
    rows = slice(rank * num_local_experts, (rank + 1) * num_local_experts)
    return local_metadata(np.asarray(old_indices)[rows], np.asarray(new_indices)[rows])[0]


def local_metadata(
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
