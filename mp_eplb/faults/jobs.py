"""The rank side of a scenario run: :func:`batch_job` runs every batch scenario in turn on
one rank and observes it; :func:`parent_kill_job` kills the last rank mid-rebalance."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import torch
import torch.distributed as dist

from mp_eplb.worker import failpoints
from mp_eplb.faults.launch import RankContext
from mp_eplb.faults.probes import (exited, fd_count, gpu_free_mib, live_worker_pid,
                                   owned_segments, stray_children, wait_exit)
from mp_eplb.faults.proxy import ChannelTracker, inject_wrong_key
from mp_eplb.faults.scenarios import Scenario, schedule
from mp_eplb.faults.workload import Driver, new_state, record_row
from mp_eplb.engine.state import EplbState

__all__ = ["batch_job", "parent_kill_job"]


def _failpoint_env(ctx: RankContext) -> str:
    return ",".join(f"{sc.spec}@rebalance={first}" for sc, first in schedule(ctx.spec.scenarios)
                    if sc.kind == "failpoint" and sc.target % ctx.world_size == ctx.rank)


def batch_job(ctx: RankContext) -> dict:
    """Run every scenario of the batch on this rank; per-scenario observations."""
    options = ctx.spec.options
    os.environ[failpoints.ENV] = _failpoint_env(ctx)
    os.environ[failpoints.LOG_ENV] = ctx.spec.log_path
    tracker = ChannelTracker(proxy=any(sc.kind == "proxy" for sc in ctx.spec.scenarios))
    gpu_before = gpu_free_mib(ctx.device)
    state = new_state(ctx)
    driver = Driver(ctx, state)
    results: list[dict] = []
    workers: set[int] = set()
    try:
        warm = driver.run_until(lambda: len(state.history) > 0 and not state.rebalance_active,
                                options.layer_timeout_s * 3)
        warm_ok = warm and not state.history[0].aborted
        for sc, first in schedule(ctx.spec.scenarios):
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
    gpu_after = gpu_free_mib(ctx.device)
    del state
    stray = [pid for pid in workers if not exited(pid)]
    return {"scenarios": results, "warm_ok": warm_ok, "violations": driver.violations,
            "final": {"stray_workers": stray, "children": stray_children(None),
                      "segments": owned_segments(),
                      "stale_sockets": tracker.stale_sockets()},
            "gpu_free_mib": {"before_state": gpu_before, "after_shutdown": gpu_after}}


def _run_scenario(ctx: RankContext, state: EplbState, driver: Driver, tracker: ChannelTracker,
                  sc: Scenario, first: int, workers: set[int]) -> dict:
    options = ctx.spec.options
    mine = sc.target % ctx.world_size == ctx.rank
    last = first + sc.slots - 1
    obs: dict[str, Any] = {"name": sc.name, "first": first, "t_error": None, "t_abandon": None,
                           "t_inject": None, "gpu_gap_mib": None}
    before = {"segments": owned_segments(), "fds": fd_count(),
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
        if (worker := live_worker_pid(state)) is not None:
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
                obs["gpu_gap_mib"] = gpu_free_mib(ctx.device)
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
        records=[record_row(r) for r in state.history if first <= r.rebalance_id <= last],
        violations=driver.violations[violations_before:],
        stats={k: after.get(k, 0) - before["stats"].get(k, 0) for k in after},
        leftovers={"children": stray_children(live_worker_pid(state)),
                   "segments": owned_segments() - before["segments"],
                   "stale_sockets": tracker.stale_sockets(),
                   "fds": fd_count() - before["fds"]})
    return obs


def parent_kill_job(ctx: RankContext) -> dict:
    """Rank 0 SIGKILLs the last rank mid-rebalance and times how long that rank's worker
    outlives it; the killed rank never returns."""
    options = ctx.spec.options
    tracker = ChannelTracker(proxy=False)
    state = new_state(ctx)
    victim = ctx.world_size - 1
    try:
        pids = torch.tensor([os.getpid(), live_worker_pid(state) or -1], dtype=torch.int64)
        gathered = [torch.zeros_like(pids) for _ in range(ctx.world_size)]
        dist.all_gather(gathered, pids, group=ctx.cpu_group)
        ctx.report("info", rank=ctx.rank, pid=os.getpid(), worker_pid=int(pids[1]),
                   endpoint=tracker.channels[-1][1])
        driver = Driver(ctx, state)
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
        worker_exit_s = wait_exit(worker_pid, 5.0, t0)
        rank_exit_s = wait_exit(rank_pid, 5.0, t0)
        t1 = time.monotonic()
        state.shutdown(wait=True)
        shutdown_s = time.monotonic() - t1
        return {"mid_rebalance": mid, "victim_pid": rank_pid, "victim_worker": worker_pid,
                "worker_exit_s": worker_exit_s, "rank_exit_s": rank_exit_s,
                "survivor_shutdown_s": shutdown_s, "violations": driver.violations,
                "children": stray_children(None), "stale_sockets": tracker.stale_sockets()}
    finally:
        state.shutdown(wait=True)
        tracker.close()
