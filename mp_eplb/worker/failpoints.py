"""Failpoints: named places in the transfer worker where a fault-injection run makes it fail.

Off unless armed. The transfer subprocess arms them once at start-up from its environment
(:func:`arm_from_env`, called by :mod:`mp_eplb.worker.boot` only, so a failpoint never
fires inside an engine process, not even in thread mode). Unarmed, :func:`failpoint` is one
dictionary truth test.

``MP_EPLB_FAILPOINTS`` holds comma-separated specs ``POINT:ACTION[@COND]...``:

- POINT (where the worker is): ``boot`` (start-up, before torch is imported: only the
  progress counter's heartbeat can tell a hang there), ``setup`` (Setup received, before
  opening handles),
  ``plan`` (before the load all-reduce), ``policy`` (after it, before the policy runs),
  ``stage`` (before a layer is transferred into its staging buffer), ``ready`` (after
  ``LayerReady`` was sent, before the engine commits).
- ACTION: ``sigkill``, ``sigsegv``, ``sigterm`` (the signal to itself), ``exit``
  (``os._exit(7)``), ``raise`` (:class:`FailpointError`), ``hang`` (a pure-Python busy loop
  that never returns: only the progress counter can tell).
- COND: ``rebalance=N`` (only during the engine's rebalance ``N``), ``hit=K`` (on the K-th
  matching pass, default 1). Each spec fires at most once per process.

Example: ``MP_EPLB_FAILPOINTS="stage:sigkill@rebalance=3@hit=2"`` kills the worker when it
starts staging the second layer of rebalance 3. If ``MP_EPLB_FAILPOINTS_LOG`` names a file,
each firing first appends one JSON line ``{"time", "pid", "point", "action", "rebalance"}``
(``time``: ``time.time()``), so a runner can measure detection latency.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["ENV", "LOG_ENV", "POINTS", "ACTIONS", "Failpoint", "FailpointError", "parse",
           "arm", "arm_from_env", "disarm", "failpoint"]

logger = logging.getLogger(__name__)

ENV = "MP_EPLB_FAILPOINTS"
LOG_ENV = "MP_EPLB_FAILPOINTS_LOG"
POINTS = ("boot", "setup", "plan", "policy", "stage", "ready")
ACTIONS = ("sigkill", "sigsegv", "sigterm", "exit", "raise", "hang")
_SIGNALS = {"sigkill": signal.SIGKILL, "sigsegv": signal.SIGSEGV, "sigterm": signal.SIGTERM}


class FailpointError(RuntimeError):
    """Raised by a failpoint with action ``raise`` (an injected worker exception)."""


@dataclass
class Failpoint:
    """One armed spec; ``rebalance=None`` matches any rebalance (and ``setup``)."""

    point: str
    action: str
    rebalance: int | None = None
    hit: int = 1
    seen: int = 0
    fired: bool = False

    def spec(self) -> str:
        conds = "" if self.rebalance is None else f"@rebalance={self.rebalance}"
        return f"{self.point}:{self.action}{conds}@hit={self.hit}"


_armed: dict[str, list[Failpoint]] = {}
_log_path: str | None = None


def parse(text: str) -> list[Failpoint]:
    """The specs in ``text`` (see the module doc); ``ValueError`` names the bad one."""
    out = []
    for raw in filter(None, (part.strip() for part in text.split(","))):
        head, *conds = raw.split("@")
        point, _, action = head.partition(":")
        if point not in POINTS or action not in ACTIONS:
            raise ValueError(f"failpoint spec {raw!r}: expected POINT:ACTION with POINT in "
                             f"{POINTS} and ACTION in {ACTIONS}")
        fp = Failpoint(point, action)
        for cond in conds:
            key, _, value = cond.partition("=")
            if key not in ("rebalance", "hit") or not value.isdigit():
                raise ValueError(f"failpoint spec {raw!r}: condition {cond!r} must be "
                                 "rebalance=N or hit=K (non-negative integers)")
            setattr(fp, key, int(value))
        if fp.hit < 1:
            raise ValueError(f"failpoint spec {raw!r}: hit counts from 1")
        out.append(fp)
    return out


def arm(specs: list[Failpoint], log_path: str | None = None) -> None:
    """Replace the armed failpoints of this process with ``specs``."""
    global _log_path
    _armed.clear()
    for fp in specs:
        _armed.setdefault(fp.point, []).append(fp)
    _log_path = log_path
    if specs:
        logger.warning("failpoints armed: %s", ", ".join(fp.spec() for fp in specs))


def arm_from_env(environ: Mapping[str, str] = os.environ) -> int:
    """Arm from ``MP_EPLB_FAILPOINTS`` / ``MP_EPLB_FAILPOINTS_LOG``; returns how many specs."""
    specs = parse(environ.get(ENV, ""))
    arm(specs, environ.get(LOG_ENV) or None)
    return len(specs)


def disarm() -> None:
    arm([])


def failpoint(point: str, rebalance: int = -1) -> None:
    """Fire the armed spec of ``point`` whose conditions hold (no-op when none is armed)."""
    if not _armed:
        return
    for fp in _armed.get(point, ()):
        if fp.fired or (fp.rebalance is not None and fp.rebalance != rebalance):
            continue
        fp.seen += 1
        if fp.seen >= fp.hit:
            fp.fired = True
            _fire(fp, rebalance)


def _fire(fp: Failpoint, rebalance: int) -> None:
    record = {"time": time.time(), "pid": os.getpid(), "point": fp.point, "action": fp.action,
              "rebalance": rebalance}
    if _log_path is not None:
        fd = os.open(_log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
        finally:
            os.close(fd)
    logger.warning("failpoint %s fired: %s (rebalance %d)", fp.point, fp.action, rebalance)
    if fp.action in _SIGNALS:
        os.kill(os.getpid(), _SIGNALS[fp.action])
        raise FailpointError(f"failpoint {fp.spec()}: signal {fp.action} did not end the process")
    if fp.action == "exit":
        os._exit(7)
    if fp.action == "raise":
        raise FailpointError(f"failpoint {fp.spec()} fired (rebalance {rebalance})")
    while True:  # hang: busy, holding the GIL between switches, never advancing progress
        pass
