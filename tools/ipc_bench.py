"""Control-message round-trip latency over an :class:`ipc.channel.Channel` between two processes.

    python tools/ipc_bench.py --iterations 20000 --endpoint ipc [--wait spin] [--handles]

The parent binds, spawns this script as the child (session key through an inherited pipe),
and times ``send(Heartbeat) -> child echoes -> recv`` round trips; it prints p50/p99/mean/max
in microseconds, plus the in-process codec cost for reference. ``--wait block`` waits in
``recv`` (zmq_poll wakeups), ``--wait spin`` busy-polls ``poll()`` on both sides (one core
each). A bare pyzmq ROUTER/DEALER echo (no codec, no HMAC) is timed too, as the floor
the machine allows. ``--handles`` adds tensor handle export/open timings (``ipc.handles``, imported only
then): export in the parent, first and cached open in the child, which gets the handle over
the channel. Goal: round-trip p50 under 50 µs on one machine.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import zmq

from ipc.channel import DEFAULT_LINGER_MS, Channel
from ipc.codec import Codec, key_from_fd, key_to_pipe, new_session_key
from ipc.errors import IpcTimeoutError
from ipc.schema import Goodbye, Heartbeat, Hello, Shutdown, message

__all__ = ["main", "OpenRequest", "OpenTiming"]

STARTUP_TIMEOUT_S = 60.0
REPLY_TIMEOUT_S = 30.0
CHILD_IDLE_TIMEOUT_S = 120.0
CHILD_EXIT_TIMEOUT_S = 10.0
HANDLE_OPEN_REPEATS = 20
_HANDLE_API = ("shared_empty", "export_tensor", "open_tensor", "time_export", "time_open", "release")


@message("ipc_bench.open")
class OpenRequest:
    """Ask the child to time ``ipc.handles.open_tensor`` on ``handle``."""

    handle: dict[str, Any]
    repeats: int


@message("ipc_bench.open_timing")
class OpenTiming:
    """Median seconds of a first open (maps the segment) and of a cached open."""

    first_s: float
    cached_s: float


Receive = Callable[[], Any]


def _receiver(channel: Channel, wait: str, timeout: float) -> Receive:
    """A no-argument receive: blocking ``recv`` or busy ``poll`` with the same timeout."""
    if wait == "block":
        return lambda: channel.recv(timeout=timeout)

    def spin() -> Any:
        deadline = time.monotonic() + timeout
        while (msg := channel.poll()) is None:
            if time.monotonic() > deadline:
                raise IpcTimeoutError(f"no message within spin timeout={timeout} s")
        return msg
    return spin


def _child(endpoint: str, key_fd: int, wait: str) -> int:
    with Channel.connect(endpoint, key_from_fd(key_fd)) as channel:
        channel.send(Hello(protocol_version=1, pid=os.getpid(), role="ipc_bench"))
        receive = _receiver(channel, wait, CHILD_IDLE_TIMEOUT_S)
        while not isinstance(msg := receive(), Shutdown):
            if isinstance(msg, OpenRequest):
                handles = importlib.import_module("ipc.handles")
                first = handles.time_open(msg.handle, repeats=msg.repeats, cached=False)
                cached = handles.time_open(msg.handle, repeats=msg.repeats, cached=True)
                msg = OpenTiming(first_s=first.seconds, cached_s=cached.seconds)
            channel.send(msg)
        channel.send(Goodbye(reason=msg.reason, exit_code=0))
    return 0


def _raw_child(endpoint: str) -> int:
    """Echo raw frames on a bare DEALER until an empty frame: the transport floor."""
    context = zmq.Context(io_threads=1)
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.RCVTIMEO, int(CHILD_IDLE_TIMEOUT_S * 1000))
    socket.connect(endpoint)
    socket.send(b"hello")
    while frame := socket.recv():
        socket.send(frame)
    socket.close(linger=DEFAULT_LINGER_MS)
    context.term()
    return 0


def _raw_floor(endpoint: str, iterations: int, warmup: int) -> list[int]:
    """Round trips of a 72-byte frame (a Heartbeat frame's size) over bare pyzmq
    ROUTER/DEALER between two processes: no codec, no HMAC, no checks."""
    context = zmq.Context(io_threads=1)
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.RCVTIMEO, int(REPLY_TIMEOUT_S * 1000))
    directory = tempfile.mkdtemp(prefix="ipc-bench-") if endpoint == "ipc" else None
    try:
        router.bind(f"ipc://{directory}/raw.sock" if directory else "tcp://127.0.0.1:*")
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--raw-child",
                                 router.getsockopt_string(zmq.LAST_ENDPOINT)])
        try:
            peer, _ = router.recv_multipart()
            payload = b"x" * 72
            samples = []
            for i in range(warmup + iterations):
                start = time.perf_counter_ns()
                router.send_multipart([peer, payload])
                router.recv_multipart()
                samples.append(time.perf_counter_ns() - start)
            router.send_multipart([peer, b""])
        finally:
            _reap(proc)
    finally:
        router.close(linger=0)
        context.term()
        if directory:
            shutil.rmtree(directory, ignore_errors=True)
    return samples[warmup:]


def _reap(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.wait(timeout=CHILD_EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=CHILD_EXIT_TIMEOUT_S)


def _stats_us(samples_ns: list[int]) -> tuple[float, float, float, float]:
    s = sorted(samples_ns)
    return (s[len(s) // 2] / 1e3, s[min(len(s) - 1, int(0.99 * len(s)))] / 1e3,
            statistics.fmean(s) / 1e3, s[-1] / 1e3)


def _codec_samples(iterations: int) -> list[int]:
    key = new_session_key()
    parent, child = Codec(key, "parent"), Codec(key, "child")
    samples = []
    for i in range(1, iterations + 1):
        start = time.perf_counter_ns()
        child.decode(parent.encode(Heartbeat(progress=i), seq=i))
        samples.append(time.perf_counter_ns() - start)
    return samples


def _round_trips(channel: Channel, receive: Receive, iterations: int) -> list[int]:
    samples = []
    for i in range(iterations):
        start = time.perf_counter_ns()
        channel.send(Heartbeat(progress=i))
        reply = receive()
        samples.append(time.perf_counter_ns() - start)
        if reply != Heartbeat(progress=i):
            raise RuntimeError(f"echo mismatch: sent Heartbeat({i}), got {reply!r}")
    return samples


def _handle_rows(channel: Channel, receive: Receive, mib: int, device: str) -> list[tuple[str, str]]:
    """``(label, median µs)`` rows for handle export/open, or one row saying why none."""
    try:
        handles = importlib.import_module("ipc.handles")
    except ImportError as err:
        return [("tensor handles", f"skipped: ipc.handles not importable ({err})")]
    missing = [name for name in _HANDLE_API if not hasattr(handles, name)]
    if missing:
        return [("tensor handles", f"skipped: ipc.handles lacks {missing}")]
    import torch

    tensor = handles.shared_empty((mib << 20,), torch.uint8, device)
    try:
        export = handles.time_export(tensor)
        channel.send(OpenRequest(handle=handles.export_tensor(tensor), repeats=HANDLE_OPEN_REPEATS))
        timing = receive()
    finally:
        handles.release(tensor)
        del tensor
    what = f"{mib} MiB {device}"
    return [(f"export_tensor ({what}, owner)", f"{export.seconds * 1e6:.1f}"),
            (f"open_tensor first open ({what}, child)", f"{timing.first_s * 1e6:.1f}"),
            (f"open_tensor cached ({what}, child)", f"{timing.cached_s * 1e6:.1f}")]


def _spawn_child(endpoint: str, key: bytes, wait: str) -> subprocess.Popen[bytes]:
    fd = key_to_pipe(key)
    try:
        return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", endpoint,
                                 "--key-fd", str(fd), "--wait", wait], pass_fds=(fd,))
    finally:
        os.close(fd)


def _run(args: argparse.Namespace) -> None:
    key = new_session_key()
    with Channel.bind(key, args.endpoint) as channel:
        proc = _spawn_child(channel.endpoint, key, args.wait)
        try:
            hello = channel.recv(timeout=STARTUP_TIMEOUT_S)
            print(f"child pid {hello.pid} connected on {channel.endpoint} (wait={args.wait})")
            receive = _receiver(channel, args.wait, REPLY_TIMEOUT_S)
            _round_trips(channel, receive, args.warmup)
            rows = [("codec encode+decode, in-process (one way)",
                     _stats_us(_codec_samples(args.iterations))),
                    (f"round trip Heartbeat over {args.endpoint} ({args.wait})",
                     _stats_us(_round_trips(channel, receive, args.iterations)))]
            if not args.no_floor:
                rows.append((f"floor: bare pyzmq round trip over {args.endpoint} (block)",
                             _stats_us(_raw_floor(args.endpoint, args.iterations, args.warmup))))
            print(f"\n{'measurement':<52} {'p50 µs':>9} {'p99 µs':>9} {'mean µs':>9} {'max µs':>9}")
            for label, (p50, p99, mean, peak) in rows:
                print(f"{label:<52} {p50:>9.1f} {p99:>9.1f} {mean:>9.1f} {peak:>9.1f}")
            if args.handles:
                print(f"\n{'tensor handles (median of repeats)':<52} {'µs':>9}")
                for label, value in _handle_rows(channel, receive, args.handle_mib,
                                                 args.handle_device):
                    print(f"{label:<52} {value:>9}")
            channel.send(Shutdown(reason="benchmark done"))
            receive()
            print(f"\n{args.iterations} iterations after {args.warmup} warm-up; "
                  f"channel stats {channel.stats}")
        finally:
            _reap(proc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=20_000, help="timed round trips")
    parser.add_argument("--warmup", type=int, default=1_000, help="untimed round trips first")
    parser.add_argument("--endpoint", choices=("ipc", "tcp"), default="ipc",
                        help="ipc:// socket in a private dir, or tcp://127.0.0.1 random port")
    parser.add_argument("--wait", choices=("block", "spin"), default="block",
                        help="block in recv, or busy-poll on both sides")
    parser.add_argument("--handles", action="store_true",
                        help="also time ipc.handles export/open (imports torch)")
    parser.add_argument("--handle-mib", type=int, default=64, help="handle tensor size")
    parser.add_argument("--handle-device", default="cpu", help="'cpu' or 'cuda:N'")
    parser.add_argument("--no-floor", action="store_true",
                        help="skip the bare pyzmq round trip measured for comparison")
    parser.add_argument("--child", metavar="ENDPOINT", help=argparse.SUPPRESS)
    parser.add_argument("--raw-child", metavar="ENDPOINT", help=argparse.SUPPRESS)
    parser.add_argument("--key-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.child, args.key_fd, args.wait)
    if args.raw_child:
        return _raw_child(args.raw_child)
    if args.iterations < 1 or args.warmup < 0:
        parser.error("--iterations must be >= 1 and --warmup >= 0")
    _run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
