import multiprocessing as mp
import signal
import time

from ipc.procs import stop_processes


def _exit_soon() -> None:
    time.sleep(0.2)


def _ignore_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(60)


def test_waits_for_exits_then_escalates_to_kill() -> None:
    ctx = mp.get_context("spawn")
    polite, stubborn = ctx.Process(target=_exit_soon), ctx.Process(target=_ignore_sigterm)
    for proc in (polite, stubborn):
        proc.start()
    time.sleep(0.5)  # let the stubborn child install its handler (spawn start-up)
    started = time.monotonic()
    stop_processes([polite, stubborn], grace_s=2.0, escalate_s=2.0)
    assert polite.exitcode == 0, "a child that exits on its own must not be signalled"
    assert stubborn.exitcode == -signal.SIGKILL, "SIGTERM ignored: SIGKILL must follow"
    assert time.monotonic() - started < 10
