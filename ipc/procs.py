"""Child processes: spawned from one long-lived thread, stopped with escalation, reaped in the
background.

Linux's ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits, not the
process. :func:`spawn` therefore forks every child from one daemon thread that lives as long
as the process, so a child armed with it follows the process whichever thread asked for it.
:func:`reap` stops and waits for a child on a thread of its own, so no caller ever blocks on
a process exit.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import select
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from multiprocessing.process import BaseProcess
from typing import Protocol

__all__ = ["Stoppable", "PopenProcess", "stop_processes", "spawn", "reap", "is_stopped",
           "inheritable_pipe"]

logger = logging.getLogger(__name__)


class Stoppable(Protocol):
    """What :func:`stop_processes` needs (``multiprocessing`` processes have it)."""

    def join(self, timeout: float | None = None) -> None: ...

    def is_alive(self) -> bool: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


class PopenProcess:
    """A ``subprocess.Popen`` seen through the :class:`Stoppable` interface."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    def join(self, timeout: float | None = None) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self) -> None:
        self.proc.terminate()

    def kill(self) -> None:
        self.proc.kill()


def stop_processes(procs: Sequence[BaseProcess | Stoppable], grace_s: float,
                   escalate_s: float) -> None:
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


def inheritable_pipe(data: bytes) -> int:
    """Write ``data`` into a new pipe and return its inheritable read end, for a child to
    read to EOF (pass it with ``spawn(pass_fds=...)``, close it here once spawned).
    ``ValueError`` past ``select.PIPE_BUF`` bytes, which a pipe always takes without
    blocking."""
    if len(data) > select.PIPE_BUF:
        raise ValueError(f"{len(data)} bytes exceed select.PIPE_BUF={select.PIPE_BUF}, which a "
                         "pipe takes at once; send more over a channel")
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, data)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    os.set_inheritable(read_fd, True)
    return read_fd


def is_stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (SIGSTOP, or traced): it would ignore a polite
    request and SIGTERM until continued. ``False`` if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] in (b"T", b"t")
    except (OSError, IndexError):
        return False


_requests: queue.SimpleQueue[tuple[Callable[[], subprocess.Popen], Future]] | None = None
_spawner_lock = threading.Lock()
_reapers: set[threading.Thread] = set()
_join_registered = False


def _serve_spawns(requests: queue.SimpleQueue) -> None:
    while True:
        start, result = requests.get()
        if result.set_running_or_notify_cancel():
            try:
                result.set_result(start())
            except BaseException as err:  # handed to the caller of spawn()
                result.set_exception(err)


def _forget_spawner() -> None:
    """In a forked child the spawner and reaper threads do not exist: start anew on demand."""
    global _requests
    _requests = None
    _reapers.clear()


os.register_at_fork(after_in_child=_forget_spawner)


def spawn(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
          pass_fds: Sequence[int] = ()) -> subprocess.Popen:
    """Start ``argv`` (stdin from /dev/null, only ``pass_fds`` inherited) from this process's
    spawner thread, a daemon thread that never exits; returns once the child is forked.
    Errors of ``Popen`` (e.g. ``FileNotFoundError``) are raised here."""
    global _requests
    with _spawner_lock:
        if _requests is None:
            _requests = queue.SimpleQueue()
            threading.Thread(target=_serve_spawns, args=(_requests,), name="ipc-spawner",
                             daemon=True).start()
        requests = _requests
    result: Future = Future()
    requests.put((lambda: subprocess.Popen(list(argv), env=None if env is None else dict(env),
                                           stdin=subprocess.DEVNULL, close_fds=True,
                                           pass_fds=tuple(pass_fds)), result))
    return result.result()


def reap(proc: subprocess.Popen, grace_s: float, escalate_s: float,
         then: Callable[[], None] = lambda: None) -> threading.Thread:
    """Stop ``proc`` like :func:`stop_processes` (``grace_s``, then SIGTERM, then SIGKILL),
    reap it and call ``then``, on a daemon thread; returns that thread at once (join it to
    wait). Kill the process first to skip the grace period of one known dead or hung. At
    interpreter exit the pending reapers are joined, so a graceful stop is not cut short."""
    def run() -> None:
        try:
            stop_processes([PopenProcess(proc)], grace_s, escalate_s)
            if proc.poll() is None:
                logger.error("process %d survived SIGKILL for %.1f s", proc.pid, escalate_s)
            then()
        finally:
            with _spawner_lock:
                _reapers.discard(threading.current_thread())

    global _join_registered
    thread = threading.Thread(target=run, name=f"ipc-reap-{proc.pid}", daemon=True)
    with _spawner_lock:
        _reapers.add(thread)
        if not _join_registered:
            # atexit runs the last registered first: registered now, after the modules the
            # reapers' ``then`` uses registered their exit hooks (e.g. ipc.handles releasing
            # every segment), the join runs before those hooks, whatever the import order.
            atexit.register(_join_reapers)
            _join_registered = True
    thread.start()
    return thread


def _join_reapers() -> None:
    with _spawner_lock:
        pending = list(_reapers)
    for thread in pending:
        thread.join()
