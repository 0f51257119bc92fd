"""The transfer subprocess after its bootstrap (:mod:`mp_eplb.worker.boot`, the entry point).

The process wrapper around :mod:`mp_eplb.worker.loop`: it connects the channel with the session
key of its :class:`~mp_eplb.worker.boot.StartInfo`, opens the handles of :class:`Setup`,
joins the workers' process group, then serves until ``Shutdown``. Any exception is sent to
the engine as :class:`WorkerError` before the process exits non-zero: with
``PEER_FAILED_EXIT`` (kind ``PEER_FAILED_KIND``) when a collective with the peer workers
failed, so the engine blames the peer rank, not this worker.
"""

from __future__ import annotations

import logging
import os
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from ipc import handles
from ipc.channel import Channel
from ipc.errors import IpcError
from ipc.events import SharedEvent
from ipc.schema import Goodbye, Hello
from mp_eplb import logs
from mp_eplb.worker.failpoints import failpoint
from mp_eplb.protocol import (PEER_FAILED_EXIT, PEER_FAILED_KIND, PROTOCOL_VERSION, Setup,
                              SetupDone, WorkerError)
from mp_eplb.worker.loop import StreamEvents, serve
from mp_eplb.worker.logic import build_worker
from mp_eplb.worker.boot import ProgressCounter, StartInfo

__all__ = ["main"]

logger = logging.getLogger(__name__)

#: What gloo says (a plain RuntimeError) when the other end of a collective is gone or
#: never came; NCCL raises ``dist.DistError`` subclasses.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting")


def _peer_failed(err: BaseException) -> bool:
    """Whether ``err`` is a collective with the peer workers failing (not this worker)."""
    return isinstance(err, dist.DistError) or (
        isinstance(err, RuntimeError) and any(text in str(err) for text in _PEER_GONE))


def _open_setup(setup: Setup, progress: ProgressCounter):
    device = torch.device(setup.device)
    if device.type == "cuda":
        with progress.waiting(setup.layer_timeout_s):  # CUDA context creation
            torch.cuda.set_device(device)
    weights = [[handles.open_tensor(h) for h in layer] for layer in setup.weights]
    buffers = [[handles.open_tensor(h) for h in slot] for slot in setup.buffers]
    load_total = handles.open_tensor(setup.load_total)
    events = [SharedEvent.open(h) for h in setup.events]
    backend = "nccl" if setup.communicator == "nccl" else "gloo"
    with progress.waiting(setup.layer_timeout_s):  # meets the peers, which may be slow
        dist.init_process_group(backend, init_method=setup.rendezvous, rank=setup.topology.rank,
                                world_size=setup.topology.world_size,
                                timeout=timedelta(seconds=setup.layer_timeout_s),
                                device_id=device if backend == "nccl" else None)
        worker = build_worker(topology=setup.topology, communicator=setup.communicator,
                              device=device, weights=weights, buffers=buffers,
                              load_total=load_total, group=dist.group.WORLD,
                              weight_handles=setup.weights)
    return worker, StreamEvents(events, setup.layer_timeout_s)


def main(info: StartInfo, progress: ProgressCounter) -> int:
    """Serve the engine described by ``info``, advancing ``progress``; the exit status."""
    logs.configure(f"worker[{os.getpid()}]")  # MP_EPLB_LOG, inherited from the engine
    channel = Channel.connect(info.endpoint, bytes.fromhex(info.key))
    try:
        channel.send(Hello(protocol_version=PROTOCOL_VERSION, pid=os.getpid(), role="eplb-worker"))
        with progress.waiting(info.start_timeout_s):  # the engine answers at its next step
            setup = channel.recv(timeout=info.start_timeout_s)
        if not isinstance(setup, Setup):
            raise TypeError(f"expected Setup first, got {type(setup).__name__}")
        failpoint("setup")
        worker, events = _open_setup(setup, progress)
        channel.send(SetupDone(pid=os.getpid()))
        serve(worker, channel, events, num_slots=len(setup.buffers),
              layer_timeout_s=setup.layer_timeout_s, progress=progress.add)
        channel.send(Goodbye(reason="shutdown requested", exit_code=0))
        return 0
    except BaseException as err:
        logger.error("transfer worker failed:\n%s", traceback.format_exc())
        peer = _peer_failed(err)
        try:
            channel.send(WorkerError(kind=PEER_FAILED_KIND if peer else type(err).__name__,
                                     detail=str(err)[:2000]))
        except IpcError:
            pass
        return PEER_FAILED_EXIT if peer else 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        handles.close_all()
        channel.close()
