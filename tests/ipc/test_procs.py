import multiprocessing as mp
import os
import select
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.synchronize import Event

import pytest

from ipc.procs import inheritable_pipe, is_stopped, reap, spawn, stop_processes

START_TIMEOUT_S = 120.0  # spawn start-up on a loaded machine; only an upper bound


def _exit_when_told(go: Event) -> None:
    go.wait(START_TIMEOUT_S)


def _ignore_sigterm(ready: Event) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready.set()
    time.sleep(START_TIMEOUT_S)


def test_waits_for_exits_then_escalates_to_kill() -> None:
    ctx = mp.get_context("spawn")
    go, ready = ctx.Event(), ctx.Event()
    polite = ctx.Process(target=_exit_when_told, args=(go,))
    stubborn = ctx.Process(target=_ignore_sigterm, args=(ready,))
    for proc in (polite, stubborn):
        proc.start()
    try:
        # Both children are running (the stubborn one has its handler) before anything is timed.
        assert ready.wait(START_TIMEOUT_S), "child did not start"
        go.set()
        started = time.monotonic()
        stop_processes([polite, stubborn], grace_s=5.0, escalate_s=2.0)
        assert polite.exitcode == 0, "a child that exits on its own must not be signalled"
        assert stubborn.exitcode == -signal.SIGKILL, "SIGTERM ignored: SIGKILL must follow"
        assert time.monotonic() - started < 5.0 + 2.0 + 2.0 + 5.0
    finally:
        for proc in (polite, stubborn):
            if proc.is_alive():
                proc.kill()
            proc.join(10)


#: A child that arms PR_SET_PDEATHSIG, says so on the pipe fd in argv, then sleeps.
_ARMED_CHILD = ("import ctypes, os, signal, sys, time; "
                "ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0); "
                "os.write(int(sys.argv[1]), b'armed'); time.sleep(300)")


def _spawn_armed_child() -> subprocess.Popen:
    """A child spawned through ipc.procs.spawn; returns once it has armed PR_SET_PDEATHSIG."""
    read_fd, write_fd = os.pipe()
    try:
        proc = spawn([sys.executable, "-c", _ARMED_CHILD, str(write_fd)], pass_fds=(write_fd,))
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        assert pipe.read(5) == b"armed"
    return proc


def test_a_child_spawned_for_an_ended_thread_lives_on_and_is_reaped_in_the_background() -> None:
    """PR_SET_PDEATHSIG fires when the forking thread exits: spawn() forks from a thread that
    never does. reap() returns at once and the child is gone once its thread is joined."""
    spawned: list[subprocess.Popen] = []
    asker = threading.Thread(target=lambda: spawned.append(_spawn_armed_child()))
    asker.start()
    asker.join(START_TIMEOUT_S)
    (proc,) = spawned
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while os.path.exists(f"/proc/self/task/{asker.native_id}"):  # the OS thread is gone
            assert time.monotonic() < deadline, "the asking thread did not end"
            time.sleep(0.01)
        time.sleep(1.0)  # a fired PDEATHSIG would have killed it by now (not a verdict margin:
        assert proc.poll() is None  # on a loaded machine this can only miss the bug, not flake)
        os.kill(proc.pid, signal.SIGSTOP)
        while not is_stopped(proc.pid):
            assert time.monotonic() < deadline, "SIGSTOP did not stop the child"
            time.sleep(0.01)
        proc.kill()  # a stopped process ignores all but SIGKILL: kill first, then reap
        started = time.monotonic()
        reaper = reap(proc, grace_s=60.0, escalate_s=60.0)
        assert time.monotonic() - started < 1.0, "reap() waited for the process"
        reaper.join(START_TIMEOUT_S)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_inheritable_pipe_refuses_more_than_a_pipe_takes_at_once() -> None:
    fd = inheritable_pipe(b"x" * select.PIPE_BUF)
    with os.fdopen(fd, "rb") as pipe:
        assert pipe.read() == b"x" * select.PIPE_BUF
    with pytest.raises(ValueError, match="PIPE_BUF"):
        inheritable_pipe(b"x" * (select.PIPE_BUF + 1))


_EXIT_WHILE_REAPING = """
import subprocess, sys
import ipc.procs as procs          # imported before ipc.handles, as mp_eplb.ranks does
from ipc import handles
t = handles.shared_empty((16,), __import__("torch").uint8)
child = procs.spawn([sys.executable, "-c", "import time; time.sleep(0.5)"])
procs.reap(child, grace_s=30.0, escalate_s=5.0, then=lambda: handles.release(t))
print("exiting", flush=True)       # the reaper still waits for the child here
"""


def test_exit_waits_for_reapers_before_segments_are_released_at_exit() -> None:
    """A reaper's ``then`` may release shared memory: the interpreter's exit joins the
    reapers before ipc.handles' own exit hook forgets every segment, whatever the import
    order (it used to depend on it: 'was released' from the reaper thread)."""
    done = subprocess.run([sys.executable, "-c", _EXIT_WHILE_REAPING], capture_output=True,
                          text=True, timeout=START_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "exiting\n"
    assert "Traceback" not in done.stderr and "HandleError" not in done.stderr, done.stderr
