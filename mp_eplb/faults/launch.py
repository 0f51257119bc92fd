"""Run one job of the fault tool on rank processes (through :func:`mp_eplb.ranks.launch_ranks`):
each rank logs into the run's log directory, joins the engine group and runs the job with a
:class:`RankContext`; the parent gathers the results and what exited ranks left by name."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mp_eplb import logs, ranks
from mp_eplb.demo.launch import join_rank_env
from mp_eplb.faults.probes import named_leftovers
from mp_eplb.faults.scenarios import FaultOptions, Scenario
from mp_eplb.progress import announce

__all__ = ["Job", "Outcome", "RankContext", "RunSpec", "launch"]

logger = logging.getLogger(__name__)


#: A job of the fault tool: runs on every rank, returns that rank's observations.
Job = Callable[["RankContext"], dict]


@dataclass(frozen=True)
class RunSpec:
    """One run: ``job`` (named ``name`` in the log files) on ``options.ranks`` ranks;
    ``log_path`` is the failpoint log, in the directory that also takes the ranks' logs."""

    name: str
    job: Job
    options: FaultOptions
    scenarios: tuple[Scenario, ...]
    log_path: str
    cycles: int = 0
    restarts: int = 0


@dataclass
class RankContext:
    """One rank of a run: its place in the engine group and the run's spec."""

    rank: int
    world_size: int
    device: torch.device
    ep_group: dist.ProcessGroup
    cpu_group: dist.ProcessGroup
    spec: RunSpec

    @staticmethod
    def report(kind: str, **data: Any) -> None:
        """Tell the runner now (``info``: this rank's pids and endpoint; ``done``: a
        scenario finished)."""
        ranks.post({"kind": kind, **data})


@dataclass
class Outcome:
    """What a run's ranks sent (by rank) and what an exited rank left by name."""

    results: dict[int, dict]
    infos: dict[int, list[dict]]
    errors: dict[int, str]
    segments_left: dict[int, list[str]]


def _rank_entry(rank: int, world_size: int, spec: RunSpec) -> dict:
    # The faults are expected: their logs (this rank's and, through the inherited stderr, its
    # workers') go to a file in the run's log directory, not between the result lines.
    log = os.open(os.path.join(os.path.dirname(spec.log_path), f"{spec.name}-rank{rank}.log"),
                  os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log, 2)
    os.close(log)
    logs.configure(f"rank{rank}", default=logging.WARNING)
    env = join_rank_env(rank, world_size, spec.options.device, spec.options.timeout_s / 4)
    return spec.job(RankContext(env.rank, env.world_size, env.device, env.ep_group,
                                env.cpu_group, spec))


def launch(spec: RunSpec) -> Outcome:
    """Run ``spec`` on ``spec.options.ranks`` spawned rank processes, none of which outlives
    the call. A rank's failure is an entry of :attr:`Outcome.errors` (its traceback is logged);
    the other ranks go on until ``options.timeout_s``, as a run may end a rank on purpose."""
    options = spec.options
    infos: dict[int, list[dict]] = {rank: [] for rank in range(options.ranks)}
    started = time.monotonic()

    def on_message(rank: int, message: dict) -> None:
        if message["kind"] == "info":
            infos[rank].append(message)
        else:
            announce(f"faults: {message['name']} finished after "
                     f"{time.monotonic() - started:.0f} s")

    run = ranks.launch_ranks(_rank_entry, options.ranks, (spec,), timeout_s=options.timeout_s,
                             name=f"eplb-faults-{spec.name}-rank", on_message=on_message,
                             failure_grace_s=None)
    for rank, text in sorted(run.tracebacks.items()):
        logger.error("rank %d failed:\n%s", rank, text)
    # A rank that exited (not killed by a signal) must have left nothing by name.
    left = {rank: named_leftovers(run.pids[rank])
            for rank, code in run.exitcodes.items() if code is not None and code >= 0}
    return Outcome(run.results, infos, run.errors, {r: names for r, names in left.items() if names})
