"""Run scenarios on rank processes and judge them: :func:`run_scenarios`."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

from mp_eplb.faults.judge import check_final, evaluate, evaluate_parent_kill, injections
from mp_eplb.faults.jobs import batch_job, parent_kill_job
from mp_eplb.faults.launch import RunSpec, launch
from mp_eplb.faults.scenarios import FaultOptions, ScenarioResult, scenarios
from mp_eplb.progress import announce

__all__ = ["run_scenarios"]


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
            run = launch(RunSpec("batch", batch_job, options, tuple(batch), log_path))
            results, errors = run.results, run.errors
            fired = injections(log_path)
            for i, sc in enumerate(batch):
                if errors or len(results) != options.ranks:
                    detail = "; ".join(f"rank {r}: {e}" for r, e in sorted(errors.items()))
                    out[sc.name] = ScenarioResult(sc.name, sc.expect, "run failed", None, None,
                                                  False, False, "?", detail)
                    continue
                observed = [results[r]["scenarios"][i] for r in range(options.ranks)]
                out[sc.name] = evaluate(sc, observed, fired, options)
            if not errors and len(results) == options.ranks:
                check_final(results, run.segments_left, batch, out)
        for sc in (s for s in chosen if s.kind == "parent_kill"):
            run = launch(RunSpec("parent_kill", parent_kill_job, options, (sc,),
                               os.path.join(tmp, "unused")))
            out[sc.name] = evaluate_parent_kill(sc, run, options)
            announce(f"faults: {sc.name} finished: {'ok' if out[sc.name].ok else 'FAIL'}")
    return [out[sc.name] for sc in chosen]
