"""The scenario table of ``mp-eplb faults``: what each fault is, what it must lead to, and the
settings and result row of a run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["FaultOptions", "Scenario", "ScenarioResult", "WRONG_KEY_FRAMES", "detection_bound",
           "scenarios", "schedule"]

#: Wrong-key frames a ``wrong-key`` scenario sends (plus two frames of random bytes).
WRONG_KEY_FRAMES = 5


@dataclass(frozen=True)
class Scenario:
    """One fault. ``kind``: ``failpoint`` (``spec`` = POINT:ACTION[@hit=K] on rank
    ``target``'s worker; ``setup_fail`` also makes the restarted worker exit at setup),
    ``proxy`` (``proxy`` = ACTION:DIRECTION[:TAG] applied by :class:`FrameProxy`),
    ``wrong_key``, or ``parent_kill``. ``expect``: ``abandon``, ``complete`` or ``either``.
    ``bound``: which detection bound applies (``kill``: ``detect_bound_s``; ``hang``:
    heartbeat timeout + that; ``timeout``: layer timeout + that). ``slots``: rebalance ids
    the scenario takes (fault, then recovery attempts)."""

    name: str
    kind: str
    expect: str
    doc: str
    target: int = 1
    spec: str = ""
    proxy: str = ""
    setup_fail: bool = False
    bound: str = "kill"
    slots: int = 2


def scenarios(world_size: int = 2) -> list[Scenario]:
    """Every scenario, in run order. Targets alternate between the last and the first rank,
    so rank 0 (where the policy runs) and a peer both lose their worker."""
    last = world_size - 1
    out = []
    for i, action in enumerate(("sigkill", "sigsegv", "sigterm", "exit", "raise")):
        for point in ("plan", "policy", "stage", "ready"):
            hit = "@hit=2" if point == "stage" else ""
            out.append(Scenario(
                f"{action}@{point}", "failpoint", "abandon",
                f"worker {action} at {point}" + (" (second layer)" if hit else ""),
                target=last if i % 2 == 0 else 0, spec=f"{point}:{action}{hit}"))
    out += [
        Scenario("hang@stage", "failpoint", "abandon",
                 "worker spins in Python at stage; only the progress counter shows it",
                 spec="stage:hang", bound="hang"),
        Scenario("exit@setup", "failpoint", "abandon",
                 "worker killed at stage, then its replacement exits during setup",
                 target=0, spec="stage:sigkill", setup_fail=True, slots=3),
        Scenario("proxy-delay", "proxy", "complete", "every frame both ways held 20 ms",
                 proxy="delay:both"),
        Scenario("proxy-duplicate", "proxy", "complete",
                 "every frame both ways sent twice (replays dropped by seq)",
                 target=0, proxy="duplicate:both"),
        Scenario("proxy-drop-ready", "proxy", "abandon", "first LayerReady to the engine lost",
                 proxy="drop:up:eplb.ready", bound="timeout"),
        Scenario("proxy-reorder", "proxy", "abandon",
                 "first LayerReady overtaken by the next frame (then dropped as a replay)",
                 target=0, proxy="reorder:up:eplb.ready", bound="timeout"),
        Scenario("proxy-corrupt", "proxy", "abandon",
                 "one bit of the first LayerReady flipped (fails HMAC)",
                 proxy="corrupt:up:eplb.ready", bound="timeout"),
        Scenario("proxy-drop-free", "proxy", "either", "first BufferFree to the worker lost",
                 target=0, proxy="drop:down:eplb.free", bound="timeout"),
        Scenario("proxy-drop-rebalance", "proxy", "abandon",
                 "Rebalance request to the worker lost: only the layer timeout can tell",
                 proxy="drop:down:eplb.rebalance", bound="timeout"),
        Scenario("wrong-key", "wrong_key", "complete",
                 f"{WRONG_KEY_FRAMES} frames under a wrong key + 2 of random bytes sent to "
                 "the engine's socket during a rebalance", target=0),
        Scenario("parent-kill", "parent_kill", "abandon",
                 "an engine rank SIGKILLed mid-rebalance: its worker must exit within 1 s",
                 slots=0),
    ]
    return out


@dataclass(frozen=True)
class FaultOptions:
    """Run settings. Times in seconds."""

    ranks: int = 2
    device: str = "cpu"
    communicator: str = "auto"
    timeout_s: float = 900.0
    heartbeat_timeout_s: float = 1.5
    layer_timeout_s: float = 30.0
    detect_bound_s: float = 1.0
    start_timeout_s: float = 60.0


@dataclass
class ScenarioResult:
    """One row of the table. ``detection_s``: injection until every rank knew (None: no
    detection, e.g. a tolerated fault)."""

    name: str
    expect: str
    outcome: str
    detection_s: float | None
    bound_s: float | None
    consistent: bool
    recovered: bool
    leftovers: str
    notes: str = ""
    ok: bool = False


def schedule(items: Sequence[Scenario]) -> list[tuple[Scenario, int]]:
    """(scenario, first rebalance id): id 0 is the warm-up, then each takes its slots."""
    out, next_id = [], 1
    for sc in items:
        out.append((sc, next_id))
        next_id += sc.slots
    return out


def detection_bound(sc: Scenario, options: FaultOptions) -> float:
    """Seconds within which every rank must know of ``sc``'s fault."""
    extra = {"kill": 0.0, "hang": options.heartbeat_timeout_s,
             "timeout": options.layer_timeout_s}[sc.bound]
    return extra + options.detect_bound_s
