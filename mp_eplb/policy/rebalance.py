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
up to a relative ``repair.BALANCE_RTOL`` for float summation order). A repaired layer's replica
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
from dataclasses import dataclass

import numpy as np
import torch

from mp_eplb.maps import RoutingMaps, maps_from_phy2log, validate_phy2log
from mp_eplb.policy.assignment import relabel
from mp_eplb.policy.balancedness import mean_balancedness
from mp_eplb.policy.layout import as_weights, make_layout, positive_int
from mp_eplb.policy.packing import place
from mp_eplb.policy.repair import repair_or_relabel

__all__ = ["RebalanceOutcome", "plan_rebalance", "rebalance_experts", "rebalance_outcome"]

logger = logging.getLogger(__name__)

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
    w = as_weights(weight)
    layers, experts = w.shape
    lay = make_layout(layers, experts, num_replicas, num_groups, num_nodes, num_ranks)
    if max_replicas is not None:
        max_replicas = positive_int("max_replicas", max_replicas)
        if max_replicas < lay.max_count_bound:
            raise ValueError(f"max_replicas ({max_replicas}) must be at least {lay.max_count_bound}, the most "
                             f"replicas one expert can get here; pass num_replicas - experts + 1 "
                             f"({lay.num_replicas - experts + 1}) or leave it None")
    old = None if old_phy2log is None else validate_phy2log(
        old_phy2log, experts, "old_phy2log", shape=(layers, lay.num_replicas), empty_slots=False,
        every_expert=False)

    phy2log = place(w, lay)
    if old is not None:
        relabelled = relabel(phy2log, old, lay)
        if keep_packs:
            phy2log = relabelled
        else:
            cap = lay.max_count_bound if max_replicas is None else max_replicas
            phy2log = repair_or_relabel(w, old, phy2log, relabelled, lay, cap)
        logger.debug("placement-aware: %d of %d slots keep their expert",
                     int((phy2log == old).sum()), phy2log.size)

    maps = maps_from_phy2log(phy2log, experts, max_replicas)
    return (torch.from_numpy(maps.phy2log), torch.from_numpy(maps.log2phy),
            torch.from_numpy(maps.logcnt))


@dataclass(frozen=True)
class RebalanceOutcome:
    """A new placement and what it changes: ``layers`` whose map changes (ascending, the order
    they are staged and committed) and the mean balancedness of the old and new placement on
    the load the policy read."""

    maps: RoutingMaps
    layers: list[int]
    balancedness_before: float
    balancedness_after: float


def rebalance_outcome(load: torch.Tensor | np.ndarray, old_phy2log: np.ndarray,
                      new_phy2log: np.ndarray, *, num_logical: int, num_ranks: int,
                      max_replicas: int) -> RebalanceOutcome:
    """Describe the move from ``old_phy2log`` to ``new_phy2log`` (both ``[layers, slots]``)."""
    maps = maps_from_phy2log(np.asarray(new_phy2log), num_logical, max_replicas)
    changed = np.nonzero((maps.phy2log != old_phy2log).any(axis=1))[0]
    return RebalanceOutcome(
        maps=maps, layers=[int(layer) for layer in changed],
        balancedness_before=mean_balancedness(load, old_phy2log, num_ranks),
        balancedness_after=mean_balancedness(load, maps.phy2log, num_ranks))


def plan_rebalance(load: torch.Tensor | np.ndarray, old_phy2log: np.ndarray, *, num_logical: int,
                   num_groups: int, num_nodes: int, num_ranks: int,
                   max_replicas: int) -> RebalanceOutcome:
    """Run the placement-aware policy on ``load`` ``[layers, logical]`` from the live
    ``old_phy2log`` and describe the result (:func:`rebalance_outcome`). ``num_groups`` is the
    one the engine settled on (1 where the groups cannot be packed onto the nodes, see
    :func:`~mp_eplb.policy.layout.global_policy_reason`); ``max_replicas`` is
    ``num_redundant + 1``, the width of the engine's ``log2phy``."""
    new, _, _ = rebalance_experts(np.asarray(load), old_phy2log.shape[1], num_groups, num_nodes,
                                  num_ranks, old_phy2log=old_phy2log, max_replicas=max_replicas)
    return rebalance_outcome(load, old_phy2log, new.numpy(), num_logical=num_logical,
                             num_ranks=num_ranks, max_replicas=max_replicas)
