"""Placement-aware repair: local search on the old placement (swaps within a node, a spare
replica turned into a copy of a hot expert) until no rank is above the unaware result's peak."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from mp_eplb.policy.balancedness import expert_counts, rank_loads
from mp_eplb.policy.layout import PlacementLayout

__all__ = ["BALANCE_RTOL", "repair_or_relabel"]

logger = logging.getLogger(__name__)

BALANCE_RTOL = 1e-9  # a placement-aware result may exceed the unaware max rank load by this much
_GAIN_RTOL = 1e-12  # a move must cut the excess by more than this fraction of the target


def _searchable(old: np.ndarray, lay: PlacementLayout, cap: int) -> np.ndarray:
    """Layers whose old placement the local search may start from, bool [layers]: every
    expert has 1..``cap`` replicas and (multi-node hierarchical) every group lies on one node."""
    count = expert_counts(old, lay.num_experts)
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
    when no rank exceeds the target (relative tolerance ``BALANCE_RTOL``), when no move
    helps, or once it changes ``budget`` [layers] slots. Moves stay within nodes, so groups
    whole on a node stay so. Returns the placements int64 [layers, slots] (the caller checks
    which reached the target).
    """
    slots = old.shape[1]
    node = np.arange(slots) // (lay.slots_per_rank * lay.ranks_per_node)
    p, count = old.copy(), expert_counts(old, lay.num_experts)
    limit = target * (1 + BALANCE_RTOL)
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


def repair_or_relabel(w: np.ndarray, old: np.ndarray, fresh: np.ndarray, relabelled: np.ndarray,
                       lay: PlacementLayout, cap: int) -> np.ndarray:
    """Per layer, the local-search repair of ``old`` when it is as balanced as ``fresh`` (the
    unaware placement) and changes fewer slots than ``relabelled``; else ``relabelled``."""
    target = rank_loads(w, fresh, lay.num_ranks).max(1)
    budget = (relabelled != old).sum(1)
    searchable = _searchable(old, lay, cap) & (budget > 0)
    repaired = _local_search(w, old, target, budget, searchable, lay, cap)
    better = (searchable & ((repaired != old).sum(1) < budget)
              & (rank_loads(w, repaired, lay.num_ranks).max(1) <= target * (1 + BALANCE_RTOL)))
    logger.debug("placement-aware: %d of %d layers repaired in place", int(better.sum()), better.size)
    return np.where(better[:, None], repaired, relabelled)
