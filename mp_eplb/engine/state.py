"""EplbState: what the engine holds and calls once per forward step.

The engine builds one per rank with that rank's expert weights. Each step it hands over the
step's per-slot expert load; every ``step_interval`` steps a rebalance starts. In ``process``
mode a transfer subprocess (``thread`` mode: a thread) plans it and stages layers into
staging buffers; the engine applies a layer (``move_from_buffer`` plus the routing maps) only
once every rank has it staged, and all ranks apply it at the same step. ``sync`` mode does the
whole rearrangement in one blocking call.

Commit protocol (invariants 1 and 2): while a rebalance is in flight, every rank contributes
``[layers staged here, plan received here, no local failure]`` to one MIN all-reduce of three
int64 on the engine's CPU group per step. It is pipelined: issued asynchronously at step S and
its result acted on at step S+1, so the host does not wait for the peers in steady state; all
ranks act on the same result at the same step, so they commit the same layers, or abandon the
rebalance together. Outside a rebalance there is no collective at all.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from ipc.schema import Goodbye
from mp_eplb.engine.host import Health, WorkerBackend, WorkerSpec, make_backend, rendezvous
from mp_eplb.config import EplbConfig
from mp_eplb.errors import (EplbError, InvalidLoadError, PeerFailedError, StateClosedError,
                            WorkerFailedError)
from mp_eplb.maps import RoutingMaps, default_phy2log, maps_from_phy2log, validate_phy2log
from mp_eplb.protocol import (PEER_FAILED_EXIT, PEER_FAILED_KIND, Abort, BufferFree, LayerReady,
                              Plan, Rebalance, RebalanceDone, WorkerError, WorkerTopology,
                              pack_int64, unpack_int64)
from mp_eplb.placement import load_placement, save_placement
from mp_eplb.policy import global_policy_reason, mean_balancedness, plan_rebalance
from mp_eplb.transfer import layer_metadata, move_from_buffer, rearrange_expert_weights_inplace

__all__ = ["EplbState", "StepReport", "RebalanceRecord"]

logger = logging.getLogger(__name__)

#: Seconds between worker health checks while no rebalance is in flight.
WATCH_INTERVAL_S = 0.1
#: Integer dtypes ``step()`` accepts for ``expert_load`` (token counts).
_LOAD_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16,
                torch.uint32, torch.uint64)
_NO_MINIMUM = torch.iinfo(torch.int64).max


@dataclass(frozen=True)
class StepReport:
    """What one :meth:`EplbState.step` did (the defaults: nothing)."""

    committed_layers: list[int] = field(default_factory=list)
    rebalance_active: bool = False
    rebalance_started: bool = False
    rebalance_finished: bool = False


@dataclass
class RebalanceRecord:
    """History of one rebalance (times in seconds; ``started_at``/``ended_at`` on the
    ``perf_counter`` clock). Per committed layer: ``commit_s`` (host time of
    ``move_from_buffer`` + maps), ``commit_steps``; per step in flight: ``agreement_s`` (host time
    of waiting for the previous step's agreement and issuing this step's); per staged layer:
    ``ready_latency_s`` (worker send -> engine receipt).
    ``balancedness_before``/``_after``: mean over layers of mean / max tokens per rank on the
    load window the policy read, under the old and the new placement (``None`` until planned).
    ``bytes_staged``: bytes of the rows this rank received (process/thread: as the worker
    reports them; sync: computed from the maps)."""

    rebalance_id: int
    start_step: int
    started_at: float
    end_step: int | None = None
    ended_at: float | None = None
    layers_planned: int | None = None
    layers_committed: list[int] = field(default_factory=list)
    commit_steps: list[int] = field(default_factory=list)
    commit_s: list[float] = field(default_factory=list)
    agreement_s: list[float] = field(default_factory=list)
    ready_latency_s: list[float] = field(default_factory=list)
    policy_s: float | None = None
    bytes_staged: int | None = None
    stage_s: float | None = None
    balancedness_before: float | None = None
    balancedness_after: float | None = None
    aborted: bool = False
    reason: str = ""

    @property
    def duration_s(self) -> float | None:
        """Seconds from the rebalance start to its end (``None`` while in flight)."""
        return None if self.ended_at is None else self.ended_at - self.started_at


@dataclass
class _InFlight:
    """Engine-side state of the rebalance in progress."""

    record: RebalanceRecord
    plan: Plan | None = None
    maps: RoutingMaps | None = None
    ready: list[LayerReady] = field(default_factory=list)
    rows: dict[int, torch.Tensor] = field(default_factory=dict)
    committed: int = 0
    last_progress: float = field(default_factory=time.monotonic)
    failure: str = ""
    #: The agreement issued at the previous step: (its work, ``None`` on one rank; its tensor).
    pending: tuple[dist.Work | None, torch.Tensor] | None = None


class EplbState:
    """Expert-parallel load balancer of one engine rank.

    ``expert_weights[layer]`` is a sequence of tensors ``[num_local_slots, ...]`` (any width,
    dtype; all on one device, contiguous; owning tensors or views). In ``process`` mode they are
    shared where they are (``ipc.handles.share_storage``): CUDA weights keep their addresses (CUDA
    graphs captured before stay valid); a CPU weight's storage moves into shared memory in place,
    so every view and Parameter on it follows.
    ``cpu_group``: a gloo group over the engine's ranks, used only for the per-step agreement
    during a rebalance and at init. ``ep_group``: the engine's device group, used by ``sync``
    mode for the transfer (defaults to ``cpu_group``).
    The routing maps (``physical_to_logical_map`` [layers, physical], ``logical_to_physical_map``
    [layers, logical, redundant + 1], ``logical_replica_count`` [layers, logical], int64) are
    views of one ``[layers, width]`` table on the weights' device (not contiguous), updated in
    place at commits and never re-bound, so a CUDA graph may read them.
    """

    def __init__(self, expert_weights: Sequence[Sequence[torch.Tensor]], *, rank: int,
                 world_size: int, num_logical_experts: int, num_groups: int = 1,
                 config: EplbConfig | None = None,
                 cpu_group: dist.ProcessGroup | None = None,
                 ep_group: dist.ProcessGroup | None = None,
                 initial_phy2log: np.ndarray | torch.Tensor | None = None) -> None:
        if config is not None and not isinstance(config, EplbConfig):
            raise TypeError(f"config must be an EplbConfig (or None for the defaults), got "
                            f"{type(config).__name__}; pass EplbConfig(...)")
        self.config = config if config is not None else EplbConfig()
        if not (_is_int(world_size) and world_size >= 1 and _is_int(rank)
                and 0 <= rank < world_size):
            raise ValueError(f"rank={rank!r} and world_size={world_size!r} must satisfy "
                             "0 <= rank < world_size")
        for name, value in (("num_logical_experts", num_logical_experts),
                            ("num_groups", num_groups)):
            if not (_is_int(value) and value >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if world_size > 1 and cpu_group is None:
            raise ValueError("cpu_group (a gloo group over the engine's ranks) is required "
                             "when world_size > 1")
        if self.config.mode != "process" and (ep_group or cpu_group) is None:
            raise ValueError(f"EplbConfig.mode={self.config.mode!r} moves weights in this "
                             "process and needs ep_group or cpu_group (a process group over the "
                             "engine's ranks), also for one rank; mode 'process' needs none")
        self.rank, self.world_size = rank, world_size
        self.num_logical = num_logical_experts
        self.cpu_group, self.ep_group = cpu_group, ep_group or cpu_group
        self.expert_weights = _validate_weights(expert_weights)
        self.device = self.expert_weights[0][0].device
        self.num_layers = len(self.expert_weights)
        self.num_local = self.expert_weights[0][0].shape[0]
        self.num_physical = self.num_local * world_size
        redundant = self.num_physical - num_logical_experts
        if redundant != self.config.num_redundant_experts:
            raise ValueError(
                f"{world_size} ranks x {self.num_local} local slots = {self.num_physical} physical "
                f"slots, but num_logical_experts={num_logical_experts} + "
                f"EplbConfig.num_redundant_experts={self.config.num_redundant_experts} = "
                f"{num_logical_experts + self.config.num_redundant_experts}; make them agree")
        ranks_per_node = self.config.ranks_per_node or world_size
        if world_size % ranks_per_node:
            raise ValueError(f"EplbConfig.ranks_per_node={ranks_per_node} must divide "
                             f"world_size={world_size}")
        self.ranks_per_node = ranks_per_node
        num_nodes = world_size // ranks_per_node
        if self.config.mode == "process" and num_nodes > 1 and self.config.rendezvous is None:
            raise ValueError(f"the ranks span {num_nodes} nodes (EplbConfig.ranks_per_node="
                             f"{ranks_per_node}) but EplbConfig.rendezvous is None; set it to "
                             "'tcp://host:port' on a host every node reaches (the transfer "
                             "workers' process group meets there)")
        #: Weight communicator of the worker (``None`` in sync mode, which uses ``ep_group``).
        self.communicator = (None if self.config.mode == "sync" else
                             self.config.resolved_communicator(self.device.type, num_nodes))
        why_global = global_policy_reason(num_groups, num_logical_experts, num_nodes)
        if why_global:
            logger.warning("rank %d: %s; the global policy is used (num_groups=1)", rank,
                           why_global)
        #: Expert groups the policy uses (1 when ``num_groups`` cannot be packed onto nodes).
        self.num_groups = 1 if why_global else num_groups
        self.topology = WorkerTopology(
            rank=rank, world_size=world_size, num_logical=num_logical_experts,
            num_groups=self.num_groups, num_redundant=redundant, ranks_per_node=ranks_per_node,
            max_ops_per_batch=self.config.max_ops_per_batch)
        if initial_phy2log is not None and self.config.loaded_phy2log is not None:
            raise ValueError("pass the layout the weights are in once: the initial_phy2log "
                             "argument or EplbConfig.loaded_phy2log, not both")
        loaded = (self._placement("EplbConfig.loaded_phy2log", self.config.loaded_phy2log)
                  if initial_phy2log is None else
                  self._placement("initial_phy2log", initial_phy2log))
        start = self.config.initial_phy2log
        phy2log = loaded if start is None else self._placement("EplbConfig.initial_phy2log",
                                                               start)
        maps = maps_from_phy2log(phy2log, num_logical_experts, redundant + 1)
        self._phy2log = maps.phy2log.copy()
        #: ``[layers, width]`` int64 on the weights' device: every map of a layer in one row, so a
        #: layer's switch is one copy. The public maps are views of it, updated in place (never
        #: re-bound: CUDA graphs captured on them stay valid).
        self._maps_flat = _map_table(maps).to(self.device)
        phy, log, cnt = (self.num_physical, num_logical_experts * (redundant + 1),
                         num_logical_experts)
        columns = torch.split(self._maps_flat, [phy, log, cnt, phy, phy], dim=1)
        self.physical_to_logical_map = columns[0]
        self.logical_to_physical_map = columns[1].unflatten(1, (num_logical_experts, redundant + 1))
        self.logical_replica_count = columns[2]
        self._load_index, self._slot_valid = columns[3], columns[4]

        self.step_count = 0
        self._closed = False
        #: Least token count of device loads since the last rebalance start (sign checked
        #: there, not per step: no host sync per step).
        self._load_min = torch.full((1,), _NO_MINIMUM, dtype=torch.int64, device=self.device)
        self._load_min_fed = False
        self.history: list[RebalanceRecord] = []
        #: The latest error recorded (sticky; see :attr:`healthy` and :attr:`error_count`).
        self.last_error = None
        #: How many errors were recorded since construction (each also sets ``last_error``).
        self.error_count = 0
        self._healthy = True
        self._restarted = False
        self._restarts = 0
        self._stopping: threading.Thread | None = None
        #: Balancedness of the window at the last ``log_balancedness`` step (``None`` before).
        self.current_balancedness: float | None = None
        self._inflight: _InFlight | None = None
        self._next_id = 0
        self._backend: WorkerBackend | None = None
        self._worker_fault: WorkerFailedError | None = None
        self._last_watch = 0.0
        #: ``[window, layers, logical]`` int64 tokens per logical expert, one row per step.
        self.load_window = torch.zeros(self._window_shape(), dtype=torch.int64,
                                       device=self.device)
        if not np.array_equal(loaded, self._phy2log):
            self._move_to_start(loaded)
        if self.config.mode != "sync":
            self._spec = WorkerSpec(
                device=self.device, config=self.config, topology=self.topology,
                communicator=self.communicator, expert_weights=self.expert_weights,
                group=self.cpu_group if self.cpu_group is not None else self.ep_group)
            self._backend = make_backend(self._spec)

    # -- engine-facing API ------------------------------------------------------------------

    def step(self, expert_load: torch.Tensor) -> StepReport:
        """Record this step's load and advance the rebalance. Call once per forward step,
        at the same point of the step on every rank.

        ``expert_load``: ``[layers, physical slots]`` tokens this rank routed to each physical
        slot this step: a torch tensor of an integer dtype on the CPU or the weights' device
        (no copy), or a numpy integer array. A bad type, dtype, shape or device raises
        ``TypeError``/``ValueError`` and a negative count on the CPU ``InvalidLoadError``,
        before anything changes. A negative count on the GPU is found at the next rebalance
        start (no host sync per step): every rank skips that rebalance, the offending rank
        clears its window and its ``last_error`` is an ``InvalidLoadError``.
        After :meth:`shutdown` this raises ``StateClosedError``.
        Committed layers have new weights and maps when this returns.
        """
        if self._closed:
            raise StateClosedError("EplbState.step() called after shutdown(); build a new "
                                   "EplbState to balance again")
        self._record_load(self._checked_load(expert_load))
        self.step_count += 1
        if (self.config.log_balancedness
                and self.step_count % self.config.log_balancedness_interval == 0):
            self._log_balancedness()
        started = finished = False
        committed: list[int] = []
        if self._backend is not None and self._inflight is None:
            self._watch_idle()
        if self._inflight is not None:
            committed, finished = self._advance()
        elif self.step_count % self.config.step_interval == 0:
            started = True
            if self.config.mode == "sync":
                committed = self._rearrange_now()
                finished = True
            elif self._start():
                committed, finished = self._advance()
            else:
                finished = True
        return StepReport(committed_layers=committed,
                          rebalance_active=self._inflight is not None,
                          rebalance_started=started, rebalance_finished=finished)

    @property
    def last_error(self) -> EplbError | None:
        """The latest fault (``WorkerFailedError``, ``InvalidLoadError``), or ``None``. Setting
        it records the time, reported as ``mp_eplb_last_error_age_seconds`` by :meth:`metrics`."""
        return self._last_error

    @last_error.setter
    def last_error(self, error: EplbError | None) -> None:
        self._last_error = error
        self._last_error_at = None if error is None else time.monotonic()

    def metrics(self) -> dict[str, float | int]:
        """This rank's counters and gauges, flat, with Prometheus-style names (no collective;
        cheap enough to call every scrape). Each is described in docs/operations.md."""
        done = [r for r in self.history if r.end_step is not None]
        planned = [r for r in done if not r.aborted and r.balancedness_after is not None]
        last = done[-1] if done else None
        return {
            "mp_eplb_steps_total": self.step_count,
            "mp_eplb_rebalances_total": sum(1 for r in done if not r.aborted),
            "mp_eplb_rebalance_aborts_total": sum(1 for r in done if r.aborted),
            "mp_eplb_worker_restarts_total": self.worker_restarts,
            "mp_eplb_errors_total": self.error_count,
            "mp_eplb_healthy": int(self.healthy),
            "mp_eplb_bytes_moved_total": sum(r.bytes_staged or 0 for r in self.history),
            "mp_eplb_layers_moved_total": sum(len(r.layers_committed) for r in self.history),
            "mp_eplb_rebalance_active": int(self.rebalance_active),
            "mp_eplb_balancedness_before": planned[-1].balancedness_before if planned else -1.0,
            "mp_eplb_balancedness_after": planned[-1].balancedness_after if planned else -1.0,
            "mp_eplb_balancedness_current": (-1.0 if self.current_balancedness is None
                                             else self.current_balancedness),
            "mp_eplb_last_rebalance_seconds": -1.0 if last is None else last.duration_s,
            "mp_eplb_last_rebalance_steps": -1 if last is None else last.end_step - last.start_step,
            "mp_eplb_last_error_age_seconds": (-1.0 if self._last_error_at is None
                                               else time.monotonic() - self._last_error_at),
        }

    def save_placement(self, path: str | os.PathLike, *, include_load: bool = False) -> None:
        """Write the current placement (the same on every rank) to ``path`` (``.json`` or
        ``.pt``, :mod:`mp_eplb.placement`); ``include_load`` adds this rank's load window sum
        ``[layers, logical]``. Pass the file as ``EplbConfig.initial_phy2log`` to start from it."""
        load = self.load_window.sum(dim=0).cpu() if include_load else None
        save_placement(path, self._phy2log, load, num_logical=self.num_logical)

    @property
    def rebalance_active(self) -> bool:
        return self._inflight is not None

    @property
    def worker_pid(self) -> int | None:
        """Process id of the transfer subprocess (process mode), else ``None``."""
        proc = getattr(self._backend, "proc", None)
        return None if proc is None else proc.pid

    @property
    def worker_start_s(self) -> float | None:
        """Seconds the transfer subprocess took from spawn to ``SetupDone`` (process mode,
        latest start), else ``None``."""
        return getattr(self._backend, "start_s", None)

    @property
    def worker_restarts(self) -> int:
        """How many times the transfer worker was replaced after a failure (this rank's or a
        peer's); kept after :meth:`shutdown`."""
        return self._restarts

    @property
    def healthy(self) -> bool:
        """``False`` from a recorded error (``last_error``) until the next rebalance that
        completes or the next worker restart that reaches ``SetupDone``."""
        return self._healthy

    def shutdown(self, wait: bool = False) -> None:
        """Stop the worker and free the shared memory, without waiting for the process:
        a worker judged dead or hung (or still starting) is SIGKILLed at once; a healthy one
        gets ``Shutdown`` and ``engine.host.SHUTDOWN_GRACE_S`` to exit, then SIGTERM, then
        SIGKILL, on a reaper thread (``wait=True`` joins it). A rebalance in flight is
        abandoned; committed layers stay. Idempotent; ``step()`` afterwards raises
        ``StateClosedError``."""
        self._closed = True
        if self._inflight is not None:
            try:  # a peer that stopped before issuing its part must not hang the shutdown
                self._drain(self._inflight, timeout_s=self.config.heartbeat_timeout_s)
            except RuntimeError as err:
                logger.warning("rank %d: the pending commit agreement did not complete at "
                               "shutdown: %s", self.rank, err)
        if self._backend is not None:
            self._backend.close(kill=self._health() is not None)
            self._stopping = getattr(self._backend, "stopping", None)
            self._backend = None
        self._inflight = None
        if wait and self._stopping is not None:
            self._stopping.join()

    def __enter__(self) -> EplbState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- start-up placement -----------------------------------------------------------------

    def _placement(self, name: str, source: object) -> np.ndarray:
        """``source`` (``None``: the default layout, a placement file, or ids) as validated
        int64 ``[layers, physical]``."""
        if source is None:
            return default_phy2log(self.num_layers, self.num_physical, self.num_logical)
        if isinstance(source, (str, os.PathLike)):
            placement = load_placement(source)
            if placement.num_logical != self.num_logical:
                raise ValueError(f"{name} file {source} is for {placement.num_logical} logical "
                                 f"experts, this model has {self.num_logical}")
            source = placement.phy2log
        return validate_phy2log(source, self.num_logical, name,
                                shape=(self.num_layers, self.num_physical))

    def _move_to_start(self, loaded: np.ndarray) -> None:
        """Move the weights from the ``loaded`` layout to the starting placement, on every
        rank (collective over ``ep_group``, before any worker starts)."""
        if self.ep_group is None:
            raise ValueError("EplbConfig.initial_phy2log differs from the layout the weights "
                             "were loaded in; moving them needs ep_group or cpu_group, also "
                             "for one rank")
        logger.info("rank %d: moving the weights of %d layers to the initial placement",
                    self.rank, int((loaded != self._phy2log).any(axis=1).sum()))
        rearrange_expert_weights_inplace(torch.as_tensor(loaded), torch.as_tensor(self._phy2log),
                                         self.expert_weights, self.ep_group)
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()

    # -- load window ------------------------------------------------------------------------

    def _window_shape(self) -> tuple[int, int, int]:
        return (self.config.window_size, self.num_layers, self.num_logical)

    def _checked_load(self, expert_load: object) -> torch.Tensor:
        """``expert_load`` as a tensor, refused (changing nothing) unless it is integer token
        counts of the right shape on the CPU or the weights' device, none negative on the CPU."""
        if isinstance(expert_load, np.ndarray):
            if expert_load.dtype.kind not in "iu":
                raise TypeError(f"expert_load has dtype {expert_load.dtype}; pass integer token "
                                "counts (e.g. int64)")
            expert_load = torch.from_numpy(np.ascontiguousarray(expert_load))
        elif not isinstance(expert_load, torch.Tensor):
            raise TypeError(f"expert_load is a {type(expert_load).__name__}; pass a torch tensor "
                            "or numpy array of integer token counts [layers, physical slots]")
        elif expert_load.dtype not in _LOAD_DTYPES:
            raise TypeError(f"expert_load has dtype {expert_load.dtype}; pass integer token "
                            "counts (e.g. torch.int64)")
        if tuple(expert_load.shape) != (self.num_layers, self.num_physical):
            raise ValueError(f"expert_load has shape {tuple(expert_load.shape)}, expected "
                             f"({self.num_layers}, {self.num_physical}) [layers, physical slots]")
        if expert_load.device.type != "cpu" and expert_load.device != self.device:
            raise ValueError(f"expert_load is on {expert_load.device}; pass it on the CPU or on "
                             f"the weights' device ({self.device})")
        if expert_load.is_signed() and not _sign_checked_later(expert_load):
            negative = expert_load < 0
            if negative.any():
                layer, slot = (int(i) for i in negative.nonzero()[0])
                raise InvalidLoadError(
                    f"expert_load[{layer}, {slot}] = {int(expert_load[layer, slot])} is negative "
                    f"({int(negative.sum())} negative entries); pass token counts >= 0")
        return expert_load

    def _record_load(self, expert_load: torch.Tensor) -> None:
        row = self.load_window[self.step_count % self.config.window_size]
        load = expert_load.to(device=self.device, dtype=torch.int64, non_blocking=True)
        if expert_load.is_signed() and _sign_checked_later(expert_load):
            torch.minimum(self._load_min, load.amin().reshape(1), out=self._load_min)
            self._load_min_fed = True
        row.zero_()
        row.scatter_add_(1, self._load_index, load * self._slot_valid)

    def _window_load(self) -> torch.Tensor:
        """All ranks' load window summed: ``[layers, logical]`` int64 on the CPU (collective)."""
        load = self.load_window.sum(dim=0).cpu()
        if self.world_size > 1:
            dist.all_reduce(load, group=self.cpu_group)
        return load

    def _log_balancedness(self) -> None:
        """``log_balancedness``: the window's balancedness under the current placement."""
        load = self._window_load()
        self.current_balancedness = mean_balancedness(load, self._phy2log, self.world_size)
        if self.rank == 0:
            logger.info("EPLB after %d steps: balancedness %.4f over the last %d (%d tokens, "
                        "%d layers)", self.step_count, self.current_balancedness,
                        min(self.step_count, self.config.window_size), int(load.sum()),
                        self.num_layers)

    def _take_load_fault(self) -> str:
        """At a rebalance start: why this rank's window holds a negative device load ("" if
        it does not). Reads the running minimum if device loads fed it (8 bytes, the one host
        sync of this check), and on a fault clears the window and sets ``last_error``."""
        if not self._load_min_fed:
            return ""
        low, self._load_min_fed = int(self._load_min.item()), False
        if low >= 0:
            return ""
        self._load_min.fill_(_NO_MINIMUM)
        self.load_window.zero_()
        reason = (f"expert_load held a negative token count (minimum {low}) before the rebalance "
                  f"at step {self.step_count}; that rebalance is skipped on every rank and this "
                  "rank's load window cleared; pass token counts >= 0")
        self._record_error(InvalidLoadError(reason))
        return reason

    def _agree_at_start(self, faulty: bool) -> tuple[bool, str]:
        """One MAX all-reduce at a rebalance start: (any rank's worker is faulty, why this
        rebalance is skipped: "" unless some rank's load was negative)."""
        bad_load = self._take_load_fault()
        flags = torch.tensor([int(faulty), int(bool(bad_load))], dtype=torch.int64)
        if self.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.cpu_group)
        if flags[1] and not bad_load:
            bad_load = "a peer rank's expert_load held a negative token count"
        return bool(flags[0]), bad_load

    def _skip(self, reason: str) -> None:
        """Record a rebalance that every rank skips at this step."""
        now = time.perf_counter()
        record = RebalanceRecord(self._next_id, self.step_count, now, end_step=self.step_count,
                                 ended_at=now, layers_planned=0, aborted=True,
                                 reason=f"skipped: {reason}")
        self._next_id += 1
        self.history.append(record)
        logger.warning("rank %d skips rebalance %d: %s", self.rank, record.rebalance_id, reason)

    # -- sync mode --------------------------------------------------------------------------

    def _rearrange_now(self) -> list[int]:
        _, bad_load = self._agree_at_start(False)
        if bad_load:
            self._skip(bad_load)
            return []
        record = RebalanceRecord(self._next_id, self.step_count, time.perf_counter())
        self._next_id += 1
        load = self._window_load()
        t0 = time.perf_counter()
        topo = self.topology
        outcome = plan_rebalance(load, self._phy2log, num_logical=topo.num_logical,
                                 num_groups=topo.num_groups, num_nodes=topo.num_nodes,
                                 num_ranks=topo.world_size, max_replicas=topo.num_redundant + 1)
        record.policy_s = time.perf_counter() - t0
        maps, layers = outcome.maps, outcome.layers
        record.balancedness_before = outcome.balancedness_before
        record.balancedness_after = outcome.balancedness_after
        record.bytes_staged = self._received_bytes(maps.phy2log)
        rearrange_expert_weights_inplace(
            torch.as_tensor(self._phy2log), torch.as_tensor(maps.phy2log), self.expert_weights,
            self.ep_group, rank_mapping=None)
        table = self._map_rows(maps)
        for layer in layers:
            self._switch_maps(layer, table[layer])
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        record.layers_planned = len(layers)
        record.layers_committed = layers
        record.commit_steps = [self.step_count] * len(layers)
        record.end_step, record.ended_at = self.step_count, time.perf_counter()
        self.history.append(record)
        return layers

    def _received_bytes(self, new: np.ndarray) -> int:
        """Bytes of this rank's rows whose expert changes from the current placement to ``new``."""
        local = slice(self.rank * self.num_local, (self.rank + 1) * self.num_local)
        rows = int((new[:, local] != self._phy2log[:, local]).sum())
        return rows * sum(t[0].numel() * t.element_size() for t in self.expert_weights[0])

    # -- process / thread mode --------------------------------------------------------------

    def _health(self) -> WorkerFailedError | None:
        """Why the worker cannot serve (``None`` if it can): a fault already recorded, it
        exited (a ``PeerFailedError`` if it stopped because a peer's collective failed),
        failed to start, or hung (its progress counter stood still for
        ``heartbeat_timeout_s``, during start-up too)."""
        backend = self._backend
        if self._worker_fault is not None:
            return self._worker_fault
        health = backend.health()
        if health is Health.EXITED:
            reason = f"transfer worker exited ({backend.exit_description()})"
            if getattr(backend, "exit_code", None) == PEER_FAILED_EXIT:
                return PeerFailedError(f"{reason} because a peer rank's worker failed")
            return WorkerFailedError(reason)
        if health is Health.STARTING:
            return None
        if self._restarted:
            self._restarted = False
            self._healthy = True
        return WorkerFailedError(backend.hang_description()) if health is Health.HUNG else None

    def _watch_idle(self) -> None:
        """Between rebalances: every WATCH_INTERVAL_S, take worker messages and check its
        health, so a death is reported within a second (the restart itself is collective
        and happens at the next rebalance start)."""
        now = time.monotonic()
        if now - self._last_watch < WATCH_INTERVAL_S:
            return
        self._last_watch = now
        while (msg := self._backend.poll()) is not None:
            self._take_idle_message(msg)
        fault = self._health()
        if fault is not None and self._worker_fault is None:
            self._record_fault(fault)

    def _take_idle_message(self, msg: object) -> None:
        if isinstance(msg, RebalanceDone):
            for record in self.history:
                if record.rebalance_id == msg.rebalance_id:
                    record.bytes_staged, record.stage_s = msg.bytes_staged, msg.stage_s
        elif isinstance(msg, WorkerError):
            self._record_fault(_reported(msg))
        elif isinstance(msg, Goodbye):
            self._record_fault(WorkerFailedError(f"transfer worker said goodbye: {msg.reason}"))
        else:
            logger.debug("rank %d: ignoring %s between rebalances", self.rank, type(msg).__name__)

    def _record_error(self, error: EplbError) -> None:
        """Log ``error`` (a peer's failure as a WARNING) and make it ``last_error``: counted,
        and ``healthy`` is ``False``."""
        level = logging.WARNING if isinstance(error, PeerFailedError) else logging.ERROR
        logger.log(level, "rank %d: %s: %s", self.rank, type(error).__name__, error)
        self.last_error = error
        self.error_count += 1
        self._healthy = self._restarted = False

    def _record_fault(self, fault: WorkerFailedError) -> None:
        self._worker_fault = fault
        self._record_error(fault)

    def _restart_workers(self) -> None:
        """Replace every rank's worker (collective: all ranks call it at the same step). The
        workers' process group spans all ranks, so one failure means a new group for all."""
        if not self._backend.restartable:
            return
        self._restarts += 1
        logger.warning("rank %d: restarting the transfer worker (restart %d)", self.rank,
                       self._restarts)
        self._backend.restart(rendezvous(self._spec))
        self._worker_fault = None
        self._restarted = True

    def _start(self) -> bool:
        """Start a rebalance (collective); ``False`` when every rank skips it (a bad load)."""
        assert self._backend is not None
        fault = self._health()
        if fault is not None and self._worker_fault is None:
            self._record_fault(fault)  # found only now: recorded, never restarted silently
        any_fault, bad_load = self._agree_at_start(fault is not None)
        if bad_load:
            self._skip(bad_load)
            return False
        if any_fault:
            if fault is None:
                self._record_error(PeerFailedError(
                    "a peer rank's transfer worker failed; this rank's healthy worker is "
                    "replaced too (the workers' process group spans every rank)"))
            self._restart_workers()
        record = RebalanceRecord(self._next_id, self.step_count, time.perf_counter())
        self._next_id += 1
        self._inflight = _InFlight(record)
        self.history.append(record)
        if any_fault and not self._backend.restartable:
            self._inflight.failure = (str(fault) if fault is not None
                                      else "a peer rank's transfer worker is unavailable")
            return True
        torch.sum(self.load_window, dim=0, out=self._backend.load_total)
        self._backend.record_load_event()
        self._backend.send(Rebalance(rebalance_id=record.rebalance_id, step=self.step_count,
                                     phy2log=pack_int64(self._phy2log),
                                     shape=list(self._phy2log.shape)))
        return True

    def _advance(self) -> tuple[list[int], bool]:
        """Act on the agreement issued at the previous step (if any), then issue this step's."""
        flight = self._inflight
        assert flight is not None and self._backend is not None
        self._take_messages(flight)
        self._check_worker(flight)
        t0 = time.perf_counter()
        decision = self._drain(flight)
        agreement_s = time.perf_counter() - t0
        committed: list[int] = []
        if decision is not None:
            staged, has_plan, ok = decision
            if not ok:
                flight.record.agreement_s.append(agreement_s)
                if not flight.failure:  # a peer's, unless this worker failed since the check
                    self._fail(flight, self._health() or PeerFailedError(
                        "a peer rank's transfer failed; this rank's worker was healthy"))
                self._abandon(flight, flight.failure)
                return [], True
            if has_plan:
                limit = min(staged, flight.committed + self.config.layers_per_step)
                while flight.committed < limit:
                    committed.append(self._commit(flight, flight.committed))
                    flight.committed += 1
                if flight.committed == len(flight.plan.layers):
                    flight.record.agreement_s.append(agreement_s)
                    self._finish(flight)
                    return committed, True
        t0 = time.perf_counter()
        self._issue_agreement(flight)
        flight.record.agreement_s.append(agreement_s + time.perf_counter() - t0)
        return committed, False

    def _issue_agreement(self, flight: _InFlight) -> None:
        """Start this step's MIN all-reduce over the engine's ranks (staged layers, plan seen,
        healthy), acted on at the next step by :meth:`_drain`."""
        status = torch.tensor([len(flight.ready), int(flight.plan is not None),
                               int(not flight.failure)], dtype=torch.int64)
        work = None
        if self.world_size > 1:
            work = dist.all_reduce(status, op=dist.ReduceOp.MIN, group=self.cpu_group,
                                   async_op=True)
        flight.pending = (work, status)

    def _drain(self, flight: _InFlight,
               timeout_s: float | None = None) -> tuple[int, bool, bool] | None:
        """Wait for the agreement issued at the previous step (done by now in steady state)
        and return ``(staged, plan seen, healthy)`` over all ranks; ``None`` if none is pending.
        Every rank issued it at the same step, so the wait ends on every rank; ``timeout_s``
        bounds it (a ``RuntimeError`` from the process group past it)."""
        if flight.pending is None:
            return None
        (work, status), flight.pending = flight.pending, None
        if work is not None:
            if timeout_s is None:
                work.wait()
            else:
                work.wait(timeout=timedelta(seconds=timeout_s))
        staged, has_plan, ok = (int(v) for v in status.tolist())
        return staged, bool(has_plan), bool(ok)

    def _take_messages(self, flight: _InFlight) -> None:
        rid = flight.record.rebalance_id
        while (msg := self._backend.poll()) is not None:
            if isinstance(msg, WorkerError):
                self._fail(flight, _reported(msg))
                continue
            if getattr(msg, "rebalance_id", rid) != rid:
                logger.debug("rank %d: dropping %s of rebalance %s", self.rank,
                             type(msg).__name__, msg.rebalance_id)
                continue
            if isinstance(msg, Plan):
                self._accept_plan(flight, msg)
            elif isinstance(msg, LayerReady):
                self._accept_ready(flight, msg)
            elif isinstance(msg, RebalanceDone):
                flight.record.bytes_staged = msg.bytes_staged
                flight.record.stage_s = msg.stage_s
            else:
                logger.warning("rank %d: unexpected %s during a rebalance", self.rank,
                               type(msg).__name__)

    def _accept_plan(self, flight: _InFlight, msg: Plan) -> None:
        try:
            new = unpack_int64(msg.phy2log, msg.shape)
            if new.shape != self._phy2log.shape:
                raise ValueError(f"plan shape {new.shape} != {self._phy2log.shape}")
            maps = maps_from_phy2log(new, self.num_logical, self.config.num_redundant_experts + 1)
            changed = [int(x) for x in np.nonzero((new != self._phy2log).any(axis=1))[0]]
            if changed != list(msg.layers):
                raise ValueError(f"plan lists layers {msg.layers} but its maps change {changed}")
        except ValueError as err:
            self._fail(flight, f"invalid plan from the transfer worker: {err}")
            return
        flight.plan, flight.maps = msg, maps
        table = self._map_rows(maps)
        flight.rows = {layer: table[layer] for layer in msg.layers}
        flight.record.layers_planned = len(msg.layers)
        flight.record.policy_s = msg.policy_s
        flight.record.balancedness_before = msg.balancedness_before
        flight.record.balancedness_after = msg.balancedness_after
        flight.last_progress = time.monotonic()

    def _accept_ready(self, flight: _InFlight, msg: LayerReady) -> None:
        index = len(flight.ready)
        if (flight.plan is None or msg.index != index or index >= len(flight.plan.layers)
                or msg.layer != flight.plan.layers[index]
                or not 0 <= msg.slot < self.config.num_staging_buffers):
            self._fail(flight, f"out-of-order or invalid ready message (index {msg.index}, "
                               f"layer {msg.layer}, slot {msg.slot}; expected index {index})")
            return
        flight.ready.append(msg)
        flight.last_progress = time.monotonic()
        flight.record.ready_latency_s.append(flight.last_progress - msg.sent_at)

    def _check_worker(self, flight: _InFlight) -> None:
        if flight.failure:
            return
        fault = self._health()
        if fault is not None:
            self._fail(flight, fault)
            return
        if not self._backend.ready:  # a (re)start is bounded by start_timeout_s (_health)
            flight.last_progress = time.monotonic()
            return
        waiting = flight.plan is None or (
            len(flight.ready) < len(flight.plan.layers)
            and len(flight.ready) - flight.committed < self.config.num_staging_buffers)
        idle = time.monotonic() - flight.last_progress
        if waiting and idle > self.config.layer_timeout_s:
            self._fail(flight, f"no progress from the transfer worker for {idle:.1f} s "
                               f"(EplbConfig.layer_timeout_s={self.config.layer_timeout_s})")

    def _fail(self, flight: _InFlight, fault: str | WorkerFailedError) -> None:
        """Record the first failure of ``flight`` (a reason: this rank's worker's fault); the
        next agreement abandons the rebalance on every rank."""
        if not flight.failure:
            error = fault if isinstance(fault, WorkerFailedError) else WorkerFailedError(fault)
            flight.failure = f"rebalance {flight.record.rebalance_id}: {error}"
            self._record_error(error)

    def _commit(self, flight: _InFlight, index: int) -> int:
        """Apply plan entry ``index``: buffer -> live weights, then this layer's maps."""
        t0 = time.perf_counter()
        msg = flight.ready[index]
        layer = msg.layer
        new = flight.maps.phy2log[layer]
        metadata = layer_metadata(self._phy2log[layer], new, self.num_local, self.rank)
        move_from_buffer(self.expert_weights[layer], self._backend.buffers[msg.slot], metadata,
                         new, self.rank)
        self._switch_maps(layer, flight.rows.pop(layer))
        self._backend.release_slot(msg.slot)
        self._backend.send(BufferFree(rebalance_id=flight.record.rebalance_id, slot=msg.slot))
        flight.record.layers_committed.append(layer)
        flight.record.commit_steps.append(self.step_count)
        flight.record.commit_s.append(time.perf_counter() - t0)
        return layer

    def _map_rows(self, maps: RoutingMaps) -> torch.Tensor:
        """Host copy of the new flat map table, a row per layer (pinned on CUDA, built once
        when the plan arrives, so each commit's copy of its row is async)."""
        table = _map_table(maps)
        return table.pin_memory() if self.device.type == "cuda" else table

    def _switch_maps(self, layer: int, row: torch.Tensor) -> None:
        """Switch ``layer``'s maps: one copy, queued on the current stream after its weights."""
        self._phy2log[layer] = row[:self.num_physical].numpy()
        self._maps_flat[layer].copy_(row, non_blocking=True)

    def _finish(self, flight: _InFlight) -> None:
        flight.record.end_step, flight.record.ended_at = self.step_count, time.perf_counter()
        if not flight.record.aborted:
            self._healthy = True
        logger.info("rank %d rebalance %d done: %d layers committed by step %d", self.rank,
                    flight.record.rebalance_id, flight.committed, self.step_count)
        self._inflight = None

    def _abandon(self, flight: _InFlight, reason: str) -> None:
        flight.record.aborted, flight.record.reason = True, reason
        logger.warning("rank %d abandons rebalance %d after %d committed layers: %s", self.rank,
                       flight.record.rebalance_id, flight.committed, reason)
        self._finish(flight)
        if self._backend.restartable:
            self._restart_workers()
        else:
            self._backend.send(Abort(rebalance_id=flight.record.rebalance_id, reason=reason))
            self._worker_fault = self._worker_fault or WorkerFailedError(reason)


def _reported(msg: WorkerError) -> WorkerFailedError:
    """The error a worker's ``WorkerError`` stands for (its own, or a peer's)."""
    if msg.kind == PEER_FAILED_KIND:
        return PeerFailedError(f"transfer worker stopped: a peer rank's worker failed "
                               f"({msg.detail})")
    return WorkerFailedError(f"transfer worker failed: {msg.kind}: {msg.detail}")


def _validate_weights(expert_weights: Sequence[Sequence[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Check the layout every mode relies on; ``ValueError`` says what to change."""
    layers = [list(layer) for layer in expert_weights]
    if not layers or not layers[0]:
        raise ValueError("expert_weights must hold at least one layer with at least one tensor")
    first = layers[0]
    if not (isinstance(first[0], torch.Tensor) and first[0].dim() >= 1):
        shape = tuple(first[0].shape) if isinstance(first[0], torch.Tensor) else None
        raise ValueError(f"expert_weights[0][0] must be a tensor [local slots, ...], got "
                         f"{type(first[0]).__name__} of shape {shape}")
    for index, layer in enumerate(layers):
        if len(layer) != len(first):
            raise ValueError(f"expert_weights[{index}] has {len(layer)} tensors, layer 0 has "
                             f"{len(first)}; every layer needs the same weights")
        for i, (t, ref) in enumerate(zip(layer, first)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"expert_weights[{index}][{i}] is {type(t).__name__}, not a tensor")
            if t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device:
                raise ValueError(
                    f"expert_weights[{index}][{i}] is {tuple(t.shape)} {t.dtype} on {t.device}, "
                    f"layer 0 has {tuple(ref.shape)} {ref.dtype} on {ref.device}; all layers "
                    "must match")
            if t.dim() < 1 or t.shape[0] != first[0].shape[0]:
                raise ValueError(f"expert_weights[{index}][{i}] first dimension must be the "
                                 f"local slots ({first[0].shape[0]}), got shape {tuple(t.shape)}")
            if not t.is_contiguous():
                raise ValueError(f"expert_weights[{index}][{i}] is not contiguous; pass "
                                 "contiguous tensors (call .contiguous() before building the state)")
    return layers


def _map_table(maps: RoutingMaps) -> torch.Tensor:
    """``[layers, width]`` int64 on the CPU: per layer ``phy2log``, ``log2phy`` flattened,
    ``logcnt``, then the load window's index (``phy2log`` clamped at 0) and slot validity (1
    where a slot holds an expert)."""
    p2l = torch.as_tensor(maps.phy2log)
    return torch.cat([p2l, torch.as_tensor(maps.log2phy).flatten(1),
                      torch.as_tensor(maps.logcnt), p2l.clamp(min=0),
                      (p2l >= 0).to(torch.int64)], dim=1)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _sign_checked_later(load: torch.Tensor) -> bool:
    """Whether ``load``'s sign is checked at the next rebalance start rather than at once:
    for device loads (checking at once would sync with the host every step)."""
    return load.device.type != "cpu"
