"""When things happen in a demo run: rebalance starts, drifts of the hot experts, the end.

Steps are 0-based indices of decode steps, as in the demo's reports: step ``i`` is the
``i + 1``-th forward. A rebalance starts at the step after which ``EplbState.step_count`` is a
multiple of the interval (steps ``I - 1``, ``2I - 1``, ...); with ``drift_offset`` the hot sets
change at steps ``D - offset``, ``2D - offset``, ... (:class:`~mp_eplb.demo.engine.DriftingModel`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Schedule", "default_schedule", "settle_steps", "PLAN_STEPS"]

#: Steps a rebalance may take before its first commit (policy and first layer staged).
PLAN_STEPS = 10


def settle_steps(num_layers: int, layers_per_step: int = 1) -> int:
    """Steps a rebalance may stay in flight: planning plus one commit step per
    ``layers_per_step`` layers."""
    return PLAN_STEPS + -(-num_layers // layers_per_step)


@dataclass(frozen=True)
class Schedule:
    """A run of ``steps`` steps, rebalancing every ``rebalance_interval``, drifting every
    ``drift_interval`` with the drifts ``drift_offset`` steps early."""

    steps: int
    rebalance_interval: int
    drift_interval: int
    drift_offset: int

    def rebalance_starts(self) -> list[int]:
        return list(range(self.rebalance_interval - 1, self.steps, self.rebalance_interval))

    def drifts(self) -> list[int]:
        first = self.drift_interval - self.drift_offset
        return list(range(first, self.steps, self.drift_interval))

    def conflicts(self, settle: int) -> list[str]:
        """What goes wrong when a rebalance stays in flight ``settle`` steps: one that the end
        of the run cuts off, or a drift while one is in flight ("" each when none)."""
        problems = []
        for start in self.rebalance_starts():
            if start + settle >= self.steps:
                problems.append(f"the rebalance starting at step {start} may be cut off by the "
                                f"end at step {self.steps - 1}")
            problems += [f"the drift at step {d} lands inside the rebalance starting at step "
                         f"{start}" for d in self.drifts() if start <= d <= start + settle]
        return problems


def default_schedule(num_layers: int = 4, *, rebalances: int = 8,
                     rebalance_interval: int = 50) -> Schedule:
    """The demo's default: ``rebalances`` rebalances, the last one followed by a whole interval
    (no further start), and the hot sets redrawn every fourth interval, half an interval after
    a rebalance start (so after it settled, and long before the next). ``ValueError`` if a
    rebalance of ``num_layers`` layers cannot settle in half an interval."""
    offset = rebalance_interval // 2
    if settle_steps(num_layers) >= offset:
        raise ValueError(f"{num_layers} layers need {settle_steps(num_layers)} steps to settle, "
                         f"more than half of rebalance_interval={rebalance_interval}; raise it")
    return Schedule(steps=(rebalances + 1) * rebalance_interval - 1,
                    rebalance_interval=rebalance_interval,
                    drift_interval=4 * rebalance_interval, drift_offset=offset)
