"""Validated inputs of the policy: dimensions (:class:`PlacementLayout`), loads and placements."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["PlacementLayout", "as_weights", "global_policy_reason", "make_layout", "positive_int"]

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


def positive_int(name: str, value: Any) -> int:
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


def as_weights(weight: Any) -> np.ndarray:
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


def make_layout(num_layers: int, num_experts: int, num_replicas: Any, num_groups: Any, num_nodes: Any,
            num_ranks: Any) -> PlacementLayout:
    num_replicas = positive_int("num_replicas", num_replicas)
    num_groups = positive_int("num_groups", num_groups)
    num_nodes = positive_int("num_nodes", num_nodes)
    num_ranks = positive_int("num_ranks", num_ranks)
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
