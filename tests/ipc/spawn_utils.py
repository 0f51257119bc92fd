"""Run a test's peer in a spawned process that talks msgpack over a pipe (tests only).

``with spawn_child(fn, *args) as child:`` starts ``fn(link, *args)`` in a fresh ``spawn`` process
and yields the parent's :class:`Link`. Both ends exchange msgpack-packed messages with
``send``/``recv``, every receive bounded by ``timeout_s``; an exception in the child comes back as an
AssertionError carrying its traceback. On leaving the block the child is joined within
``JOIN_TIMEOUT_S`` (then terminated, then killed) and must have exited with code 0, unless
``expect_exit`` says otherwise. ``fn`` must be a module-level function of an importable module.
:data:`CHILD_GPUS` parametrizes a GPU test over the child's GPU: 0 (the parent's) and 1 (the peer).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

import msgpack
import pytest
import torch

from ipc import naming
from ipc.procs import stop_processes

#: The ipc name prefix of the ipc tests (set around each test by their conftest).
TEST_PREFIX = "ipctest"

__all__ = ["CHILD_GPUS", "JOIN_TIMEOUT_S", "RECV_TIMEOUT_S", "Link", "spawn_child"]

JOIN_TIMEOUT_S = 30.0
RECV_TIMEOUT_S = 60.0
CHILD_GPUS = [
    pytest.param(0, id="same-gpu"),
    pytest.param(1, id="peer-gpu", marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")),
]


class Link:
    """One end of the pipe; messages are msgpack (bytes stay bytes, arrays come back as lists)."""

    def __init__(self, conn: Connection, peer: str, pid: int | None = None) -> None:
        self.conn = conn
        self.peer = peer
        self.pid = pid

    def send(self, message: Any) -> None:
        self.conn.send_bytes(msgpack.packb(message, use_bin_type=True))

    def recv(self, timeout_s: float = RECV_TIMEOUT_S) -> Any:
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"no message from the {self.peer} within timeout_s={timeout_s}")
        message = msgpack.unpackb(self.conn.recv_bytes(), raw=False)
        if isinstance(message, dict) and "child_error" in message:
            raise AssertionError(f"child failed:\n{message['child_error']}")
        return message


def _child_main(conn: Connection, prefix: str, fn: Callable[..., None],
                args: tuple[Any, ...]) -> None:
    naming.set_name_prefix(prefix)  # the parent's: handles of another prefix are refused
    link = Link(conn, "parent")
    try:
        fn(link, *args)
    except BaseException:  # report everything to the parent, then fail the exit code
        link.send({"child_error": traceback.format_exc()})
        raise SystemExit(1) from None


@contextlib.contextmanager
def spawn_child(fn: Callable[..., None], *args: Any, expect_exit: int | None = 0) -> Iterator[Link]:
    """Run ``fn(link, *args)`` in a spawned child for the duration of the block (see module doc)."""
    ctx = mp.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe(duplex=True)
    proc = ctx.Process(target=_child_main, args=(child_conn, naming.name_prefix(), fn, args), daemon=True)
    proc.start()
    child_conn.close()
    link = Link(parent_conn, "child", proc.pid)
    try:
        yield link
        proc.join(JOIN_TIMEOUT_S)
        if proc.is_alive():
            raise AssertionError(f"child did not exit within JOIN_TIMEOUT_S={JOIN_TIMEOUT_S}")
        if expect_exit is not None and proc.exitcode != expect_exit:
            detail = link.recv(0) if parent_conn.poll(0) else "(no message)"
            raise AssertionError(f"child exited with {proc.exitcode}, expected {expect_exit}: {detail}")
    finally:
        stop_processes([proc], 0.0, JOIN_TIMEOUT_S)
        parent_conn.close()
