"""Run a function in N real processes joined by a torch.distributed group (tests only).

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes; each one
joins a process group (gloo by default) through a TCPStore that the parent hosts on
127.0.0.1 (port chosen by the OS, so no free-port race), calls
``fn(rank, world_size, *args)`` and sends back its return value. The parent returns the
values in rank order, or raises :class:`DistributedRunError` carrying every rank's
traceback when a rank raised, died or did not finish within ``timeout_s``; on any
outcome every child is terminated, then killed, and joined.

``fn`` must be a module-level function and its arguments/results picklable (this is the
local multiprocessing pipe between the test and its children, not a project wire).
With an NCCL backend each rank first selects GPU ``rank % device_count``.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ipc.procs import stop_processes

__all__ = ["DistributedRunError", "run_distributed"]

_HOST = "127.0.0.1"
_JOIN_TIMEOUT_S = 5.0
_POLL_S = 0.1


class DistributedRunError(RuntimeError):
    """Some rank failed, died or timed out; ``failures`` maps rank -> description."""

    def __init__(self, failures: dict[int, str]) -> None:
        self.failures = failures
        details = "\n".join(f"--- rank {r} ---\n{msg}" for r, msg in sorted(failures.items()))
        super().__init__(f"{len(failures)} rank(s) failed:\n{details}")


def _child(
    rank: int, world_size: int, port: int, backend: str, timeout_s: float,
    results: mp.Queue, fn: Callable[..., Any], args: tuple[Any, ...],
) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        device_id = None
        if "nccl" in backend:
            device_id = torch.device("cuda", rank % torch.cuda.device_count())
            torch.cuda.set_device(device_id)
        store = dist.TCPStore(_HOST, port, world_size + 1, is_master=False,
                              timeout=datetime.timedelta(seconds=timeout_s))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device_id)
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, value))
    except BaseException:  # report everything, including KeyboardInterrupt, to the parent
        results.put((rank, False, traceback.format_exc()))


def _stop(procs: list[mp.process.BaseProcess]) -> None:
    # Children that reported exit on their own (running their atexit hooks, which release
    # shared memory); only stragglers are terminated, then killed.
    stop_processes(procs, _JOIN_TIMEOUT_S, _JOIN_TIMEOUT_S)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 120.0,
) -> list[Any]:
    """``[fn(rank, world_size, *args) for each rank]``, computed in ``world_size`` spawned
    processes of one process group. ``timeout_s`` bounds the whole run and every
    collective inside it."""
    ctx = mp.get_context("spawn")
    store = dist.TCPStore(_HOST, 0, world_size + 1, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout_s))
    results: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=_child, name=f"dist-rank{rank}", daemon=True,
                         args=(rank, world_size, store.port, backend, timeout_s, results, fn, args))
             for rank in range(world_size)]
    values: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    try:
        for proc in procs:
            proc.start()
        while len(values) + len(failures) < world_size:
            try:
                rank, ok, value = results.get(timeout=_POLL_S)
            except queue.Empty:
                pending = [r for r in range(world_size) if r not in values and r not in failures]
                for r in pending:
                    if procs[r].exitcode is not None and procs[r].exitcode != 0:
                        failures[r] = f"exited with code {procs[r].exitcode} without a result"
                if time.monotonic() > deadline:
                    for r in pending:
                        failures.setdefault(r, f"no result within timeout_s={timeout_s}")
                continue
            (values if ok else failures)[rank] = value
    finally:
        _stop(procs)
        results.close()
        results.join_thread()
        del store
    if failures:
        raise DistributedRunError(failures)
    return [values[r] for r in range(world_size)]
