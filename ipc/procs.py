"""Stopping child processes with escalation: join, then terminate, then kill."""

from __future__ import annotations

import time
from collections.abc import Sequence
from multiprocessing.process import BaseProcess

__all__ = ["stop_processes"]


def stop_processes(procs: Sequence[BaseProcess], grace_s: float, escalate_s: float) -> None:
    """Give ``procs`` ``grace_s`` seconds in all to exit on their own (so their atexit hooks
    run), then terminate the stragglers and wait ``escalate_s``, then kill and wait again."""
    deadline = time.monotonic() + grace_s
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for stop in ("terminate", "kill"):
        stragglers = [proc for proc in procs if proc.is_alive()]
        for proc in stragglers:
            getattr(proc, stop)()
        for proc in stragglers:
            proc.join(escalate_s)
