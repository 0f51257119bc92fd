"""EplbConfig: every knob of the load balancer, validated at construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

__all__ = ["EplbConfig", "MODES", "COMMUNICATORS"]

MODES = ("process", "thread", "sync")
COMMUNICATORS = ("auto", "cuda_ipc", "nccl", "gloo")


@dataclass(frozen=True)
class EplbConfig:
    """Settings of :class:`mp_eplb.EplbState`. Bad values raise ``ValueError`` naming the field.

    Steps are engine forward steps; times are seconds.
    """

    #: Steps of per-expert load kept in the sliding window the policy reads.
    window_size: int = 1000
    #: A rebalance starts every ``step_interval`` steps (at steps that are multiples of it).
    step_interval: int = 3000
    #: Physical slots beyond one per logical expert (replicas of hot experts).
    num_redundant_experts: int = 0
    #: ``process``: transfer subprocess per rank (default); ``thread``: a thread in the engine
    #: process (vLLM-style baseline); ``sync``: one blocking rearrangement at the interval.
    mode: Literal["process", "thread", "sync"] = "process"
    #: How weights move between ranks. ``auto``: ``cuda_ipc`` on CUDA within one node,
    #: ``nccl`` on CUDA across nodes, ``gloo`` on CPU.
    communicator: Literal["auto", "cuda_ipc", "nccl", "gloo"] = "auto"
    #: At most this many layers are switched (``move_from_buffer`` + maps) in one step.
    layers_per_step: int = 1
    #: Staging buffers (each holds one layer of this rank's slots). Two let the worker fill
    #: the next layer while the engine copies out of the previous one.
    num_staging_buffers: int = 2
    #: Ranks per node, for sender choice and the hierarchical policy. ``None``: one node.
    ranks_per_node: int | None = None
    #: P2P operations issued per batch (chunking avoids hangs on large batches).
    max_ops_per_batch: int = 32
    #: Seconds to wait for the transfer worker to start and answer the handshake.
    start_timeout_s: float = 120.0
    #: Seconds the engine waits for the next layer of a rebalance before abandoning it.
    layer_timeout_s: float = 60.0
    #: Seconds without worker progress (while it has work) before it is declared hung.
    heartbeat_timeout_s: float = 10.0
    #: ``tcp://host:port`` where the workers' own process group meets. ``None``: rank 0 picks
    #: a free port on 127.0.0.1 and shares it over the engine's CPU group (single node only:
    #: process mode on more than one node needs an address every node reaches).
    rendezvous: str | None = None
    #: ZeroMQ transport between the engine and its worker: ``ipc`` (private socket dir) or ``tcp``.
    endpoint: Literal["ipc", "tcp"] = "ipc"

    def __post_init__(self) -> None:
        for name in ("window_size", "step_interval", "layers_per_step", "max_ops_per_batch"):
            _require(name, getattr(self, name), lambda v: isinstance(v, int) and v >= 1,
                     "a positive integer")
        _require("num_redundant_experts", self.num_redundant_experts,
                 lambda v: isinstance(v, int) and v >= 0, "a non-negative integer")
        _require("num_staging_buffers", self.num_staging_buffers,
                 lambda v: isinstance(v, int) and v >= 1, "an integer >= 1 (2 to overlap)")
        _require("mode", self.mode, lambda v: v in MODES, f"one of {MODES}")
        _require("communicator", self.communicator, lambda v: v in COMMUNICATORS,
                 f"one of {COMMUNICATORS}")
        _require("ranks_per_node", self.ranks_per_node,
                 lambda v: v is None or (isinstance(v, int) and v >= 1), "None or an integer >= 1")
        for name in ("start_timeout_s", "layer_timeout_s", "heartbeat_timeout_s"):
            _require(name, getattr(self, name),
                     lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
                     "a positive number of seconds")
        _require("rendezvous", self.rendezvous,
                 lambda v: v is None or (isinstance(v, str) and v.startswith("tcp://")
                                         and v.rsplit(":", 1)[-1].isdigit()),
                 "None or 'tcp://host:port'")
        _require("endpoint", self.endpoint, lambda v: v in ("ipc", "tcp"), "'ipc' or 'tcp'")

    def replace(self, **changes: object) -> EplbConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def resolved_communicator(self, device_type: str, num_nodes: int = 1) -> str:
        """The communicator to use for weights on ``device_type`` (``cpu`` or ``cuda``) across
        ``num_nodes`` nodes (``world_size // ranks_per_node``).

        Thread mode moves weights with gloo only: NCCL from a second thread beside the
        engine's own NCCL collectives deadlocked on the H200 pair (the engine's all-to-all
        never completed; vLLM refuses NCCL in async mode for the same reason), and
        ``cuda_ipc`` needs the weights in shareable allocations, which only process mode makes.
        ``cuda_ipc`` opens peers' memory, so it works within one node only: ``auto`` picks
        ``nccl`` for CUDA weights on more than one node.
        """
        if self.mode == "thread":
            if self.communicator not in ("auto", "gloo"):
                raise ValueError(f"EplbConfig.communicator={self.communicator!r} is not available "
                                 "in thread mode (NCCL beside the engine's collectives can "
                                 "deadlock); use 'gloo', or mode 'process'")
            return "gloo"
        if self.communicator == "auto":
            if device_type != "cuda":
                return "gloo"
            return "cuda_ipc" if num_nodes == 1 else "nccl"
        if device_type == "cpu" and self.communicator in ("cuda_ipc", "nccl"):
            raise ValueError(f"EplbConfig.communicator={self.communicator!r} needs CUDA weights; "
                             "use 'gloo' (or 'auto') for CPU weights")
        if self.communicator == "cuda_ipc" and num_nodes > 1:
            raise ValueError(f"EplbConfig.communicator='cuda_ipc' works within one node, but the "
                             f"ranks span {num_nodes} nodes (EplbConfig.ranks_per_node="
                             f"{self.ranks_per_node}); use 'nccl' (or 'auto')")
        return self.communicator


def _require(name: str, value: object, ok, what: str) -> None:
    if not ok(value):
        raise ValueError(f"EplbConfig.{name} must be {what}, got {value!r}")
