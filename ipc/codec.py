"""Wire codec: a registered message <-> one authenticated, size-limited msgpack frame.

Frame layout (one ZeroMQ frame)::

    mac[32] || body,   body = msgpack([SCHEMA_VERSION, tag, seq, fields])
    mac = HMAC-SHA256(session_key, direction_label || body)

``direction_label`` differs per sender role ("parent"/"child"), so a frame cannot be
reflected back to its sender. Decoding checks, in this order and before any unpacking:
frame size, then the MAC (constant-time compare); only then msgpack with limits tied to
``max_message_bytes``, the schema version, the tag and every field (:mod:`ipc.schema`).

The session key travels out of band, never in argv nor in the environment (which
``/proc/<pid>/environ`` shows): :func:`key_to_pipe` / :func:`key_from_fd` (an inherited
pipe). No pickle anywhere.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import secrets
from functools import partial
from typing import Any, Literal, NamedTuple

import msgpack

from ipc.errors import AuthenticationError, ProtocolError
from ipc.procs import inheritable_pipe
from ipc.schema import SCHEMA_VERSION, from_fields, message_type, to_fields

__all__ = [
    "KEY_BYTES",
    "MAC_BYTES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "Role",
    "DropReason",
    "DecodeError",
    "Envelope",
    "Codec",
    "new_session_key",
    "key_to_pipe",
    "key_from_fd",
]

KEY_BYTES = 32
MAC_BYTES = hashlib.sha256().digest_size
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20
"""Default limit of a message body (the frame without its MAC), in bytes."""
_MIN_KEY_BYTES = 16
_MAX_SEQ = (1 << 64) - 1

Role = Literal["parent", "child"]
_LABELS: dict[str, bytes] = {"parent": b"ipc/v1 parent->child\0", "child": b"ipc/v1 child->parent\0"}
_PEER: dict[str, str] = {"parent": "child", "child": "parent"}


class DropReason(str, enum.Enum):
    """Why a received frame was rejected; the channel counts drops under these values."""

    OVERSIZED = "oversized"
    UNAUTHENTICATED = "unauthenticated"
    MALFORMED = "malformed"
    WRONG_VERSION = "wrong_version"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_FIELDS = "invalid_fields"
    REPLAYED = "replayed"


class DecodeError(ProtocolError):
    """A frame failed a decoding check other than the MAC (that one raises
    :class:`~ipc.errors.AuthenticationError`). ``reason`` says which check; ``seq`` and
    ``tag`` are set once the frame was authenticated and its envelope read, so the
    receiver can answer that request with an error reply."""

    def __init__(self, reason: DropReason, message: str, seq: int | None = None,
                 tag: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.seq = seq
        self.tag = tag


class Envelope(NamedTuple):
    """A decoded, authenticated message: ``seq`` is the sender's sequence number (strictly
    increasing per sender, from 1), ``message`` an instance of the class registered under
    ``tag``. (A NamedTuple: immutable and cheaper to build than a frozen dataclass.)"""

    tag: str
    seq: int
    message: Any


def new_session_key() -> bytes:
    """A fresh random key (32 bytes) for one parent/child session."""
    return secrets.token_bytes(KEY_BYTES)


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes) or len(key) < _MIN_KEY_BYTES:
        raise ValueError(f"session key must be bytes of at least {_MIN_KEY_BYTES} bytes "
                         "(use ipc.codec.new_session_key())")
    return key


def key_to_pipe(key: bytes) -> int:
    """Write ``key`` into a new pipe and return its inheritable read end. Pass the fd
    number to the child (``Popen(pass_fds=(fd,))``; the number is not secret) and close it
    in the parent after the child started. The key is smaller than PIPE_BUF: no blocking."""
    return inheritable_pipe(_check_key(key))


def key_from_fd(fd: int) -> bytes:
    """Read the whole key from the pipe ``fd`` written by :func:`key_to_pipe`, then close it."""
    chunks = []
    try:
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return _check_key(b"".join(chunks))


class Codec:
    """Encode messages this side sends and decode those the peer sends.

    ``role`` is this side's role; frames are signed with this role's direction label and
    verified against the peer's. ``max_message_bytes`` bounds the body (frame minus MAC) in
    both directions; both sides should use the same value. Not thread-safe (holds HMAC
    state templates, cheap to copy).
    """

    def __init__(self, key: bytes, role: Role, *,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        if role not in _LABELS:
            raise ValueError(f"role must be 'parent' or 'child', got {role!r}")
        if not isinstance(max_message_bytes, int) or max_message_bytes < 64:
            raise ValueError(f"max_message_bytes must be an int >= 64, got {max_message_bytes!r}")
        _check_key(key)
        self.role: Role = role
        self.max_message_bytes = max_message_bytes
        self._sign = hmac.new(key, _LABELS[role], hashlib.sha256)
        self._verify = hmac.new(key, _LABELS[_PEER[role]], hashlib.sha256)
        n = max_message_bytes
        # unpackb takes no max_buffer_size (the frame is already in hand): the size check in
        # decode() plays that role, before any byte is parsed. Ext types are refused.
        self._unpack = partial(
            msgpack.unpackb, raw=False, use_list=True, strict_map_key=True, max_str_len=n,
            max_bin_len=n, max_array_len=n, max_map_len=n // 2, max_ext_len=0)

    @property
    def max_frame_bytes(self) -> int:
        """Largest frame accepted: ``max_message_bytes`` plus the MAC."""
        return self.max_message_bytes + MAC_BYTES

    def encode(self, msg: object, seq: int) -> bytes:
        """One frame for ``msg`` with sequence number ``seq`` (1 <= seq < 2**64).
        ProtocolError if ``msg`` is not a registered message, a field has the wrong type, or
        the body exceeds ``max_message_bytes``."""
        if type(seq) is not int or not 0 < seq <= _MAX_SEQ:
            raise ValueError(f"seq must be an int in [1, 2**64), got {seq!r}")
        tag, fields = to_fields(msg)
        body = msgpack.packb([SCHEMA_VERSION, tag, seq, fields], use_bin_type=True)
        if len(body) > self.max_message_bytes:
            raise ProtocolError(f"{tag} message of {len(body)} bytes exceeds max_message_bytes="
                                f"{self.max_message_bytes}; send less or raise the limit on "
                                "both sides")
        return self.seal(body)

    def seal(self, body: bytes) -> bytes:
        """Frame for an already-packed ``body``, signed as this role, with no check of its
        content: :meth:`encode` uses it; fault-injection tools and tests use it to send
        authenticated but invalid messages."""
        mac = self._sign.copy()
        mac.update(body)
        return mac.digest() + body

    def decode(self, frame: bytes) -> Envelope:
        """Check and decode one frame from the peer. Raises
        :class:`~ipc.errors.AuthenticationError` on a bad MAC and :class:`DecodeError`
        (a ProtocolError with ``.reason``) for every other rejection."""
        size = len(frame)
        if size > self.max_frame_bytes:
            raise DecodeError(DropReason.OVERSIZED, f"frame of {size} bytes exceeds the limit "
                              f"of {self.max_frame_bytes} (max_message_bytes="
                              f"{self.max_message_bytes} + {MAC_BYTES}-byte MAC)")
        if size <= MAC_BYTES:
            raise DecodeError(DropReason.MALFORMED, f"frame of {size} bytes is too short to "
                              f"hold a {MAC_BYTES}-byte MAC and a body")
        view = memoryview(frame)
        mac = self._verify.copy()
        mac.update(view[MAC_BYTES:])
        if not hmac.compare_digest(mac.digest(), view[:MAC_BYTES]):
            raise AuthenticationError(
                f"frame failed HMAC-SHA256 verification as a {_PEER[self.role]}->{self.role} "
                "message: wrong session key, tampered frame, or a reflected frame")
        try:
            # Parsing untrusted bytes: every msgpack failure mode is a malformed frame.
            envelope = self._unpack(view[MAC_BYTES:])
        except (ValueError, TypeError, msgpack.UnpackException) as err:
            raise DecodeError(DropReason.MALFORMED, f"body is not valid msgpack within the "
                              f"limits: {type(err).__name__}: {err}") from None
        return self._open(envelope)

    def _open(self, envelope: Any) -> Envelope:
        if type(envelope) is not list or not envelope or type(envelope[0]) is not int:
            raise DecodeError(DropReason.MALFORMED, "envelope is not a list starting with the "
                              "schema version")
        if envelope[0] != SCHEMA_VERSION:
            raise DecodeError(DropReason.WRONG_VERSION, f"peer speaks schema version "
                              f"{envelope[0]}, this side speaks version {SCHEMA_VERSION}: run "
                              "the same ipc version on both sides")
        if len(envelope) != 4:
            raise DecodeError(DropReason.MALFORMED, f"envelope has {len(envelope)} items, "
                              "expected 4 [version, tag, seq, fields]")
        _, tag, seq, fields = envelope
        if type(tag) is not str or type(seq) is not int or not 0 < seq <= _MAX_SEQ:
            raise DecodeError(DropReason.MALFORMED, f"envelope tag must be str and seq an int "
                              f"in [1, 2**64), got {tag!r:.60} and {seq!r:.30}")
        try:
            message_type(tag)
        except ProtocolError as err:
            raise DecodeError(DropReason.UNKNOWN_TYPE, str(err), seq, tag) from None
        try:
            return Envelope(tag, seq, from_fields(tag, fields))
        except ProtocolError as err:
            raise DecodeError(DropReason.INVALID_FIELDS, str(err), seq, tag) from None
