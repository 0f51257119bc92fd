"""The demo engine's decode loop, the balancer protocol it drives, its result records, and
the per-rebalance report computed from them.

Each step: scheduling bookkeeping in pure Python (so GIL contention shows), one forward of
every MoE layer through the balancer's *current* maps (read fresh every step), then
``balancer.step(load)``, which may switch maps and weights of some layers in place. The
forward is :class:`~mp_eplb.demo.model.MoEModel`'s (``--engine python``) or the CUDA-graph one
of :mod:`mp_eplb.demo.graph` (``--engine graph``).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from mp_eplb.demo.model import ConfigError, MoEConfig, MoEModel, routing_maps
from mp_eplb.state import StepReport

__all__ = [
    "Balancer",
    "BalancerReport",
    "DemoSummary",
    "DriftingModel",
    "FakeScheduler",
    "RankResult",
    "RebalanceReport",
    "RunReport",
    "StaticBalancer",
    "StepReport",
    "StepStats",
    "balancedness",
    "format_report",
    "rebalance_report",
    "run_engine",
    "summarize",
]

logger = logging.getLogger(__name__)


@runtime_checkable
class BalancerReport(Protocol):
    """What ``Balancer.step`` tells the engine about the step just taken."""

    committed_layers: list[int]  # layers whose maps and weights switched in this step
    rebalance_active: bool  # a rebalance is under way (started, not finished)
    rebalance_started: bool  # one started in this step
    rebalance_finished: bool  # one finished in this step


@runtime_checkable
class Balancer(Protocol):
    """What the engine needs of a load balancer (``mp_eplb.EplbState`` implements it).

    The maps are int64 tensors on the weights' device; the engine reads them again every step.
    A balancer may also have a ``history`` list of dataclass records (``EplbState.history``);
    :func:`run_engine` copies it into :attr:`RankResult.rebalances`.
    """

    @property
    def physical_to_logical_map(self) -> torch.Tensor: ...  # [layers, num_physical]

    @property
    def logical_to_physical_map(self) -> torch.Tensor: ...  # [layers, E, max_replicas], -1 pad

    @property
    def logical_replica_count(self) -> torch.Tensor: ...  # [layers, E]

    def step(self, load: torch.Tensor) -> BalancerReport: ...  # load [layers, num_physical]

    def shutdown(self) -> None: ...


class StaticBalancer:
    """EPLB off (``--mode none``): the maps of ``phy2log`` forever; nothing ever moves."""

    def __init__(self, phy2log: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor) -> None:
        self.physical_to_logical_map = phy2log
        self.logical_to_physical_map = log2phy
        self.logical_replica_count = logcnt

    @classmethod
    def for_model(cls, model: MoEModel) -> StaticBalancer:
        """The model's initial placement, on its device."""
        phy2log = model.initial_phy2log.clone()
        return cls(phy2log, *routing_maps(phy2log, model.cfg))

    def step(self, load: torch.Tensor) -> StepReport:
        return StepReport()

    def shutdown(self) -> None:
        """Nothing to release."""


class DriftingModel(MoEModel):
    """:class:`MoEModel` whose routing drifts by a set amount, so a rebalance moves a set share.

    ``drift_swaps`` > 0: at each drift epoch (``cfg.drift_interval`` steps) each layer's
    expert popularity order is the previous epoch's with ``drift_swaps`` random pairs of
    experts swapped (0: redrawn whole, as :class:`MoEModel` does). ``token_period`` > 0: the
    decode batch of step ``s`` is that of step ``s % token_period``, so the load over a window
    of a multiple of ``token_period`` steps inside one epoch is the same every time and a
    rebalance moves only what the drift changed (0: a fresh batch every step, whose sampling
    noise reorders the packing of near-equal experts at every rebalance). ``drift_offset``:
    the epochs start ``drift_offset`` steps early (the first drift is at step
    ``drift_interval - drift_offset``), e.g. to keep drifts away from rebalance starts.
    """

    def __init__(self, cfg: MoEConfig, *, drift_swaps: int = 0, token_period: int = 0,
                 drift_offset: int = 0, **kwargs: Any) -> None:
        if min(drift_swaps, token_period, drift_offset) < 0:
            raise ConfigError(f"drift_swaps ({drift_swaps}), token_period ({token_period}) and "
                              f"drift_offset ({drift_offset}) must be >= 0")
        super().__init__(cfg, **kwargs)
        self.drift_swaps = drift_swaps
        self.token_period = token_period
        self.drift_offset = drift_offset
        self._epoch_bias: dict[int, list[torch.Tensor]] = {}  # layer -> CPU bias per epoch
        self._device_bias: dict[tuple[int, int], torch.Tensor] = {}

    def make_tokens(self, step: int) -> torch.Tensor:
        return super().make_tokens(step % self.token_period if self.token_period else step)

    def router_bias(self, layer: int, step: int) -> torch.Tensor:
        step += self.drift_offset
        if not self.drift_swaps:
            return super().router_bias(layer, step)
        epoch = step // self.cfg.drift_interval
        key = (layer, epoch)
        if key not in self._device_bias:
            chain = self._epoch_bias.setdefault(layer, [super().router_bias(layer, 0).cpu()])
            while len(chain) <= epoch:
                gen = torch.Generator().manual_seed(
                    (self.cfg.seed * 1_000_003 + layer * 10_007 + len(chain)) & (2**62 - 1))
                bias = chain[-1].clone()
                for _ in range(self.drift_swaps):
                    pair = torch.randperm(self.cfg.num_experts, generator=gen)[:2]
                    bias[pair] = bias[pair.flip(0)]
                chain.append(bias)
            self._device_bias = {k: v for k, v in self._device_bias.items() if k[1] == epoch}
            self._device_bias[key] = chain[epoch].to(self.device)
        return self._device_bias[key]


class FakeScheduler:
    """Scheduling-like bookkeeping over a pool of fake requests: pure Python, a few hundred µs.

    Each step it admits requests up to ``pool_factor * tokens`` queued, ages the waiting ones,
    sorts by priority, gives one decode token to the first ``tokens``, accounts KV blocks,
    retires finished requests and tallies per-priority statistics. Deterministic from
    ``seed`` and ``rank``.
    """

    def __init__(self, tokens: int, *, seed: int, rank: int, pool_factor: int = 8,
                 block_size: int = 16) -> None:
        self.tokens = tokens
        self.pool_size = pool_factor * tokens
        self.block_size = block_size
        self._rng = random.Random(seed * 1_000_003 + rank)
        self._next_id = 0
        self.requests: dict[int, dict[str, int]] = {}
        self.tokens_by_priority: dict[int, int] = {}
        self.stats: dict[str, int] = {}
        self.finished = 0
        self.kv_blocks = 0

    def schedule(self, step: int) -> int:
        """Do one step's bookkeeping; returns the decode tokens scheduled."""
        rng = self._rng
        while len(self.requests) < self.pool_size:
            self.requests[self._next_id] = {
                "id": self._next_id, "priority": rng.randrange(4), "arrival": step,
                "prompt_len": rng.randrange(16, 2048), "max_new": rng.randrange(8, 256),
                "generated": 0, "blocks": 0, "waited": 0, "last_step": -1}
            self._next_id += 1
        for req in self.requests.values():
            if req["last_step"] != step - 1:
                req["waited"] += 1
                if req["waited"] % 32 == 0 and req["priority"] > 0:
                    req["priority"] -= 1  # aging
        batch = sorted(self.requests.values(),
                       key=lambda r: (r["priority"], r["arrival"], r["id"]))[:self.tokens]
        done = []
        for req in batch:
            req["generated"] += 1
            req["last_step"] = step
            blocks = -(-(req["prompt_len"] + req["generated"]) // self.block_size)
            self.kv_blocks += blocks - req["blocks"]
            req["blocks"] = blocks
            self.tokens_by_priority[req["priority"]] = self.tokens_by_priority.get(req["priority"], 0) + 1
            if req["generated"] >= req["max_new"]:
                done.append(req["id"])
        for rid in done:
            self.kv_blocks -= self.requests.pop(rid)["blocks"]
            self.finished += 1
        stats: dict[str, int] = {}
        for req in self.requests.values():
            key = f"p{req['priority']}_{'running' if req['last_step'] == step else 'waiting'}"
            stats[key] = stats.get(key, 0) + 1
            stats["context_tokens"] = stats.get("context_tokens", 0) + req["prompt_len"] + req["generated"]
        self.stats = stats
        return len(batch)


@dataclass
class RankResult:
    """One rank's record of a run; plain data (``to_dict`` / ``from_dict`` for msgpack).

    Per step: ``step_latency_s`` (seconds, wall clock, device synchronised at the step end),
    ``gpu_time_s`` (seconds of the forward's GPU work between CUDA events; empty when the
    model does not time it), ``cpu_time_s`` (this process's CPU seconds over the step, all its threads),
    ``received`` [steps][layers] token-expert pairs this rank's experts computed,
    ``logical_load`` [steps][layers][experts] this rank's tokens routed to each logical
    expert, ``rebalance_active``. ``committed``: ``[step, [layers]]`` for each step that
    switched layers; ``started`` / ``finished``: steps at which a rebalance started /
    finished; ``placement_before`` / ``placement_after`` [rebalances][layers][slots]: the
    ``phy2log`` in force when each rebalance started / after it finished. ``rebalances``: the
    balancer's ``history`` records as dicts (``EplbState``: ``RebalanceRecord`` fields).
    ``setup``: numbers the launcher measured around the balancer's construction.
    """

    rank: int
    step_latency_s: list[float] = field(default_factory=list)
    gpu_time_s: list[float] = field(default_factory=list)
    cpu_time_s: list[float] = field(default_factory=list)
    received: list[list[int]] = field(default_factory=list)
    logical_load: list[list[list[int]]] = field(default_factory=list)
    rebalance_active: list[bool] = field(default_factory=list)
    committed: list[list] = field(default_factory=list)
    started: list[int] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)
    placement_before: list[list[list[int]]] = field(default_factory=list)
    placement_after: list[list[list[int]]] = field(default_factory=list)
    rebalances: list[dict] = field(default_factory=list)
    setup: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RankResult:
        return cls(**data)


def run_engine(model: MoEModel, balancer: Balancer, *, steps: int, verify: bool = False,
               progress_every: int = 0, scheduler: bool = True,
               on_step: Callable[[int, StepReport], None] | None = None) -> RankResult:
    """Decode ``steps`` steps on this rank (a collective: every rank runs it together).

    ``verify``: check every layer's output against the dense reference each step (inside the
    timed step), and the weights of each committed layer against the new ``phy2log`` (after
    it). The weights of every layer are checked against the final map at the end, in any
    mode (:meth:`MoEModel.check_weights`, agreed by all ranks).
    ``progress_every`` > 0: log one progress line every that many steps. ``on_step(done,
    report)``: called after each step with the steps done so far and its ``StepReport``.
    Step numbers in the result (``started``, ``committed``, ...) are 0-based step indices.
    ``scheduler``: run :class:`FakeScheduler`'s host work each step, before the forward, or
    after it for a model that ``launches_async`` (overlapping the queued GPU work, as
    production engines do); ``False``: none.
    Bookkeeping of the result (loads, placements) happens after each step's timing.
    Raises :class:`mp_eplb.demo.model.VerificationError` on a mismatch.
    """
    cfg = model.cfg
    host_work = (FakeScheduler(cfg.tokens_per_rank, seed=cfg.seed, rank=model.rank).schedule
                 if scheduler else lambda step: 0)
    result = RankResult(rank=model.rank)
    on_cuda = model.device.type == "cuda"
    phy2log = balancer.physical_to_logical_map.cpu().numpy().copy()
    layer_index = np.arange(cfg.num_layers)[:, None]
    for step in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        if not model.launches_async:
            host_work(step)
        out = model.forward(model.make_tokens(step), step, balancer.logical_to_physical_map,
                            balancer.logical_replica_count, verify=verify)
        if model.launches_async:
            host_work(step)  # overlapping the queued GPU work
        report = balancer.step(out.load)
        if on_cuda:
            torch.cuda.synchronize(model.device)
        result.step_latency_s.append(time.perf_counter() - start)
        result.cpu_time_s.append(time.process_time() - cpu_start)
        if out.gpu_events is not None:
            result.gpu_time_s.append(out.gpu_events[0].elapsed_time(out.gpu_events[1]) / 1e3)
        result.received.append(out.received.tolist())
        logical = np.zeros((cfg.num_layers, cfg.num_experts), dtype=np.int64)
        valid = phy2log >= 0  # the maps the forward routed by (before this step's commits)
        np.add.at(logical, (np.broadcast_to(layer_index, phy2log.shape)[valid], phy2log[valid]),
                  out.load.cpu().numpy()[valid])
        result.logical_load.append(logical.tolist())
        result.rebalance_active.append(bool(report.rebalance_active))
        if report.rebalance_started:
            result.started.append(step)
            result.placement_before.append(phy2log.tolist())
        if report.committed_layers:
            layers = [int(layer) for layer in report.committed_layers]
            result.committed.append([step, layers])
            phy2log[layers] = balancer.physical_to_logical_map[layers].cpu().numpy()
            if verify:
                model.check_weights(balancer.physical_to_logical_map, layers=layers, step=step)
        if report.rebalance_finished:
            result.finished.append(step)
            result.placement_after.append(phy2log.tolist())
        if progress_every and (step + 1) % progress_every == 0:
            recent = np.asarray(result.step_latency_s[-progress_every:]) * 1e3
            logger.info("%d/%d steps done: step p50 %.2f ms, p99 %.2f ms over the last %d "
                        "steps%s", step + 1, steps, np.percentile(recent, 50), np.percentile(recent, 99),
                        len(recent), ", rebalancing" if report.rebalance_active else "")
        if on_step is not None:
            on_step(step + 1, report)
    model.check_weights(balancer.physical_to_logical_map)
    result.rebalances = [dataclasses.asdict(record)
                         for record in getattr(balancer, "history", ())]
    return result


def balancedness(received: np.ndarray) -> float:
    """Mean over ranks / max over ranks of the tokens each rank computed, averaged.

    ``received`` [ranks, steps, layers]; 1.0 is perfect balance. Averaged over steps and layers.
    """
    received = np.asarray(received, dtype=np.float64)
    peak = received.max(axis=0)
    ratio = np.divide(received.mean(axis=0), peak, out=np.ones_like(peak), where=peak > 0)
    return float(ratio.mean())


@dataclass(frozen=True)
class DemoSummary:
    """Summary of a run over all ranks. Latencies in milliseconds (per step, the slowest rank)."""

    ranks: int
    steps: int
    p50_ms: float
    p99_ms: float
    balancedness_start: float
    balancedness_end: float
    window: int  # steps averaged for the start and end balancedness
    rebalances: int
    committed_layers: int

    def describe(self) -> str:
        return (f"{self.steps} steps on {self.ranks} ranks: step p50 {self.p50_ms:.2f} ms, "
                f"p99 {self.p99_ms:.2f} ms; balancedness (mean/max tokens per rank) "
                f"{self.balancedness_start:.3f} over the first {self.window} steps, "
                f"{self.balancedness_end:.3f} over the last {self.window}; "
                f"{self.rebalances} rebalances, {self.committed_layers} layer switches")


def summarize(results: list[RankResult]) -> DemoSummary:
    """Combine every rank's :class:`RankResult` (any order, same step count) into a summary."""
    results = sorted(results, key=lambda r: r.rank)
    latency_ms = np.max([r.step_latency_s for r in results], axis=0) * 1e3
    received = np.asarray([r.received for r in results])
    steps = len(latency_ms)
    window = min(20, max(1, steps // 5))
    return DemoSummary(
        ranks=len(results), steps=steps,
        p50_ms=float(np.percentile(latency_ms, 50)), p99_ms=float(np.percentile(latency_ms, 99)),
        balancedness_start=balancedness(received[:, :window]),
        balancedness_end=balancedness(received[:, -window:]), window=window,
        rebalances=len(results[0].started),
        committed_layers=sum(len(layers) for _, layers in results[0].committed))


@dataclass(frozen=True)
class StepStats:
    """Step latency over ``steps`` steps, in milliseconds (per step, the slowest rank)."""

    steps: int
    p50_ms: float
    p99_ms: float

    @classmethod
    def of(cls, latency_ms: np.ndarray) -> StepStats | None:
        """Percentiles of ``latency_ms`` [steps]; ``None`` when there is no step."""
        if len(latency_ms) == 0:
            return None
        return cls(len(latency_ms), float(np.percentile(latency_ms, 50)),
                   float(np.percentile(latency_ms, 99)))


@dataclass(frozen=True)
class RebalanceReport:
    """One rebalance seen from the engine, over all ranks.

    Steps are engine steps (0-based): it started in ``start_step`` and finished in
    ``end_step`` (``None``: still in flight when the run ended); ``during`` covers both.
    ``slots_moved``: physical slots whose expert changed, all ranks together;
    ``bytes_moved`` = ``slots_moved`` x one expert's bytes. ``bytes_staged``: what the
    workers staged, summed over ranks (``None`` when unknown: sync mode, or not reported by
    the end). ``transfer_s``: the slowest rank's staging time (sync mode: its whole blocking
    call, policy included). Balancedness (mean / max tokens per rank) over ``window`` steps
    before the start and after the end (``None`` if the run has no such steps).
    ``added_ms``: the sum over its steps of (step latency - steady p50). ``cpu_ms``: the
    engine process's CPU time over its steps (the largest over ranks).
    """

    index: int
    start_step: int
    end_step: int | None
    aborted: bool
    layers: int
    slots_moved: int
    bytes_moved: int
    bytes_staged: int | None
    transfer_s: float | None
    balancedness_before: float | None
    balancedness_after: float | None
    during: StepStats
    added_ms: float
    cpu_ms: float

    @property
    def completed(self) -> bool:
        return self.end_step is not None and not self.aborted

    def describe(self, steady: StepStats | None) -> str:
        def fmt(value: float | None, spec: str = ".3f") -> str:
            return "n/a" if value is None else format(value, spec)

        end = "still running at the end" if self.end_step is None else f"step {self.end_step}"
        state = " ABORTED" if self.aborted else ""
        moved = self.bytes_staged if self.bytes_staged is not None else self.bytes_moved
        rate = (moved / self.transfer_s / 1e9 if self.transfer_s and moved else None)
        lines = [
            f"rebalance {self.index}{state}: steps {self.start_step} -> {end} "
            f"({self.during.steps} steps), {self.layers} layers switched, "
            f"{self.slots_moved} slots moved ({self.bytes_moved / 2**20:.1f} MiB"
            + ("" if self.bytes_staged is None else
               f"; workers staged {self.bytes_staged / 2**20:.1f} MiB") + ")",
            f"  balancedness {fmt(self.balancedness_before)} before -> "
            f"{fmt(self.balancedness_after)} after; transfer "
            f"{fmt(None if self.transfer_s is None else self.transfer_s * 1e3, '.1f')} ms"
            f" ({fmt(rate, '.2f')} GB/s over all ranks)",
            f"  step p50/p99 {self.during.p50_ms:.2f}/{self.during.p99_ms:.2f} ms during vs "
            + (f"{steady.p50_ms:.2f}/{steady.p99_ms:.2f} ms steady" if steady else "n/a steady")
            + f"; {self.added_ms:+.1f} ms added in total, engine CPU {self.cpu_ms:.1f} ms"]
        return "\n".join(lines)


@dataclass(frozen=True)
class RunReport:
    """Every rebalance of a run and the steady steps around them.

    ``steady``: steps in no rebalance, after the first rebalance finished (before it the
    placement is the naive initial one; with no rebalance, after the first tenth of the run).
    ``steady_cpu_ms``: median engine CPU time of a steady step (slowest rank).
    ``latency_ms`` [steps]: every step's latency (the slowest rank). ``steady_gpu``: GPU time
    of the steady steps (the slowest rank's; ``None`` when the engine does not time it).
    """

    steady: StepStats | None
    steady_cpu_ms: float | None
    steady_gpu: StepStats | None
    rebalances: list[RebalanceReport]
    window: int
    latency_ms: np.ndarray

    def describe(self) -> str:
        return "\n".join(r.describe(self.steady) for r in self.rebalances)


def _rebalance_windows(result: RankResult) -> list[tuple[int, int | None]]:
    ends: list[int | None] = list(result.finished)
    ends += [None] * (len(result.started) - len(ends))
    return list(zip(result.started, ends))


def rebalance_report(results: Sequence[RankResult], *, expert_bytes: int,
                     window: int) -> RunReport:
    """Per-rebalance report of a run from every rank's :class:`RankResult` (any order).

    ``expert_bytes``: bytes of one expert (all its weight tensors); ``window``: steps of
    balancedness before and after each rebalance.
    """
    results = sorted(results, key=lambda r: r.rank)
    first = results[0]
    latency_ms = np.max([r.step_latency_s for r in results], axis=0) * 1e3
    cpu_ms = np.max([r.cpu_time_s for r in results], axis=0) * 1e3
    received = np.asarray([r.received for r in results])
    steps = len(latency_ms)
    windows = _rebalance_windows(first)
    steady_mask = np.ones(steps, dtype=bool)
    finished = [end for _, end in windows if end is not None]
    steady_mask[:finished[0] + 1 if finished else steps // 10] = False
    for start, end in windows:
        steady_mask[start:(steps if end is None else end + 1)] = False
    steady = StepStats.of(latency_ms[steady_mask])
    timed = steps > 0 and all(len(r.gpu_time_s) == steps for r in results)
    steady_gpu = (StepStats.of(np.max([r.gpu_time_s for r in results], axis=0)[steady_mask] * 1e3)
                  if timed else None)
    steady_cpu = float(np.median(cpu_ms[steady_mask])) if steady_mask.any() else None
    reports = []
    for index, (start, end) in enumerate(windows):
        span = slice(start, steps if end is None else end + 1)
        records = [r.rebalances[index] for r in results if index < len(r.rebalances)]
        slots = 0
        if index < len(first.placement_after):
            slots = int((np.asarray(first.placement_before[index])
                         != np.asarray(first.placement_after[index])).sum())
        layers = sum(len(ls) for step, ls in first.committed
                     if start <= step <= (steps if end is None else end))
        staged = [rec.get("bytes_staged") for rec in records]
        bytes_staged = (int(sum(staged)) if records and None not in staged else None)
        transfer_s = _transfer_s(records)
        before = received[:, max(0, start - window):start]
        after = received[:, (end if end is not None else steps) + 1:][:, :window]
        reports.append(RebalanceReport(
            index=index, start_step=start, end_step=end,
            aborted=any(rec.get("aborted") for rec in records),
            layers=layers, slots_moved=slots, bytes_moved=slots * expert_bytes,
            bytes_staged=bytes_staged, transfer_s=transfer_s,
            balancedness_before=balancedness(before) if before.shape[1] else None,
            balancedness_after=balancedness(after) if after.shape[1] else None,
            during=StepStats.of(latency_ms[span]),
            added_ms=float((latency_ms[span] - (steady.p50_ms if steady else 0.0)).sum()),
            cpu_ms=float(np.max([np.sum(r.cpu_time_s[span]) for r in results]) * 1e3)))
    return RunReport(steady=steady, steady_cpu_ms=steady_cpu, steady_gpu=steady_gpu,
                     rebalances=reports, window=window, latency_ms=latency_ms)


def _transfer_s(records: list[dict]) -> float | None:
    """Slowest rank's staging time; a rebalance that ended in the step it started (sync
    mode) is timed whole from its host clocks."""
    if not records:
        return None
    if all(rec.get("stage_s") is not None for rec in records):
        return float(max(rec["stage_s"] for rec in records))
    if all(rec.get("end_step") is not None and rec["end_step"] == rec["start_step"]
           and rec.get("ended_at") is not None for rec in records):
        return float(max(rec["ended_at"] - rec["started_at"] for rec in records))
    return None


def format_report(run: RunReport, summary: DemoSummary) -> str:
    """The demo's closing text: one block per rebalance, then the run's summary."""
    completed = [r for r in run.rebalances if r.completed]
    lines = [run.describe()] if run.rebalances else ["no rebalance ran"]
    if run.steady:
        lines.append(f"steady steps: p50 {run.steady.p50_ms:.2f} ms, p99 {run.steady.p99_ms:.2f} ms "
                     f"over {run.steady.steps} steps (p99/p50 "
                     f"{run.steady.p99_ms / run.steady.p50_ms:.3f})")
    if run.steady_gpu:
        lines.append(f"steady GPU time per step (CUDA events): p50 {run.steady_gpu.p50_ms:.2f} ms, "
                     f"p99 {run.steady_gpu.p99_ms:.2f} ms")
    moved = sum(r.bytes_moved for r in run.rebalances)
    lines.append(f"{len(completed)} of {len(run.rebalances)} rebalances completed, "
                 f"{sum(r.slots_moved for r in run.rebalances)} slots ({moved / 2**20:.1f} MiB) "
                 "moved in all")
    lines.append(summary.describe())
    return "\n".join(lines)
