"""How even a placement spreads a load over ranks: mean / max tokens per rank."""

from __future__ import annotations

import numpy as np
import torch

from mp_eplb.maps import validate_phy2log
from mp_eplb.policy.layout import as_weights, positive_int

__all__ = ["balancedness", "expert_counts", "mean_balancedness", "rank_loads"]


def expert_counts(p: np.ndarray, num_experts: int) -> np.ndarray:
    """Replicas per expert, int64 [layers, experts], of placements ``p`` int64 [layers, slots]."""
    layers = p.shape[0]
    keys = (np.arange(layers)[:, None] * num_experts + p).ravel()
    return np.bincount(keys, minlength=layers * num_experts).reshape(layers, num_experts)


def rank_loads(w: np.ndarray, p: np.ndarray, num_ranks: int) -> np.ndarray:
    """Tokens per rank, float64 [layers, ranks], of placements ``p`` [layers, slots] under ``w``.

    Each expert's tokens are split evenly over its replicas; each rank's slot loads are summed
    in ascending order, so any arrangement of the same packs gives the same number.
    """
    count = expert_counts(p, w.shape[1])
    per_slot = np.take_along_axis(w / np.maximum(count, 1), p, 1)
    return np.sort(per_slot.reshape(p.shape[0], num_ranks, -1), -1).sum(-1)


def balancedness(weight: torch.Tensor | np.ndarray, phy2log: torch.Tensor | np.ndarray,
                 num_ranks: int) -> np.ndarray:
    """Per-layer balance of a placement: mean / max tokens per rank (1.0 = perfect).

    Each expert's tokens are split evenly over its replicas. ``weight`` [layers, experts],
    ``phy2log`` int [layers, slots] with slots a multiple of ``num_ranks``; returns float64
    [layers] (1.0 for a layer with no tokens).
    """
    w = as_weights(weight)
    layers, experts = w.shape
    num_ranks = positive_int("num_ranks", num_ranks)
    p = validate_phy2log(phy2log, experts, shape=(layers, None), empty_slots=False,
                         every_expert=False)
    if p.shape[1] % num_ranks:
        raise ValueError(f"phy2log has {p.shape[1]} slots per layer, not a multiple of num_ranks ({num_ranks}); "
                         f"pass the rank count the placement was made for")
    orphan = (expert_counts(p, experts) == 0) & (w > 0)
    if orphan.any():
        layer, expert = np.argwhere(orphan)[0]
        raise ValueError(f"phy2log has no slot for expert {expert} of layer {layer}, which has load "
                         f"{w[layer, expert]}; every loaded expert needs a replica")
    per_rank = rank_loads(w, p, num_ranks)
    peak = per_rank.max(1)
    mean = w.sum(1) / num_ranks  # every token lands on some rank
    return np.where(peak > 0, mean / np.where(peak > 0, peak, 1.0), 1.0)


def mean_balancedness(weight: torch.Tensor | np.ndarray, phy2log: torch.Tensor | np.ndarray,
                      num_ranks: int) -> float:
    """:func:`balancedness` averaged over layers: one figure in (0, 1] for a placement."""
    return float(balancedness(weight, phy2log, num_ranks).mean())
