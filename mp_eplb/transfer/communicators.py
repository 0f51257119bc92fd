"""Point-to-point communicators used to move expert rows between EP ranks.

One small interface, :class:`EplbCommunicator`, with the same method names as vLLM's
``eplb_communicator`` (``add_send``, ``add_recv``, ``execute``, ``set_stream``). Ranks are
*group* ranks of the process group the communicator was built on.

Contract shared by every implementation:

- ``add_send``/``add_recv`` only queue an operation; nothing moves before ``execute()``.
  Queued tensors must stay alive and unmodified until ``execute()`` returns.
- ``execute()`` runs the queued operations in the order they were added, in batches of at
  most ``max_ops_per_batch`` operations, waiting for each batch before posting the next.
  Deadlock freedom therefore relies on the caller: both sides of every transfer must add
  their operations in the same global order (``move_to_buffer`` does).
- ``add_recv`` takes an optional :class:`RowRef` naming the sender's local row that the
  receiver wants. Two-sided communicators ignore it; a pull-based communicator (CUDA IPC
  copy-engine reads) uses it and ignores ``add_send``.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_MAX_OPS_PER_BATCH",
    "COMMUNICATOR_NAMES",
    "RowRef",
    "EplbCommunicator",
    "NcclCommunicator",
    "GlooCommunicator",
    "make_communicator",
    "default_communicator",
    "stream_context",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_OPS_PER_BATCH = 32
"""Operations per ``batch_isend_irecv`` call. Large batches of P2P ops (over ~1k per
layer) hang NCCL; SGLang uses 32."""

COMMUNICATOR_NAMES = ("gloo", "nccl")
"""Names accepted by :func:`make_communicator`."""


@dataclass(frozen=True)
class RowRef:
    """The sender's local row that a receive wants.

    ``layer`` is the MoE layer index, ``weight_index`` the position of the tensor in that
    layer's weight list, ``row`` the local slot (first dimension) on the sending rank.
    """

    layer: int
    weight_index: int
    row: int


class EplbCommunicator(ABC):
    """Queues P2P sends/receives of expert rows and executes them in bounded batches."""

    def __init__(self) -> None:
        self._stream: torch.cuda.Stream | None = None

    @abstractmethod
    def add_send(self, tensor: torch.Tensor, dst_rank: int) -> None:
        """Queue sending ``tensor`` (contiguous) to group rank ``dst_rank``."""

    @abstractmethod
    def add_recv(
        self, tensor: torch.Tensor, src_rank: int, *, source: RowRef | None = None
    ) -> None:
        """Queue receiving into ``tensor`` (contiguous) from group rank ``src_rank``;
        ``source`` names the sender's row (used by pull-based communicators)."""

    @abstractmethod
    def execute(self) -> None:
        """Run every queued operation and clear the queue (also when an operation fails).
        On return the data is on the host (CPU tensors) or ordered before any later work
        on the communicator's stream (CUDA tensors)."""

    def set_stream(self, stream: torch.cuda.Stream | None) -> None:
        """Run CUDA work on ``stream`` (``None``: the current stream)."""
        self._stream = stream


@dataclass(frozen=True)
class _QueuedOp:
    is_send: bool
    tensor: torch.Tensor
    peer: int  # group rank


def stream_context(stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager:
    """``torch.cuda.stream(stream)``, or a no-op context for ``None`` (also without CUDA)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


class _TorchP2PCommunicator(EplbCommunicator):
    """Shared queueing and chunking over ``torch.distributed.batch_isend_irecv``.

    ``ops_executed`` and ``batches_executed`` count what ``execute()`` has posted since
    construction (for metrics and tests).
    """

    def __init__(
        self,
        group: dist.ProcessGroup,
        *,
        stream: torch.cuda.Stream | None = None,
        max_ops_per_batch: int = DEFAULT_MAX_OPS_PER_BATCH,
    ) -> None:
        super().__init__()
        if isinstance(max_ops_per_batch, bool) or not isinstance(max_ops_per_batch, int):
            raise ValueError(f"max_ops_per_batch must be an int >= 1, got {max_ops_per_batch!r}")
        if max_ops_per_batch < 1:
            raise ValueError(f"max_ops_per_batch must be >= 1, got {max_ops_per_batch}")
        self._group = group
        self._rank = dist.get_rank(group)
        self._size = dist.get_world_size(group)
        self._global_ranks = [dist.get_global_rank(group, r) for r in range(self._size)]
        self._stream = stream
        self.max_ops_per_batch = max_ops_per_batch
        self._ops: list[_QueuedOp] = []
        self.ops_executed = 0
        self.batches_executed = 0

    def _queue(self, is_send: bool, tensor: torch.Tensor, peer: int) -> None:
        if not 0 <= peer < self._size or peer == self._rank:
            raise ValueError(
                f"peer rank {peer} is invalid for rank {self._rank} of a group of "
                f"{self._size}: pass another rank of the group"
            )
        if not tensor.is_contiguous():
            raise ValueError("P2P tensors must be contiguous: pass a contiguous row view")
        self._check_device(tensor)
        self._ops.append(_QueuedOp(is_send, tensor, peer))

    def add_send(self, tensor: torch.Tensor, dst_rank: int) -> None:
        self._queue(True, tensor, dst_rank)

    def add_recv(
        self, tensor: torch.Tensor, src_rank: int, *, source: RowRef | None = None
    ) -> None:
        self._queue(False, tensor, src_rank)

    def _chunks(self) -> Iterator[Sequence[_QueuedOp]]:
        step = self.max_ops_per_batch
        for start in range(0, len(self._ops), step):
            yield self._ops[start : start + step]

    def execute(self) -> None:
        try:
            for chunk in self._chunks():
                self._run_batch(chunk)
                self.ops_executed += len(chunk)
                self.batches_executed += 1
        finally:
            self._ops.clear()

    def _p2p_op(self, op: _QueuedOp, tensor: torch.Tensor) -> dist.P2POp:
        fn = dist.isend if op.is_send else dist.irecv
        return dist.P2POp(fn, tensor, self._global_ranks[op.peer], self._group)

    def _check_device(self, tensor: torch.Tensor) -> None:
        """Raise ValueError when this communicator cannot move ``tensor``."""

    @abstractmethod
    def _run_batch(self, ops: Sequence[_QueuedOp]) -> None:
        """Post ``ops`` as one batch and wait for them."""


class NcclCommunicator(_TorchP2PCommunicator):
    """NCCL P2P through ``batch_isend_irecv`` on the communicator's stream, chunked.

    CUDA tensors only. torch requires the first operation on an NCCL group to involve all
    its ranks: run a collective on the group (or init it with ``device_id``) before the
    first ``execute()``; ``rearrange_expert_weights_inplace`` does so.
    """

    def _check_device(self, tensor: torch.Tensor) -> None:
        if not tensor.is_cuda:
            raise ValueError("NcclCommunicator moves CUDA tensors only: use GlooCommunicator")

    def _run_batch(self, ops: Sequence[_QueuedOp]) -> None:
        with stream_context(self._stream):
            reqs = dist.batch_isend_irecv([self._p2p_op(op, op.tensor) for op in ops])
            for req in reqs:
                req.wait()


class GlooCommunicator(_TorchP2PCommunicator):
    """gloo P2P. CPU tensors go directly; CUDA tensors are staged through pinned host
    memory: device→host copies on the stream, a stream synchronize before sending, and
    host→device copies of received data queued on the stream after the batch."""

    def _run_batch(self, ops: Sequence[_QueuedOp]) -> None:
        p2p_ops: list[dist.P2POp] = []
        staged_recvs: list[tuple[torch.Tensor, torch.Tensor]] = []
        staged_send = False
        with stream_context(self._stream):
            for op in ops:
                host = op.tensor
                if op.tensor.is_cuda:
                    host = torch.empty(op.tensor.shape, dtype=op.tensor.dtype, pin_memory=True)
                    if op.is_send:
                        host.copy_(op.tensor, non_blocking=True)
                        staged_send = True
                    else:
                        staged_recvs.append((op.tensor, host))
                p2p_ops.append(self._p2p_op(op, host))
            if staged_send:
                (self._stream or torch.cuda.current_stream()).synchronize()
        for req in dist.batch_isend_irecv(p2p_ops):
            req.wait()
        with stream_context(self._stream):
            for device_tensor, host in staged_recvs:
                device_tensor.copy_(host, non_blocking=True)


def make_communicator(
    name: str,
    group: dist.ProcessGroup,
    *,
    stream: torch.cuda.Stream | None = None,
    max_ops_per_batch: int = DEFAULT_MAX_OPS_PER_BATCH,
) -> EplbCommunicator:
    """Build the communicator called ``name`` (one of :data:`COMMUNICATOR_NAMES`)."""
    if name == "nccl":
        return NcclCommunicator(group, stream=stream, max_ops_per_batch=max_ops_per_batch)
    if name == "gloo":
        return GlooCommunicator(group, stream=stream, max_ops_per_batch=max_ops_per_batch)
    raise ValueError(
        f"unknown communicator {name!r}: choose one of {', '.join(COMMUNICATOR_NAMES)}"
    )


def default_communicator(
    group: dist.ProcessGroup,
    device: torch.device,
    *,
    stream: torch.cuda.Stream | None = None,
    max_ops_per_batch: int = DEFAULT_MAX_OPS_PER_BATCH,
) -> EplbCommunicator:
    """The communicator for tensors on ``device``: NCCL for CUDA tensors on a group with
    an NCCL backend, gloo otherwise (CUDA tensors staged through host memory)."""
    backend = str(dist.get_backend(group)).lower()
    if device.type == "cuda" and "nccl" in backend:
        name = "nccl"
    elif "gloo" in backend:
        name = "gloo"
    else:
        raise ValueError(
            f"no communicator moves {device.type} tensors over a {backend!r} group: "
            "use a gloo group for CPU tensors, or pass a communicator"
        )
    return make_communicator(name, group, stream=stream, max_ops_per_batch=max_ops_per_batch)
