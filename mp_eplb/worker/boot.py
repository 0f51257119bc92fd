"""Entry point of the transfer subprocess: ``python -m mp_eplb.worker.boot --start-fd N``.

Standard library only, so it runs its first steps before anything heavy is imported:

1. arm ``PR_SET_PDEATHSIG`` (SIGKILL) and check the parent pid: a child of an engine killed
   at any moment of its start dies with it;
2. read its :class:`StartInfo` (session key, endpoint, ...) as JSON from the inherited pipe
   ``N``, so the key never appears in ``/proc/<pid>/environ`` or the command line;
3. advance the progress counter (:class:`ProgressCounter`, shared memory inherited as an fd)
   at once, the engine's heartbeat from the first moment; only declared long waits
   (:meth:`ProgressCounter.waiting`: imports, the wait for ``Setup``, rendezvous) may be
   silent, so a start-up hang anywhere else is judged within
   ``EplbConfig.heartbeat_timeout_s``;
4. import and run :func:`mp_eplb.worker.main.main`.

The engine side writes the pipe with ``ipc.procs.inheritable_pipe(info.to_json())`` and
creates the counter with :meth:`ProgressCounter.create`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import mmap
import os
import signal
import struct
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from mp_eplb.worker.failpoints import arm_from_env, failpoint

__all__ = ["ProgressCounter", "StartInfo", "read_start_info", "main",
           "PARENT_GONE_EXIT"]

#: Exit code of a worker whose parent engine is gone.
PARENT_GONE_EXIT = 3
#: Seconds between parent checks (backs up PR_SET_PDEATHSIG).
PARENT_CHECK_S = 0.2
_PR_SET_PDEATHSIG = 1
#: Progress count, and the end of the declared wait (``time.monotonic()``; 0.0: none).
_HEARTBEAT = struct.Struct("<qd")


class ProgressCounter:
    """The worker's heartbeat in a 16-byte memfd mapping: a count the worker advances and
    the end of the long wait it declared (``time.monotonic()`` is system-wide on Linux).
    Only the worker writes; the engine reads (:attr:`value`, :attr:`waiting_until`)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._map = mmap.mmap(fd, _HEARTBEAT.size)

    @classmethod
    def create(cls) -> ProgressCounter:
        """A new zeroed counter; hand :attr:`fd` to the worker in ``pass_fds`` (no other
        child inherits it)."""
        fd = os.memfd_create("mp_eplb-progress")
        os.ftruncate(fd, _HEARTBEAT.size)
        return cls(fd)

    @property
    def value(self) -> int:
        return _HEARTBEAT.unpack_from(self._map)[0]

    @property
    def waiting_until(self) -> float:
        """End of the declared wait (``time.monotonic()``), 0.0 when none."""
        return _HEARTBEAT.unpack_from(self._map)[1]

    def add(self, waiting_until: float = 0.0) -> None:
        _HEARTBEAT.pack_into(self._map, 0, self.value + 1, waiting_until)

    @contextlib.contextmanager
    def waiting(self, limit_s: float) -> Iterator[None]:
        """Declare a long wait bounded elsewhere by ``limit_s`` (an import, the wait for
        ``Setup``, a rendezvous with its own timeout): the engine does not count silence
        until the block ends or ``limit_s`` passes. No thread involved, so it holds while
        the GIL is held (torch's libraries loading)."""
        self.add(time.monotonic() + limit_s)
        try:
            yield
        finally:
            self.add()

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)


@dataclass(frozen=True)
class StartInfo:
    """What the engine tells its worker at spawn (the key as hex)."""

    key: str
    endpoint: str
    parent_pid: int
    progress_fd: int
    start_timeout_s: float

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()


def read_start_info(fd: int) -> StartInfo:
    """Read the whole :class:`StartInfo` (JSON of :meth:`StartInfo.to_json`) from pipe
    ``fd``, then close it."""
    with os.fdopen(fd, "rb") as pipe:
        return StartInfo(**json.loads(pipe.read()))


def _watch_parent(parent_pid: int) -> None:
    """Die with the parent: PR_SET_PDEATHSIG plus a getppid poll on a thread (the signal is
    lost if the parent died before it was armed, and is Linux only)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(PARENT_GONE_EXIT)

    def poll() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_S)
        os._exit(PARENT_GONE_EXIT)

    threading.Thread(target=poll, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """Boot the transfer worker (see the module doc) and return its exit status."""
    parser = argparse.ArgumentParser(prog="mp_eplb.worker.boot")
    parser.add_argument("--start-fd", type=int, required=True,
                        help="inherited pipe holding the StartInfo JSON")
    args = parser.parse_args(argv)
    info = read_start_info(args.start_fd)
    _watch_parent(info.parent_pid)
    progress = ProgressCounter(info.progress_fd)
    progress.add()
    arm_from_env()
    failpoint("boot")
    with progress.waiting(info.start_timeout_s):
        from mp_eplb.worker import main as worker_main  # torch and the rest: only now
    return worker_main.main(info, progress)


if __name__ == "__main__":
    sys.exit(main())
