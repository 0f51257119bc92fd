"""ipc: generic transport between a process and its helper subprocess.

Shared tensor handles (unnamed shared memory, CUDA IPC allocations shared in place), interprocess
CUDA events, a versioned schema of typed messages, an authenticated msgpack codec and a
ZeroMQ channel. Knows nothing of experts.
"""

from ipc.channel import Channel
from ipc.codec import Codec, key_from_env, key_to_env, new_session_key
from ipc.errors import (AuthenticationError, ChannelClosedError, HandleError, IpcError,
                        IpcTimeoutError, ProtocolError)
from ipc.events import SharedEvent
from ipc.handles import (TensorSpec, close, close_all, export_tensor, live_segments,
                         open_tensor, release, share_storage, shared_empty)
from ipc.procs import inheritable_pipe, is_stopped, reap, spawn, stop_processes
from ipc.schema import ErrorReply, Goodbye, Heartbeat, Hello, Shutdown, message

__all__ = [
    "Channel", "Codec", "new_session_key", "key_to_env", "key_from_env",
    "IpcError", "HandleError", "ProtocolError", "AuthenticationError", "IpcTimeoutError",
    "ChannelClosedError",
    "SharedEvent",
    "TensorSpec", "shared_empty", "share_storage", "export_tensor", "open_tensor", "release", "close",
    "close_all", "live_segments",
    "message", "Hello", "Heartbeat", "ErrorReply", "Shutdown", "Goodbye",
    "stop_processes", "spawn", "reap", "is_stopped", "inheritable_pipe",
]
