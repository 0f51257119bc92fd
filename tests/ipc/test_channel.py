"""ipc.channel: real child processes over ipc:// and tcp://, fuzzing, auth, timeouts, cleanup.

Run as a script, this file is the echo child: ``python test_channel.py ENDPOINT env|FD``.
"""

from __future__ import annotations

import logging
import os
import random
import select
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import msgpack
import pytest
import zmq

from ipc import naming
from ipc.channel import MAX_IPC_PATH_CHARS, Channel, sweep_stale_dirs
from ipc.codec import (
    MAC_BYTES,
    Codec,
    DropReason,
    key_from_fd,
    key_to_pipe,
    new_session_key,
)
from ipc.errors import ChannelClosedError, IpcError, IpcTimeoutError
from ipc.schema import SCHEMA_VERSION, ErrorReply, Goodbye, Heartbeat, Hello, Shutdown, message

STARTUP_TIMEOUT_S = 20.0  # child interpreter start + first message
REPLY_TIMEOUT_S = 5.0
CHILD_IDLE_TIMEOUT_S = 30.0  # the echo child exits on its own after this long without a message
CHILD_EXIT_TIMEOUT_S = 10.0
FUZZ_FRAMES = 10_000
FUZZ_MAX_MESSAGE_BYTES = 4096
FUZZ_MAX_FRAME_BYTES = FUZZ_MAX_MESSAGE_BYTES + MAC_BYTES
DROP_KEYS = [r.value for r in DropReason]


@message("test_channel.probe")
class Probe:
    n: int
    payload: bytes
    tags: list[str]
    scores: dict[str, float | None]


def _echo_child(endpoint: str, key_fd: str) -> int:
    """Connect, say Hello, echo every message until Shutdown, answer it with Goodbye."""
    key = key_from_fd(int(key_fd))
    with Channel.connect(endpoint, key) as channel:
        channel.send(Hello(protocol_version=1, pid=os.getpid(), role="echo"))
        while True:
            msg = channel.recv(timeout=CHILD_IDLE_TIMEOUT_S)
            if isinstance(msg, Shutdown):
                channel.send(Goodbye(reason=msg.reason, exit_code=0))
                return 0
            channel.send(msg)


@pytest.fixture()
def key() -> bytes:
    return new_session_key()


@pytest.fixture()
def spawn() -> Iterator[Callable[[str, bytes], subprocess.Popen[bytes]]]:
    """``spawn(endpoint, key)`` starts an echo child (the key through an inherited pipe);
    teardown fails the test if a child is still running (after killing it)."""
    children: list[subprocess.Popen[bytes]] = []

    def start(endpoint: str, key: bytes) -> subprocess.Popen[bytes]:
        fd = key_to_pipe(key)
        try:
            proc = subprocess.Popen([sys.executable, __file__, endpoint, str(fd)],
                                    env=dict(os.environ), pass_fds=(fd,))
        finally:
            os.close(fd)
        children.append(proc)
        return proc

    yield start
    left = [p for p in children if p.poll() is None]
    for proc in left:
        proc.kill()
        proc.wait(timeout=CHILD_EXIT_TIMEOUT_S)
    assert not left, f"child processes left running: {[p.pid for p in left]}"


def socket_path(channel: Channel) -> str:
    assert channel.endpoint.startswith("ipc://")
    return channel.endpoint[len("ipc://"):]


def shut_down(parent: Channel, proc: subprocess.Popen[bytes]) -> None:
    parent.send(Shutdown(reason="test over"))
    assert parent.recv(timeout=REPLY_TIMEOUT_S) == Goodbye(reason="test over", exit_code=0)
    assert proc.wait(timeout=CHILD_EXIT_TIMEOUT_S) == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("endpoint", [None, "tcp"])
def test_round_trip_with_child_process(key: bytes, spawn: Callable, endpoint: str | None) -> None:
    with Channel.bind(key, endpoint) as parent:
        if endpoint is None:
            path = socket_path(parent)
            assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
            assert len(path) <= MAX_IPC_PATH_CHARS
        else:
            assert parent.endpoint.startswith("tcp://127.0.0.1:")
        proc = spawn(parent.endpoint, key)
        assert parent.recv(timeout=STARTUP_TIMEOUT_S) == Hello(1, proc.pid, "echo")
        sent = [Heartbeat(progress=1),
                Probe(n=-5, payload=bytes(range(256)), tags=["a", ""], scores={"x": 0.5, "y": None}),
                ErrorReply(request_seq=None, kind="k", message="m")]
        for i, msg in enumerate(sent, start=1):
            assert parent.send(msg) == i
            assert parent.recv(timeout=REPLY_TIMEOUT_S) == msg
            assert parent.last_seq == i + 1
        shut_down(parent, proc)
        # The child is gone: sending fails with a typed error once libzmq saw the disconnect.
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        with pytest.raises(ChannelClosedError, match="connection is gone"):
            while time.monotonic() < deadline:
                parent.send(Heartbeat(progress=0))
                time.sleep(0.01)
        assert {k: parent.stats[k] for k in DROP_KEYS} == dict.fromkeys(DROP_KEYS, 0)
        assert parent.stats["received"] == 5
    assert parent.closed
    if endpoint is None:
        assert not os.path.exists(path) and not os.path.exists(os.path.dirname(path))
    with pytest.raises(ChannelClosedError, match="is closed"):
        parent.recv(timeout=0)


def fuzz_frames(rng: random.Random, valid: bytes, max_frame: int) -> Iterator[tuple[str, list[bytes]]]:
    """Endless (kind, frames) of hostile input built around one valid frame."""
    def flipped() -> bytes:
        out = bytearray(valid)
        for bit in rng.sample(range(8 * len(out)), rng.randint(1, 3)):  # distinct bits
            out[bit // 8] ^= 1 << (bit % 8)
        return bytes(out)
    makers: list[tuple[str, Callable[[], list[bytes]]]] = [
        ("random", lambda: [rng.randbytes(rng.randint(0, 300))]),
        ("truncated", lambda: [valid[:rng.randrange(len(valid))]]),
        ("flipped", lambda: [flipped()]),
        ("oversized", lambda: [rng.randbytes(rng.randint(max_frame + 1, 2 * max_frame))]),
        ("replayed", lambda: [valid]),
        ("multipart", lambda: [rng.randbytes(rng.randint(0, 50)) for _ in range(rng.randint(2, 4))]),
    ]
    while True:
        name, make = makers[rng.randrange(len(makers))]
        yield name, make()


def drain_until(channel: Channel, dropped: int, timeout: float) -> None:
    """Let ``channel`` process input until ``dropped`` frames were dropped in all; no good
    message may arrive meanwhile."""
    deadline = time.monotonic() + timeout
    while sum(channel.stats[k] for k in DROP_KEYS) < dropped:
        assert time.monotonic() < deadline, f"only {channel.stats} of {dropped} drops"
        channel.socket.poll(50, zmq.POLLIN)
        assert channel.poll() is None


@pytest.mark.timeout(60)
def test_fuzzed_frames_are_counted_drops_and_channel_keeps_working(
        key: bytes, spawn: Callable, caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(20240501)
    with Channel.bind(key, max_message_bytes=FUZZ_MAX_MESSAGE_BYTES) as parent:
        proc = spawn(parent.endpoint, key)
        assert isinstance(parent.recv(timeout=STARTUP_TIMEOUT_S), Hello)  # child seq 1 used
        # A genuine child->parent frame with seq 1: replaying it must be refused.
        valid = Codec(key, "child").encode(Probe(1, b"x" * 40, ["t"], {"s": 1.0}), seq=1)
        injector = zmq.Context.instance().socket(zmq.DEALER)
        injector.setsockopt(zmq.LINGER, 0)
        injector.setsockopt(zmq.SNDTIMEO, int(REPLY_TIMEOUT_S * 1000))
        injector.connect(parent.endpoint)
        sent = dict.fromkeys(["random", "truncated", "flipped", "oversized", "replayed",
                              "multipart"], 0)
        frames = fuzz_frames(rng, valid, FUZZ_MAX_FRAME_BYTES)
        try:
            with caplog.at_level(logging.WARNING, logger="ipc.channel"):
                for batch_start in range(0, FUZZ_FRAMES, 500):
                    for _ in range(500):
                        kind, parts = next(frames)
                        sent[kind] += 1
                        injector.send_multipart(parts)
                    drain_until(parent, batch_start + 500, timeout=REPLY_TIMEOUT_S)
            stats = parent.stats
            assert sum(stats[k] for k in DROP_KEYS) == FUZZ_FRAMES
            assert stats["oversized"] == sent["oversized"]
            assert stats["replayed"] == sent["replayed"]
            assert stats["unauthenticated"] + stats["malformed"] == (
                sent["random"] + sent["truncated"] + sent["flipped"] + sent["multipart"])
            assert stats["received"] == 1
            # Rate-limited: at most one warning per reason within the 5 s interval.
            warnings = [r for r in caplog.records if r.name == "ipc.channel"]
            assert 0 < len(warnings) <= len(DROP_KEYS)
            # A frame beyond libzmq's hard cap (2x the limit) cuts only the injector's link.
            injector.send(b"\0" * (3 * FUZZ_MAX_FRAME_BYTES))
            # The real child is still the peer and still answers.
            parent.send(Heartbeat(progress=42))
            assert parent.recv(timeout=REPLY_TIMEOUT_S) == Heartbeat(progress=42)
            assert parent.stats["oversized"] == sent["oversized"]
        finally:
            injector.close()
        shut_down(parent, proc)


@pytest.mark.timeout(30)
def test_child_side_drops_fuzz_from_a_raw_parent(key: bytes) -> None:
    rng = random.Random(7)
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    forge = Codec(key, "parent")
    try:
        with Channel.connect(f"tcp://127.0.0.1:{port}", key,
                             max_message_bytes=FUZZ_MAX_MESSAGE_BYTES) as child:
            child.send(Hello(1, os.getpid(), "child"))
            assert router.poll(int(REPLY_TIMEOUT_S * 1000))
            routing_id, _ = router.recv_multipart()
            frames = fuzz_frames(rng, forge.encode(Heartbeat(1), seq=1), FUZZ_MAX_FRAME_BYTES)
            for _ in range(2000):
                kind, parts = next(frames)
                if kind != "replayed":  # seq 1 is still fresh on this side
                    router.send_multipart([routing_id, *parts])
            router.send_multipart([routing_id, forge.encode(Heartbeat(5), seq=2)])
            assert child.recv(timeout=REPLY_TIMEOUT_S) == Heartbeat(5)
            assert child.stats["received"] == 1 and child.last_seq == 2
            assert sum(child.stats[k] for k in DROP_KEYS) > 1500
    finally:
        router.close()


@pytest.mark.timeout(30)
def test_peer_with_wrong_key_is_rejected(key: bytes) -> None:
    with Channel.bind(key, "tcp") as parent:
        with Channel.connect(parent.endpoint, new_session_key()) as impostor:
            impostor.send(Hello(1, os.getpid(), "impostor"))
            with pytest.raises(IpcTimeoutError):
                parent.recv(timeout=1.0)
            assert parent.stats["unauthenticated"] == 1 and parent.last_seq == 0
            with pytest.raises(IpcError, match="no peer yet"):
                parent.send(Heartbeat(1))
        with Channel.connect(parent.endpoint, key) as child:
            child.send(Hello(1, os.getpid(), "child"))
            assert parent.recv(timeout=REPLY_TIMEOUT_S) == Hello(1, os.getpid(), "child")
            parent.send(Heartbeat(2))
            assert child.recv(timeout=REPLY_TIMEOUT_S) == Heartbeat(2)


@pytest.mark.timeout(30)
def test_authenticated_bad_requests_get_error_replies(key: bytes) -> None:
    forge = Codec(key, "child")
    with Channel.bind(key) as parent:
        raw = zmq.Context.instance().socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(parent.endpoint)
        try:
            def push(envelope: list) -> None:
                raw.send(forge.seal(msgpack.packb(envelope)))

            push([SCHEMA_VERSION, "no_such_type", 5, {}])
            push([SCHEMA_VERSION, "heartbeat", 6, {"progress": "1"}])
            push([SCHEMA_VERSION + 1, "heartbeat", 7, {"progress": 1}])
            push([SCHEMA_VERSION, "heartbeat", 8, {"progress": 1}])
            assert parent.recv(timeout=REPLY_TIMEOUT_S) == Heartbeat(1)
            assert parent.last_seq == 8
            push([SCHEMA_VERSION, "heartbeat", 8, {"progress": 1}])
            push([SCHEMA_VERSION, "heartbeat", 3, {"progress": "x"}])  # stale and bad
            drain_until(parent, 5, timeout=REPLY_TIMEOUT_S)
            stats = parent.stats
            assert [stats[k] for k in ("unknown_type", "invalid_fields", "wrong_version",
                                       "replayed")] == [1, 1, 1, 2]
            replies = []
            for _ in range(2):
                assert raw.poll(int(REPLY_TIMEOUT_S * 1000))
                replies.append(forge.decode(raw.recv()))
            assert [(r.message.request_seq, r.message.kind) for r in replies] == [
                (5, "unknown_type"), (6, "invalid_fields")]
            assert "unknown message type 'no_such_type'" in replies[0].message.message
            assert "'heartbeat.progress' expects int, got str" in replies[1].message.message
        finally:
            raw.close()


@pytest.mark.timeout(30)
def test_recv_timeout_is_honoured(key: bytes) -> None:
    with Channel.bind(key) as parent:
        assert parent.poll() is None
        for timeout in (0.0, 0.3):
            start = time.monotonic()
            with pytest.raises(IpcTimeoutError, match=f"no good message arrived within recv timeout={timeout} s"):
                parent.recv(timeout=timeout)
            assert timeout <= time.monotonic() - start < timeout + 0.2


@pytest.mark.timeout(30)
def test_fileno_signals_for_event_loops(key: bytes) -> None:
    with Channel.bind(key, "tcp") as parent, Channel.connect(parent.endpoint, key) as child:
        child.send(Heartbeat(3))
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        got = None
        while got is None and time.monotonic() < deadline:
            select.select([parent.fileno()], [], [], 0.5)
            got = parent.poll()
        assert got == Heartbeat(3)


@pytest.mark.timeout(30)
def test_explicit_ipc_path_second_bind_raises_and_close_cleans(key: bytes, tmp_path) -> None:
    path = str(tmp_path / "x.sock")
    with Channel.bind(key, f"ipc://{path}") as first:
        assert os.path.exists(path)
        with pytest.raises(IpcError, match="already exists: another channel is bound there"):
            Channel.bind(key, f"ipc://{path}")
        with Channel.connect(first.endpoint, key) as child:  # the first binder still serves
            child.send(Heartbeat(1))
            assert first.recv(timeout=REPLY_TIMEOUT_S) == Heartbeat(1)
    assert not os.path.exists(path) and tmp_path.exists()  # not our dir: kept


@pytest.mark.timeout(30)
def test_ipc_path_length_limit_and_fallback(key: bytes, tmp_path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(IpcError, match=f"over the {MAX_IPC_PATH_CHARS}-byte limit"):
        Channel.bind(key, "ipc://" + str(tmp_path / ("s" * 120)))
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    with Channel.bind(key) as parent:
        path = socket_path(parent)
        assert path.startswith(f"/tmp/{naming.name_prefix()}-ipc-{os.getpid()}-") and len(path) <= MAX_IPC_PATH_CHARS
    assert not os.path.exists(os.path.dirname(path))
    assert list(deep.iterdir()) == []  # the too-long private dir was removed again
    with pytest.raises(ValueError, match="endpoint must be"):
        Channel.bind(key, "udp://x")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.timeout(60)
def test_sweep_removes_only_dirs_of_dead_owners_that_nobody_listens_on(
        key: bytes, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with Channel.bind(key) as mine:  # a live owner (this process); its first bind swept already
        assert os.path.basename(os.path.dirname(socket_path(mine))).startswith(
            f"{naming.private_dir_prefix()}{os.getpid()}-")
        dead = _dead_pid()
        stale = tmp_path / f"{naming.private_dir_prefix()}{dead}-stale"
        stale.mkdir(mode=0o700)
        alien = tmp_path / f"other-ipc-{dead}-stale"  # as stale, but of another name prefix
        for left in (stale, alien):
            left.mkdir(mode=0o700, exist_ok=True)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as orphan:
                orphan.bind(str(left / "ch.sock"))  # closed without unlink: a killed owner's
        listened = tmp_path / f"{naming.private_dir_prefix()}{dead}-listened"
        listened.mkdir(mode=0o700)
        young = tmp_path / f"{naming.private_dir_prefix()}{dead}-young"  # created, not bound yet
        young.mkdir(mode=0o700)
        foreign = tmp_path / f"ipc-{dead}-other"
        foreign.mkdir(mode=0o700)
        with Channel.bind(key, f"ipc://{listened}/ch.sock"):  # someone listens there
            removed = sweep_stale_dirs()
            assert [r for r in removed if r.startswith(str(tmp_path))] == [str(stale)]
            assert not stale.exists()
            assert listened.exists() and young.exists() and foreign.exists() and alien.exists()
            assert os.path.exists(socket_path(mine))
    assert sorted(tmp_path.iterdir()) == sorted([listened, young, foreign, alien])  # mine closed


if __name__ == "__main__":
    sys.exit(_echo_child(sys.argv[1], sys.argv[2]))
