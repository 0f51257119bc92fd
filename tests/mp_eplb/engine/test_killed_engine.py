"""An engine rank killed with its process-mode EplbState leaves nothing behind (issue #10).

Shared memory is unnamed (memfd, or torch's unlinked file for weights shared in place), so
SIGTERM, ``os._exit`` and SIGKILL leave no /dev/shm entry; the worker dies with its parent;
the private socket directory (a killed process cannot remove it) is removed by the next start
of an engine of the same user (``ipc.channel.sweep_stale_dirs``, run at its first bind).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from multiprocessing.connection import Connection

import pytest
import torch
import torch.distributed as dist

from ipc.channel import sweep_stale_dirs
from ipc import naming
from ipc.handles import SHM_DIR, live_segments
from ipc.procs import stop_processes
from mp_eplb import EplbConfig, EplbState

pytestmark = pytest.mark.timeout(240)

START_TIMEOUT_S = 150.0
EXIT_TIMEOUT_S = 30.0


def _engine(conn: Connection, init_file: str) -> None:
    """A world-size-1 engine rank on CPU with a process-mode state; then waits to be ended."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    params = [torch.nn.Parameter(torch.zeros(12, 2, 4), requires_grad=False) for _ in range(2)]
    state = EplbState([[p.view(12, -1)] for p in params], rank=0, world_size=1,
                      num_logical_experts=8,
                      config=EplbConfig(mode="process", num_redundant_experts=4,
                                        start_timeout_s=START_TIMEOUT_S),
                      cpu_group=dist.group.WORLD)
    conn.send({"worker": state.worker_pid, "endpoint": state._backend.channel.endpoint,
               "segments": live_segments()})
    if conn.recv() == "exit":
        os._exit(0)
    time.sleep(3600)  # ended by the test's signal


def _named_shm(pid: int) -> list[str]:
    """/dev/shm entries naming ``pid`` (ours: mp_eplb_<pid>_..., torch's: torch_<pid>_...)."""
    return [n for n in os.listdir(SHM_DIR) if f"_{pid}_" in n]


def _shared_files(pid: int) -> tuple[set[str], set[str]]:
    """(memfd segments, unlinked /dev/shm files) ``pid`` holds open."""
    links = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            continue
    return ({link for link in links if link.startswith(f"/memfd:{naming.segment_prefix()}")},
            {link for link in links if link.startswith(f"{SHM_DIR}/") and link.endswith(" (deleted)")})


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("how,exitcode", [("sigterm", -signal.SIGTERM), ("os._exit", 0),
                                          ("sigkill", -signal.SIGKILL)])
def test_killed_engine_leaves_no_shm_no_socket_dir_no_worker(how: str, exitcode: int,
                                                             tmp_path) -> None:
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=_engine, args=(child_conn, str(tmp_path / "init")), daemon=True)
    proc.start()
    child_conn.close()
    try:
        assert conn.poll(START_TIMEOUT_S), "the engine did not build its state in time"
        info = conn.recv()
        sock_dir = os.path.dirname(info["endpoint"].removeprefix("ipc://"))
        assert _running(info["worker"]) and os.path.isdir(sock_dir)
        memfds, unlinked = _shared_files(proc.pid)
        # 2 weights shared in place (torch's unlinked files), 2 staging buffers, load (the
        # progress counter is an inherited memfd of its own, not a segment)
        assert len(info["segments"]) == 5 and len(memfds) == 3 and len(unlinked) == 2
        assert _named_shm(proc.pid) == []  # nothing is named, even while alive
        if how == "sigterm":
            proc.terminate()
        elif how == "sigkill":
            proc.kill()
        else:
            conn.send("exit")
        proc.join(EXIT_TIMEOUT_S)
        assert proc.exitcode == exitcode
        deadline = time.monotonic() + EXIT_TIMEOUT_S
        while _running(info["worker"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(info["worker"]), "the transfer worker outlived its engine"
        assert _named_shm(proc.pid) == []
        # What a killed process cannot remove, the next start of an engine of this user sweeps.
        assert sock_dir in sweep_stale_dirs()
        assert not os.path.exists(sock_dir)
    finally:
        conn.close()
        stop_processes([proc], 0.0, EXIT_TIMEOUT_S)
