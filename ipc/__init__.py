"""ipc: generic transport between a process and its helper subprocess.

Shared tensor handles (unnamed shared memory, CUDA IPC allocations shared in place), interprocess
CUDA events, a versioned schema of typed messages, an authenticated msgpack codec and a
ZeroMQ channel. Knows nothing of experts: what it names starts with the user's prefix
(:func:`set_name_prefix`, :mod:`ipc.naming`).

The names below are imported on first use, so a process can set the name prefix before
anything heavy (torch, zmq) is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ipc.naming import set_name_prefix

if TYPE_CHECKING:
    from ipc.channel import Channel
    from ipc.codec import Codec, key_from_env, key_to_env, new_session_key
    from ipc.errors import (AuthenticationError, ChannelClosedError, HandleError, IpcError,
                            IpcTimeoutError, ProtocolError)
    from ipc.events import SharedEvent
    from ipc.handles import (TensorSpec, close, close_all, export_tensor, live_segments,
                             open_tensor, release, share_storage, shared_empty)
    from ipc.procs import inheritable_pipe, is_stopped, reap, spawn, stop_processes
    from ipc.schema import ErrorReply, Goodbye, Heartbeat, Hello, Shutdown, message

_EXPORTS = {
    "ipc.channel": ("Channel",),
    "ipc.codec": ("Codec", "new_session_key", "key_to_env", "key_from_env"),
    "ipc.errors": ("IpcError", "HandleError", "ProtocolError", "AuthenticationError",
                   "IpcTimeoutError", "ChannelClosedError"),
    "ipc.events": ("SharedEvent",),
    "ipc.handles": ("TensorSpec", "shared_empty", "share_storage", "export_tensor",
                    "open_tensor", "release", "close", "close_all", "live_segments"),
    "ipc.schema": ("message", "Hello", "Heartbeat", "ErrorReply", "Shutdown", "Goodbye"),
    "ipc.procs": ("stop_processes", "spawn", "reap", "is_stopped", "inheritable_pipe"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = ["set_name_prefix", *_MODULE_OF]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'ipc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
