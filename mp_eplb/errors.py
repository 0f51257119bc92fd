"""Typed errors of mp_eplb. Bad arguments raise ``ValueError`` or ``TypeError``; these cover
runtime faults, a closed state and bad load counts (the last two are also ``ValueError``)."""

from __future__ import annotations

__all__ = ["EplbError", "InvalidLoadError", "PeerFailedError", "PlacementFileError",
           "StateClosedError", "VllmConfigError", "WorkerFailedError", "WorkerStartError"]


class EplbError(Exception):
    """Base class of mp_eplb's runtime errors."""


class WorkerStartError(EplbError):
    """The transfer worker did not start or answer its handshake in time (see
    ``EplbConfig.start_timeout_s``) or failed while opening its handles."""


class WorkerFailedError(EplbError):
    """The transfer worker died, hung, or misbehaved during a rebalance. The rebalance was
    abandoned on every rank at the same step; committed layers stay and serving goes on."""


class PeerFailedError(WorkerFailedError):
    """Another rank's transfer worker failed; this rank's own worker was healthy and was
    replaced only because the workers' process group spans every rank. The rank whose worker
    really failed reports a plain :class:`WorkerFailedError`."""


class StateClosedError(EplbError, ValueError):
    """:meth:`mp_eplb.EplbState.step` was called after ``shutdown()`` (like I/O on a closed
    file). Build a new ``EplbState`` to balance again."""


class InvalidLoadError(EplbError, ValueError):
    """An ``expert_load`` held a negative token count. Refused by ``step()`` for a CPU load;
    for a load on the GPU it is found at the next rebalance start (no host sync per step),
    that rebalance is skipped on every rank and this error is the offending rank's
    ``EplbState.last_error``."""


class PlacementFileError(EplbError, ValueError):
    """A placement file (:mod:`mp_eplb.placement`) cannot be read or does not describe a valid
    placement; the message names the file and what is wrong."""


class VllmConfigError(EplbError, ValueError):
    """:meth:`mp_eplb.EplbConfig.from_vllm` got a vLLM setting it does not know or that means
    something else here; the message says what differs and what to pass instead."""
