"""mp_eplb: expert-parallel load balancing with the weight transfer in a subprocess.

The engine-facing entry point is :class:`EplbState` (configured by :class:`EplbConfig`).
The functions named like vLLM's (``rebalance_experts``, ``move_to_buffer``,
``move_from_buffer``, ``transfer_layer``, ``rearrange_expert_weights_inplace``) keep vLLM's
semantics so an engine can switch.

The names below are imported on first use, so the transfer subprocess's bootstrap
(:mod:`mp_eplb.worker.boot`) starts without importing torch. Importing the package names what
:mod:`ipc` creates ``mp_eplb``-first (shared segments ``mp_eplb_...``, socket directories
``mp_eplb-ipc-...``), in the engine and its workers alike.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import ipc

#: The :mod:`ipc` name prefix of every mp_eplb process (see :func:`ipc.set_name_prefix`).
IPC_NAME_PREFIX = "mp_eplb"
ipc.set_name_prefix(IPC_NAME_PREFIX)

if TYPE_CHECKING:
    from mp_eplb.transfer.communicators import (EplbCommunicator, GlooCommunicator, NcclCommunicator,
                                      RowRef, make_communicator)
    from mp_eplb.config import EplbConfig
    from mp_eplb.errors import (EplbError, InvalidLoadError, PeerFailedError,
                                PlacementFileError, StateClosedError, VllmConfigError,
                                WorkerFailedError, WorkerStartError)
    from mp_eplb.maps import RoutingMaps, maps_from_phy2log
    from mp_eplb.transfer.cuda_ipc import CudaIpcPullCommunicator
    from mp_eplb.placement import Placement, load_placement, save_placement
    from mp_eplb.policy import balancedness, mean_balancedness, rebalance_experts
    from mp_eplb.engine.state import EplbState, RebalanceRecord, StepReport
    from mp_eplb.transfer import (TransferMetadata, get_ep_ranks_with_experts_batch,
                                  move_from_buffer, move_to_buffer,
                                  rearrange_expert_weights_inplace, transfer_layer)

__version__ = "0.1.0"

_EXPORTS = {
    "mp_eplb.config": ("EplbConfig",),
    "mp_eplb.engine.state": ("EplbState", "StepReport", "RebalanceRecord"),
    "mp_eplb.errors": ("EplbError", "InvalidLoadError", "StateClosedError", "WorkerFailedError",
                       "PeerFailedError", "WorkerStartError", "PlacementFileError",
                       "VllmConfigError"),
    "mp_eplb.policy": ("rebalance_experts", "balancedness", "mean_balancedness"),
    "mp_eplb.placement": ("Placement", "save_placement", "load_placement"),
    "mp_eplb.maps": ("RoutingMaps", "maps_from_phy2log"),
    "mp_eplb.transfer": ("TransferMetadata", "get_ep_ranks_with_experts_batch", "move_to_buffer",
                         "move_from_buffer", "transfer_layer",
                         "rearrange_expert_weights_inplace"),
    "mp_eplb.transfer.communicators": ("EplbCommunicator", "NcclCommunicator", "GlooCommunicator",
                             "RowRef", "make_communicator"),
    "mp_eplb.transfer.cuda_ipc": ("CudaIpcPullCommunicator",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = ["__version__", *_MODULE_OF]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'mp_eplb' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
