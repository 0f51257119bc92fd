"""Fault injection against a real multi-rank EplbState run: ``mp-eplb faults``.

Each scenario breaks something on one rank (its worker, its channel, or the rank itself)
during one rebalance of a real run (rank processes in a gloo group, each with an
:class:`~mp_eplb.engine.state.EplbState` in process mode and its transfer subprocess), then
checks the invariants of ``docs/faults.md``: detection within a bound, consistency on every
rank at every step, recovery, and no leftovers.

Modules, one idea each: :mod:`~mp_eplb.faults.scenarios` (the scenario table and options),
:mod:`~mp_eplb.faults.proxy` (the channel proxy that delays, drops or corrupts frames, and the
wrong-key injector), :mod:`~mp_eplb.faults.probes` (leftover checks: processes, owned segments,
socket directories), :mod:`~mp_eplb.faults.workload` (the synthetic engine and its lockstep
driver), :mod:`~mp_eplb.faults.launch` (a run on rank processes), :mod:`~mp_eplb.faults.jobs`
(the rank side of a run), :mod:`~mp_eplb.faults.judge` (evaluation),
:mod:`~mp_eplb.faults.runner` (:func:`run_scenarios`), :mod:`~mp_eplb.faults.soak` and
:mod:`~mp_eplb.faults.cli` (``mp-eplb faults``).
"""

from mp_eplb.faults.cli import add_faults_arguments, format_table, run_faults
from mp_eplb.faults.proxy import FrameProxy, inject_wrong_key
from mp_eplb.faults.runner import run_scenarios
from mp_eplb.faults.scenarios import FaultOptions, Scenario, ScenarioResult, scenarios
from mp_eplb.faults.soak import SoakResult, run_soak

__all__ = ["FaultOptions", "FrameProxy", "Scenario", "ScenarioResult", "SoakResult",
           "add_faults_arguments", "format_table", "inject_wrong_key", "run_faults",
           "run_scenarios", "run_soak", "scenarios"]
