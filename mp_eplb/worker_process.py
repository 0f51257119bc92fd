"""Entry point of the transfer subprocess: ``python -m mp_eplb.worker_process``.

The process wrapper around :mod:`mp_eplb.serve`: it watches its parent, connects the
channel with the session key from its environment, opens the handles of :class:`Setup`,
joins the workers' process group, then serves until ``Shutdown``. Any exception is sent
to the engine as :class:`WorkerError` before the process exits non-zero.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from ipc import handles
from ipc.channel import Channel
from ipc.codec import key_from_env
from ipc.errors import IpcError
from ipc.events import SharedEvent
from ipc.schema import Goodbye, Hello
from mp_eplb import logs
from mp_eplb.backends import ENDPOINT_ENV, PARENT_PID_ENV, START_TIMEOUT_ENV
from mp_eplb.failpoints import arm_from_env, failpoint
from mp_eplb.messages import PROTOCOL_VERSION, Setup, SetupDone, WorkerError
from mp_eplb.serve import StreamEvents, serve
from mp_eplb.worker import build_worker

__all__ = ["main"]

logger = logging.getLogger("mp_eplb.worker_process")

#: Seconds between checks that the parent is still alive (backs up PR_SET_PDEATHSIG).
PARENT_CHECK_S = 0.2
_PR_SET_PDEATHSIG = 1


def _watch_parent(parent_pid: int) -> None:
    """Die with the parent: PR_SET_PDEATHSIG (Linux) plus a getppid poll on a thread."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        logger.debug("PR_SET_PDEATHSIG unavailable; relying on the parent poll")
    if os.getppid() != parent_pid:
        os._exit(3)

    def poll() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(3)
            time.sleep(PARENT_CHECK_S)

    threading.Thread(target=poll, name="parent-watch", daemon=True).start()


def _open_setup(setup: Setup):
    device = torch.device(setup.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    weights = [[handles.open_tensor(h) for h in layer] for layer in setup.weights]
    buffers = [[handles.open_tensor(h) for h in slot] for slot in setup.buffers]
    load_total = handles.open_tensor(setup.load_total)
    events = [SharedEvent.open(h) for h in setup.events]
    progress = handles.open_tensor(setup.progress, expect={"shape": (1,), "dtype": torch.int64,
                                                           "device": "cpu"})
    backend = "nccl" if setup.communicator == "nccl" else "gloo"
    dist.init_process_group(backend, init_method=setup.rendezvous, rank=setup.topology.rank,
                            world_size=setup.topology.world_size,
                            timeout=timedelta(seconds=setup.collective_timeout_s),
                            device_id=device if backend == "nccl" else None)
    worker = build_worker(topology=setup.topology, communicator=setup.communicator, device=device,
                          weights=weights, buffers=buffers, load_total=load_total,
                          group=dist.group.WORLD, weight_handles=setup.weights)
    return worker, StreamEvents(events, setup.collective_timeout_s), progress


def main() -> int:
    logs.configure(f"worker[{os.getpid()}]")  # MP_EPLB_LOG, inherited from the engine
    _watch_parent(int(os.environ[PARENT_PID_ENV]))
    arm_from_env()
    channel = Channel.connect(os.environ[ENDPOINT_ENV], key_from_env())
    rebalance_id = -1
    try:
        channel.send(Hello(protocol_version=PROTOCOL_VERSION, pid=os.getpid(), role="eplb-worker"))
        setup = channel.recv(timeout=float(os.environ[START_TIMEOUT_ENV]))
        if not isinstance(setup, Setup):
            raise TypeError(f"expected Setup first, got {type(setup).__name__}")
        failpoint("setup")
        worker, events, progress = _open_setup(setup)
        channel.send(SetupDone(pid=os.getpid()))
        serve(worker, channel, events, num_slots=len(setup.buffers),
              layer_timeout_s=setup.collective_timeout_s, progress=lambda: progress.add_(1))
        channel.send(Goodbye(reason="shutdown requested", exit_code=0))
        return 0
    except BaseException as err:
        logger.error("transfer worker failed:\n%s", traceback.format_exc())
        try:
            channel.send(WorkerError(rebalance_id=rebalance_id, kind=type(err).__name__,
                                     detail=str(err)[:2000]))
        except IpcError:
            pass
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        handles.close_all()
        channel.close()


if __name__ == "__main__":
    sys.exit(main())
