"""Leftover checks of a rank process: its child processes, the shared segments it owns, what
an exited process left by name (/dev/shm entries, socket directories), open fds, GPU memory."""

from __future__ import annotations

import glob
import os
import tempfile
import time

import torch

from ipc import handles, naming
from ipc.channel import sweep_stale_dirs
from mp_eplb.engine.state import EplbState

__all__ = ["exited", "fd_count", "gpu_free_mib", "live_worker_pid", "named_leftovers",
           "owned_segments", "proc_state", "stray_children", "sweep_dead_owner", "wait_exit"]


def proc_state(pid: int) -> str | None:
    """The state letter of process ``pid`` (``Z``: exited, not reaped), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def exited(pid: int) -> bool:
    """Process ``pid`` is gone or a zombie."""
    return proc_state(pid) in (None, "Z")


def stray_children(keep: int | None) -> list[str]:
    """This process's children other than ``keep`` that are zombies or transfer workers."""
    me = str(os.getpid())
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat, "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            pid = int(stat.split("/")[2])
            if fields[1].decode() != me or pid == keep:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, IndexError):
            continue
        if fields[0] == b"Z" or b"mp_eplb.worker.boot" in cmd:
            out.append(f"{pid}({fields[0].decode()})")
    return out


def owned_segments() -> int:
    """Shared segments this process owns (registered with ipc.handles)."""
    return len(handles.live_segments())


def named_leftovers(pid: int) -> list[str]:
    """What process ``pid`` left by name: /dev/shm entries naming it (ipc.handles names nothing
    there; torch unlinks its own files at once) and its private socket directories."""
    shm = [os.path.join(handles.SHM_DIR, n) for n in os.listdir(handles.SHM_DIR) if f"_{pid}_" in n]
    dirs = [path for base in sorted({tempfile.gettempdir(), "/tmp"})
            for path in glob.glob(os.path.join(base, f"{naming.private_dir_prefix()}{pid}-*"))]
    return sorted(shm + dirs)


def fd_count() -> int:
    """Open file descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


def live_worker_pid(state: EplbState) -> int | None:
    """The running worker's pid (None while there is none)."""
    pid = state.worker_pid
    return None if pid is None or exited(pid) else pid


def gpu_free_mib(device: torch.device) -> float | None:
    """Free memory of ``device`` (MiB, the most of a few readings over 0.3 s, so memory a
    just-exited process returns is counted); None on CPU."""
    if device.type != "cuda":
        return None
    best = 0.0
    for _ in range(4):
        best = max(best, torch.cuda.mem_get_info(device)[0] / 2**20)
        time.sleep(0.1)
    return best


def wait_exit(pid: int, limit_s: float, t0: float) -> float | None:
    """Seconds from ``t0`` (monotonic) until ``pid`` exited; None if not within ``limit_s``."""
    while time.monotonic() - t0 < limit_s:
        if exited(pid):
            return time.monotonic() - t0
        time.sleep(0.005)
    return None


def sweep_dead_owner(info: dict | None) -> tuple[str, list[str]]:
    """Sweep what the SIGKILLed rank left, as the next engine start does
    (:func:`ipc.channel.sweep_stale_dirs`): (what was swept, what its pid still names after)."""
    if info is None:
        return "none", []
    prefix = f"{naming.private_dir_prefix()}{info['pid']}-"
    swept = [p for p in sweep_stale_dirs() if os.path.basename(p).startswith(prefix)]
    return (f"{len(swept)} socket dir" if swept else "none"), named_leftovers(info["pid"])
