"""DeepSeek's hierarchical placement: balanced packing of groups onto nodes, replication of
hot experts within a node, balanced packing of replicas onto ranks."""

from __future__ import annotations

import numpy as np

from mp_eplb.policy.layout import PlacementLayout

__all__ = ["place"]


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


def place(w: np.ndarray, lay: PlacementLayout) -> np.ndarray:
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


def _inverse(perm: np.ndarray) -> np.ndarray:
    """Row-wise inverse of a batch of permutations [rows, n]."""
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), 1)
    return inv
