"""Routing maps: derive ``log2phy`` and ``logcnt`` from ``phy2log`` and check a map's validity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

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


def validate_phy2log(phy2log: Any, num_logical: int | None, name: str = "phy2log", *,
                     shape: tuple[int | None, ...] | None = None, empty_slots: bool = True,
                     every_expert: bool = True) -> np.ndarray:
    """The one check of a placement: ``phy2log`` (numpy, torch or nested lists) as int64.

    ``shape``: the expected shape, ``None`` entries any non-zero size (default: 2-D
    ``[layers, physical slots]``). Ids must be in ``[0, num_logical)`` (``num_logical`` None:
    any id >= 0), or -1 for an empty slot where ``empty_slots``; with ``every_expert`` every
    logical expert needs a slot in every layer. Raises ``ValueError`` naming the first bad
    entry.
    """
    if isinstance(phy2log, torch.Tensor):
        phy2log = phy2log.detach().cpu().numpy()
    arr = np.asarray(phy2log)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer expert ids, got dtype {arr.dtype}")
    want = shape if shape is not None else (None, None)
    if arr.ndim != len(want) or any(w not in (None, n) or n == 0 for w, n in zip(want, arr.shape)):
        dims = ", ".join("any" if w is None else str(w) for w in want) + ("," if len(want) == 1 else "")
        raise ValueError(f"{name} must have shape ({dims}), got {tuple(arr.shape)}; pass a map of "
                         "this model's layers and physical slots")
    arr = arr.astype(np.int64, copy=False)
    low = -1 if empty_slots else 0
    bad = (arr < low) if num_logical is None else (arr < low) | (arr >= num_logical)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        allowed = ">= 0" if num_logical is None else f"in [0, {num_logical})"
        raise ValueError(f"{name}[{', '.join(map(str, where))}] = {int(arr[where])} is not a logical "
                         f"expert id {allowed}" + (" nor -1 (empty slot)" if empty_slots else ""))
    if every_expert and num_logical is not None:
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
