"""Routing maps: derive ``log2phy`` and ``logcnt`` from ``phy2log`` and check a map's validity."""

from __future__ import annotations

import numpy as np

__all__ = ["RoutingMaps", "maps_from_phy2log", "validate_phy2log"]

from dataclasses import dataclass


@dataclass(frozen=True)
class RoutingMaps:
    """The three maps of DeepSeek's contract, as int64 numpy arrays.

    ``phy2log`` [layers, physical]: logical id per slot (-1: empty slot).
    ``log2phy`` [layers, logical, max_replicas]: slots holding each expert, ascending, -1 padded.
    ``logcnt``  [layers, logical]: replicas per expert.
    """

    phy2log: np.ndarray
    log2phy: np.ndarray
    logcnt: np.ndarray


def validate_phy2log(phy2log: np.ndarray, num_logical: int, name: str = "phy2log") -> np.ndarray:
    """Return ``phy2log`` as int64 [layers, physical]; raise ``ValueError`` if malformed.

    Every id must be -1 or in ``[0, num_logical)``, and every logical expert must have a slot.
    """
    arr = np.asarray(phy2log)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [layers, physical slots], got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer expert ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    bad = (arr < -1) | (arr >= num_logical)
    if bad.any():
        layer, slot = map(int, np.argwhere(bad)[0])
        raise ValueError(f"{name}[{layer}, {slot}] = {int(arr[layer, slot])} is not a logical expert "
                         f"id in [0, {num_logical}) nor -1 (empty slot)")
    present = np.zeros((arr.shape[0], num_logical + 1), dtype=bool)
    np.put_along_axis(present, arr + 1, True, axis=1)
    missing = ~present[:, 1:]
    if missing.any():
        layer, expert = map(int, np.argwhere(missing)[0])
        raise ValueError(f"{name} layer {layer} has no slot for logical expert {expert}; every "
                         "expert needs at least one replica")
    return arr


def maps_from_phy2log(phy2log: np.ndarray, num_logical: int,
                      max_replicas: int | None = None) -> RoutingMaps:
    """Build ``log2phy`` and ``logcnt`` from a valid ``phy2log``.

    ``max_replicas`` fixes the last dimension of ``log2phy`` (engines keep it constant at
    ``num_redundant_experts + 1``); ``ValueError`` if an expert has more replicas than that.
    """
    p2l = validate_phy2log(phy2log, num_logical)
    layers, num_phy = p2l.shape
    valid = p2l >= 0
    logcnt = np.zeros((layers, num_logical), dtype=np.int64)
    rows = np.repeat(np.arange(layers), num_phy).reshape(layers, num_phy)
    np.add.at(logcnt, (rows[valid], p2l[valid]), 1)
    width = int(logcnt.max()) if max_replicas is None else max_replicas
    if logcnt.max() > width:
        raise ValueError(f"an expert has {int(logcnt.max())} replicas but max_replicas={width}; "
                         "raise max_replicas (num_redundant_experts + 1)")
    # Rank of each slot among the slots of its expert: stable sort by (layer, expert, slot).
    key = np.where(valid, p2l, num_logical)
    order = np.argsort(key, axis=1, kind="stable")
    sorted_ids = np.take_along_axis(key, order, axis=1)
    first = np.zeros_like(sorted_ids)
    starts = np.concatenate([np.zeros((layers, 1), dtype=np.int64),
                             np.cumsum(logcnt, axis=1)[:, :-1]], axis=1)
    first[sorted_ids < num_logical] = np.take_along_axis(
        starts, np.minimum(sorted_ids, num_logical - 1), axis=1)[sorted_ids < num_logical]
    replica = np.arange(num_phy)[None, :] - first
    log2phy = np.full((layers, num_logical, max(width, 1)), -1, dtype=np.int64)
    keep = sorted_ids < num_logical
    log2phy[rows[keep], sorted_ids[keep], replica[keep]] = order[keep]
    return RoutingMaps(phy2log=p2l, log2phy=log2phy, logcnt=logcnt)
