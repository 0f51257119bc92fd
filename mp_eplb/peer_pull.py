"""``cuda_ipc`` communicator: pull expert rows from peer GPUs with copy-engine copies.

Within a node every worker opens the other ranks' live expert weights through CUDA IPC once
at start; a receive then becomes a device-to-device ``copy_`` from the peer's row (a DMA on
the copy engines, no SM kernel, no work on the sending side). Sends are no-ops.
"""

from __future__ import annotations

import logging

import msgpack
import torch
import torch.distributed as dist

from ipc import handles
from mp_eplb.communicator import EplbCommunicator, RowRef, stream_context

__all__ = ["CudaIpcPullCommunicator", "all_gather_bytes"]

logger = logging.getLogger(__name__)


def all_gather_bytes(data: bytes, group: dist.ProcessGroup) -> list[bytes]:
    """Every rank's ``data`` over a gloo ``group`` (uint8 tensors, no pickle)."""
    size = dist.get_world_size(group)
    length = torch.tensor([len(data)], dtype=torch.int64)
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
    dist.all_gather(lengths, length, group=group)
    longest = max(int(n.item()) for n in lengths)
    mine = torch.zeros(longest, dtype=torch.uint8)
    if data:  # torch.frombuffer refuses an empty buffer
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    gathered = [torch.empty(longest, dtype=torch.uint8) for _ in range(size)]
    dist.all_gather(gathered, mine, group=group)
    return [bytes(t[: int(n.item())].numpy()) for t, n in zip(gathered, lengths)]


class CudaIpcPullCommunicator(EplbCommunicator):
    """Receives pull ``peer_weights[src_rank][layer][weight_index][row]`` into the target.

    ``peer_weights[r]`` is ``None`` for this rank (local rows never go through a
    communicator). The peer tensors stay owned by their engines; this process only maps them.
    """

    def __init__(self, peer_weights: list[list[list[torch.Tensor]] | None]) -> None:
        super().__init__()
        self._peers = peer_weights
        self._copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.ops_executed = 0

    @classmethod
    def from_handles(cls, my_handles: list[list[dict]], group: dist.ProcessGroup, *,
                     rank: int, world_size: int, device: torch.device) -> CudaIpcPullCommunicator:
        """Exchange weight handles over ``group`` (collective) and open the peers' ones,
        mapped on this worker's ``device`` so the pulls run on its streams as peer DMAs."""
        blobs = all_gather_bytes(msgpack.packb(my_handles, use_bin_type=True), group)
        peers: list[list[list[torch.Tensor]] | None] = []
        for peer, blob in enumerate(blobs):
            if peer == rank:
                peers.append(None)
                continue
            layers = msgpack.unpackb(blob, raw=False, max_bin_len=1 << 16)
            if not isinstance(layers, list):
                raise ValueError(f"rank {peer} sent weight handles that are not a list of layers")
            peers.append([[handles.open_tensor(h, map_on=device.index) for h in layer]
                          for layer in layers])
        logger.info("rank %d opened the weights of %d peer ranks through CUDA IPC", rank,
                    world_size - 1)
        return cls(peers)

    def add_send(self, tensor: torch.Tensor, dst_rank: int) -> None:
        """Nothing to do: the receiver pulls."""

    def add_recv(self, tensor: torch.Tensor, src_rank: int, *,
                 source: RowRef | None = None) -> None:
        if source is None:
            raise ValueError("the cuda_ipc communicator pulls rows: add_recv needs source=RowRef")
        peer = self._peers[src_rank]
        if peer is None:
            raise ValueError(f"rank {src_rank} is this rank; local rows are copied, not received")
        src = peer[source.layer][source.weight_index][source.row]
        if src.shape != tensor.shape or src.dtype != tensor.dtype:
            raise ValueError(f"peer row {source} is {tuple(src.shape)} {src.dtype}, the target is "
                             f"{tuple(tensor.shape)} {tensor.dtype}")
        self._copies.append((tensor, src))

    def execute(self) -> None:
        try:
            with stream_context(self._stream):
                for dst, src in self._copies:
                    dst.copy_(src, non_blocking=True)
            self.ops_executed += len(self._copies)
        finally:
            self._copies.clear()
