"""ipc: generic transport between a process and its helper subprocess.

Shared tensor handles (POSIX shared memory, CUDA IPC), interprocess CUDA events, a
ZeroMQ channel and a versioned, authenticated msgpack protocol. Knows nothing of experts.
"""

__all__: list[str] = []
