"""mp_eplb: expert-parallel load balancing with the weight transfer in a subprocess.

The engine-facing entry point is :class:`EplbState` (configured by :class:`EplbConfig`).
The functions named like vLLM's (``rebalance_experts``, ``move_to_buffer``,
``move_from_buffer``, ``transfer_layer``, ``rearrange_expert_weights_inplace``) keep vLLM's
semantics so an engine can switch.
"""

from mp_eplb.communicator import (EplbCommunicator, GlooCommunicator, NcclCommunicator, RowRef,
                                  make_communicator)
from mp_eplb.config import EplbConfig
from mp_eplb.errors import (EplbError, InvalidLoadError, PlacementFileError, StateClosedError,
                            VllmConfigError, WorkerFailedError, WorkerStartError)
from mp_eplb.maps import RoutingMaps, maps_from_phy2log
from mp_eplb.peer_pull import CudaIpcPullCommunicator
from mp_eplb.placement import Placement, load_placement, save_placement
from mp_eplb.policy import balancedness, mean_balancedness, rebalance_experts
from mp_eplb.state import EplbState, RebalanceRecord, StepReport
from mp_eplb.transfer import (TransferMetadata, get_ep_ranks_with_experts_batch, move_from_buffer,
                              move_to_buffer, rearrange_expert_weights_inplace, transfer_layer)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "EplbConfig", "EplbState", "StepReport", "RebalanceRecord",
    "EplbError", "InvalidLoadError", "StateClosedError", "WorkerFailedError", "WorkerStartError",
    "PlacementFileError", "VllmConfigError",
    "rebalance_experts", "balancedness", "mean_balancedness", "RoutingMaps", "maps_from_phy2log",
    "Placement", "save_placement", "load_placement",
    "TransferMetadata", "get_ep_ranks_with_experts_batch", "move_to_buffer", "move_from_buffer",
    "transfer_layer", "rearrange_expert_weights_inplace",
    "EplbCommunicator", "NcclCommunicator", "GlooCommunicator", "CudaIpcPullCommunicator",
    "RowRef", "make_communicator",
]
