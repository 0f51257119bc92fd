"""EPLB placement policy: DeepSeek's hierarchical balanced packing, optionally placement-aware.

``rebalance_experts`` follows DeepSeek's EPLB contract (same arguments, same outputs,
same placement for the same load) and adds ``old_phy2log``, the placement that is live now.
Given it, each layer gets whichever of two candidates changes fewer slots:

- *relabelled*: DeepSeek's packs (so the per-rank loads and replica counts of the
  placement-agnostic result), with the node and rank each pack lands on, and the slot
  each expert takes within its rank, chosen to change as few slots as possible;
- *repaired* (not with ``keep_packs=True``): the old placement, with its replica counts,
  fixed by local search under the new load, one slot change at a time, until no rank
  carries more than the placement-agnostic result's most loaded rank. Used only when it
  gets there with fewer changed slots than the relabelled one.

Either way no layer is less balanced than the placement-agnostic result (its max rank load,
up to a relative ``_BALANCE_RTOL`` for float summation order). A repaired layer's replica
counts need not be monotone in load (a hot expert may have fewer replicas than a colder
one); they stay within 1..``max_replicas``.

Terms: a *slot* (physical expert) is one expert-sized region of a rank's weights; slot
``s`` lives on rank ``s // (num_replicas // num_ranks)``, rank ``r`` on node
``r // (num_ranks // num_nodes)``. A *pack* is the multiset of experts the balanced
packing puts on one rank (or the set of groups it puts on one node).

All work is on CPU in numpy (float64 loads, int64 ids); the outputs are new CPU int64
torch tensors owned by the caller.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from mp_eplb.maps import maps_from_phy2log, occurrence

__all__ = ["PlacementLayout", "balancedness", "global_policy_reason", "mean_balancedness",
           "rebalance_experts"]

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


def global_policy_reason(num_groups: int, num_experts: int, num_nodes: int) -> str:
    """Why ``num_groups`` expert groups cannot be packed whole onto ``num_nodes`` nodes, so the
    global policy applies ("" when the hierarchical policy can use them, or when there is a
    single group: that is the global policy anyway)."""
    if num_groups == 1:
        return ""
    if num_experts % num_groups:
        return f"num_groups={num_groups} does not divide the {num_experts} logical experts"
    if num_groups % num_nodes:
        return f"num_groups={num_groups} is not a multiple of the {num_nodes} nodes"
    return ""


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


# ----------------------------------------------------------------------------- local search

_BALANCE_RTOL = 1e-9  # a placement-aware result may exceed the unaware max rank load by this much
_GAIN_RTOL = 1e-12  # a move must cut the excess by more than this fraction of the target


def _expert_counts(p: np.ndarray, num_experts: int) -> np.ndarray:
    """Replicas per expert, int64 [layers, experts], of placements ``p`` int64 [layers, slots]."""
    layers = p.shape[0]
    keys = (np.arange(layers)[:, None] * num_experts + p).ravel()
    return np.bincount(keys, minlength=layers * num_experts).reshape(layers, num_experts)


def _rank_loads(w: np.ndarray, p: np.ndarray, num_ranks: int) -> np.ndarray:
    """Tokens per rank, float64 [layers, ranks], of placements ``p`` [layers, slots] under ``w``.

    Each expert's tokens are split evenly over its replicas; each rank's slot loads are summed
    in ascending order, so any arrangement of the same packs gives the same number.
    """
    count = _expert_counts(p, w.shape[1])
    per_slot = np.take_along_axis(w / np.maximum(count, 1), p, 1)
    return np.sort(per_slot.reshape(p.shape[0], num_ranks, -1), -1).sum(-1)


def _searchable(old: np.ndarray, lay: PlacementLayout, cap: int) -> np.ndarray:
    """Layers whose old placement the local search may start from, bool [layers]: every
    expert has 1..``cap`` replicas and (multi-node hierarchical) every group lies on one node."""
    count = _expert_counts(old, lay.num_experts)
    ok = (count.min(1) >= 1) & (count.max(1) <= cap)
    if lay.num_nodes > 1:
        node = np.arange(lay.num_replicas) // (lay.slots_per_rank * lay.ranks_per_node)
        key = (np.arange(lay.num_layers)[:, None] * lay.num_groups
               + old // (lay.num_experts // lay.num_groups)).ravel()
        size = lay.num_layers * lay.num_groups
        lo = np.full(size, lay.num_nodes)
        hi = np.full(size, -1)
        np.minimum.at(lo, key, np.broadcast_to(node, old.shape).ravel())
        np.maximum.at(hi, key, np.broadcast_to(node, old.shape).ravel())
        ok &= ((lo == hi) | (hi < 0)).reshape(lay.num_layers, -1).all(1)
    return ok


def _excess(load: np.ndarray, limit: np.ndarray) -> np.ndarray:
    return np.maximum(load - limit, 0.0)


def _ties(gain: np.ndarray, tol: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, candidates) of ``gain`` [rows, candidates] within ``tol`` [rows] of their row's
    lowest; a row whose gains are all +inf (nothing valid) has none."""
    best = gain.min(1)
    threshold = np.where(np.isfinite(best), best + tol, -np.inf)
    return np.nonzero(gain <= threshold[:, None])


def _first_per_row(num_rows: int, rows: np.ndarray, *keys: np.ndarray) -> np.ndarray:
    """Per row, the position in ``rows`` of its entry with the smallest ``keys`` (compared in
    order, then by position); -1 for a row with no entry. ``rows`` ascending."""
    order = np.lexsort((*reversed(keys), rows))
    head = np.ones(order.size, dtype=bool)
    head[1:] = rows[order][1:] != rows[order][:-1]
    out = np.full(num_rows, -1, dtype=np.int64)
    out[rows[order[head]]] = order[head]
    return out


@dataclass
class _Moves:
    """Best move per searching layer: ``gain`` (change of the summed excess over the limit,
    +inf for none), ``changes`` (change of the count of slots differing from old), and the
    move's two operands (slot pair for a swap; slot and expert it takes for a replication)."""

    gain: np.ndarray
    changes: np.ndarray
    first: np.ndarray
    second: np.ndarray

    @classmethod
    def pick(cls, gain: np.ndarray, tol: np.ndarray, changes: Any, peak: Any) -> tuple[_Moves, np.ndarray]:
        """Per row of ``gain`` [n, candidates]: lowest gain (within ``tol``), then fewest
        ``changes(rows, cols)``, then lowest ``peak(rows, cols)``, then lowest index.

        Returns the moves with operands unset (zeros) and the chosen candidate per row.
        """
        n = gain.shape[0]
        rows, cols = _ties(gain, tol)
        ch = changes(rows, cols)
        at = _first_per_row(n, rows, ch, peak(rows, cols))
        found = at >= 0
        moves = cls(np.full(n, np.inf), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64),
                    np.zeros(n, dtype=np.int64))
        at = at[found]
        moves.gain[found] = gain[rows[at], cols[at]]
        moves.changes[found] = ch[at]
        chosen = np.zeros(n, dtype=np.int64)
        chosen[found] = cols[at]
        return moves, chosen


@dataclass
class _SearchStep:
    """State of the layers still searching, each array's first axis one such layer.

    p, old: int64 [n, slots]; count: int64 [n, experts]; w, q (tokens per replica): float64
    [n, experts]; slot_load: float64 [n, slots]; load: float64 [n, ranks]; top: int64 [n],
    the most loaded rank; limit, tol: float64 [n].
    """

    p: np.ndarray
    old: np.ndarray
    count: np.ndarray
    w: np.ndarray
    q: np.ndarray
    slot_load: np.ndarray
    load: np.ndarray
    top: np.ndarray
    limit: np.ndarray
    tol: np.ndarray

    @classmethod
    def of(cls, w: np.ndarray, p: np.ndarray, old: np.ndarray, count: np.ndarray, limit: np.ndarray,
           num_ranks: int) -> _SearchStep:
        """The state of placements ``p`` with replica counts ``count`` under loads ``w``."""
        q = w / np.maximum(count, 1)
        slot_load = np.take_along_axis(q, p, 1)
        load = slot_load.reshape(p.shape[0], num_ranks, -1).sum(-1)
        return cls(p, old, count, w, q, slot_load, load, load.argmax(1), limit, limit * _GAIN_RTOL)

    def rows(self, keep: np.ndarray) -> _SearchStep:
        """The state of the layers selected by ``keep`` (bool or index [n])."""
        return _SearchStep(*(getattr(self, f.name)[keep] for f in fields(self)))

    def searching(self) -> np.ndarray:
        """Layers with a rank over the limit, bool [n]."""
        return (self.load > self.limit[:, None]).any(1)

    def top_slots(self) -> np.ndarray:
        k = self.p.shape[1] // self.load.shape[1]
        return self.top[:, None] * k + np.arange(k)


def _best_swaps(st: _SearchStep, node: np.ndarray) -> _Moves:
    """Best exchange of a top-rank slot (first) with a slot (second) of an under-limit rank on
    its node."""
    n, slots = st.p.shape
    k = slots // st.load.shape[1]
    rows = np.arange(n)[:, None]
    rank = np.arange(slots) // k
    mine = st.top_slots()
    over = st.load[rows[:, 0], st.top] - st.limit  # excess of the top rank
    room = st.limit[:, None] - st.load[:, rank]  # [n, slots]: what the slot's rank can take
    # an over-limit partner (the top rank included) gains what the top rank loses: never helps
    room = np.where((room > 0) & (node == node[mine[:, :1]]), room, -np.inf)
    delta = st.slot_load[rows, mine][:, :, None] - st.slot_load[:, None, :]  # [n, k, slots]
    gain = np.maximum(over[:, None, None] - delta, 0.0) + np.maximum(delta - room[:, None], 0.0)
    gain = np.where(delta > 0, gain, np.inf).reshape(n, -1) - over[:, None]

    def changes(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        a, b = mine[r, c // slots], c % slots
        x, y, ox, oy = st.p[r, a], st.p[r, b], st.old[r, a], st.old[r, b]
        return (y != ox).astype(np.int64) + (x != oy) - (x != ox) - (y != oy)

    def peak(r: np.ndarray, c: np.ndarray) -> np.ndarray:  # the pair's higher load, less the top's
        d = delta.reshape(n, -1)[r, c]
        return np.maximum(-d, d - room[r, c % slots] - over[r])

    moves, c = _Moves.pick(gain, st.tol, changes, peak)
    moves.first, moves.second = mine[rows[:, 0], c // slots], c % slots
    return moves


def _best_replications(st: _SearchStep, node: np.ndarray, cap: int) -> _Moves:
    """Best conversion of one replica (slot: first) of an expert with several, on the top
    rank's node, into one more replica of the top rank's expert (second) whose extra replica
    relieves the top rank most."""
    n, slots = st.p.shape
    ranks = st.load.shape[1]
    k = slots // ranks
    rows = np.arange(n)[:, None]
    mine = st.p[rows, st.top_slots()]
    on_top = (mine[:, :, None] == mine[:, None, :]).sum(2)  # copies on the top rank
    relief = np.where(st.count[rows, mine] < cap, st.q[rows, mine] / (st.count[rows, mine] + 1), -1.0)
    h = mine[rows[:, 0], (relief * on_top).argmax(1)]  # [n]
    plural = np.take_along_axis(st.count, st.p, 1) > 1
    donor = plural & (node == node[st.top * k][:, None]) & (st.p != h[:, None])
    donor &= (st.count[rows[:, 0], h] < cap)[:, None]
    width = max(int(donor.sum(1).max()), 1)
    src = np.argsort(~donor, axis=1, kind="stable")[:, :width]  # donor slots, ascending
    d, od = st.p[rows, src], st.old[rows, src]  # [n, width]
    # copies per rank of the experts with several replicas (at most slots - experts of them)
    compact = np.cumsum(st.count > 1, axis=1) - 1
    many = max(int(compact[:, -1].max()) + 1, 1)
    key = (rows * ranks + np.arange(slots) // k) * many + compact[rows, st.p]
    per_rank = np.bincount(key[plural], minlength=n * ranks * many).reshape(n, ranks, many)
    d_new = st.w[rows, d] / np.maximum(st.count[rows, d] - 1, 1)
    h_new = st.w[rows[:, 0], h] / (st.count[rows[:, 0], h] + 1)
    d_rise = np.take_along_axis(per_rank, compact[rows, d][:, None, :], 2) * (d_new - st.q[rows, d])[:, None, :]
    h_drop = (st.p == h[:, None]).reshape(n, ranks, k).sum(2) * (h_new - st.q[rows[:, 0], h])[:, None]
    at_src = (src // k)[:, :, None] == np.arange(ranks)  # [n, width, ranks]
    load = ((st.load + h_drop)[:, None, :] + d_rise.transpose(0, 2, 1)
            + at_src * (h_new[:, None] - d_new)[:, :, None])  # [n, width, ranks]
    limit = st.limit[:, None]
    gain = _excess(load, limit[:, :, None]).sum(-1) - _excess(st.load, limit).sum(1)[:, None]
    gain = np.where(np.take_along_axis(donor, src, 1), gain, np.inf)
    moves, c = _Moves.pick(
        gain, st.tol,
        lambda r, c: (h[r] != od[r, c]).astype(np.int64) - (d[r, c] != od[r, c]),
        lambda r, c: load[r, c].max(-1))
    moves.first, moves.second = src[rows[:, 0], c], h
    return moves


def _local_search(w: np.ndarray, old: np.ndarray, target: np.ndarray, budget: np.ndarray,
                  searchable: np.ndarray, lay: PlacementLayout, cap: int) -> np.ndarray:
    """Repair the old placement under the new load, one slot change at a time.

    Per layer in ``searchable``, starting from ``old`` (its slots and replica counts), apply
    the move that most cuts the excess of rank loads over ``target`` [layers] (then: fewest
    changed slots, lowest peak, lowest index): swap a slot of the most loaded rank with a
    slot of another rank of its node, or turn a replica of an expert with several into
    one more replica (at most ``cap``) of an expert on the most loaded rank. A layer stops
    when no rank exceeds the target (relative tolerance ``_BALANCE_RTOL``), when no move
    helps, or once it changes ``budget`` [layers] slots. Moves stay within nodes, so groups
    whole on a node stay so. Returns the placements int64 [layers, slots] (the caller checks
    which reached the target).
    """
    slots = old.shape[1]
    node = np.arange(slots) // (lay.slots_per_rank * lay.ranks_per_node)
    p, count = old.copy(), _expert_counts(old, lay.num_experts)
    limit = target * (1 + _BALANCE_RTOL)
    live = np.nonzero(searchable)[0]
    for _ in range(2 * slots):  # each move cuts the excess; this only bounds pathological float cases
        if live.size == 0:
            break
        st = _SearchStep.of(w[live], p[live], old[live], count[live], limit[live], lay.num_ranks)
        keep = st.searching() & ((st.p != st.old).sum(1) < budget[live])
        live, st = live[keep], st.rows(keep)
        if live.size == 0:
            break
        swap, rep = _best_swaps(st, node), _best_replications(st, node, cap)
        use_rep = ((rep.gain < swap.gain - st.tol)
                   | ((rep.gain <= swap.gain + st.tol) & (rep.changes < swap.changes)))
        moved = np.where(use_rep, rep.gain, swap.gain) < -st.tol
        by_swap, by_rep = moved & ~use_rep, moved & use_rep
        at, a, b = live[by_swap], swap.first[by_swap], swap.second[by_swap]
        p[at, a], p[at, b] = p[at, b], p[at, a]
        at, src, h = live[by_rep], rep.first[by_rep], rep.second[by_rep]
        np.subtract.at(count, (at, p[at, src]), 1)
        np.add.at(count, (at, h), 1)
        p[at, src] = h
        live = live[moved]
    return p


def _relabel(packs: np.ndarray, old: np.ndarray, lay: PlacementLayout) -> np.ndarray:
    """``packs`` (a placement [layers, slots]) with its node packs, rank packs and slots
    relabelled to keep as many of ``old``'s slots as possible."""
    layers = packs.shape[0]
    shape = (layers, lay.num_ranks, lay.slots_per_rank)
    packs, old_ranks = packs.reshape(shape), old.reshape(shape)
    rank = _rank_of_pack(packs, old_ranks, lay)
    placed = np.empty_like(packs)
    placed[np.arange(layers)[:, None], rank] = packs
    return _keep_slots(placed, old_ranks, lay.num_experts).reshape(layers, -1)


def _repair_or_relabel(w: np.ndarray, old: np.ndarray, fresh: np.ndarray, relabelled: np.ndarray,
                       lay: PlacementLayout, cap: int) -> np.ndarray:
    """Per layer, the local-search repair of ``old`` when it is as balanced as ``fresh`` (the
    unaware placement) and changes fewer slots than ``relabelled``; else ``relabelled``."""
    target = _rank_loads(w, fresh, lay.num_ranks).max(1)
    budget = (relabelled != old).sum(1)
    searchable = _searchable(old, lay, cap) & (budget > 0)
    repaired = _local_search(w, old, target, budget, searchable, lay, cap)
    better = (searchable & ((repaired != old).sum(1) < budget)
              & (_rank_loads(w, repaired, lay.num_ranks).max(1) <= target * (1 + _BALANCE_RTOL)))
    logger.debug("placement-aware: %d of %d layers repaired in place", int(better.sum()), better.size)
    return np.where(better[:, None], repaired, relabelled)


def rebalance_experts(
    weight: torch.Tensor | np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
    old_phy2log: torch.Tensor | np.ndarray | None = None,
    *,
    max_replicas: int | None = None,
    keep_packs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place ``num_replicas`` physical experts per layer on ``num_ranks`` ranks (DeepSeek EPLB).

    Args:
        weight: [layers, logical experts] load (tokens per expert, >= 0), any real dtype.
        num_replicas: physical expert slots per layer, a multiple of ``num_ranks``.
        num_groups: expert groups; hierarchical policy (groups packed whole onto nodes) when
            ``num_groups % num_nodes == 0``, else the global one.
        num_nodes, num_ranks: nodes and ranks (GPUs) of the expert-parallel group.
        old_phy2log: the live placement, int [layers, num_replicas]. When given, each layer
            is the relabelled DeepSeek placement or the repaired old one (module docstring),
            whichever changes fewer slots; its max rank load is at most that of the result
            without ``old_phy2log`` (relative tolerance 1e-9). The old placement is repaired
            only in layers where it gives every expert 1..``max_replicas`` replicas and, for
            the hierarchical policy on several nodes, keeps every group on one node (moves
            stay within nodes, so the result does too).
        max_replicas: last dimension of ``log2phy`` (e.g. num_redundant + 1 for a constant
            shape) and the most replicas a repair gives one expert; default: the largest
            replica count of this result (repairs stay within ``PlacementLayout.max_count_bound``).
        keep_packs: with ``old_phy2log``, only relabel DeepSeek's packs: per-rank loads and
            replica counts then equal those of the result without ``old_phy2log``.

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
        relabelled = _relabel(phy2log, old, lay)
        if keep_packs:
            phy2log = relabelled
        else:
            cap = lay.max_count_bound if max_replicas is None else max_replicas
            phy2log = _repair_or_relabel(w, old, phy2log, relabelled, lay, cap)
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
    orphan = (_expert_counts(p, experts) == 0) & (w > 0)
    if orphan.any():
        layer, expert = np.argwhere(orphan)[0]
        raise ValueError(f"phy2log has no slot for expert {expert} of layer {layer}, which has load "
                         f"{w[layer, expert]}; every loaded expert needs a replica")
    per_rank = _rank_loads(w, p, num_ranks)
    peak = per_rank.max(1)
    mean = w.sum(1) / num_ranks  # every token lands on some rank
    return np.where(peak > 0, mean / np.where(peak > 0, peak, 1.0), 1.0)


def mean_balancedness(weight: torch.Tensor | np.ndarray, phy2log: torch.Tensor | np.ndarray,
                      num_ranks: int) -> float:
    """:func:`balancedness` averaged over layers: one figure in (0, 1] for a placement."""
    return float(balancedness(weight, phy2log, num_ranks).mean())
