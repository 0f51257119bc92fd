"""ipc: generic transport between a process and its helper subprocess.

Shared tensor handles (:mod:`ipc.handles`: unnamed shared memory, CUDA IPC allocations shared in
place), interprocess CUDA events (:mod:`ipc.events`), a versioned schema of typed messages
(:mod:`ipc.schema`), an authenticated msgpack codec (:mod:`ipc.codec`), a ZeroMQ channel
(:mod:`ipc.channel`), helper processes (:mod:`ipc.procs`) and errors (:mod:`ipc.errors`).
Knows nothing of experts: what it names starts with its user's prefix (:mod:`ipc.naming`).

Import the module you need (``from ipc import handles``); the package itself imports nothing
heavy, so a process sets its name prefix (:func:`set_name_prefix`) before torch or zmq loads.
"""

from ipc.naming import set_name_prefix

__all__ = ["set_name_prefix"]
