"""Soak: many rebalances with injected worker faults, and each rank's resources at the start
and the end (``tests/mp_eplb/faults/test_soak.py``)."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass

from mp_eplb.worker import failpoints
from mp_eplb.faults.launch import RankContext, RunSpec, launch
from mp_eplb.faults.probes import fd_count, live_worker_pid, owned_segments, stray_children
from mp_eplb.faults.scenarios import FaultOptions
from mp_eplb.faults.workload import Driver, new_state
from mp_eplb.engine.state import EplbState

__all__ = ["SOAK_FAULTS", "SoakResult", "run_soak"]


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
    return {"rss_mib": rss / 1024, "fds": fd_count(), "segments": owned_segments(),
            "stray_children": stray_children(None if state is None else live_worker_pid(state))}


def _soak_job(ctx: RankContext) -> dict:
    """``cycles`` rebalances with ``restarts`` worker faults; resources before and after."""
    spec = ctx.spec
    faults = _soak_faults(spec.cycles, spec.restarts, ctx.world_size)
    os.environ[failpoints.ENV] = ",".join(f for _, rank, f in faults if rank == ctx.rank)
    os.environ.pop(failpoints.LOG_ENV, None)
    options = spec.options
    state = new_state(ctx)
    driver = Driver(ctx, state)
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
        run = launch(RunSpec("soak", _soak_job, options, (), os.path.join(tmp, "unused"),
                             cycles=cycles, restarts=restarts))
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
