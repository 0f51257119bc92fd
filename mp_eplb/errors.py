"""Typed errors of mp_eplb. Bad arguments raise ``ValueError``; these cover runtime faults."""

from __future__ import annotations

__all__ = ["EplbError", "WorkerFailedError", "WorkerStartError"]


class EplbError(Exception):
    """Base class of mp_eplb's runtime errors."""


class WorkerStartError(EplbError):
    """The transfer worker did not start or answer its handshake in time (see
    ``EplbConfig.start_timeout_s``) or failed while opening its handles."""


class WorkerFailedError(EplbError):
    """The transfer worker died, hung, or misbehaved during a rebalance. The rebalance was
    abandoned on every rank at the same step; committed layers stay and serving goes on."""
