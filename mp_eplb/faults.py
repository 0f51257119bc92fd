"""Fault injection against a real multi-rank EplbState run: ``mp-eplb faults``.

Each scenario breaks something on one rank (its worker, its channel, or the rank itself)
during one rebalance of a real run (rank processes in a gloo group, each with an
:class:`~mp_eplb.state.EplbState` in process mode and its transfer subprocess), then
checks the invariants of ``docs/faults.md``:

- **detection**: from the injection to the moment every rank knew (``last_error`` set or
  the rebalance abandoned), within the scenario's bound;
- **consistent**: after every step, on every rank, every row holds the expert its maps name
  (rows encode (layer, expert)), all ranks hold identical maps, and all ranks' rebalance
  records (aborted, layers committed, commit steps) are identical;
- **recovered**: a later rebalance completes with committed layers;
- **leftovers**: no stray worker process or zombie, no growth of the shared segments a rank
  owns (``ipc.handles.live_segments``; none after shutdown), no socket file of a closed
  channel, and nothing an exited rank left by name (a /dev/shm entry naming its pid, its
  private socket directory).

Scenarios of one run share the rank processes and their EplbState: they follow each other
on a fixed schedule of rebalance ids (fault, then recovery), so the worker failpoints
(:mod:`mp_eplb.failpoints`) are armed once, through the environment the workers inherit.
Message faults go through :class:`FrameProxy`, a ZeroMQ man in the middle that the runner
puts between the engine and its worker by wrapping ``Channel.bind`` as
:mod:`mp_eplb.backends` sees it (no production hook). The parent killer runs in a run of
its own, as it ends one rank.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import msgpack
import numpy as np
import torch
import torch.distributed as dist
import zmq

from ipc import handles
from ipc.channel import PRIVATE_DIR_PREFIX, Channel, sweep_stale_dirs
from ipc.codec import MAC_BYTES, Codec, new_session_key
from mp_eplb import logs
from mp_eplb.engine import host as backends
from mp_eplb.worker import failpoints
from mp_eplb.argtypes import device, positive_float, positive_int
from mp_eplb.progress import announce
from mp_eplb.config import EplbConfig
from mp_eplb.demo.launch import init_rank_groups
from mp_eplb.protocol import RebalanceDone
from mp_eplb.engine.state import EplbState

__all__ = ["Scenario", "ScenarioResult", "FaultOptions", "FrameProxy", "SoakResult", "scenarios",
           "run_scenarios", "run_soak", "inject_wrong_key", "format_table",
           "add_faults_arguments", "run_faults"]

logger = logging.getLogger(__name__)

NUM_LAYERS = 3
NUM_LOGICAL = 8
#: Seconds between steps of the scenario loop (an engine's step, shortened).
STEP_SLEEP_S = 0.002
#: Wrong-key frames a ``wrong-key`` scenario sends (plus two frames of random bytes).
WRONG_KEY_FRAMES = 5
#: Readings of GPU free memory after a kill may differ by this much (allocator granularity).
GPU_MEM_TOLERANCE_MIB = 64.0
#: Longest time the proxy holds a reordered frame when nothing overtakes it.
REORDER_HOLD_S = 1.0
_EXIT_WAIT_S = 10.0


# -- scenarios --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    """One fault. ``kind``: ``failpoint`` (``spec`` = POINT:ACTION[@hit=K] on rank
    ``target``'s worker; ``setup_fail`` also makes the restarted worker exit at setup),
    ``proxy`` (``proxy`` = ACTION:DIRECTION[:TAG] applied by :class:`FrameProxy`),
    ``wrong_key``, or ``parent_kill``. ``expect``: ``abandon``, ``complete`` or ``either``.
    ``bound``: which detection bound applies (``kill``: ``detect_bound_s``; ``hang``:
    heartbeat timeout + that; ``timeout``: layer timeout + that). ``slots``: rebalance ids
    the scenario takes (fault, then recovery attempts)."""

    name: str
    kind: str
    expect: str
    doc: str
    target: int = 1
    spec: str = ""
    proxy: str = ""
    setup_fail: bool = False
    bound: str = "kill"
    slots: int = 2


def scenarios(world_size: int = 2) -> list[Scenario]:
    """Every scenario, in run order. Targets alternate between the last and the first rank,
    so rank 0 (where the policy runs) and a peer both lose their worker."""
    last = world_size - 1
    out = []
    for i, action in enumerate(("sigkill", "sigsegv", "sigterm", "exit", "raise")):
        for point in ("plan", "policy", "stage", "ready"):
            hit = "@hit=2" if point == "stage" else ""
            out.append(Scenario(
                f"{action}@{point}", "failpoint", "abandon",
                f"worker {action} at {point}" + (" (second layer)" if hit else ""),
                target=last if i % 2 == 0 else 0, spec=f"{point}:{action}{hit}"))
    out += [
        Scenario("hang@stage", "failpoint", "abandon",
                 "worker spins in Python at stage; only the progress counter shows it",
                 spec="stage:hang", bound="hang"),
        Scenario("exit@setup", "failpoint", "abandon",
                 "worker killed at stage, then its replacement exits during setup",
                 target=0, spec="stage:sigkill", setup_fail=True, slots=3),
        Scenario("proxy-delay", "proxy", "complete", "every frame both ways held 20 ms",
                 proxy="delay:both"),
        Scenario("proxy-duplicate", "proxy", "complete",
                 "every frame both ways sent twice (replays dropped by seq)",
                 target=0, proxy="duplicate:both"),
        Scenario("proxy-drop-ready", "proxy", "abandon", "first LayerReady to the engine lost",
                 proxy="drop:up:eplb.ready", bound="timeout"),
        Scenario("proxy-reorder", "proxy", "abandon",
                 "first LayerReady overtaken by the next frame (then dropped as a replay)",
                 target=0, proxy="reorder:up:eplb.ready", bound="timeout"),
        Scenario("proxy-corrupt", "proxy", "abandon",
                 "one bit of the first LayerReady flipped (fails HMAC)",
                 proxy="corrupt:up:eplb.ready", bound="timeout"),
        Scenario("proxy-drop-free", "proxy", "either", "first BufferFree to the worker lost",
                 target=0, proxy="drop:down:eplb.free", bound="timeout"),
        Scenario("proxy-drop-rebalance", "proxy", "abandon",
                 "Rebalance request to the worker lost: only the layer timeout can tell",
                 proxy="drop:down:eplb.rebalance", bound="timeout"),
        Scenario("wrong-key", "wrong_key", "complete",
                 f"{WRONG_KEY_FRAMES} frames under a wrong key + 2 of random bytes sent to "
                 "the engine's socket during a rebalance", target=0),
        Scenario("parent-kill", "parent_kill", "abandon",
                 "an engine rank SIGKILLed mid-rebalance: its worker must exit within 1 s",
                 slots=0),
    ]
    return out


@dataclass(frozen=True)
class FaultOptions:
    """Run settings. Times in seconds."""

    ranks: int = 2
    device: str = "cpu"
    communicator: str = "auto"
    timeout_s: float = 900.0
    heartbeat_timeout_s: float = 1.5
    layer_timeout_s: float = 30.0
    detect_bound_s: float = 1.0
    start_timeout_s: float = 60.0


@dataclass
class ScenarioResult:
    """One row of the table. ``detection_s``: injection until every rank knew (None: no
    detection, e.g. a tolerated fault)."""

    name: str
    expect: str
    outcome: str
    detection_s: float | None
    bound_s: float | None
    consistent: bool
    recovered: bool
    leftovers: str
    notes: str = ""
    ok: bool = False


# -- the proxy ------------------------------------------------------------------------------

@dataclass
class _ProxyFault:
    action: str      # delay | duplicate | drop | reorder | corrupt
    direction: str   # up (worker -> engine) | down (engine -> worker) | both
    tag: str | None
    delay_s: float = 0.02
    spent: bool = False


class FrameProxy:
    """ZeroMQ man in the middle: the worker's DEALER connects to :attr:`endpoint` (a ROUTER
    here), and frames go on to the engine's ROUTER at ``upstream`` through a DEALER. It
    reads only the message tag of a frame (no key needed) and, once armed, delays,
    duplicates, drops, reorders or corrupts frames. Runs on a daemon thread of the rank
    process until :meth:`stop`, which also removes its socket directory."""

    def __init__(self, upstream: str) -> None:
        self._dir = tempfile.mkdtemp(prefix="eplb-proxy-")
        self.endpoint = f"ipc://{self._dir}/p.sock"
        self.upstream = upstream
        self._ctx = zmq.Context(io_threads=1)
        self._front = self._ctx.socket(zmq.ROUTER)
        self._back = self._ctx.socket(zmq.DEALER)
        for sock in (self._front, self._back):
            sock.setsockopt(zmq.LINGER, 0)
        self._front.bind(self.endpoint)
        self._back.connect(upstream)
        self._worker_id: bytes | None = None
        self._lock = threading.Lock()
        self._fault: _ProxyFault | None = None
        self._held: list[tuple[float, str, bytes, bool]] = []
        self.injected_at: float | None = None
        self.frames = {"up": 0, "down": 0, "faulted": 0}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="eplb-fault-proxy", daemon=True)
        self._thread.start()

    def arm(self, text: str) -> None:
        """Arm ``ACTION:DIRECTION[:TAG]`` (e.g. ``drop:up:eplb.ready``)."""
        action, direction, *tag = text.split(":")
        if action not in ("delay", "duplicate", "drop", "reorder", "corrupt") or \
                direction not in ("up", "down", "both"):
            raise ValueError(f"proxy fault {text!r}: expected ACTION:DIRECTION[:TAG]")
        with self._lock:
            self._fault = _ProxyFault(action, direction, tag[0] if tag else None)
            self.injected_at = None

    def disarm(self) -> None:
        with self._lock:
            self._fault = None

    def stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._thread.join(_EXIT_WAIT_S)
        self._front.close(linger=0)
        self._back.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def socket_path(self) -> str:
        return self.endpoint.removeprefix("ipc://")

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._front, zmq.POLLIN)
        poller.register(self._back, zmq.POLLIN)
        while not self._stopping.is_set():
            for sock, _ in poller.poll(timeout=5):
                if sock is self._front:
                    self._worker_id, frame = sock.recv_multipart()[:2]
                    self._route("up", frame)
                else:
                    self._route("down", sock.recv())
            self._release(time.monotonic())

    def _route(self, direction: str, frame: bytes) -> None:
        self.frames[direction] += 1
        with self._lock:
            fault = self._fault
        if (fault is None or fault.spent or fault.direction not in (direction, "both")
                or (fault.tag is not None and _frame_tag(frame) != fault.tag)):
            self._queue(direction, frame)
            return
        self.frames["faulted"] += 1
        if self.injected_at is None:
            self.injected_at = time.time()
        if fault.action == "delay":
            self._queue(direction, frame, fault.delay_s)
        elif fault.action == "duplicate":
            self._queue(direction, frame)
            self._queue(direction, frame)
        elif fault.action == "corrupt":
            fault.spent = True
            body = bytearray(frame)
            body[MAC_BYTES + (len(body) - MAC_BYTES) // 2] ^= 0x01
            self._queue(direction, bytes(body))
        elif fault.action == "reorder":
            fault.spent = True
            self._queue(direction, frame, REORDER_HOLD_S, overtakable=True)
        else:  # drop
            fault.spent = True

    def _queue(self, direction: str, frame: bytes, delay_s: float = 0.0,
               overtakable: bool = False) -> None:
        self._held.append((time.monotonic() + delay_s, direction, frame, overtakable))
        self._release(time.monotonic())

    def _release(self, now: float) -> None:
        """Emit due frames, first in first out per direction; an overtakable (reordered)
        frame goes right after the next frame of its direction, or when its hold ends."""
        keep: list[tuple[float, str, bytes, bool]] = []
        blocked: set[str] = set()
        for item in self._held:
            due, direction, frame, overtakable = item
            if due > now or (direction in blocked and not overtakable):
                keep.append(item)
                if not overtakable:
                    blocked.add(direction)
                continue
            self._emit(direction, frame)
            if not overtakable:
                for held in [k for k in keep if k[3] and k[1] == direction]:
                    keep.remove(held)
                    self._emit(direction, held[2])
        self._held = keep

    def _emit(self, direction: str, frame: bytes) -> None:
        if direction == "up":
            self._back.send(frame)
        elif self._worker_id is not None:
            self._front.send_multipart([self._worker_id, frame])


def _frame_tag(frame: bytes) -> str | None:
    try:
        body = msgpack.unpackb(frame[MAC_BYTES:], raw=False)
        return body[1] if isinstance(body, list) and len(body) > 1 else None
    except (ValueError, msgpack.UnpackException):
        return None


class _ChannelTracker:
    """Wraps ``Channel.bind`` as :mod:`mp_eplb.backends` sees it: records every channel the
    backend binds (for drop counters and socket-file checks) and, with ``proxy``, puts a
    :class:`FrameProxy` between it and the worker (the worker is told the proxy's endpoint)."""

    def __init__(self, proxy: bool) -> None:
        self.channels: list[tuple[Channel, str]] = []
        self.proxies: list[tuple[Channel, FrameProxy]] = []
        tracker = self

        class TrackedChannel(Channel):
            @classmethod
            def bind(cls, key: bytes, endpoint: str | None = None, **kwargs: Any) -> Channel:
                channel = Channel.bind(key, endpoint, **kwargs)
                tracker.channels.append((channel, channel.endpoint))
                tracker.stop_closed()
                if proxy:
                    front = FrameProxy(channel.endpoint)
                    tracker.proxies.append((channel, front))
                    channel.endpoint = front.endpoint  # what _spawn hands to the worker
                return channel

        self._original = backends.Channel
        backends.Channel = TrackedChannel

    @property
    def proxy(self) -> FrameProxy | None:
        return self.proxies[-1][1] if self.proxies else None

    def stop_closed(self) -> None:
        for channel, front in self.proxies:
            if channel.closed:
                front.stop()

    def stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for channel, _ in self.channels:
            for key, value in channel.stats.items():
                total[key] = total.get(key, 0) + value
        return total

    def stale_sockets(self) -> list[str]:
        self.stop_closed()
        paths = [endpoint.removeprefix("ipc://") for channel, endpoint in self.channels
                 if channel.closed and endpoint.startswith("ipc://")]
        paths += [front.socket_path for channel, front in self.proxies if channel.closed]
        return [p for p in paths if os.path.exists(p)]

    def close(self) -> None:
        for _, front in self.proxies:
            front.stop()
        backends.Channel = self._original


def inject_wrong_key(endpoint: str, frames: int = WRONG_KEY_FRAMES) -> int:
    """Connect to a channel's ``endpoint`` as a stranger and send ``frames`` well-formed
    messages sealed with a wrong key plus two frames of random bytes; returns how many were
    sent (each must be counted as ``unauthenticated`` and ignored)."""
    codec = Codec(new_session_key(), "child")
    ctx = zmq.Context(io_threads=1)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    try:
        sock.connect(endpoint)
        for seq in range(1, frames + 1):
            sock.send(codec.encode(RebalanceDone(rebalance_id=10**6 + seq, bytes_staged=0,
                                                 stage_s=0.0),
                                   10**9 + seq))
        for _ in range(2):
            sock.send(os.urandom(MAC_BYTES + 64))
    finally:
        sock.close()
        ctx.term()
    return frames + 2


# -- one rank of a run ------------------------------------------------------------------------

@dataclass(frozen=True)
class _RunSpec:
    job: str
    options: FaultOptions
    init_method: str
    scenarios: tuple[Scenario, ...]
    log_path: str
    cycles: int = 0
    restarts: int = 0


@dataclass
class _Rank:
    rank: int
    world_size: int
    device: torch.device
    ep_group: dist.ProcessGroup
    cpu_group: dist.ProcessGroup
    spec: _RunSpec
    report: Callable[..., None]


def _num_physical(world_size: int) -> int:
    return world_size * -(-(NUM_LOGICAL + 4) // world_size)


def _expected_rows(layer: int, ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """What slots holding experts ``ids`` of ``layer`` contain: code = layer * 64 + expert
    (-1 for an empty slot); float32 rows add the column index, so a partial copy shows."""
    code = torch.where(ids >= 0, layer * 64 + ids, torch.full_like(ids, -1))
    width = like[0].numel()
    values = code[:, None].expand(-1, width)
    if like.dtype == torch.float32:
        values = values * 8 + torch.arange(width)[None, :]
    return values.to(like.dtype).reshape(like.shape)


def _initial_weights(rank: int, world_size: int, device: torch.device) -> list[list[torch.Tensor]]:
    num_phy = _num_physical(world_size)
    local = num_phy // world_size
    ids = torch.arange(rank * local, (rank + 1) * local) % NUM_LOGICAL
    shapes = ((torch.float32, (local, 6)), (torch.bfloat16, (local, 2, 2)))
    return [[_expected_rows(layer, ids, torch.empty(shape, dtype=dtype)).to(device)
             for dtype, shape in shapes] for layer in range(NUM_LAYERS)]


def _load(phy2log: np.ndarray, world_size: int) -> np.ndarray:
    """Tokens per physical slot ``[layers, physical]`` (the same on every rank): experts
    with a slot on rank 0 are 16x hotter than the rest. A function of the placement alone,
    so a load window that spans a commit still asks for the same thing; rank 0 is then
    overloaded under any placement and every rebalance moves experts in every layer."""
    layers, num_phy = phy2log.shape
    local = num_phy // world_size
    ids = np.clip(phy2log, 0, None)
    experts = np.arange(NUM_LOGICAL)
    hot = np.stack([np.isin(experts, row[:local]) for row in ids])
    tilt = 1 + (experts[None, :] + np.arange(layers)[:, None]) % 3
    per_expert = np.where(hot, 4096, 256) * tilt
    replicas = np.stack([np.bincount(row, minlength=NUM_LOGICAL) for row in ids])
    rows = np.arange(layers)[:, None]
    return per_expert[rows, ids] // np.maximum(replicas[rows, ids], 1) * (phy2log >= 0)


def _proc_state(pid: int) -> str | None:
    """The state letter of process ``pid`` (``Z``: exited, not reaped), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def _exited(pid: int) -> bool:
    return _proc_state(pid) in (None, "Z")


def _stray_children(keep: int | None) -> list[str]:
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


def _segments() -> int:
    """Shared segments this process owns (registered with ipc.handles)."""
    return len(handles.live_segments())


def _named_leftovers(pid: int) -> list[str]:
    """What process ``pid`` left by name: /dev/shm entries naming it (ipc.handles names nothing
    there; torch unlinks its own files at once) and its private socket directories."""
    shm = [os.path.join(handles.SHM_DIR, n) for n in os.listdir(handles.SHM_DIR) if f"_{pid}_" in n]
    dirs = [path for base in sorted({tempfile.gettempdir(), "/tmp"})
            for path in glob.glob(os.path.join(base, f"{PRIVATE_DIR_PREFIX}{pid}-*"))]
    return sorted(shm + dirs)


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _worker_pid(state: EplbState) -> int | None:
    """The running worker's pid (None while there is none)."""
    pid = state.worker_pid
    return None if pid is None or _exited(pid) else pid


def _gpu_free_mib(device: torch.device) -> float | None:
    """Free memory of ``device`` (MiB, the most of a few readings over 0.3 s, so memory a
    just-exited process returns is counted); None on CPU."""
    if device.type != "cuda":
        return None
    best = 0.0
    for _ in range(4):
        best = max(best, torch.cuda.mem_get_info(device)[0] / 2**20)
        time.sleep(0.1)
    return best


class _Driver:
    """Steps a rank's EplbState in lockstep with the other ranks and checks every step."""

    def __init__(self, ctx: _Rank, state: EplbState) -> None:
        self.ctx, self.state = ctx, state
        self.violations: list[str] = []

    def step(self) -> Any:
        state = self.state
        load = _load(state.physical_to_logical_map.cpu().numpy(), self.ctx.world_size)
        report = state.step(torch.as_tensor(load, device=state.device))
        self._check_rows()
        time.sleep(STEP_SLEEP_S)
        return report

    def _check_rows(self) -> None:
        state = self.state
        p2l = state.physical_to_logical_map.cpu()
        local = state.num_local
        for layer, tensors in enumerate(state.expert_weights):
            ids = p2l[layer, state.rank * local:(state.rank + 1) * local]
            for t in tensors:
                if not torch.equal(t.cpu(), _expected_rows(layer, ids, t.cpu())):
                    self.violations.append(f"rank {state.rank} step {state.step_count}: layer "
                                           f"{layer} rows do not hold experts {ids.tolist()}")
                    return

    def agree(self, done: bool, give_up: bool) -> tuple[bool, bool]:
        """All ranks: (every rank done, some rank gave up); also checks the maps are equal."""
        p2l = self.state.physical_to_logical_map.cpu().reshape(-1)
        mine = torch.cat([torch.tensor([int(done), int(give_up)]), p2l.to(torch.int64)])
        gathered = [torch.zeros_like(mine) for _ in range(self.ctx.world_size)]
        dist.all_gather(gathered, mine, group=self.ctx.cpu_group)
        if any(not torch.equal(g[2:], mine[2:]) for g in gathered):
            self.violations.append(f"step {self.state.step_count}: ranks hold different maps")
        return all(bool(g[0]) for g in gathered), any(bool(g[1]) for g in gathered)

    def run_until(self, done: Callable[[], bool], limit_s: float,
                  each: Callable[[Any], None] = lambda report: None) -> bool:
        """Step until ``done()`` holds on every rank; False if some rank passed ``limit_s``."""
        deadline = time.monotonic() + limit_s
        while True:
            each(self.step())
            all_done, gave_up = self.agree(done(), time.monotonic() > deadline)
            if all_done:
                return True
            if gave_up:
                return False


def _config(options: FaultOptions, world_size: int) -> EplbConfig:
    return EplbConfig(mode="process", communicator=options.communicator, window_size=2,
                      step_interval=2,
                      num_redundant_experts=_num_physical(world_size) - NUM_LOGICAL,
                      heartbeat_timeout_s=options.heartbeat_timeout_s,
                      layer_timeout_s=options.layer_timeout_s,
                      start_timeout_s=options.start_timeout_s)


def _record_row(record: Any) -> list:
    return [record.rebalance_id, record.aborted, record.end_step, list(record.layers_committed),
            list(record.commit_steps), record.reason]


def _schedule(items: Sequence[Scenario]) -> list[tuple[Scenario, int]]:
    """(scenario, first rebalance id): id 0 is the warm-up, then each takes its slots."""
    out, next_id = [], 1
    for sc in items:
        out.append((sc, next_id))
        next_id += sc.slots
    return out


def _failpoint_env(ctx: _Rank) -> str:
    return ",".join(f"{sc.spec}@rebalance={first}" for sc, first in _schedule(ctx.spec.scenarios)
                    if sc.kind == "failpoint" and sc.target % ctx.world_size == ctx.rank)


def _batch_job(ctx: _Rank) -> dict:
    """Run every scenario of the batch on this rank; per-scenario observations."""
    options = ctx.spec.options
    os.environ[failpoints.ENV] = _failpoint_env(ctx)
    os.environ[failpoints.LOG_ENV] = ctx.spec.log_path
    tracker = _ChannelTracker(proxy=any(sc.kind == "proxy" for sc in ctx.spec.scenarios))
    gpu_before = _gpu_free_mib(ctx.device)
    state = EplbState(_initial_weights(ctx.rank, ctx.world_size, ctx.device), rank=ctx.rank,
                      world_size=ctx.world_size, num_logical_experts=NUM_LOGICAL, num_groups=2,
                      config=_config(options, ctx.world_size), cpu_group=ctx.cpu_group,
                      ep_group=ctx.ep_group)
    driver = _Driver(ctx, state)
    results: list[dict] = []
    workers: set[int] = set()
    try:
        warm = driver.run_until(lambda: len(state.history) > 0 and not state.rebalance_active,
                                options.layer_timeout_s * 3)
        warm_ok = warm and not state.history[0].aborted
        for sc, first in _schedule(ctx.spec.scenarios):
            if not warm_ok or len(state.history) != first:
                results.append({"name": sc.name, "skipped": "schedule broken (warm-up or an "
                                "earlier scenario did not finish)"})
                continue
            results.append(_run_scenario(ctx, state, driver, tracker, sc, first, workers))
            if ctx.rank == 0:
                ctx.report("done", name=sc.name)
    finally:
        state.shutdown(wait=True)
        tracker.close()
    gpu_after = _gpu_free_mib(ctx.device)
    del state
    stray = [pid for pid in workers if not _exited(pid)]
    return {"scenarios": results, "warm_ok": warm_ok, "violations": driver.violations,
            "final": {"stray_workers": stray, "children": _stray_children(None),
                      "segments": _segments(),
                      "stale_sockets": tracker.stale_sockets()},
            "gpu_free_mib": {"before_state": gpu_before, "after_shutdown": gpu_after}}


def _run_scenario(ctx: _Rank, state: EplbState, driver: _Driver, tracker: _ChannelTracker,
                  sc: Scenario, first: int, workers: set[int]) -> dict:
    options = ctx.spec.options
    mine = sc.target % ctx.world_size == ctx.rank
    last = first + sc.slots - 1
    obs: dict[str, Any] = {"name": sc.name, "first": first, "t_error": None, "t_abandon": None,
                           "t_inject": None, "gpu_gap_mib": None}
    before = {"segments": _segments(), "fds": _fd_count(),
              "stats": tracker.stats()}
    violations_before = len(driver.violations)
    last_error = state.last_error
    if mine and sc.setup_fail:
        os.environ[failpoints.ENV] += ",setup:exit"
    armed = tracker.proxy if mine and sc.kind == "proxy" else None
    if armed is not None:
        armed.arm(sc.proxy)

    def each(report: Any) -> None:
        nonlocal last_error
        if (worker := _worker_pid(state)) is not None:
            workers.add(worker)
        now = time.time()
        if state.last_error is not last_error:
            last_error = state.last_error
            obs["t_error"] = obs["t_error"] or now
        record = next((r for r in state.history if r.rebalance_id == first), None)
        if record is None:
            return
        if report.rebalance_started and record is state.history[-1] and mine \
                and sc.kind == "wrong_key":
            endpoint = tracker.channels[-1][1]
            obs["injected"] = inject_wrong_key(endpoint)
            obs["t_inject"] = now
        if record.end_step is not None and obs.get("fault_end") is None:
            obs["fault_end"] = state.step_count
            if record.aborted:
                obs["t_abandon"] = now
                obs["gpu_gap_mib"] = _gpu_free_mib(ctx.device)
            if mine and sc.setup_fail:
                os.environ[failpoints.ENV] = _failpoint_env(ctx)
            if armed is not None:
                armed.disarm()

    limit = sc.slots * (options.layer_timeout_s + options.start_timeout_s)
    finished = driver.run_until(lambda: len(state.history) > last and not state.rebalance_active,
                                limit, each)
    if armed is not None:
        armed.disarm()
        obs["t_inject"] = armed.injected_at
    after = tracker.stats()
    obs.update(
        finished=finished,
        records=[_record_row(r) for r in state.history if first <= r.rebalance_id <= last],
        violations=driver.violations[violations_before:],
        stats={k: after.get(k, 0) - before["stats"].get(k, 0) for k in after},
        leftovers={"children": _stray_children(_worker_pid(state)),
                   "segments": _segments() - before["segments"],
                   "stale_sockets": tracker.stale_sockets(),
                   "fds": _fd_count() - before["fds"]})
    return obs


def _parent_kill_job(ctx: _Rank) -> dict:
    """Rank 0 SIGKILLs the last rank mid-rebalance and times how long that rank's worker
    outlives it; the killed rank never returns."""
    options = ctx.spec.options
    tracker = _ChannelTracker(proxy=False)
    state = EplbState(_initial_weights(ctx.rank, ctx.world_size, ctx.device), rank=ctx.rank,
                      world_size=ctx.world_size, num_logical_experts=NUM_LOGICAL, num_groups=2,
                      config=_config(options, ctx.world_size), cpu_group=ctx.cpu_group,
                      ep_group=ctx.ep_group)
    victim = ctx.world_size - 1
    try:
        pids = torch.tensor([os.getpid(), _worker_pid(state) or -1], dtype=torch.int64)
        gathered = [torch.zeros_like(pids) for _ in range(ctx.world_size)]
        dist.all_gather(gathered, pids, group=ctx.cpu_group)
        ctx.report("info", rank=ctx.rank, pid=os.getpid(), worker_pid=int(pids[1]),
                   endpoint=tracker.channels[-1][1])
        driver = _Driver(ctx, state)
        mid = driver.run_until(
            lambda: bool(state.history) and not state.history[0].aborted
            and state.history[0].end_step is not None and state.rebalance_active
            and bool(state.history[-1].layers_committed), options.layer_timeout_s * 3)
        if ctx.rank == victim:
            time.sleep(options.layer_timeout_s * 3)  # rank 0 kills this process meanwhile
            raise RuntimeError("rank 0 did not kill this rank")
        rank_pid, worker_pid = (int(v) for v in gathered[victim])
        t0 = time.monotonic()
        os.kill(rank_pid, signal.SIGKILL)
        worker_exit_s = _wait_exit(worker_pid, 5.0, t0)
        rank_exit_s = _wait_exit(rank_pid, 5.0, t0)
        t1 = time.monotonic()
        state.shutdown(wait=True)
        shutdown_s = time.monotonic() - t1
        return {"mid_rebalance": mid, "victim_pid": rank_pid, "victim_worker": worker_pid,
                "worker_exit_s": worker_exit_s, "rank_exit_s": rank_exit_s,
                "survivor_shutdown_s": shutdown_s, "violations": driver.violations,
                "children": _stray_children(None), "stale_sockets": tracker.stale_sockets()}
    finally:
        state.shutdown(wait=True)
        tracker.close()


def _wait_exit(pid: int, limit_s: float, t0: float) -> float | None:
    while time.monotonic() - t0 < limit_s:
        if _exited(pid):
            return time.monotonic() - t0
        time.sleep(0.005)
    return None


#: Faults the soak cycles through (each makes every rank restart its worker).
SOAK_FAULTS = ("stage:sigkill", "plan:exit", "ready:sigterm", "policy:raise", "stage:sigsegv")


@dataclass
class SoakResult:
    """Resources of each rank at the start (after the first restart), at the end (before
    shutdown) and after shutdown; ``problems`` lists every broken expectation."""

    ranks: list[dict]
    problems: list[str]
    seconds: float


def _soak_faults(cycles: int, restarts: int, world_size: int) -> list[tuple[int, int, str]]:
    """(rebalance id, rank, failpoint spec) of each injected fault, spread evenly."""
    every = cycles // restarts
    return [(every * i + every // 2, i % world_size,
             f"{SOAK_FAULTS[i % len(SOAK_FAULTS)]}@rebalance={every * i + every // 2}")
            for i in range(restarts)]


def _resources(state: EplbState | None) -> dict:
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return {"rss_mib": rss / 1024, "fds": _fd_count(), "segments": _segments(),
            "stray_children": _stray_children(None if state is None else _worker_pid(state))}


def _soak_job(ctx: _Rank) -> dict:
    """``cycles`` rebalances with ``restarts`` worker faults; resources before and after."""
    spec = ctx.spec
    faults = _soak_faults(spec.cycles, spec.restarts, ctx.world_size)
    os.environ[failpoints.ENV] = ",".join(f for _, rank, f in faults if rank == ctx.rank)
    os.environ.pop(failpoints.LOG_ENV, None)
    options = spec.options
    state = EplbState(_initial_weights(ctx.rank, ctx.world_size, ctx.device), rank=ctx.rank,
                      world_size=ctx.world_size, num_logical_experts=NUM_LOGICAL, num_groups=2,
                      config=_config(options, ctx.world_size), cpu_group=ctx.cpu_group,
                      ep_group=ctx.ep_group)
    driver = _Driver(ctx, state)
    started = time.monotonic()
    warm_id = faults[0][0] + 2
    try:
        driver.run_until(lambda: len(state.history) > warm_id and not state.rebalance_active,
                         options.timeout_s)
        start = _resources(state)
        finished = driver.run_until(
            lambda: len(state.history) >= spec.cycles and not state.rebalance_active,
            options.timeout_s - (time.monotonic() - started))
        end = _resources(state)
        restarts = state.worker_restarts
    finally:
        state.shutdown(wait=True)
    history = state.history
    return {"finished": finished, "start": start, "end": end,
            "after_shutdown": _resources(None), "restarts": restarts,
            "rebalances": len(history), "aborted": sum(r.aborted for r in history),
            "committed_layers": sum(len(r.layers_committed) for r in history),
            "violations": driver.violations[:5], "seconds": time.monotonic() - started}


def run_soak(cycles: int = 1000, restarts: int = 50, options: FaultOptions = FaultOptions(),
             rss_noise_mib: float = 16.0) -> SoakResult:
    """Run ``cycles`` rebalances with ``restarts`` injected worker faults (each restarts
    every rank's worker) and compare each rank's RSS, open fds, /dev/shm segments and child
    processes at the start and the end: fds and segments must not grow, RSS by at most
    ``rss_noise_mib``, and no stray process may remain."""
    if not 0 < restarts <= cycles // 2:
        raise ValueError(f"restarts={restarts} must be in [1, cycles // 2 = {cycles // 2}]")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="eplb-soak-") as tmp:  # the ranks' logs
        run = _launch("soak", [], options, os.path.join(tmp, "unused"), cycles=cycles,
                      restarts=restarts)
    problems = [f"rank {r}: {e}" for r, e in sorted(run.errors.items())]
    problems += [f"rank {r}: left after exit {names[:3]}"
                 for r, names in sorted(run.segments_left.items())]
    ranks = [run.results[r] for r in sorted(run.results)]
    for rank, res in enumerate(ranks):
        start, end, after = res["start"], res["end"], res["after_shutdown"]
        checks = [
            (res["finished"], "did not finish its cycles in time"),
            (res["rebalances"] >= cycles, f"ran {res['rebalances']} rebalances, not {cycles}"),
            (res["restarts"] >= restarts, f"restarted its worker {res['restarts']} times, "
                                          f"expected {restarts}"),
            (res["aborted"] == restarts, f"{res['aborted']} rebalances aborted, expected "
                                         f"{restarts} (one per fault)"),
            (not res["violations"], f"inconsistent: {res['violations']}"),
            (end["fds"] <= start["fds"], f"open fds {start['fds']} -> {end['fds']}"),
            (end["segments"] <= start["segments"],
             f"shm segments {start['segments']} -> {end['segments']}"),
            (end["rss_mib"] - start["rss_mib"] <= rss_noise_mib,
             f"RSS {start['rss_mib']:.1f} -> {end['rss_mib']:.1f} MiB"),
            (not end["stray_children"] and not after["stray_children"],
             f"stray processes {end['stray_children'] + after['stray_children']}"),
        ]
        problems += [f"rank {rank}: {text}" for ok, text in checks if not ok]
    return SoakResult(ranks, problems, time.monotonic() - t0)


_JOBS: dict[str, Callable[[_Rank], dict]] = {"batch": _batch_job, "parent_kill": _parent_kill_job,
                                             "soak": _soak_job}


def _rank_entry(rank: int, spec: _RunSpec, conn: Connection) -> None:
    # The faults are expected: their logs (this rank's and, through the inherited stderr, its
    # workers') go to a file in the run's log directory, not between the result lines.
    log = os.open(os.path.join(os.path.dirname(spec.log_path), f"{spec.job}-rank{rank}.log"),
                  os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log, 2)
    os.close(log)
    logs.configure(f"rank{rank}", default=logging.WARNING)

    def report(kind: str, **data: Any) -> None:
        conn.send_bytes(msgpack.packb({"kind": kind, **data}))

    opts = spec.options
    try:
        device = torch.device(f"cuda:{rank}" if opts.device == "cuda" else "cpu")
        if device.type == "cpu":
            torch.set_num_threads(1)
        ep_group, cpu_group = init_rank_groups(rank, opts.ranks, spec.init_method, device,
                                               opts.timeout_s / 4)
        ctx = _Rank(rank, opts.ranks, device, ep_group, cpu_group, spec, report)
        report("result", result=_JOBS[spec.job](ctx))
    except Exception as exc:  # reported to the runner, which fails the scenarios
        report("error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        conn.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class _Outcome:
    """What a run's ranks sent (by rank) and what an exited rank left by name."""

    results: dict[int, dict]
    infos: dict[int, list[dict]]
    errors: dict[int, str]
    segments_left: dict[int, list[str]]


def _launch(job: str, items: Sequence[Scenario], options: FaultOptions, log_path: str,
            cycles: int = 0, restarts: int = 0) -> _Outcome:
    """Run ``job`` on ``options.ranks`` spawned rank processes. No rank process outlives the
    call (terminate, then kill)."""
    spec = _RunSpec(job, options, f"tcp://127.0.0.1:{_free_port()}", tuple(items), log_path,
                    cycles, restarts)
    mp = multiprocessing.get_context("spawn")
    procs, readers = [], {}
    for rank in range(options.ranks):
        reader, writer = mp.Pipe(duplex=False)
        proc = mp.Process(target=_rank_entry, args=(rank, spec, writer), daemon=True,
                          name=f"eplb-faults-rank{rank}")
        proc.start()
        writer.close()
        procs.append(proc)
        readers[reader] = rank
    results: dict[int, dict] = {}
    infos: dict[int, list[dict]] = {r: [] for r in range(options.ranks)}
    errors: dict[int, str] = {}
    started = time.monotonic()
    deadline = started + options.timeout_s
    try:
        while readers and (remaining := deadline - time.monotonic()) > 0:
            for reader in wait(list(readers), timeout=remaining):
                rank = readers[reader]
                try:
                    msg = msgpack.unpackb(reader.recv_bytes(), raw=False)
                except EOFError:
                    del readers[reader]
                    errors.setdefault(rank, "exited without a result")
                    continue
                if msg["kind"] == "info":
                    infos[rank].append(msg)
                    continue
                if msg["kind"] == "done":
                    announce(f"faults: {msg['name']} finished "
                             f"after {time.monotonic() - started:.0f} s")
                    continue
                del readers[reader]
                reader.close()
                if msg["kind"] == "result":
                    results[rank] = msg["result"]
                else:
                    errors[rank] = msg["error"]
                    logger.error("rank %d failed:\n%s", rank, msg["traceback"])
        for rank in readers.values():
            errors.setdefault(rank, f"no result within --timeout {options.timeout_s:g} s")
    finally:
        for proc in procs:
            proc.join(_EXIT_WAIT_S if not errors else 0.5)
            for stop in (proc.terminate, proc.kill):
                if proc.is_alive():
                    stop()
                    proc.join(_EXIT_WAIT_S)
        for reader in readers:
            reader.close()
    # A rank that exited (not killed by a signal) must have left nothing by name.
    left = {rank: _named_leftovers(proc.pid)
            for rank, proc in enumerate(procs) if proc.exitcode is not None and proc.exitcode >= 0}
    return _Outcome(results, infos, errors, {r: names for r, names in left.items() if names})


# -- evaluation -------------------------------------------------------------------------------

def _bound(sc: Scenario, options: FaultOptions) -> float:
    extra = {"kill": 0.0, "hang": options.heartbeat_timeout_s,
             "timeout": options.layer_timeout_s}[sc.bound]
    return extra + options.detect_bound_s


def _injections(log_path: str) -> dict[int, float]:
    """Failpoint firings by rebalance id (the first one of each)."""
    out: dict[int, float] = {}
    if os.path.exists(log_path):
        with open(log_path) as f:
            for line in f:
                entry = json.loads(line)
                out.setdefault(entry["rebalance"], entry["time"])
    return out


def _evaluate(sc: Scenario, observed: list[dict], fired: dict[int, float],
              options: FaultOptions) -> ScenarioResult:
    skipped = next((o["skipped"] for o in observed if "skipped" in o), None)
    if skipped:
        return ScenarioResult(sc.name, sc.expect, "not run", None, None, False, False, "?",
                              skipped)
    target = observed[sc.target % len(observed)]
    notes = []
    records = [[row[:5] for row in o["records"]] for o in observed]  # reasons differ by rank
    agree = all(r == records[0] for r in records)
    if not agree:
        notes.append("ranks' rebalance records differ")
    violations = [v for o in observed for v in o["violations"]]
    notes += violations[:2]
    fault = records[0][0] if records[0] else None
    aborted = bool(fault and fault[1])
    outcome = "abandoned" if aborted else ("completed" if fault and fault[2] is not None
                                           else "unfinished")
    t_inject = fired.get(target["first"]) if sc.kind == "failpoint" else target["t_inject"]
    detection = None
    known = [min(t for t in (o["t_abandon"], o["t_error"]) if t is not None)
             if o["t_abandon"] or o["t_error"] else None for o in observed]
    if t_inject is not None and aborted and all(known):
        detection = max(known) - t_inject
    bound = _bound(sc, options) if sc.expect != "complete" else None
    injected = t_inject is not None
    if not injected:
        notes.append("fault was not injected")
    recovered = any(not r[1] and r[2] is not None and r[3] for r in records[0][1:]) \
        if records[0] else False
    if not recovered:
        notes += [f"rebalance {r[0]}: " + ("aborted: " + r[5] if r[1] else
                                           f"ended with layers {r[3]}" if r[2] is not None
                                           else "unfinished")
                  for r in observed[0]["records"][1:]]
    expected = {"abandon": aborted, "complete": outcome == "completed",
                "either": outcome in ("abandoned", "completed")}[sc.expect]
    if not expected:
        notes.append(f"expected {sc.expect}, got {outcome}")
    in_bound = detection is None or bound is None or detection <= bound
    if aborted and detection is None:
        in_bound = False
        notes.append("abandon not observed on every rank")
    if not in_bound and detection is not None:
        notes.append(f"detection {detection:.2f} s over the bound {bound:.2f} s")
    leftovers = _leftover_text(observed)
    stats = target["stats"]
    if sc.kind == "wrong_key" and stats.get("unauthenticated", 0) != target.get("injected"):
        notes.append(f"{target.get('injected')} bad frames sent, "
                     f"{stats.get('unauthenticated', 0)} counted unauthenticated")
        expected = False
    if sc.kind == "proxy" and sc.proxy.startswith("duplicate") and not stats.get("replayed"):
        notes.append("no duplicate was counted as replayed")
        expected = False
    if sc.kind == "proxy" and sc.proxy.startswith("corrupt") and not stats.get("unauthenticated"):
        notes.append("the corrupted frame was not counted as unauthenticated")
        expected = False
    counters = {k: v for k, v in stats.items() if k not in ("sent", "received") and v}
    if counters:
        notes.append("drops " + ", ".join(f"{k}={v}" for k, v in sorted(counters.items())))
    gaps = [o["gpu_gap_mib"] for o in observed if o.get("gpu_gap_mib") is not None]
    if gaps:
        notes.append("GPU free after kill " + "/".join(f"{g:.0f}" for g in gaps) + " MiB")
    finished = all(o["finished"] for o in observed)
    if not finished:
        notes.append("did not finish within its time limit")
    ok = (injected and expected and agree and not violations and recovered and in_bound
          and leftovers == "none" and finished)
    return ScenarioResult(sc.name, sc.expect, outcome, detection, bound, agree and not violations,
                          recovered, leftovers, "; ".join(notes), ok)


def _leftover_text(observed: list[dict]) -> str:
    parts = []
    for rank, o in enumerate(observed):
        left = o["leftovers"]
        if left["children"]:
            parts.append(f"r{rank} procs {','.join(left['children'])}")
        if left["segments"] > 0:
            parts.append(f"r{rank} +{left['segments']} shm")
        if left["stale_sockets"]:
            parts.append(f"r{rank} {len(left['stale_sockets'])} socket files")
    return "; ".join(parts) or "none"


def _evaluate_parent_kill(sc: Scenario, run: _Outcome, options: FaultOptions) -> ScenarioResult:
    victim = options.ranks - 1
    errors = {r: e for r, e in run.errors.items() if r != victim}
    errors.update({r: f"left after exit {names[:3]}" for r, names in run.segments_left.items()})
    survivor = run.results.get(0)
    info = next(iter(run.infos.get(victim, [])), None)
    swept, left = _sweep_dead_owner(info)
    if errors or survivor is None:
        return ScenarioResult(sc.name, sc.expect, "failed", None, 1.0, False, False, swept,
                              "; ".join(f"rank {r}: {e}" for r, e in errors.items()))
    notes = [f"killed rank exited in {survivor['rank_exit_s'] or float('nan'):.4f} s",
             f"survivor shut down in {survivor['survivor_shutdown_s']:.2f} s"]
    if swept != "none":
        notes.append(f"swept {swept} of the killed rank, as the next start does (a SIGKILLed "
                     "process cannot remove it)")
    detection = survivor["worker_exit_s"]
    ok_exit = detection is not None and detection <= 1.0 and survivor["victim_worker"] > 0
    notes.append(f"worker pid {survivor['victim_worker']}")
    if not ok_exit:
        notes.append("the killed rank's worker outlived it by more than 1 s")
    stray = survivor["children"] + survivor["stale_sockets"] + left
    leftovers = "none" if not stray else ", ".join(stray)
    ok = (ok_exit and survivor["mid_rebalance"] and not survivor["violations"]
          and leftovers == "none")
    if not survivor["mid_rebalance"]:
        notes.append("no rebalance was in flight at the kill")
    return ScenarioResult(sc.name, sc.expect, "worker exited" if ok_exit else "worker outlived",
                          detection, 1.0, not survivor["violations"], True, leftovers,
                          "; ".join(notes), ok)


def _sweep_dead_owner(info: dict | None) -> tuple[str, list[str]]:
    """Sweep what the SIGKILLed rank left, as the next engine start does
    (:func:`ipc.channel.sweep_stale_dirs`): (what was swept, what its pid still names after)."""
    if info is None:
        return "none", []
    prefix = f"{PRIVATE_DIR_PREFIX}{info['pid']}-"
    swept = [p for p in sweep_stale_dirs() if os.path.basename(p).startswith(prefix)]
    return (f"{len(swept)} socket dir" if swept else "none"), _named_leftovers(info["pid"])


def run_scenarios(names: Sequence[str] | None = None,
                  options: FaultOptions = FaultOptions(),
                  log_dir: str | None = None) -> list[ScenarioResult]:
    """Run the named scenarios (all when None) and evaluate them, in the order of
    :func:`scenarios`. Batch scenarios share one run; the parent killer has its own. The
    ranks' and workers' logs (full of the injected failures) go to files in ``log_dir``
    (kept), else in a temporary directory removed at the end."""
    catalog = scenarios(options.ranks)
    known = {sc.name for sc in catalog}
    unknown = [n for n in names or () if n not in known]
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; --list shows them")
    chosen = [sc for sc in catalog if names is None or sc.name in names]
    if options.ranks < 2:
        raise ValueError("fault scenarios need --ranks >= 2 (a peer rank observes each fault)")
    out: dict[str, ScenarioResult] = {}
    batch = [sc for sc in chosen if sc.kind != "parent_kill"]
    with tempfile.TemporaryDirectory(prefix="eplb-faults-") as scratch:
        tmp = log_dir or scratch
        os.makedirs(tmp, exist_ok=True)
        if batch:
            log_path = os.path.join(tmp, "failpoints.jsonl")
            run = _launch("batch", batch, options, log_path)
            results, errors = run.results, run.errors
            fired = _injections(log_path)
            for i, sc in enumerate(batch):
                if errors or len(results) != options.ranks:
                    detail = "; ".join(f"rank {r}: {e}" for r, e in sorted(errors.items()))
                    out[sc.name] = ScenarioResult(sc.name, sc.expect, "run failed", None, None,
                                                  False, False, "?", detail)
                    continue
                observed = [results[r]["scenarios"][i] for r in range(options.ranks)]
                out[sc.name] = _evaluate(sc, observed, fired, options)
            if not errors and len(results) == options.ranks:
                _check_final(results, run.segments_left, batch, out)
        for sc in (s for s in chosen if s.kind == "parent_kill"):
            run = _launch("parent_kill", [sc], options, os.path.join(tmp, "unused"))
            out[sc.name] = _evaluate_parent_kill(sc, run, options)
            announce(f"faults: {sc.name} finished: {'ok' if out[sc.name].ok else 'FAIL'}")
    return [out[sc.name] for sc in chosen]


def _check_final(results: dict[int, dict], segments_left: dict[int, list[str]],
                 batch: list[Scenario], out: dict[str, ScenarioResult]) -> None:
    """After shutdown and exit: no worker left, no segment, no socket file; else the last
    row fails."""
    problems = [f"rank {r}: left after exit {names[:3]}" for r, names in sorted(segments_left.items())]
    for rank, result in sorted(results.items()):
        final = result["final"]
        if final["stray_workers"] or final["children"]:
            left = final["stray_workers"] + final["children"]
            problems.append(f"rank {rank}: workers left {left}")
        if final["segments"] > 0:
            problems.append(f"rank {rank}: {final['segments']} shared segments still owned "
                            "after shutdown")
        if final["stale_sockets"]:
            problems.append(f"rank {rank}: socket files left {final['stale_sockets']}")
        if result["violations"] and not any(not r.consistent for r in out.values()):
            problems.append(f"rank {rank}: {result['violations'][0]}")
        gaps = [o["gpu_gap_mib"] for o in result["scenarios"]
                if o.get("gpu_gap_mib") is not None]
        if gaps and min(gaps) < gaps[0] - GPU_MEM_TOLERANCE_MIB:
            problems.append(f"rank {rank}: GPU free memory right after a worker kill fell from "
                            f"{gaps[0]:.0f} to {min(gaps):.0f} MiB over the run (memory of "
                            "dead workers not returned)")
        gpu = result["gpu_free_mib"]
        if gpu["before_state"] is not None:
            out[batch[-1].name].notes += (f"; rank {rank} GPU free MiB before state "
                                          f"{gpu['before_state']:.0f}, after shutdown "
                                          f"{gpu['after_shutdown']:.0f}")
    if problems:
        row = out[batch[-1].name]
        row.ok = False
        row.leftovers = "after shutdown: " + "; ".join(problems)


def format_table(rows: Sequence[ScenarioResult]) -> str:
    """A markdown table of the results."""
    head = ("| scenario | expect | outcome | detection (s) | bound (s) | consistent | recovered "
            "| leftovers | ok | notes |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        det = "-" if r.detection_s is None else f"{r.detection_s:.3f}"
        bound = "-" if r.bound_s is None else f"{r.bound_s:.1f}"
        lines.append(f"| {r.name} | {r.expect} | {r.outcome} | {det} | {bound} | "
                     f"{'yes' if r.consistent else 'NO'} | {'yes' if r.recovered else 'NO'} | "
                     f"{r.leftovers} | {'ok' if r.ok else 'FAIL'} | {r.notes} |")
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------

def add_faults_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mp-eplb faults``."""
    defaults = FaultOptions()
    parser.add_argument("--scenario", action="append", default=None, metavar="NAME",
                        help="run this scenario (repeatable; default: all, see --list)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--ranks", type=positive_int, default=defaults.ranks,
                        help="rank processes (default %(default)s)")
    parser.add_argument("--device", type=device, choices=("cpu", "cuda"), default=defaults.device,
                        help="cpu (gloo) or cuda (one GPU per rank)")
    parser.add_argument("--communicator", choices=("auto", "cuda_ipc", "nccl", "gloo"),
                        default=defaults.communicator,
                        help="how workers move weights (default: cuda_ipc on cuda, gloo on cpu)")
    parser.add_argument("--timeout", type=positive_float, default=defaults.timeout_s,
                        help="seconds one run may take before its ranks are killed "
                             "(default %(default)s)")
    parser.add_argument("--heartbeat-timeout", type=positive_float, default=defaults.heartbeat_timeout_s,
                        help="EplbConfig.heartbeat_timeout_s of the runs (default %(default)s)")
    parser.add_argument("--layer-timeout", type=positive_float, default=defaults.layer_timeout_s,
                        help="EplbConfig.layer_timeout_s of the runs (default %(default)s)")
    parser.add_argument("--detect-bound", type=positive_float, default=defaults.detect_bound_s,
                        help="seconds within which a dead worker must be detected on every "
                             "rank (default %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--log-dir", metavar="DIR",
                        help="keep the ranks' and workers' logs (the injected failures) there, "
                             "one file per run and rank (default: discarded)")


def run_faults(args: argparse.Namespace) -> int:
    """``mp-eplb faults``: run, print the table; 0 if every scenario kept every invariant."""
    if args.list:
        for sc in scenarios(args.ranks):
            print(f"{sc.name:22} expect {sc.expect:8} {sc.doc}")
        return 0
    options = FaultOptions(ranks=args.ranks, device=args.device, communicator=args.communicator,
                           timeout_s=args.timeout, heartbeat_timeout_s=args.heartbeat_timeout,
                           layer_timeout_s=args.layer_timeout, detect_bound_s=args.detect_bound)
    if args.device == "cuda" and torch.cuda.device_count() < args.ranks:
        print(f"--ranks {args.ranks} needs {args.ranks} GPUs, "
              f"{torch.cuda.device_count()} visible", file=sys.stderr)
        return 2
    try:
        rows = run_scenarios(args.scenario, options, log_dir=args.log_dir)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(rows))
    failed = [r.name for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} scenarios kept every invariant"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 1 if failed else 0
