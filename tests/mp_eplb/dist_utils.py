"""Run a function in N real processes joined by a torch.distributed group (tests only).

``run_distributed(fn, world_size, *args)`` starts ``world_size`` rank processes through
:func:`mp_eplb.ranks.launch_ranks`; each joins a process group (gloo by default) at the
launcher's ``MASTER_ADDR``/``MASTER_PORT``, calls ``fn(rank, world_size, *args)`` and sends
back its return value. The parent returns the values in rank order, or raises
:class:`~mp_eplb.ranks.RankFailure` naming every rank that raised, died or did not finish
within ``timeout_s`` (tracebacks in its ``tracebacks``); no child outlives the call.

``fn`` must be a module-level function and its arguments/results picklable. With an NCCL
backend each rank first selects GPU ``rank % device_count``.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from mp_eplb.ranks import launch_ranks

__all__ = ["run_distributed"]


def _child(rank: int, world_size: int, backend: str, timeout_s: float, fn: Callable[..., Any],
           args: tuple[Any, ...]) -> Any:
    device_id = None
    if "nccl" in backend:
        device_id = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device_id)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s), device_id=device_id)
    return fn(rank, world_size, *args)


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
    return launch_ranks(_child, world_size, (backend, timeout_s, fn, args), timeout_s=timeout_s,
                        name="dist-rank").values()
