"""EplbConfig: every knob of the load balancer, validated at construction."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from mp_eplb.errors import VllmConfigError

__all__ = ["EplbConfig", "MODES", "COMMUNICATORS", "VLLM_COMMUNICATORS", "VLLM_FIELDS"]

MODES = ("process", "thread", "sync")
COMMUNICATORS = ("auto", "cuda_ipc", "nccl", "gloo")
#: vLLM's ``EPLBConfig.communicator`` names -> ours.
VLLM_COMMUNICATORS = {"torch_nccl": "nccl", "pynccl": "nccl", "torch_gloo": "gloo"}
#: vLLM ``EPLBConfig`` fields taken over under the same name and meaning.
VLLM_FIELDS = ("window_size", "step_interval", "num_redundant_experts", "log_balancedness",
               "log_balancedness_interval")
#: A placement: a ``.json``/``.pt`` file (:mod:`mp_eplb.placement`) or ``[layers, physical]`` ids.
PlacementSource = str | os.PathLike | np.ndarray | torch.Tensor


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
    #: Log the current window's balancedness (mean over layers of mean / max tokens per rank,
    #: all ranks' load) at INFO on rank 0 every ``log_balancedness_interval`` steps. A
    #: collective over the engine's CPU group at those steps (vLLM's names and meaning).
    log_balancedness: bool = False
    log_balancedness_interval: int = 1
    #: Placement to start from (a ``.json``/``.pt`` placement file or ``[layers, physical]``
    #: ids). When it differs from the layout the weights were loaded in, the weights are moved
    #: to it in the constructor (collective), before any worker starts.
    initial_phy2log: PlacementSource | None = field(default=None, compare=False)
    #: The layout the engine loaded the weights in (same forms). ``None``: the constructor's
    #: ``initial_phy2log`` argument, else :func:`mp_eplb.maps.default_phy2log`.
    loaded_phy2log: PlacementSource | None = field(default=None, compare=False)

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
        _require("log_balancedness", self.log_balancedness, lambda v: isinstance(v, bool),
                 "True or False")
        _require("log_balancedness_interval", self.log_balancedness_interval,
                 lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                 "a positive integer")
        for name in ("initial_phy2log", "loaded_phy2log"):
            _require(name, getattr(self, name),
                     lambda v: v is None or isinstance(v, PlacementSource),
                     "None, a placement file path or a [layers, physical] array")

    @classmethod
    def from_vllm(cls, vllm_config: Mapping[str, Any] | object | None = None,
                  **overrides: Any) -> EplbConfig:
        """An ``EplbConfig`` from vLLM's EPLB settings (``vllm_config``: a mapping or an object
        such as vLLM's ``EPLBConfig``; keyword arguments override its entries).

        Same name and meaning: :data:`VLLM_FIELDS`. ``use_async`` -> ``mode`` (``True``:
        ``"process"``, the transfer off the engine's thread; ``False``: ``"sync"``);
        ``communicator`` via :data:`VLLM_COMMUNICATORS`; ``policy`` must be ``"default"``;
        ``None`` values are skipped. Any other name, or a value with no equivalent, raises
        :class:`~mp_eplb.errors.VllmConfigError` saying what differs. Our own field names
        are accepted too (e.g. ``ranks_per_node``).
        """
        if vllm_config is None:
            settings: dict[str, Any] = {}
        elif isinstance(vllm_config, Mapping):
            settings = dict(vllm_config)
        else:
            settings = {k: v for k, v in vars(vllm_config).items() if not k.startswith("_")}
        settings.update(overrides)
        own = {f.name for f in dataclasses.fields(cls)}
        fields: dict[str, Any] = {}
        for name, value in settings.items():
            if value is None:
                continue
            if name == "use_async":
                fields["mode"] = "process" if value else "sync"
            elif name == "communicator":
                fields[name] = _vllm_communicator(value)
            elif name == "policy":
                if value != "default":
                    raise VllmConfigError(
                        f"vLLM EPLB policy {value!r} is not available; mp_eplb has one policy "
                        "(DeepSeek's hierarchical packing, placement-aware): pass 'default'")
            elif name in own:  # VLLM_FIELDS are EplbConfig fields
                fields[name] = value
            else:
                raise VllmConfigError(
                    f"vLLM EPLB setting {name!r} has no mp_eplb equivalent; mapped: "
                    f"{', '.join(VLLM_FIELDS + ('use_async', 'communicator', 'policy'))} "
                    "(see docs/operations.md)")
        return cls(**fields)

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


def _vllm_communicator(name: object) -> str:
    if name in VLLM_COMMUNICATORS:
        return VLLM_COMMUNICATORS[name]
    if name in COMMUNICATORS:
        return name
    raise VllmConfigError(f"vLLM EPLB communicator {name!r} has no mp_eplb equivalent; use one "
                          f"of {tuple(VLLM_COMMUNICATORS)} or ours {COMMUNICATORS}")


def _require(name: str, value: object, ok, what: str) -> None:
    if not ok(value):
        raise ValueError(f"EplbConfig.{name} must be {what}, got {value!r}")
