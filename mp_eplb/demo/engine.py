"""The demo engine's decode loop, the balancer protocol it drives, and its result records.

Each step: scheduling bookkeeping in pure Python (so GIL contention shows), one forward of
every MoE layer through the balancer's *current* maps (read fresh every step), then
``balancer.step(load)``, which may switch maps and weights of some layers in place.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from mp_eplb.demo.model import MoEModel, routing_maps

__all__ = [
    "Balancer",
    "BalancerReport",
    "DemoSummary",
    "FakeScheduler",
    "RankResult",
    "StaticBalancer",
    "StepReport",
    "balancedness",
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
    """

    @property
    def physical_to_logical_map(self) -> torch.Tensor: ...  # [layers, num_physical]

    @property
    def logical_to_physical_map(self) -> torch.Tensor: ...  # [layers, E, max_replicas], -1 pad

    @property
    def logical_replica_count(self) -> torch.Tensor: ...  # [layers, E]

    def step(self, load: torch.Tensor) -> BalancerReport: ...  # load [layers, num_physical]

    def shutdown(self) -> None: ...


@dataclass
class StepReport:
    """A plain :class:`BalancerReport`."""

    committed_layers: list[int] = field(default_factory=list)
    rebalance_active: bool = False
    rebalance_started: bool = False
    rebalance_finished: bool = False


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
    ``received`` [steps][layers] token-expert pairs this rank's experts computed,
    ``rebalance_active``. ``committed``: ``[step, [layers]]`` for each step that switched layers;
    ``started`` / ``finished``: steps at which a rebalance started / finished.
    """

    rank: int
    step_latency_s: list[float] = field(default_factory=list)
    received: list[list[int]] = field(default_factory=list)
    rebalance_active: list[bool] = field(default_factory=list)
    committed: list[list] = field(default_factory=list)
    started: list[int] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RankResult:
        return cls(**data)


def run_engine(model: MoEModel, balancer: Balancer, *, steps: int, verify: bool = False,
               progress_every: int = 0) -> RankResult:
    """Decode ``steps`` steps on this rank (a collective: every rank runs it together).

    ``verify``: check every layer's output against the dense reference each step (inside the
    timed step), and the weights of each committed layer against the new ``phy2log`` (after
    it). The weights of every layer are checked against the final map at the end, in any
    mode (:meth:`MoEModel.check_weights`, agreed by all ranks).
    ``progress_every`` > 0: log one progress line every that many steps.
    Raises :class:`mp_eplb.demo.model.VerificationError` on a mismatch.
    """
    cfg = model.cfg
    scheduler = FakeScheduler(cfg.tokens_per_rank, seed=cfg.seed, rank=model.rank)
    result = RankResult(rank=model.rank)
    on_cuda = model.device.type == "cuda"
    for step in range(steps):
        start = time.perf_counter()
        scheduler.schedule(step)
        out = model.forward(model.make_tokens(step), step, balancer.logical_to_physical_map,
                            balancer.logical_replica_count, verify=verify)
        report = balancer.step(out.load)
        if on_cuda:
            torch.cuda.synchronize(model.device)
        result.step_latency_s.append(time.perf_counter() - start)
        result.received.append(out.received.tolist())
        result.rebalance_active.append(bool(report.rebalance_active))
        if report.rebalance_started:
            result.started.append(step)
        if report.rebalance_finished:
            result.finished.append(step)
        if report.committed_layers:
            layers = [int(layer) for layer in report.committed_layers]
            result.committed.append([step, layers])
            if verify:
                model.check_weights(balancer.physical_to_logical_map, layers=layers, step=step)
        if progress_every and (step + 1) % progress_every == 0:
            recent = np.asarray(result.step_latency_s[-progress_every:]) * 1e3
            logger.info("step %d/%d: step p50 %.2f ms, p99 %.2f ms over the last %d steps%s",
                        step + 1, steps, np.percentile(recent, 50), np.percentile(recent, 99),
                        len(recent), ", rebalancing" if report.rebalance_active else "")
    model.check_weights(balancer.physical_to_logical_map)
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
