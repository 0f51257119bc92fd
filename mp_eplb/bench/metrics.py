"""The bench's numbers: per configuration from every rank's :class:`RankResult`, the policy
comparison on the recorded load windows, and the goals of the design brief.

Conventions: times in ms unless a key ends in ``_s``; rates in GB/s (1e9 B/s); bytes as
ints. A *measured* rebalance is one that completed, switched at least one layer and is not
the run's first (the first starts from the naive initial placement and pays one-off set-up
such as NCCL communicator creation); ``none`` mode has none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mp_eplb.demo.engine import RankResult, RebalanceReport, RunReport, rebalance_report
from mp_eplb.policy import balancedness, rebalance_experts

__all__ = ["BenchConfig", "SPREAD_KEYS", "add_relative", "combine_runs", "config_metrics", "goals",
           "measured", "policy_comparison"]

#: Numbers of a configuration that repeated runs report as median and spread (key paths).
SPREAD_KEYS: tuple[tuple[str, ...], ...] = (
    ("steady_ms", "p50"), ("steady_ms", "p99"), ("during_ms", "p50"), ("during_ms", "p99"),
    ("steady_gpu_ms", "p50"), ("steady_gpu_ms", "p99"), ("added_ms_per_rebalance",),
    ("transfer_gbps_per_rank",), ("engine_cpu_extra_ms_per_rebalance",))


@dataclass(frozen=True)
class BenchConfig:
    """One column of the bench: EPLB ``mode`` and ``communicator`` (``auto`` for sync and
    none); ``link``: the link its weights travel (compared with that link's best rate)."""

    name: str
    mode: str
    communicator: str
    link: str | None


def measured(report: RunReport) -> list[RebalanceReport]:
    """The rebalances the bench's averages use (see the module docstring)."""
    return [r for r in report.rebalances[1:] if r.completed and r.layers > 0]


def _percentiles(values: Sequence[float], scale: float = 1e3) -> dict[str, float | None]:
    if not len(values):
        return {"p50": None, "p99": None}
    arr = np.asarray(values, dtype=np.float64) * scale
    return {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99))}


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _max_setup(results: Sequence[RankResult], key: str) -> float | None:
    values = [r.setup.get(key) for r in results if r.setup.get(key) is not None]
    return max(values) if values else None


def policy_comparison(results: Sequence[RankResult], report: RunReport, *, window: int,
                      num_redundant: int, expert_bytes: int) -> dict:
    """Bytes per measured rebalance with the placement-aware policy vs the agnostic one, both
    run here on the load window each rebalance saw (all ranks summed) and its old placement.

    ``aware_matches_plan``: the aware result equals the placement the run switched to.
    """
    first = min(results, key=lambda r: r.rank)
    loads = np.sum([np.asarray(r.logical_load, dtype=np.int64) for r in results], axis=0)
    ranks = len(results)
    rows = []
    for r in measured(report):
        old = np.asarray(first.placement_before[r.index], dtype=np.int64)
        load = loads[max(0, r.start_step - window + 1):r.start_step + 1].sum(axis=0)
        num_physical = old.shape[1]
        kwargs = dict(max_replicas=num_redundant + 1)
        aware = rebalance_experts(load, num_physical, 1, 1, ranks, old_phy2log=old, **kwargs)[0]
        agnostic = rebalance_experts(load, num_physical, 1, 1, ranks, **kwargs)[0]
        aware, agnostic = aware.numpy(), agnostic.numpy()
        rows.append({
            "rebalance": r.index,
            "aware_slots": int((aware != old).sum()), "agnostic_slots": int((agnostic != old).sum()),
            "aware_balancedness": float(balancedness(load, aware, ranks).mean()),
            "agnostic_balancedness": float(balancedness(load, agnostic, ranks).mean()),
            "aware_matches_plan": bool(np.array_equal(
                aware, np.asarray(first.placement_after[r.index]))),
        })
    aware_bytes = _mean([row["aware_slots"] * expert_bytes for row in rows])
    agnostic_bytes = _mean([row["agnostic_slots"] * expert_bytes for row in rows])
    return {
        "per_rebalance": rows,
        "aware_bytes": aware_bytes, "agnostic_bytes": agnostic_bytes,
        "ratio": (aware_bytes / agnostic_bytes if aware_bytes is not None and agnostic_bytes
                  else None),
        "aware_balancedness": _mean([row["aware_balancedness"] for row in rows]),
        "agnostic_balancedness": _mean([row["agnostic_balancedness"] for row in rows]),
    }


def config_metrics(config: BenchConfig, results: Sequence[RankResult], *, expert_bytes: int,
                   window: int, num_redundant: int) -> dict:
    """Every metric of one configuration's run (JSON-ready; ``None`` where not applicable).

    Sync-relative and link-relative numbers are added by :func:`add_relative`.
    """
    results = sorted(results, key=lambda r: r.rank)
    report = rebalance_report(results, expert_bytes=expert_bytes, window=window)
    rebalances = measured(report)
    ranks = len(results)
    steps = np.concatenate([np.arange(r.start_step, r.end_step + 1) for r in rebalances]) \
        if rebalances else np.zeros(0, dtype=np.int64)
    records = [rec for res in results for i, rec in enumerate(res.rebalances)
               if i in {r.index for r in rebalances}]
    rates = [(r.bytes_staged if r.bytes_staged is not None else r.bytes_moved) / ranks
             / r.transfer_s / 1e9 for r in rebalances if r.transfer_s]
    cpu_extra = [r.cpu_ms - r.during.steps * report.steady_cpu_ms for r in rebalances] \
        if report.steady_cpu_ms is not None else []
    return {
        "name": config.name, "mode": config.mode, "communicator": config.communicator,
        "link": config.link, "ranks": ranks, "steps": len(report.latency_ms),
        "rebalances_started": len(report.rebalances),
        "rebalances_completed": sum(r.completed for r in report.rebalances),
        "rebalances_measured": len(rebalances),
        "steady_ms": None if report.steady is None else
        {"p50": report.steady.p50_ms, "p99": report.steady.p99_ms, "steps": report.steady.steps},
        "during_ms": {**_percentiles(report.latency_ms[steps], 1.0), "steps": int(len(steps))},
        "added_ms_per_rebalance": _mean([r.added_ms for r in rebalances]),
        "steps_per_rebalance": _mean([r.during.steps for r in rebalances]),
        "layers_per_rebalance": _mean([r.layers for r in rebalances]),
        "bytes_per_rank_per_rebalance": _mean(
            [(r.bytes_staged if r.bytes_staged is not None else r.bytes_moved) / ranks
             for r in rebalances]),
        "transfer_ms": _mean([None if r.transfer_s is None else r.transfer_s * 1e3
                              for r in rebalances]),
        "transfer_gbps_per_rank": _mean(rates),
        "commit_ms_per_layer": _percentiles([s for rec in records for s in rec["commit_s"]]),
        "ready_latency_ms": _percentiles([s for rec in records for s in rec["ready_latency_s"]]),
        "agreement_ms": _percentiles([s for rec in records for s in rec["agreement_s"]]),
        "policy_ms": _mean([None if rec.get("policy_s") is None else rec["policy_s"] * 1e3
                            for rec in records]),
        "engine_cpu_ms_per_rebalance": _mean([r.cpu_ms for r in rebalances]),
        "engine_cpu_extra_ms_per_rebalance": _mean(cpu_extra),
        "steady_cpu_ms_per_step": report.steady_cpu_ms,
        "steady_gpu_ms": None if report.steady_gpu is None else
        {"p50": report.steady_gpu.p50_ms, "p99": report.steady_gpu.p99_ms},
        "setup": {key: _max_setup(results, key) for key in (
            "balancer_init_s", "worker_start_s", "gpu_extra_bytes", "rss_extra_bytes",
            "shm_bytes", "worker_rss_bytes")},
        "policy": policy_comparison(results, report, window=window, num_redundant=num_redundant,
                                    expert_bytes=expert_bytes) if rebalances else None,
        "series": {"step_ms": [float(v) for v in report.latency_ms],
                   "windows": [[r.start_step, r.end_step if r.end_step is not None
                                else len(report.latency_ms) - 1, r in rebalances]
                               for r in report.rebalances],
                   "added_ms": [r.added_ms for r in report.rebalances]},
    }


def _path_get(d: dict, path: tuple[str, ...]) -> float | None:
    for key in path:
        d = d.get(key) if isinstance(d, dict) else None
    return d if isinstance(d, (int, float)) else None


def combine_runs(runs: list[dict]) -> dict:
    """One configuration's :func:`config_metrics` over repeated runs (failed ones carry
    ``error`` and are left out): the first good run's dict (its series, set-up and policy
    comparison) with every :data:`SPREAD_KEYS` number replaced by the median over the runs,
    plus ``runs`` (good runs) and ``spread`` (``"steady_ms.p99": [min, max]`` per key)."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[0]
    combined = {**good[0], "runs": len(good), "spread": {}}
    for path in SPREAD_KEYS:
        values = [v for v in (_path_get(r, path) for r in good) if v is not None]
        if not values:
            continue
        target = combined
        for key in path[:-1]:
            target[key] = target = dict(target[key])
        target[path[-1]] = float(np.median(values))
        combined["spread"][".".join(path)] = [float(min(values)), float(max(values))]
    return combined


def add_relative(configs: list[dict], micro: dict | None) -> None:
    """Add, in place: added time as a fraction of sync mode's stall, of the floor (twice the
    bytes a rank writes at the plain-copy rate: staging plus ``move_from_buffer``), and the
    transfer rate as a fraction of the best rate of the config's link."""
    sync = next((c for c in configs if c.get("mode") == "sync"), None)
    sync_added = sync.get("added_ms_per_rebalance") if sync else None
    copy_gbps = (micro or {}).get("copy", {}).get("plain_copy_gbps")
    links = (micro or {}).get("links", {})
    for c in configs:
        if "error" in c:
            continue
        added, nbytes = c["added_ms_per_rebalance"], c["bytes_per_rank_per_rebalance"]
        c["added_vs_sync"] = added / sync_added if added is not None and sync_added else None
        c["floor_ms"] = 2 * nbytes / copy_gbps / 1e6 if nbytes and copy_gbps else None
        c["added_vs_floor"] = added / c["floor_ms"] if added is not None and c["floor_ms"] else None
        best = links.get(c["link"], {}).get("best_gbps") if c["link"] else None
        c["link_best_gbps"] = best
        rate = c["transfer_gbps_per_rank"]
        c["rate_vs_link_best"] = rate / best if rate is not None and best else None


def goals(configs: list[dict], micro: dict | None, product: str) -> list[dict]:
    """The brief's goals, checked on the ``product`` configuration (each: goal, value, met)."""
    c = next((c for c in configs if c["name"] == product and "error" not in c), None)
    if c is None:
        return []
    steady, during = c["steady_ms"], c["during_ms"]
    p99_ratio = (during["p99"] / steady["p99"] if steady and during["p99"] is not None
                 else None)
    copy_ratio = (micro or {}).get("copy", {}).get("ratio")
    policy = c["policy"] or {}

    def row(goal: str, value: float | None, limit: float, text: str, *,
            at_least: bool = False) -> dict:
        met = None if value is None else bool(value >= limit if at_least else value <= limit)
        return {"goal": goal, "value": value, "limit": limit, "met": met, "text": text}

    rate = c.get("rate_vs_link_best")
    return [
        row("step p99 during a rebalance / steady p99 (slowest rank per step)", p99_ratio, 1.10,
            "<= 1.10x"),
        row("step time added per rebalance (total over its steps) / sync's stall (total)",
            c.get("added_vs_sync"), 0.5, "<= 0.5"),
        row("step time added per rebalance (total) / floor (2 x bytes per rank / copy rate)",
            c.get("added_vs_floor"), 2.0, "heading for <= 2x"),
        row("transfer rate per rank, % of the link's best", None if rate is None else 100 * rate,
            80.0, ">= 80%", at_least=True),
        row("move_from_buffer of one layer (one rank) / plain copy of its bytes", copy_ratio, 1.2,
            "<= 1.2x"),
        row("bytes per rebalance (all ranks), aware / agnostic policy", policy.get("ratio"), 0.75,
            "well under (<= 0.75 here)"),
    ]
