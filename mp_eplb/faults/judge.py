"""Judge a scenario from what every rank observed: detection within the bound, consistency,
recovery, leftovers; and the checks after the run's shutdown."""

from __future__ import annotations

import json
import os

from mp_eplb.faults.launch import Outcome
from mp_eplb.faults.probes import sweep_dead_owner
from mp_eplb.faults.scenarios import FaultOptions, Scenario, ScenarioResult, detection_bound

__all__ = ["check_final", "evaluate", "evaluate_parent_kill", "injections"]

#: Readings of GPU free memory after a kill may differ by this much (allocator granularity).
GPU_MEM_TOLERANCE_MIB = 64.0


def injections(log_path: str) -> dict[int, float]:
    """Failpoint firings by rebalance id (the first one of each)."""
    out: dict[int, float] = {}
    if os.path.exists(log_path):
        with open(log_path) as f:
            for line in f:
                entry = json.loads(line)
                out.setdefault(entry["rebalance"], entry["time"])
    return out


def evaluate(sc: Scenario, observed: list[dict], fired: dict[int, float],
              options: FaultOptions) -> ScenarioResult:
    """One batch scenario's row from every rank's observations (``fired``: failpoint
    firings by rebalance id)."""
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
    bound = detection_bound(sc, options) if sc.expect != "complete" else None
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


def evaluate_parent_kill(sc: Scenario, run: Outcome, options: FaultOptions) -> ScenarioResult:
    """The parent-kill row: the victim's worker gone within 1 s, the survivor shut
    down cleanly, nothing of the victim left by name once swept."""
    victim = options.ranks - 1
    errors = {r: e for r, e in run.errors.items() if r != victim}
    errors.update({r: f"left after exit {names[:3]}" for r, names in run.segments_left.items()})
    survivor = run.results.get(0)
    info = next(iter(run.infos.get(victim, [])), None)
    swept, left = sweep_dead_owner(info)
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


def check_final(results: dict[int, dict], segments_left: dict[int, list[str]],
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
