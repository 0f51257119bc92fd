"""Typed errors of the ipc package. Every message says what to change."""

from __future__ import annotations

__all__ = [
    "IpcError",
    "HandleError",
    "ProtocolError",
    "AuthenticationError",
    "IpcTimeoutError",
    "ChannelClosedError",
]


class IpcError(Exception):
    """Base class of every error raised by :mod:`ipc`."""


class HandleError(IpcError):
    """A tensor or event handle is malformed, tampered with, or does not match
    what the opener expected (size, dtype, shape, device, segment)."""


class ProtocolError(IpcError):
    """A message broke the wire protocol: bad framing, unknown type, wrong field
    type, unsupported schema version, or over the size limit."""


class AuthenticationError(ProtocolError):
    """A message failed HMAC verification (wrong session key or tampered frames)."""


class IpcTimeoutError(IpcError, TimeoutError):
    """An operation did not complete within its timeout; the message names the setting."""


class ChannelClosedError(IpcError):
    """The channel was closed (locally, or the peer is gone) and cannot be used."""
