"""EPLB placement policy (DeepSeek's, optionally placement-aware): :func:`rebalance_experts`
in :mod:`.rebalance`, built from :mod:`.packing` (hierarchical balanced packing),
:mod:`.assignment` (relabelling onto the old placement), :mod:`.repair` (local search on the
old placement) and measured by :mod:`.balancedness`."""

from __future__ import annotations

from mp_eplb.policy.balancedness import balancedness, mean_balancedness
from mp_eplb.policy.layout import PlacementLayout, global_policy_reason
from mp_eplb.policy.rebalance import (RebalanceOutcome, plan_rebalance, rebalance_experts,
                                      rebalance_outcome)

__all__ = ["PlacementLayout", "RebalanceOutcome", "balancedness", "global_policy_reason",
           "mean_balancedness", "plan_rebalance", "rebalance_experts", "rebalance_outcome"]
