"""Relabelling a placement onto the old one: maximum-weight assignment of packs to ranks
(Hungarian method, batched over layers) and of experts to the slots they already hold."""

from __future__ import annotations

import numpy as np

from mp_eplb.maps import occurrence
from mp_eplb.policy.layout import PlacementLayout

__all__ = ["relabel"]


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


def relabel(packs: np.ndarray, old: np.ndarray, lay: PlacementLayout) -> np.ndarray:
    """``packs`` (a placement [layers, slots]) with its node packs, rank packs and slots
    relabelled to keep as many of ``old``'s slots as possible."""
    layers = packs.shape[0]
    shape = (layers, lay.num_ranks, lay.slots_per_rank)
    packs, old_ranks = packs.reshape(shape), old.reshape(shape)
    rank = _rank_of_pack(packs, old_ranks, lay)
    placed = np.empty_like(packs)
    placed[np.arange(layers)[:, None], rank] = packs
    return _keep_slots(placed, old_ranks, lay.num_experts).reshape(layers, -1)
