"""Start N rank processes of one job and gather what they return: the one rank launcher of the
demo, the bench, ``mp-eplb faults`` and the tests.

:func:`launch_ranks` spawns ``world_size`` processes (multiprocessing's spawn context) with
``MASTER_ADDR``/``MASTER_PORT`` (a free port of 127.0.0.1), ``RANK`` and ``WORLD_SIZE`` in
their environment, so ``init_process_group(init_method="env://")`` joins them. Each runs
``fn(rank, world_size, *args)`` and sends back its return value, or its exception with the
traceback; :func:`post` sends a message on the way (e.g. progress). The call returns a
:class:`RankRun`; whatever happens, no rank process outlives it (stragglers are terminated,
then killed, through :func:`ipc.procs.stop_processes`).

``fn`` must be a module-level function; arguments and results travel pickled over the
launcher's own pipes (its children, not a project wire).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import torch.distributed as dist

from ipc.procs import stop_processes

__all__ = ["RankFailure", "RankRun", "free_port", "launch_ranks", "post"]

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
#: Seconds the other ranks get to report their own outcome after one rank failed.
FAILURE_GRACE_S = 10.0
#: Seconds a rank process gets to exit on its own, then after terminate (then kill).
EXIT_TIMEOUT_S = 10.0

#: This rank process's pipe to the launcher (set in the child only).
_link: Connection | None = None


class RankFailure(RuntimeError):
    """Some rank raised, died or gave no result in time.

    ``errors`` maps each failed rank to ``"ExceptionType: message"`` (or what happened to it),
    ``tracebacks`` the ranks that raised to their traceback; the message lists the errors.
    """

    def __init__(self, errors: dict[int, str], tracebacks: dict[int, str] | None = None) -> None:
        super().__init__("; ".join(f"rank {rank}: {errors[rank]}" for rank in sorted(errors)))
        self.errors = dict(errors)
        self.tracebacks = dict(tracebacks or {})


@dataclass
class RankRun:
    """What the ranks of one launch sent, by rank, and how their processes ended."""

    results: dict[int, Any] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    tracebacks: dict[int, str] = field(default_factory=dict)
    pids: dict[int, int] = field(default_factory=dict)
    exitcodes: dict[int, int | None] = field(default_factory=dict)

    def values(self) -> list[Any]:
        """Every rank's return value in rank order; :class:`RankFailure` if any rank failed."""
        if self.errors:
            raise RankFailure(self.errors, self.tracebacks)
        return [self.results[rank] for rank in sorted(self.results)]


def free_port(host: str = HOST) -> int:
    """A TCP port of ``host`` that was free a moment ago (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def post(message: Any) -> None:
    """From inside a rank process: send ``message`` to the launcher's ``on_message`` now."""
    if _link is None:
        raise RuntimeError("post() is for a rank process started by launch_ranks")
    _link.send(("post", message))


def _rank_main(rank: int, world_size: int, port: int, conn: Connection,
               fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    global _link
    _link = conn
    os.environ.update(MASTER_ADDR=HOST, MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        reply: tuple = ("result", fn(rank, world_size, *args))
    except BaseException as exc:  # everything, KeyboardInterrupt included, reaches the launcher
        reply = ("error", f"{type(exc).__name__}: {exc}", traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    try:
        conn.send(reply)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        reply = ("error", f"{type(exc).__name__}: the rank's result cannot be pickled ({exc}); "
                 "return plain data", traceback.format_exc())
        conn.send(reply)
    conn.close()
    if reply[0] == "error":
        sys.exit(1)


def launch_ranks(fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (), *,
                 timeout_s: float, name: str = "rank",
                 on_message: Callable[[int, Any], None] | None = None,
                 failure_grace_s: float | None = FAILURE_GRACE_S) -> RankRun:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; what they sent.

    A rank that raises, exits without a result or has none after ``timeout_s`` seconds gets an
    entry in :attr:`RankRun.errors`; after a first failure the others have ``failure_grace_s``
    seconds to report (``None``: until ``timeout_s``, for runs where a rank dies on purpose). Messages a rank :func:`post`\\ s go to
    ``on_message(rank, message)`` as they arrive. Processes are named ``f"{name}{rank}"``.
    """
    port = free_port()
    ctx = multiprocessing.get_context("spawn")
    run = RankRun()
    procs: list[multiprocessing.process.BaseProcess] = []
    pending: dict[Connection, int] = {}
    try:
        for rank in range(world_size):
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_rank_main, name=f"{name}{rank}", daemon=True,
                               args=(rank, world_size, port, writer, fn, tuple(args)))
            proc.start()
            writer.close()
            procs.append(proc)
            pending[reader] = rank
            run.pids[rank] = proc.pid
        _collect(run, procs, pending, timeout_s, on_message, failure_grace_s)
    finally:
        stop_processes(procs, EXIT_TIMEOUT_S if not run.errors else 0.0, EXIT_TIMEOUT_S)
        for reader in pending:
            reader.close()
        run.exitcodes = {rank: proc.exitcode for rank, proc in enumerate(procs)}
    return run


def _collect(run: RankRun, procs: list, pending: dict[Connection, int], timeout_s: float,
             on_message: Callable[[int, Any], None] | None,
             failure_grace_s: float | None) -> None:
    deadline = time.monotonic() + timeout_s
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            for rank in sorted(pending.values()):
                run.errors[rank] = ("stopped after another rank failed" if run.errors else
                                    f"gave no result within the timeout ({timeout_s:g} s)")
            return
        for reader in wait(list(pending), timeout=remaining):
            rank = pending[reader]
            try:
                kind, *body = reader.recv()
            except EOFError:
                procs[rank].join(EXIT_TIMEOUT_S)
                run.errors[rank] = f"exited (code {procs[rank].exitcode}) without a result"
            else:
                if kind == "post":
                    if on_message is not None:
                        on_message(rank, body[0])
                    continue
                if kind == "result":
                    run.results[rank] = body[0]
                else:
                    run.errors[rank], run.tracebacks[rank] = body
                    logger.debug("rank %d failed:\n%s", rank, body[1])
            del pending[reader]
            reader.close()
        if run.errors and failure_grace_s is not None:
            deadline = min(deadline, time.monotonic() + failure_grace_s)
