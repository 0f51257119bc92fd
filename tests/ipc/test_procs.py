import multiprocessing as mp
import signal
import time
from multiprocessing.synchronize import Event

from ipc.procs import stop_processes

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
