"""The transfer worker's logic: plan a rebalance and stage layers. Knows nothing of processes.

A :class:`TransferWorker` is driven by :mod:`mp_eplb.worker.loop` in the transfer subprocess
(process mode) or on a thread of the engine (thread mode). It owns a process group of the
workers of all ranks (never the engine's), reads the load window the engine fills, runs the
placement-aware policy, and fills staging buffers layer by layer with ``move_to_buffer``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from mp_eplb.policy import RebalanceOutcome, plan_rebalance, rebalance_outcome
from mp_eplb.protocol import WorkerTopology
from mp_eplb.transfer import move_to_buffer
from mp_eplb.transfer.communicators import EplbCommunicator, make_communicator
from mp_eplb.transfer.cuda_ipc import CudaIpcPullCommunicator
from mp_eplb.worker.failpoints import failpoint

__all__ = ["TransferWorker", "RebalancePlan", "build_worker"]

logger = logging.getLogger(__name__)


@dataclass
class RebalancePlan:
    """One rebalance on this worker: the policy's ``outcome``, identical on every rank (its
    ``layers`` are staged in that order), and this rank's staging figures."""

    rebalance_id: int
    old_phy2log: np.ndarray
    outcome: RebalanceOutcome
    policy_s: float = 0.0
    bytes_staged: int = 0
    stage_s: list[float] = field(default_factory=list)


class TransferWorker:
    """Plans and stages rebalances for one rank.

    ``weights[layer][i]``: this rank's live expert weights ``[local_slots, ...]`` (owned by the
    engine; read here, written only by the engine's ``move_from_buffer``).
    ``buffers[slot][i]``: staging buffers shaped like one layer's weights (owned by the engine).
    ``load_total``: ``[layers, logical]`` int64 tokens per logical expert over the engine's
    window, written by the engine at the rebalance request (read here only after it).
    ``group``: the workers' process group (its collectives run on tensors of
    ``collective_device``: CUDA for NCCL, CPU for gloo); ``communicator`` moves rows.
    """

    def __init__(self, *, topology: WorkerTopology, weights: list[list[torch.Tensor]],
                 buffers: list[list[torch.Tensor]], load_total: torch.Tensor,
                 group: dist.ProcessGroup, communicator: EplbCommunicator,
                 stream: torch.cuda.Stream | None,
                 collective_device: torch.device = torch.device("cpu")) -> None:
        self.topology = topology
        self.weights = weights
        self.buffers = buffers
        self.load_total = load_total
        self.group = group
        self.communicator = communicator
        self.stream = stream
        self.num_local = weights[0][0].shape[0]
        self._collective_device = collective_device

    # -- collectives among workers (no pickle: tensors only) ---------------------------------

    def _all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
        if self.topology.world_size == 1:
            return tensor
        moved = tensor.to(self._collective_device)
        dist.all_reduce(moved, op=op, group=self.group)
        return moved.cpu()

    def _broadcast_from_first(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.topology.world_size == 1:
            return tensor
        moved = tensor.to(self._collective_device)
        dist.broadcast(moved, src=dist.get_global_rank(self.group, 0), group=self.group)
        return moved.cpu()

    def agree_to_continue(self, stop_requested: bool) -> bool:
        """All workers decide together whether to stage the next layer.

        Two-sided communicators deadlock if one worker skips a layer its peers stage, so an
        abort seen by any worker stops all of them at the same layer.
        """
        flag = torch.tensor([1 if stop_requested else 0], dtype=torch.int64)
        return int(self._all_reduce(flag, dist.ReduceOp.MAX).item()) == 0

    # -- planning -------------------------------------------------------------------------

    def plan(self, rebalance_id: int, old_phy2log: np.ndarray) -> RebalancePlan:
        """Aggregate the load window over all ranks, run the policy on the first worker and
        share its result, so every rank gets the identical plan."""
        topo = self.topology
        failpoint("plan", rebalance_id)
        local = self.load_total.cpu()
        load = self._all_reduce(local.to(torch.int64).clone(), dist.ReduceOp.SUM)
        failpoint("policy", rebalance_id)
        started = time.perf_counter()
        shape = dict(num_logical=topo.num_logical, num_ranks=topo.world_size,
                     max_replicas=topo.num_redundant + 1)
        if topo.rank == 0:  # plans, then shares the placement; the others describe it
            outcome = plan_rebalance(load, old_phy2log, num_groups=topo.num_groups,
                                     num_nodes=topo.num_nodes, **shape)
            self._broadcast_from_first(torch.from_numpy(outcome.maps.phy2log))
        else:
            new = self._broadcast_from_first(torch.empty(old_phy2log.shape, dtype=torch.int64))
            outcome = rebalance_outcome(load, old_phy2log, new.numpy(), **shape)
        policy_s = time.perf_counter() - started
        logger.info("rank %d rebalance %d: %d of %d layers change (policy %.1f ms)",
                    topo.rank, rebalance_id, len(outcome.layers), old_phy2log.shape[0],
                    policy_s * 1e3)
        return RebalancePlan(rebalance_id=rebalance_id, old_phy2log=old_phy2log,
                             outcome=outcome, policy_s=policy_s)

    # -- staging --------------------------------------------------------------------------

    def stage(self, plan: RebalancePlan, layer: int, slot: int) -> None:
        """Fill staging buffer ``slot`` with this rank's new rows of ``layer``.

        Returns when the data is complete in the buffer (the worker's stream is synchronised),
        so the engine may read it and peers may overwrite the rows this rank read from them
        once every rank reports the layer ready. Appends the transfer time to
        ``plan.stage_s``: on CUDA the GPU time of the copies (from CUDA events, so waiting for
        the engine's buffer-free event is excluded), on CPU the wall time.
        """
        failpoint("stage", plan.rebalance_id)
        started = time.perf_counter()
        self.communicator.set_stream(self.stream)
        if self.stream is not None:  # GPU time of the copies, not of waiting for the engine
            begin, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            begin.record(self.stream)
        metadata = move_to_buffer(
            self.num_local, plan.old_phy2log[layer], plan.outcome.maps.phy2log[layer],
            self.weights[layer], self.buffers[slot], self.stream, self.group,
            communicator=self.communicator, layer=layer,
            ranks_per_node=self.topology.ranks_per_node,
            max_ops_per_batch=self.topology.max_ops_per_batch)
        if self.stream is not None:
            end.record(self.stream)
            self.stream.synchronize()
            plan.stage_s.append(begin.elapsed_time(end) / 1e3)
        else:
            plan.stage_s.append(time.perf_counter() - started)
        rows = int((~metadata.is_unchanged).sum())
        plan.bytes_staged += rows * sum(w[0].numel() * w.element_size() for w in self.weights[layer])


def build_worker(*, topology: WorkerTopology, communicator: str, device: torch.device,
                 weights: list[list[torch.Tensor]], buffers: list[list[torch.Tensor]],
                 load_total: torch.Tensor, group: dist.ProcessGroup,
                 weight_handles: list[list[dict]] | None = None) -> TransferWorker:
    """Assemble a worker: a side stream on CUDA, and the named communicator over ``group``.

    ``cuda_ipc`` opens every peer's weights from ``weight_handles`` (this rank's handles,
    exchanged once over ``group``); ``nccl``/``gloo`` use two-sided P2P.
    """
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    if communicator == "cuda_ipc":
        if weight_handles is None:
            raise ValueError("communicator 'cuda_ipc' needs this rank's weight handles")
        comm: EplbCommunicator = CudaIpcPullCommunicator.from_handles(
            weight_handles, group, rank=topology.rank, world_size=topology.world_size,
            device=device)
    else:
        comm = make_communicator(communicator, group, stream=stream,
                                 max_ops_per_batch=topology.max_ops_per_batch)
    collective_device = device if communicator == "nccl" else torch.device("cpu")
    return TransferWorker(topology=topology, weights=weights, buffers=buffers,
                          load_total=load_total, group=group, communicator=comm,
                          stream=stream, collective_device=collective_device)
