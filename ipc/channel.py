"""ZeroMQ channel between a parent process and its helper child.

Transport only: frames come from and go to :class:`ipc.codec.Codec`; message types live
in :mod:`ipc.schema`.

Sockets: the parent binds a ROUTER, the child connects a DEALER. Why not PAIR: a PAIR
socket serves only the first connection, so any stray local connection that comes first
(tcp on 127.0.0.1 is open to every local user) locks the real child out, and libzmq
documents PAIR for inproc use. A ROUTER takes every connection and tags each frame with
the sender's routing id; the channel answers the routing id of the last *authenticated*
message, so strangers can neither inject (HMAC) nor lock out (no exclusivity). With
``ROUTER_MANDATORY`` a send to a child whose connection closed fails at once with
:class:`~ipc.errors.ChannelClosedError` instead of queueing forever; the child's DEALER
uses a fixed random routing id and the ROUTER ``ROUTER_HANDOVER``, so a tcp reconnect
keeps the route. Consequence: the child speaks first (a :class:`~ipc.schema.Hello`);
before that the parent has nobody to send to.

Every received frame passes size, HMAC, msgpack limits, schema version, type and field
checks (the codec) and a replay check (seq must exceed the last accepted one). A frame
failing any check is dropped, counted in :attr:`Channel.stats`, logged at warning
(rate-limited) and the channel carries on; an authenticated request of an unknown type or
with bad fields is also answered with an :class:`~ipc.schema.ErrorReply` naming its seq.

A channel is not thread-safe: use it from one thread. One channel serves one child
lifetime; to restart a worker, bind a new channel with a new key.
"""

from __future__ import annotations

import logging
import math
import os
import re
import secrets
import shutil
import socket as pysocket
import stat
import tempfile
import time
import weakref
from types import TracebackType
from typing import Any

import zmq

from ipc import naming
from ipc.codec import DEFAULT_MAX_MESSAGE_BYTES, Codec, DecodeError, DropReason, Role
from ipc.errors import AuthenticationError, ChannelClosedError, IpcError, IpcTimeoutError
from ipc.schema import ErrorReply, message_tag

__all__ = [
    "Channel",
    "sweep_stale_dirs",
    "DEFAULT_SEND_TIMEOUT_S",
    "DEFAULT_LINGER_MS",
    "MAX_IPC_PATH_CHARS",
]

logger = logging.getLogger(__name__)

DEFAULT_SEND_TIMEOUT_S = 5.0
DEFAULT_LINGER_MS = 100
MAX_IPC_PATH_CHARS = 107
"""Longest path an ``ipc://`` endpoint may have (``sun_path`` is 108 bytes with its NUL)."""
_SOCKET_NAME = "ch.sock"
#: A private socket directory is ``<tmp>/<ipc.naming.private_dir_prefix()><owner pid>-<random>``
#: (see :func:`sweep_stale_dirs`); this matches what follows the prefix.
_PRIVATE_DIR_TAIL_RE = re.compile(r"([0-9]{1,10})-[A-Za-z0-9_]{1,32}\Z")
#: A private directory with no socket in it is swept only once older than this (its owner may be
#: between creating it and binding).
_EMPTY_DIR_GRACE_S = 60.0
_swept = False
_WARN_INTERVAL_S = 5.0
_ERROR_TAG = message_tag(ErrorReply)


def _ipc_path(endpoint: str) -> str:
    path = endpoint[len("ipc://"):]
    if len(os.fsencode(path)) > MAX_IPC_PATH_CHARS:
        raise IpcError(f"ipc endpoint path {path!r} is {len(os.fsencode(path))} bytes, over "
                       f"the {MAX_IPC_PATH_CHARS}-byte limit of a unix socket path: use a "
                       "shorter directory")
    if os.path.lexists(path):
        raise IpcError(f"ipc endpoint {path!r} already exists: another channel is bound "
                       "there (binding again would silently steal it) or a stale file was "
                       "left; pick another path, or remove the file if no process uses it")
    return path


def _tmp_bases() -> list[str]:
    return list(dict.fromkeys((tempfile.gettempdir(), "/tmp")))


def _private_ipc_endpoint() -> tuple[str, str]:
    """``(endpoint, dir)``: a socket path in a new 0700 directory, under $TMPDIR or, if that
    path is too long for a unix socket, under /tmp. The directory's name carries this pid, so
    the next start can sweep what a killed process left (:func:`sweep_stale_dirs`)."""
    global _swept
    if not _swept:
        _swept = True
        sweep_stale_dirs()
    for base in _tmp_bases():
        directory = tempfile.mkdtemp(prefix=f"{naming.private_dir_prefix()}{os.getpid()}-",
                                     dir=base)
        path = os.path.join(directory, _SOCKET_NAME)
        if len(os.fsencode(path)) <= MAX_IPC_PATH_CHARS:
            return f"ipc://{path}", directory
        os.rmdir(directory)
    raise IpcError(f"no temporary directory gives an ipc socket path of at most "
                   f"{MAX_IPC_PATH_CHARS} bytes (tried $TMPDIR and /tmp): set TMPDIR to a "
                   "short directory or bind to 'tcp'")


def sweep_stale_dirs() -> list[str]:
    """Remove the private socket directories of this name prefix (:mod:`ipc.naming`) that dead
    processes of this user left (a process killed by a signal or ``os._exit`` cannot remove its
    own); returns what was removed.

    Safe against live channels: a directory is removed only if it is this user's (owner uid, not a
    symlink), its owner pid no longer exists here, and its socket refuses connections (nobody
    listens: this also protects a live owner in another pid namespace that shares the directory);
    a directory without a socket only once older than a minute. Called once per process, at its
    first private bind.
    """
    removed = []
    prefix = naming.private_dir_prefix()
    for base in _tmp_bases():
        try:
            names = os.listdir(base)
        except OSError:
            continue
        for name in names:
            match = (_PRIVATE_DIR_TAIL_RE.match(name[len(prefix):]) if name.startswith(prefix)
                     else None)
            path = os.path.join(base, name)
            if match is None or not _is_stale(path, int(match.group(1))):
                continue
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.lexists(path):
                removed.append(path)
    if removed:
        logger.info("removed %d socket directories left by dead processes: %s", len(removed),
                    ", ".join(removed))
    return removed


def _is_stale(path: str, pid: int) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
        return False  # alive (or pid reused): keep
    except ProcessLookupError:
        pass
    except PermissionError:
        return False  # a process of another user has that pid now: keep
    sock_path = os.path.join(path, _SOCKET_NAME)
    if not os.path.lexists(sock_path):
        return time.time() - st.st_mtime > _EMPTY_DIR_GRACE_S
    with pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM) as probe:
        try:
            probe.connect(sock_path)
        except ConnectionRefusedError:
            return True  # a socket file nobody listens on
        except OSError:
            return False  # not a socket, or unreadable: not ours to judge
    return False


def _release(socket: zmq.Socket, context: zmq.Context, socket_path: str | None,
             directory: str | None) -> None:
    """Close the socket before terminating its context (``term`` waits for every socket of
    the context, so a garbage-collected context with an open socket would block forever),
    then remove the socket file and private directory."""
    socket.close(linger=0)
    context.term()
    _remove_paths(socket_path, directory)


def _remove_paths(socket_path: str | None, directory: str | None) -> None:
    if socket_path is not None:
        try:
            os.unlink(socket_path)
        except FileNotFoundError:
            pass
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


class _WarnLimiter:
    """At most one warning per drop reason every ``_WARN_INTERVAL_S``; counts the rest."""

    def __init__(self, endpoint: str) -> None:
        self._endpoint = endpoint
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, reason: str, detail: str) -> None:
        now = time.monotonic()
        if now < self._next.get(reason, 0.0):
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return
        self._next[reason] = now + _WARN_INTERVAL_S
        hidden = self._suppressed.pop(reason, 0)
        logger.warning("ipc channel %s dropped a %s frame: %s%s", self._endpoint, reason,
                       detail, f" (+{hidden} similar drops not logged)" if hidden else "")


class Channel:
    """One end of a parent/child ZeroMQ channel. Build with :meth:`bind` (parent) or
    :meth:`connect` (child); close with :meth:`close` or a ``with`` block."""

    def __init__(self, context: zmq.Context, socket: zmq.Socket, codec: Codec, endpoint: str,
                 socket_path: str | None = None, directory: str | None = None) -> None:
        """Internal: use :meth:`bind` or :meth:`connect`."""
        self._context = context
        self._socket = socket
        self._codec = codec
        self._is_parent = codec.role == "parent"
        self.endpoint = endpoint
        self._cleanup = weakref.finalize(self, _release, socket, context, socket_path, directory)
        self._peer: bytes | None = None
        self._send_seq = 0
        self._last_seq = 0
        self._closed = False
        self._warn = _WarnLimiter(endpoint)
        self._timeouts: dict[int, int] = {}
        self._stats = {"sent": 0, "received": 0, **{r.value: 0 for r in DropReason}}

    @classmethod
    def bind(cls, key: bytes, endpoint: str | None = None, *,
             max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Channel:
        """Parent side. ``endpoint``: None or ``"ipc"`` for a socket in a new private 0700
        directory (removed on close); ``"tcp"`` or ``"tcp://127.0.0.1:*"`` for a random
        loopback port; or an explicit ``"ipc:///path"`` (must not exist yet) or
        ``"tcp://host:port"``. The bound address is :attr:`endpoint`; give it and ``key``
        to the child. IpcError if the path is too long or already exists."""
        codec = Codec(key, "parent", max_message_bytes=max_message_bytes)
        socket_path = directory = None
        if endpoint is None or endpoint == "ipc":
            endpoint, directory = _private_ipc_endpoint()
            socket_path = endpoint[len("ipc://"):]
        elif endpoint.startswith("ipc://"):
            socket_path = _ipc_path(endpoint)
        elif endpoint == "tcp":
            endpoint = "tcp://127.0.0.1:*"
        elif not endpoint.startswith("tcp://"):
            raise ValueError(f"endpoint must be None, 'ipc', 'tcp', 'ipc://PATH' or "
                             f"'tcp://HOST:PORT', got {endpoint!r}")
        context = zmq.Context(io_threads=1)
        socket = context.socket(zmq.ROUTER)
        try:
            socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
            socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
            cls._configure(socket, codec)
            socket.bind(endpoint)
            bound = socket.getsockopt_string(zmq.LAST_ENDPOINT)
        except BaseException:
            socket.close(linger=0)
            context.term()
            _remove_paths(socket_path, directory)
            raise
        return cls(context, socket, codec, bound, socket_path, directory)

    @classmethod
    def connect(cls, endpoint: str, key: bytes, *,
                max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Channel:
        """Child side: connect to the parent's :attr:`endpoint` with the session ``key``.
        Sending works at once (frames queue until the connection is up)."""
        codec = Codec(key, "child", max_message_bytes=max_message_bytes)
        context = zmq.Context(io_threads=1)
        socket = context.socket(zmq.DEALER)
        try:
            # First byte non-zero: libzmq reserves routing ids starting with 0.
            socket.setsockopt(zmq.ROUTING_ID, b"c" + secrets.token_bytes(15))
            cls._configure(socket, codec)
            socket.connect(endpoint)
        except BaseException:
            socket.close(linger=0)
            context.term()
            raise
        return cls(context, socket, codec, endpoint)

    @staticmethod
    def _configure(socket: zmq.Socket, codec: Codec) -> None:
        # Frames over max_frame_bytes are counted as 'oversized' by the codec; libzmq itself
        # cuts the connection of a peer sending a frame over twice that, so a hostile peer
        # cannot make this process allocate arbitrary memory.
        socket.setsockopt(zmq.MAXMSGSIZE, 2 * codec.max_frame_bytes)
        socket.setsockopt(zmq.LINGER, 0)

    # --- properties --------------------------------------------------------------------

    @property
    def role(self) -> Role:
        """``"parent"`` (bound) or ``"child"`` (connected)."""
        return self._codec.role

    @property
    def socket(self) -> zmq.Socket:
        """The ZeroMQ socket, for ``zmq.Poller`` / asyncio integration; do not send or
        receive on it directly."""
        return self._socket

    @property
    def stats(self) -> dict[str, int]:
        """Copy of the counters: ``sent``, ``received`` and one per
        :class:`~ipc.codec.DropReason` value (frames dropped for that reason)."""
        return dict(self._stats)

    @property
    def last_seq(self) -> int:
        """Sequence number of the last message accepted from the peer (0: none yet)."""
        return self._last_seq

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        """ZeroMQ's notification fd (``zmq.FD``). It is edge-triggered: once it reads as
        readable, call :meth:`poll` until it returns None before waiting on it again."""
        self._check_open()
        return self._socket.getsockopt(zmq.FD)

    # --- sending -----------------------------------------------------------------------

    def send(self, msg: object, timeout: float | None = DEFAULT_SEND_TIMEOUT_S) -> int:
        """Send a registered message; returns the sequence number it was given (strictly
        increasing from 1). Waits at most ``timeout`` seconds (None: no limit) for queue
        space, then raises IpcTimeoutError. ChannelClosedError if the peer's connection is
        gone; IpcError on the parent before the child sent its first message; ProtocolError
        if ``msg`` does not fit its declared types or the size limit."""
        self._check_open()
        seq = self._send_seq + 1
        frame = self._codec.encode(msg, seq)
        if self._is_parent and self._peer is None:
            raise IpcError(f"channel {self.endpoint} has no peer yet: the parent can send only "
                           "after the child's first message (e.g. Hello) arrived")
        self._set_timeout(zmq.SNDTIMEO, None if timeout is None else time.monotonic() + timeout)
        try:
            if self._is_parent:  # once the routing frame is queued, the rest of it is too
                self._socket.send(self._peer, zmq.SNDMORE)
            self._socket.send(frame)
        except zmq.Again:
            raise self._timeout_error(f"the send queue stayed full for send "
                                      f"timeout={timeout} s") from None
        except zmq.ZMQError as err:
            if err.errno == zmq.EHOSTUNREACH:
                raise ChannelClosedError(
                    f"channel {self.endpoint}: the peer's connection is gone (child "
                    "exited or disconnected); check the child process") from None
            raise
        self._send_seq = seq
        self._stats["sent"] += 1
        return seq

    # --- receiving ---------------------------------------------------------------------

    def recv(self, timeout: float | None) -> Any:
        """Next good message from the peer. Dropped frames do not end the wait; after
        ``timeout`` seconds (None: no limit) without a good message, IpcTimeoutError."""
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._set_timeout(zmq.RCVTIMEO, deadline)
            try:
                parts = self._socket.recv_multipart(copy=True)
            except zmq.Again:
                if deadline is not None and time.monotonic() >= deadline:
                    raise self._timeout_error(f"no good message arrived within recv "
                                              f"timeout={timeout} s") from None
                continue
            msg = self._accept(parts)
            if msg is not None:
                return msg

    def poll(self) -> Any | None:
        """Non-blocking: the next good message already received, or None. Drops (and
        counts) bad frames on the way. For an engine's step loop."""
        self._check_open()
        while self._socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            msg = self._accept(self._socket.recv_multipart(flags=zmq.NOBLOCK, copy=True))
            if msg is not None:
                return msg
        return None

    def _set_timeout(self, option: int, deadline: float | None) -> None:
        """Set SNDTIMEO/RCVTIMEO to the milliseconds left until ``deadline`` (-1: none)."""
        ms = -1 if deadline is None else max(0, math.ceil((deadline - time.monotonic()) * 1000))
        if self._timeouts.get(option) != ms:
            self._socket.setsockopt(option, ms)
            self._timeouts[option] = ms

    def _timeout_error(self, what: str) -> IpcTimeoutError:
        dropped = sum(self._stats[r.value] for r in DropReason)
        return IpcTimeoutError(f"channel {self.endpoint}: {what} ({dropped} bad frames "
                               "dropped so far); raise the timeout or check the peer process")

    def _accept(self, parts: list[bytes]) -> Any | None:
        """The message in ``parts`` if it passes every check, else None (dropped)."""
        routing_id = parts[0] if self._is_parent else None
        frames = parts[1:] if self._is_parent else parts
        if len(frames) != 1:
            self._drop(DropReason.MALFORMED, f"{len(frames)} frames in one message, expected 1")
            return None
        try:
            envelope = self._codec.decode(frames[0])
        except AuthenticationError as err:
            self._drop(DropReason.UNAUTHENTICATED, str(err))
            return None
        except DecodeError as err:
            if err.seq is not None and err.seq > self._last_seq:
                # Authenticated, fresh, but unusable: the peer's request gets an answer.
                self._admit(err.seq, routing_id)
                self._drop(err.reason, f"seq {err.seq}: {err}")
                self._reply_error(err)
            else:
                self._drop(DropReason.REPLAYED if err.seq is not None else err.reason, str(err))
            return None
        if envelope.seq <= self._last_seq:
            self._drop(DropReason.REPLAYED, f"{envelope.tag} seq {envelope.seq} is not after "
                       f"the last accepted seq {self._last_seq} (duplicate or replay)")
            return None
        self._admit(envelope.seq, routing_id)
        self._stats["received"] += 1
        return envelope.message

    def _admit(self, seq: int, routing_id: bytes | None) -> None:
        self._last_seq = seq
        if routing_id is not None:
            self._peer = routing_id

    def _drop(self, reason: DropReason, detail: str) -> None:
        self._stats[reason.value] += 1
        self._warn.warn(reason.value, detail)

    def _reply_error(self, err: DecodeError) -> None:
        if err.tag == _ERROR_TAG:
            return  # never answer an error reply with another one
        try:
            self.send(ErrorReply(err.seq, err.reason.value, str(err)), timeout=0)
        except IpcError as send_err:
            logger.warning("ipc channel %s could not answer bad request seq %s: %s",
                           self.endpoint, err.seq, send_err)

    # --- lifetime ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ChannelClosedError(f"channel {self.endpoint} is closed; bind or connect a "
                                     "new one")

    def close(self, linger_ms: int = DEFAULT_LINGER_MS) -> None:
        """Close the socket, waiting at most ``linger_ms`` for queued frames to leave, stop
        the ZeroMQ context and remove the socket file and private directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._socket.close(linger=max(0, int(linger_ms)))
        self._cleanup()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"Channel({self.role}, {self.endpoint!r}, {state})"
