"""EPLB placement policy: DeepSeek's hierarchical balanced packing, optionally placement-aware.

``rebalance_experts`` follows DeepSeek's EPLB contract (same arguments, same outputs,
same placement for the same load) and adds ``old_phy2log``: given the placement that is
live now, it keeps the new placement's packs (so the per-rank load is exactly that of the
placement-agnostic result) but chooses which node and rank each pack lands on, and which
slot each expert takes within its rank, so that as few slots as possible change expert.

Terms: a *slot* (physical expert) is one expert-sized region of a rank's weights; slot
``s`` lives on rank ``s // (num_replicas // num_ranks)``, rank ``r`` on node
``r // (num_ranks // num_nodes)``. A *pack* is the multiset of experts the balanced
packing puts on one rank (or the set of groups it puts on one node).

All work is on CPU in numpy (float64 loads, int64 ids); the outputs are new CPU int64
torch tensors owned by the caller.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mp_eplb.maps import maps_from_phy2log, occurrence

__all__ = ["PlacementLayout", "balancedness", "rebalance_experts"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlacementLayout:
    """Validated dimensions of one placement problem.

    ``num_groups``/``num_nodes`` are the *effective* ones: DeepSeek's global policy (used
    when the groups do not divide evenly over the nodes) is the hierarchical one with a
    single group on a single node.
    """

    num_layers: int
    num_experts: int
    num_replicas: int
    num_groups: int
    num_nodes: int
    num_ranks: int

    @property
    def slots_per_rank(self) -> int:
        return self.num_replicas // self.num_ranks

    @property
    def ranks_per_node(self) -> int:
        return self.num_ranks // self.num_nodes

    @property
    def max_count_bound(self) -> int:
        """Most replicas one expert can get: all of its node's redundant slots, plus one."""
        return (self.num_replicas - self.num_experts) // self.num_nodes + 1


# ----------------------------------------------------------------------------- validation

def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _as_numpy(name: str, value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a torch tensor or numpy array, got {type(value).__name__}") from exc


def _weights(weight: Any) -> np.ndarray:
    """``weight`` as float64 [layers, experts], checked finite and non-negative."""
    w = _as_numpy("weight", weight)
    if w.dtype == np.bool_ or w.dtype.kind not in "iuf":
        raise ValueError(f"weight must hold real numbers (tokens per expert), got dtype {w.dtype}")
    if w.ndim != 2 or 0 in w.shape:
        raise ValueError(f"weight must be 2-D [layers, logical experts] with no empty dimension, "
                         f"got shape {tuple(w.shape)}; pass one row of per-expert token counts per layer")
    w = w.astype(np.float64)
    bad = ~np.isfinite(w) | (w < 0)
    if bad.any():
        layer, expert = np.argwhere(bad)[0]
        raise ValueError(f"weight must be finite and non-negative, got {w[layer, expert]} at layer {layer}, "
                         f"expert {expert} ({int(bad.sum())} bad entries); clamp or zero the load counts first")
    return w


def _placement(name: str, value: Any, num_layers: int, num_replicas: int | None,
               num_experts: int) -> np.ndarray:
    """``value`` as int64 [layers, replicas] of logical expert ids in [0, num_experts).

    ``num_replicas`` None accepts any non-zero slot count.
    """
    p = _as_numpy(name, value)
    if p.dtype == np.bool_ or p.dtype.kind not in "iu":
        raise ValueError(f"{name} must have an integer dtype (logical expert ids), got {p.dtype}")
    slots_ok = p.ndim == 2 and p.shape[1] > 0 and num_replicas in (None, p.shape[1])
    if not slots_ok or p.shape[0] != num_layers:
        want = f"[{num_layers} layers, {num_replicas if num_replicas is not None else 'slots'}]"
        raise ValueError(f"{name} must have shape {want}, got {tuple(p.shape)}; pass a phy2log of the same "
                         f"model and replica count")
    p = p.astype(np.int64)
    bad = (p < 0) | (p >= num_experts)
    if bad.any():
        layer, slot = np.argwhere(bad)[0]
        raise ValueError(f"{name} ids must lie in [0, {num_experts}), got {p[layer, slot]} at layer {layer}, "
                         f"slot {slot}; pass logical expert ids of this model")
    return p


def _layout(num_layers: int, num_experts: int, num_replicas: Any, num_groups: Any, num_nodes: Any,
            num_ranks: Any) -> PlacementLayout:
    num_replicas = _positive_int("num_replicas", num_replicas)
    num_groups = _positive_int("num_groups", num_groups)
    num_nodes = _positive_int("num_nodes", num_nodes)
    num_ranks = _positive_int("num_ranks", num_ranks)
    if num_replicas < num_experts:
        raise ValueError(f"num_replicas ({num_replicas}) must be at least the number of logical experts "
                         f"({num_experts}): every expert needs a slot")
    if num_replicas % num_ranks:
        raise ValueError(f"num_replicas ({num_replicas}) must be a multiple of num_ranks ({num_ranks}) so every "
                         f"rank holds the same number of slots; add or drop redundant experts")
    if num_groups % num_nodes:
        logger.debug("num_groups %d not divisible by num_nodes %d: global policy", num_groups, num_nodes)
        return PlacementLayout(num_layers, num_experts, num_replicas, 1, 1, num_ranks)
    if num_experts % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the number of logical experts ({num_experts}) "
                         f"for the hierarchical policy; pass the model's expert-group count")
    if num_ranks % num_nodes:
        raise ValueError(f"num_ranks ({num_ranks}) must be a multiple of num_nodes ({num_nodes}) for the "
                         f"hierarchical policy; pass the ranks of whole nodes")
    return PlacementLayout(num_layers, num_experts, num_replicas, num_groups, num_nodes, num_ranks)


# ----------------------------------------------------------------------------- small kernels

def _balanced_packing(w: np.ndarray, num_packs: int) -> np.ndarray:
    """Pack each row's items into ``num_packs`` packs of equal item count, balancing the weight.

    Items go heaviest first (ties: lower index first) into the lightest pack that still
    has room (ties: lower pack). ``w`` is [rows, items]; returns each item's position
    ``pack * items_per_pack + arrival order within the pack``, int64 [rows, items].
    """
    rows, items = w.shape
    per_pack = items // num_packs
    if per_pack == 1:
        return np.broadcast_to(np.arange(items, dtype=np.int64), w.shape).copy()
    r = np.arange(rows)
    order = np.argsort(-w, axis=1, kind="stable")
    pack_load = np.zeros((rows, num_packs))
    pack_fill = np.zeros((rows, num_packs), dtype=np.int64)
    position = np.empty((rows, items), dtype=np.int64)
    for t in range(items):
        item = order[:, t]
        pack = np.where(pack_fill < per_pack, pack_load, np.inf).argmin(1)
        position[r, item] = pack * per_pack + pack_fill[r, pack]
        pack_load[r, pack] += w[r, item]
        pack_fill[r, pack] += 1
    return position


def _replicate(w: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray]:
    """Give each row's experts ``num_phy`` slots: one each, then one more at a time to the
    expert with the largest load per replica (ties: lower index).

    ``w`` is [rows, experts]; returns (phy2log [rows, num_phy], count [rows, experts]), int64.
    """
    rows, experts = w.shape
    r = np.arange(rows)
    phy = np.empty((rows, num_phy), dtype=np.int64)
    phy[:, :experts] = np.arange(experts)
    count = np.ones((rows, experts), dtype=np.int64)
    per_replica = w.copy()
    for s in range(experts, num_phy):
        hot = per_replica.argmax(1)
        phy[:, s] = hot
        count[r, hot] += 1
        per_replica[r, hot] = w[r, hot] / count[r, hot]
    return phy, count


def _inverse(perm: np.ndarray) -> np.ndarray:
    """Row-wise inverse of a batch of permutations [rows, n]."""
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), 1)
    return inv


def _max_assignment(value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-weight perfect matching for a batch of square matrices.

    ``value`` [batch, n, n], non-negative integers (keeps the arithmetic exact). Returns
    (col [batch, n] int64: the column matched to each row, total [batch]: the matched sum).
    """
    batch, n, _ = value.shape
    match = _row_maxima_matching(value)
    hard = np.nonzero(match[:, 0] < 0)[0]
    if hard.size:
        match[hard] = _hungarian(value[hard])
    total = np.take_along_axis(value, match[:, :, None], 2)[:, :, 0].sum(1)
    return match, total


def _row_maxima_matching(value: np.ndarray) -> np.ndarray:
    """The matching that gives every row its maximum, where one exists without conflict.

    Rows whose maximum is positive must have distinct best columns; rows of zeros take the
    columns left over. Such a matching reaches the upper bound (sum of row maxima), so it
    is optimal. ``value`` [batch, n, n] >= 0; returns int64 [batch, n], rows of -1 where
    this shortcut does not apply.
    """
    batch, n, _ = value.shape
    best = value.argmax(2)
    positive = np.take_along_axis(value, best[:, :, None], 2)[:, :, 0] > 0
    claimed = np.sort(np.where(positive, best, n + np.arange(n)), axis=1)
    easy = (claimed[:, 1:] != claimed[:, :-1]).all(1)
    match = np.full((batch, n), -1, dtype=np.int64)
    match[easy] = _complete_matching(positive[easy], best[easy])
    return match


def _hungarian(value: np.ndarray) -> np.ndarray:
    """Maximum-weight perfect matching (Hungarian method) for a batch [batch, n, n].

    The shortest-augmenting-path form with potentials, O(n^3) per matrix, started from
    row reduction and a greedy matching on its tight edges, run in lockstep over the
    batch: each numpy step advances every matrix still searching. ``value`` >= 0;
    returns the column matched to each row, int64 [batch, n].
    """
    batch, n, _ = value.shape
    b = np.arange(batch)
    cost = np.zeros((batch, n + 1, n + 1))  # row/column 0 are the algorithm's sentinel
    cost[:, 1:, 1:] = -value
    u = np.zeros((batch, n + 1))
    v = np.zeros((batch, n + 1))
    u[:, 1:] = cost[:, 1:, 1:].min(2)  # feasible duals: u_i + v_j <= cost_ij, tight at row minima
    tight = cost[:, 1:, 1:] == u[:, 1:, None]
    # rows of zeros are left out (they take the columns left over, at no loss); the others
    # start from a maximal matching on tight edges, rows with fewest tight columns first
    active = u[:, 1:] < 0
    order = np.argsort(np.where(active, tight.sum(2), n + 1), axis=1, kind="stable")
    row_of = np.zeros((batch, n + 1), dtype=np.int64)  # row matched to each column, 0 = none
    greedy = ~active
    for i in order.T:
        free_tight = tight[b, i] & (row_of[:, 1:] == 0) & active[b, i, None]
        pick = free_tight.argmax(1) + 1
        found = free_tight[b, pick - 1]
        greedy[b, i] |= found
        row_of[b, pick] = np.where(found, i + 1, row_of[b, pick])
    pending = np.argsort(greedy, axis=1, kind="stable") + 1  # unmatched rows first
    num_pending = n - greedy.sum(1)
    u_of_col = np.take_along_axis(u, row_of, 1)  # potential of the row in each column (dense updates)
    way = np.zeros((batch, n + 1), dtype=np.int64)
    for t in range(int(num_pending.max())):
        searching = num_pending > t
        row_of[:, 0] = pending[:, t]
        u_of_col[:, 0] = u[b, pending[:, t]]
        col = np.zeros(batch, dtype=np.int64)
        min_slack = np.full((batch, n + 1), np.inf)
        used = np.zeros((batch, n + 1), dtype=bool)
        augmenting = searching.copy()
        for _ in range(n + 1):  # each step reaches a new column; one of them is free
            used[b, col] |= searching
            slack = cost[b, row_of[b, col]] - u_of_col[b, col][:, None] - v
            better = searching[:, None] & ~used & (slack < min_slack)
            min_slack = np.where(better, slack, min_slack)
            way = np.where(better, col[:, None], way)
            free_slack = np.where(used, np.inf, min_slack)
            nxt = free_slack.argmin(1)
            delta = np.where(searching, free_slack[b, nxt], 0.0)
            shift = np.where(used, delta[:, None], 0.0)
            u_of_col += shift
            v -= shift
            min_slack -= np.where(used, 0.0, delta[:, None])
            col = np.where(searching, nxt, col)
            searching &= row_of[b, col] != 0
            if not searching.any():
                break
        for _ in range(n + 1):  # walk the alternating path back to the sentinel column
            prev = way[b, col]
            row_of[b, col] = np.where(augmenting, row_of[b, prev], row_of[b, col])
            u_of_col[b, col] = np.where(augmenting, u_of_col[b, prev], u_of_col[b, col])
            col = np.where(augmenting, prev, col)
            augmenting &= col != 0
            if not augmenting.any():
                break
    which, col = np.nonzero(row_of[:, 1:])
    row = row_of[which, col + 1] - 1
    has_col = np.zeros((batch, n), dtype=bool)
    has_col[which, row] = True
    col_of = np.zeros((batch, n), dtype=np.int64)
    col_of[which, row] = col
    return _complete_matching(has_col, col_of)  # rows of zeros take the columns left over


# ----------------------------------------------------------------------------- the policy

def _place(w: np.ndarray, lay: PlacementLayout) -> np.ndarray:
    """DeepSeek's hierarchical placement: phy2log int64 [layers, replicas]."""
    layers, experts = w.shape
    nodes = lay.num_nodes
    group_size = experts // lay.num_groups
    experts_per_node = experts // nodes
    # 1. pack expert groups onto nodes; relabel experts node-major ("mlog" order)
    group_pos = _balanced_packing(w.reshape(layers, lay.num_groups, group_size).sum(-1), nodes)
    log2mlog = (group_pos[:, :, None] * group_size + np.arange(group_size)).reshape(layers, experts)
    mlog2log = _inverse(log2mlog)
    # 2. replicate experts within each node
    node_w = np.take_along_axis(w, mlog2log, 1).reshape(layers * nodes, experts_per_node)
    phy2mlog, count = _replicate(node_w, lay.num_replicas // nodes)
    # 3. pack each node's replicas onto its ranks
    replica_w = np.take_along_axis(node_w / count, phy2mlog, 1)
    slot_of_replica = _balanced_packing(replica_w, lay.ranks_per_node)
    slot2mlog = np.empty_like(phy2mlog)
    np.put_along_axis(slot2mlog, slot_of_replica, phy2mlog, 1)
    slot2mlog = slot2mlog.reshape(layers, nodes, -1) + (np.arange(nodes) * experts_per_node)[:, None]
    return np.take_along_axis(mlog2log, slot2mlog.reshape(layers, -1), 1)


def _copy_keys(x: np.ndarray, scope: np.ndarray, num_experts: int) -> np.ndarray:
    """Key naming "the t-th copy (in row order) of expert e in scope" for each entry of ``x``.

    ``x`` int64 [..., k] expert ids; ``scope`` int64 broadcastable to ``x``: which layer
    (or rank) the entry belongs to. Keys are unique within a row and ordered by scope.
    """
    k = x.shape[-1]
    return ((scope * num_experts + x) * k + occurrence(x)).ravel()


def _rank_overlap(packs: np.ndarray, old: np.ndarray, num_experts: int) -> np.ndarray:
    """Slots that can keep their expert if pack q goes to rank r (their multiset intersection).

    ``packs``, ``old``: int64 [layers, ranks, k]. Returns int64 [layers, q, r]. The t-th
    copy of e in pack q can stay on rank r iff r held a t-th copy of e: a join on keys.
    """
    layers, ranks, k = old.shape
    layer = np.arange(layers)[:, None, None]
    key_new = _copy_keys(packs, layer, num_experts)
    key_old = _copy_keys(old, layer, num_experts)
    by_key = np.argsort(key_old, kind="stable")
    sorted_old = key_old[by_key]
    lo = np.searchsorted(sorted_old, key_new, "left")
    hits = np.searchsorted(sorted_old, key_new, "right") - lo
    new_slot = np.repeat(np.arange(key_new.size), hits)
    offset = np.arange(new_slot.size) - np.repeat(np.cumsum(hits) - hits, hits)
    old_slot = by_key[np.repeat(lo, hits) + offset]
    pair = (new_slot // k) * ranks + (old_slot // k) % ranks  # (layer, q) * ranks + r
    return np.bincount(pair, minlength=layers * ranks * ranks).reshape(layers, ranks, ranks)


def _complete_matching(has_target: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Positions for each row's items: items with a target take it (targets distinct within a
    row), the others take the remaining positions in ascending order, in item order.

    ``has_target`` bool, ``target`` int64, both [rows, k]; returns int64 [rows, k].
    """
    rows, k = target.shape
    idx = np.arange(k)
    taken = np.zeros((rows, k), dtype=bool)
    taken[np.nonzero(has_target)[0], target[has_target]] = True
    # free items first (in order), then targeted ones sorted by target; positions likewise
    item_order = np.argsort(np.where(has_target, k + target, idx), axis=1)
    position_order = np.argsort(np.where(taken, k + idx, idx), axis=1)
    position = np.empty((rows, k), dtype=np.int64)
    np.put_along_axis(position, item_order, position_order, 1)
    return position


def _rank_of_pack(packs: np.ndarray, old: np.ndarray, lay: PlacementLayout) -> np.ndarray:
    """Rank for each pack maximising the slots kept; nodes first choose whole node packs.

    Returns int64 [layers, ranks] (a permutation per layer).
    """
    layers, nodes, per_node = lay.num_layers, lay.num_nodes, lay.ranks_per_node
    overlap = _rank_overlap(packs, old, lay.num_experts)
    if nodes == 1:
        return _max_assignment(overlap)[0]
    # value of node pack p on node n = best rank assignment of p's packs to n's ranks
    blocks = overlap.reshape(layers, nodes, per_node, nodes, per_node).transpose(0, 1, 3, 2, 4)
    rank_in_node, kept = _max_assignment(blocks.reshape(-1, per_node, per_node))
    node_of_pack = _max_assignment(kept.reshape(layers, nodes, nodes))[0]  # [layers, p]
    rank_in_node = rank_in_node.reshape(layers, nodes, nodes, per_node)
    chosen = np.take_along_axis(rank_in_node, node_of_pack[:, :, None, None], 2)[:, :, 0]  # [layers, p, q]
    return (node_of_pack[:, :, None] * per_node + chosen).reshape(layers, -1)


def _keep_slots(packs: np.ndarray, old: np.ndarray, num_experts: int) -> np.ndarray:
    """Order each rank's new experts so the t-th copy of e takes the slot of the old t-th copy.

    ``packs`` (already on their ranks), ``old``: int64 [layers, ranks, k]. Experts that
    cannot stay fill the rank's other slots in order. Returns int64 [layers, ranks, k].
    """
    k = packs.shape[-1]
    new = packs.reshape(-1, k)
    rank = np.arange(new.shape[0])[:, None]
    key_new = _copy_keys(new, rank, num_experts)
    key_old = _copy_keys(old.reshape(-1, k), rank, num_experts)
    by_key = np.argsort(key_old)
    hit = by_key[np.minimum(np.searchsorted(key_old[by_key], key_new), key_old.size - 1)]
    found = (key_old[hit] == key_new).reshape(new.shape)
    out = np.empty_like(new)
    np.put_along_axis(out, _complete_matching(found, (hit % k).reshape(new.shape)), new, 1)
    return out.reshape(packs.shape)


def rebalance_experts(
    weight: torch.Tensor | np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
    old_phy2log: torch.Tensor | np.ndarray | None = None,
    *,
    max_replicas: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place ``num_replicas`` physical experts per layer on ``num_ranks`` ranks (DeepSeek EPLB).

    Args:
        weight: [layers, logical experts] load (tokens per expert, >= 0), any real dtype.
        num_replicas: physical expert slots per layer, a multiple of ``num_ranks``.
        num_groups: expert groups; hierarchical policy (groups packed whole onto nodes) when
            ``num_groups % num_nodes == 0``, else the global one.
        num_nodes, num_ranks: nodes and ranks (GPUs) of the expert-parallel group.
        old_phy2log: the live placement, int [layers, num_replicas]. When given, the
            per-rank loads equal those without it (same packs) and packs, ranks and slots
            are chosen to change as few slots as possible.
        max_replicas: last dimension of ``log2phy`` (e.g. num_redundant + 1 for a constant
            shape); default: the largest replica count of this result.

    Returns:
        (phy2log [layers, num_replicas], log2phy [layers, experts, max_replicas] slot ids in
        ascending order padded with -1, logcnt [layers, experts]); CPU int64 tensors.

    Raises:
        ValueError: on an inconsistent shape, count or id; the message says what to change.
    """
    w = _weights(weight)
    layers, experts = w.shape
    lay = _layout(layers, experts, num_replicas, num_groups, num_nodes, num_ranks)
    if max_replicas is not None:
        max_replicas = _positive_int("max_replicas", max_replicas)
        if max_replicas < lay.max_count_bound:
            raise ValueError(f"max_replicas ({max_replicas}) must be at least {lay.max_count_bound}, the most "
                             f"replicas one expert can get here; pass num_replicas - experts + 1 "
                             f"({lay.num_replicas - experts + 1}) or leave it None")
    old = None if old_phy2log is None else _placement("old_phy2log", old_phy2log, layers, lay.num_replicas, experts)

    phy2log = _place(w, lay)
    if old is not None:
        shape = (layers, lay.num_ranks, lay.slots_per_rank)
        packs, old_ranks = phy2log.reshape(shape), old.reshape(shape)
        rank = _rank_of_pack(packs, old_ranks, lay)
        placed = np.empty_like(packs)
        placed[np.arange(layers)[:, None], rank] = packs
        phy2log = _keep_slots(placed, old_ranks, experts).reshape(layers, -1)
        logger.debug("placement-aware: %d of %d slots keep their expert",
                     int((phy2log == old).sum()), phy2log.size)

    maps = maps_from_phy2log(phy2log, experts, max_replicas)
    return (torch.from_numpy(maps.phy2log), torch.from_numpy(maps.log2phy),
            torch.from_numpy(maps.logcnt))


def balancedness(weight: torch.Tensor | np.ndarray, phy2log: torch.Tensor | np.ndarray,
                 num_ranks: int) -> np.ndarray:
    """Per-layer balance of a placement: mean / max tokens per rank (1.0 = perfect).

    Each expert's tokens are split evenly over its replicas. ``weight`` [layers, experts],
    ``phy2log`` int [layers, slots] with slots a multiple of ``num_ranks``; returns float64
    [layers] (1.0 for a layer with no tokens).
    """
    w = _weights(weight)
    layers, experts = w.shape
    num_ranks = _positive_int("num_ranks", num_ranks)
    p = _placement("phy2log", phy2log, layers, None, experts)
    if p.shape[1] % num_ranks:
        raise ValueError(f"phy2log has {p.shape[1]} slots per layer, not a multiple of num_ranks ({num_ranks}); "
                         f"pass the rank count the placement was made for")
    count = np.zeros((layers, experts), dtype=np.int64)
    np.add.at(count, (np.arange(layers)[:, None], p), 1)
    orphan = (count == 0) & (w > 0)
    if orphan.any():
        layer, expert = np.argwhere(orphan)[0]
        raise ValueError(f"phy2log has no slot for expert {expert} of layer {layer}, which has load "
                         f"{w[layer, expert]}; every loaded expert needs a replica")
    per_slot = np.take_along_axis(w / np.maximum(count, 1), p, 1)
    # summed in sorted order so that any arrangement of the same packs gives the same number
    per_rank = np.sort(per_slot.reshape(layers, num_ranks, -1), -1).sum(-1)
    peak = per_rank.max(1)
    mean = w.sum(1) / num_ranks  # every token lands on some rank
    return np.where(peak > 0, mean / np.where(peak > 0, peak, 1.0), 1.0)
