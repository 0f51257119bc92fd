"""Moving expert weights between EP ranks: who sends what (:mod:`.plan`, a pure function of
two maps), doing it (:mod:`.execute`, vLLM's function names), and over what
(:mod:`.communicators`: NCCL/gloo P2P, :mod:`.cuda_ipc`: copy-engine pulls)."""

from __future__ import annotations

from mp_eplb.transfer.communicators import (EplbCommunicator, GlooCommunicator,
                                            NcclCommunicator, RowRef, make_communicator)
from mp_eplb.transfer.cuda_ipc import CudaIpcPullCommunicator
from mp_eplb.transfer.execute import (move_from_buffer, move_to_buffer,
                                      rearrange_expert_weights_inplace, transfer_layer)
from mp_eplb.transfer.plan import (PlannedTransfer, TransferMetadata,
                                   get_ep_ranks_with_experts_batch, layer_metadata,
                                   plan_layer_transfers)

__all__ = [
    "CudaIpcPullCommunicator",
    "EplbCommunicator",
    "GlooCommunicator",
    "NcclCommunicator",
    "PlannedTransfer",
    "RowRef",
    "TransferMetadata",
    "get_ep_ranks_with_experts_batch",
    "layer_metadata",
    "make_communicator",
    "move_from_buffer",
    "move_to_buffer",
    "plan_layer_transfers",
    "rearrange_expert_weights_inplace",
    "transfer_layer",
]
