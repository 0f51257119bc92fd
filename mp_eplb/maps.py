"""Routing maps: derive ``log2phy`` and ``logcnt`` from ``phy2log`` and check a map's validity."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["RoutingMaps", "default_phy2log", "maps_from_phy2log", "validate_phy2log", "occurrence"]


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


def default_phy2log(num_layers: int, num_physical: int, num_logical: int) -> np.ndarray:
    """The layout engines load by default: slot ``s`` of every layer holds expert
    ``s % num_logical`` (redundant slots repeat the first experts). int64 [layers, physical]."""
    return np.tile(np.arange(num_physical, dtype=np.int64) % num_logical, (num_layers, 1))


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


def occurrence(x: np.ndarray) -> np.ndarray:
    """For each entry of ``x`` (int, any leading dims), how many equal entries precede it in
    its row."""
    order = np.argsort(x, axis=-1, kind="stable")
    xs = np.take_along_axis(x, order, -1)
    idx = np.broadcast_to(np.arange(x.shape[-1]), x.shape)
    run_start = np.ones(x.shape, dtype=bool)
    run_start[..., 1:] = xs[..., 1:] != xs[..., :-1]
    first = np.maximum.accumulate(np.where(run_start, idx, 0), axis=-1)
    occ = np.empty_like(x)
    np.put_along_axis(occ, order, idx - first, -1)
    return occ


def maps_from_phy2log(phy2log: np.ndarray, num_logical: int,
                      max_replicas: int | None = None) -> RoutingMaps:
    """Build ``log2phy`` and ``logcnt`` from a valid ``phy2log``.

    ``max_replicas`` fixes the last dimension of ``log2phy`` (engines keep it constant at
    ``num_redundant_experts + 1``); ``ValueError`` if an expert has more replicas than that.
    """
    p2l = validate_phy2log(phy2log, num_logical)
    layers, num_phy = p2l.shape
    rows = np.broadcast_to(np.arange(layers)[:, None], p2l.shape)
    valid = p2l >= 0
    logcnt = np.bincount((rows * num_logical + p2l)[valid],
                         minlength=layers * num_logical).reshape(layers, num_logical)
    most = int(logcnt.max())
    width = most if max_replicas is None else max_replicas
    if most > width:
        raise ValueError(f"an expert has {most} replicas but max_replicas={width}; raise "
                         "max_replicas (num_redundant_experts + 1)")
    log2phy = np.full((layers, num_logical, width), -1, dtype=np.int64)
    slots = np.broadcast_to(np.arange(num_phy), p2l.shape)
    log2phy[rows[valid], p2l[valid], occurrence(p2l)[valid]] = slots[valid]
    return RoutingMaps(phy2log=p2l, log2phy=log2phy, logcnt=logcnt)
