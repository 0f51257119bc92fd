"""ipc.schema + ipc.codec: round trips, strict field checks, authentication, limits, keys."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from typing import Any

import msgpack
import pytest

from ipc.codec import (
    MAC_BYTES,
    Codec,
    DecodeError,
    DropReason,
    key_from_fd,
    key_to_pipe,
    new_session_key,
)
from ipc.errors import AuthenticationError, ProtocolError
from ipc.schema import (
    SCHEMA_VERSION,
    ErrorReply,
    Goodbye,
    Heartbeat,
    Hello,
    Shutdown,
    message,
    message_tag,
)

pytestmark = pytest.mark.timeout(60)


@message("test_codec.point")
class Point:
    x: int
    label: str


@message("test_codec.every_kind")
class EveryKind:
    i: int
    f: float
    b: bool
    s: str
    raw: bytes
    maybe: int | None
    ints: list[int]
    by_name: dict[str, float]
    point: Point
    points: list[Point]
    nested: dict[str, list[bytes | None]]
    plain: dict[str, Any]


@message("test_codec.checked")
class Checked:
    n: int

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"n must be >= 0, got {self.n}")


def every_kind(**changes: Any) -> EveryKind:
    base = EveryKind(i=-(2**40), f=0.25, b=True, s="héllo", raw=b"\x00\xff", maybe=None,
                     ints=[1, 2, 3], by_name={"a": 1.5, "b": -2.0}, point=Point(7, "p"),
                     points=[Point(1, "a"), Point(2, "b")],
                     nested={"k": [b"x", None], "empty": []},
                     plain={"handle": [1, b"\x01", None, {"size": 2.5, "ok": False}]})
    return dataclasses.replace(base, **changes)


@pytest.fixture()
def key() -> bytes:
    return new_session_key()


@pytest.fixture()
def pair(key: bytes) -> tuple[Codec, Codec]:
    """(parent codec, child codec) sharing one session key."""
    return Codec(key, "parent"), Codec(key, "child")


def signed(codec: Codec, envelope: Any) -> bytes:
    """A correctly authenticated frame around an arbitrary envelope (bypasses encode's checks)."""
    return codec.seal(msgpack.packb(envelope, use_bin_type=True))


ALL_IPC_MESSAGES = [Hello(protocol_version=3, pid=1234, role="worker"), Heartbeat(progress=99),
                    ErrorReply(request_seq=5, kind="ValueError", message="bad"),
                    ErrorReply(request_seq=None, kind="x", message=""),
                    Shutdown(reason="engine stopping"), Goodbye(reason="done", exit_code=0)]


@pytest.mark.parametrize("msg", ALL_IPC_MESSAGES + [every_kind(), every_kind(maybe=5)],
                         ids=lambda m: type(m).__name__)
def test_round_trip_both_directions(pair: tuple[Codec, Codec], msg: object) -> None:
    parent, child = pair
    env = child.decode(parent.encode(msg, seq=7))
    assert (env.tag, env.seq, env.message) == (message_tag(msg), 7, msg)
    assert type(env.message) is type(msg)
    back = parent.decode(child.encode(msg, seq=2**64 - 1))
    assert back.message == msg and back.seq == 2**64 - 1


def test_nested_values_rebuilt_as_declared_types(pair: tuple[Codec, Codec]) -> None:
    parent, child = pair
    got = child.decode(parent.encode(every_kind(), seq=1)).message
    assert type(got.point) is Point and [type(p) for p in got.points] == [Point, Point]
    assert got.raw == b"\x00\xff" and type(got.raw) is bytes
    assert got.nested == {"k": [b"x", None], "empty": []}


def fields_of(msg: object) -> dict[str, Any]:
    return {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}


@pytest.mark.parametrize("tag, fields, needle", [
    ("heartbeat", {"progress": True}, "'heartbeat.progress' expects int, got bool"),
    ("heartbeat", {"progress": 1.0}, "'heartbeat.progress' expects int, got float"),
    ("heartbeat", {}, "missing fields ['progress']"),
    ("heartbeat", {"progress": 1, "extra": 2}, "unexpected fields ['extra']"),
    ("heartbeat", {"progress": 1, b"progress": 2}, "unexpected fields [b'progress']"),
    ("heartbeat", [1], "expects a map of Heartbeat fields, got list"),
    ("goodbye", {"reason": b"x", "exit_code": 0}, "'goodbye.reason' expects str, got bytes"),
    ("error", {"request_seq": "1", "kind": "k", "message": "m"},
     "'error.request_seq' expects int, got str"),
    ("test_codec.checked", {"n": -1}, "rejected its fields: n must be >= 0"),
])
def test_strict_field_checks(pair: tuple[Codec, Codec], tag: str, fields: Any,
                             needle: str) -> None:
    parent, child = pair
    with pytest.raises(DecodeError) as info:
        child.decode(signed(parent, [SCHEMA_VERSION, tag, 3, fields]))
    assert info.value.reason is DropReason.INVALID_FIELDS
    assert (info.value.seq, info.value.tag) == (3, tag)
    assert needle in str(info.value)


@pytest.mark.parametrize("path, value, needle", [
    ("f", 1, "'test_codec.every_kind.f' expects float, got int"),
    ("b", 1, "'test_codec.every_kind.b' expects bool, got int"),
    ("raw", "x", "'test_codec.every_kind.raw' expects bytes, got str"),
    ("ints", [1, False], "'test_codec.every_kind.ints[1]' expects int, got bool"),
    ("ints", {"0": 1}, "'test_codec.every_kind.ints' expects list[int], got dict"),
    ("by_name", {"a": "1"}, "'test_codec.every_kind.by_name['a']' expects float, got str"),
    ("point", {"x": 1}, "missing fields ['label']"),
    ("nested", {"k": [1]}, "'test_codec.every_kind.nested['k'][0]' expects bytes, got int"),
    ("plain", {"h": {b"k": 1}}, "'test_codec.every_kind.plain['h'] key' expects str, got bytes"),
    ("plain", {"h": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]},
     "nests deeper than 32 levels"),
])
def test_strict_nested_checks_name_the_path(pair: tuple[Codec, Codec], path: str, value: Any,
                                            needle: str) -> None:
    parent, child = pair
    frame = parent.encode(every_kind(), seq=1)  # a valid body to start from
    envelope = msgpack.unpackb(frame[MAC_BYTES:])
    envelope[3][path] = value
    with pytest.raises(DecodeError) as info:
        child.decode(signed(parent, envelope))
    assert info.value.reason is DropReason.INVALID_FIELDS
    assert needle in str(info.value)


def test_encode_checks_fields_too(pair: tuple[Codec, Codec]) -> None:
    parent, _ = pair
    with pytest.raises(ProtocolError, match="'heartbeat.progress' expects int, got bool"):
        parent.encode(Heartbeat(progress=True), seq=1)
    with pytest.raises(ProtocolError, match=r"test_codec.every_kind.points\[0\]' expects Point"):
        parent.encode(every_kind(points=[{"x": 1, "label": "a"}]), seq=1)
    with pytest.raises(ProtocolError, match=r"every_kind.ints' expects list\[int\], got tuple"):
        parent.encode(every_kind(ints=(1, 2)), seq=1)
    with pytest.raises(ProtocolError, match=r"plain\['h'\]' expects plain data"):
        parent.encode(every_kind(plain={"h": {1, 2}}), seq=1)
    with pytest.raises(ProtocolError, match="dict is not a registered message type"):
        parent.encode({"progress": 1}, seq=1)
    with pytest.raises(ValueError, match="seq must be an int"):
        parent.encode(Heartbeat(1), seq=0)


def test_unknown_tag_and_bad_envelopes(pair: tuple[Codec, Codec]) -> None:
    parent, child = pair
    with pytest.raises(DecodeError, match="unknown message type 'nope'") as info:
        child.decode(signed(parent, [SCHEMA_VERSION, "nope", 4, {}]))
    assert (info.value.reason, info.value.seq) == (DropReason.UNKNOWN_TYPE, 4)
    for envelope in ([SCHEMA_VERSION, "heartbeat", 1], {"v": 1}, [SCHEMA_VERSION, 7, 1, {}],
                     [SCHEMA_VERSION, "heartbeat", True, {"progress": 1}],
                     [SCHEMA_VERSION, "heartbeat", 0, {"progress": 1}], [True, "x", 1, {}]):
        with pytest.raises(DecodeError) as info:
            child.decode(signed(parent, envelope))
        assert info.value.reason is DropReason.MALFORMED and info.value.seq is None


def test_wrong_schema_version_names_both_versions(pair: tuple[Codec, Codec]) -> None:
    parent, child = pair
    theirs = SCHEMA_VERSION + 1
    with pytest.raises(DecodeError) as info:
        child.decode(signed(parent, [theirs, "heartbeat", 1, {"progress": 1}, "future"]))
    assert info.value.reason is DropReason.WRONG_VERSION
    assert f"peer speaks schema version {theirs}" in str(info.value)
    assert f"this side speaks version {SCHEMA_VERSION}" in str(info.value)


def test_not_msgpack_or_over_limits_is_malformed(pair: tuple[Codec, Codec]) -> None:
    parent, child = pair
    bodies = [b"\xc1",  # never-used msgpack byte
              b"\xdd\x7f\xff\xff\xff",  # array header claiming 2**31 items, no data
              msgpack.packb([1, "heartbeat", 1, {"progress": 1}]) + b"\x00",  # trailing data
              msgpack.packb([1, msgpack.ExtType(1, b"x"), 1, {}]),  # ext types refused
              msgpack.packb({1: 2})]  # non-str map key
    for body in bodies:
        with pytest.raises(DecodeError) as info:
            child.decode(parent.seal(body))
        assert info.value.reason is DropReason.MALFORMED, body


def test_authentication(pair: tuple[Codec, Codec], key: bytes) -> None:
    parent, child = pair
    frame = parent.encode(Heartbeat(1), seq=1)
    stranger = Codec(new_session_key(), "parent")
    with pytest.raises(AuthenticationError, match="HMAC-SHA256"):
        child.decode(stranger.encode(Heartbeat(1), seq=1))
    with pytest.raises(AuthenticationError):  # reflected back to its own side
        parent.decode(frame)
    for bit in (0, 8 * MAC_BYTES, 8 * len(frame) - 1):  # first MAC bit, first/last body bit
        flipped = bytearray(frame)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(AuthenticationError):
            child.decode(bytes(flipped))
    with pytest.raises(DecodeError, match="too short") as info:
        child.decode(frame[:MAC_BYTES])
    assert info.value.reason is DropReason.MALFORMED


def test_size_limit_checked_before_anything(key: bytes) -> None:
    parent = Codec(key, "parent", max_message_bytes=1024)
    child = Codec(key, "child", max_message_bytes=1024)
    with pytest.raises(DecodeError, match="exceeds the limit of 1056") as info:
        child.decode(b"\x00" * 1057)  # garbage: refused on size, not on MAC
    assert info.value.reason is DropReason.OVERSIZED
    fits = Goodbye(reason="x" * (1024 - 40), exit_code=0)
    assert child.decode(parent.encode(fits, seq=1)).message == fits
    with pytest.raises(ProtocolError, match="exceeds max_message_bytes=1024"):
        parent.encode(Goodbye(reason="x" * 1024, exit_code=0), seq=1)


def test_declaration_errors() -> None:
    for bad in (set[int], tuple[int, int], int | str, dict[int, str], list, object):
        with pytest.raises(TypeError, match="is not allowed in a message"):
            message("test_codec.bad")(type("Bad", (), {"__annotations__": {"v": bad}}))

    @dataclasses.dataclass
    class Mutable:
        v: int
    with pytest.raises(TypeError, match="must be a frozen dataclass"):
        message("test_codec.mutable")(Mutable)
    with pytest.raises(ValueError, match="'heartbeat' is already registered by ipc.schema"):
        message("heartbeat")(type("Other", (), {"__annotations__": {"v": int}}))
    with pytest.raises(ValueError, match="non-empty str"):
        message("")


def test_key_through_inherited_pipe(key: bytes) -> None:
    fd = key_to_pipe(key)
    try:
        code = ("import sys; from ipc.codec import key_from_fd; "
                "sys.stdout.write(key_from_fd(int(sys.argv[1])).hex())")
        out = subprocess.run([sys.executable, "-c", code, str(fd)], pass_fds=(fd,),
                             capture_output=True, text=True, timeout=30, check=True)
    finally:
        os.close(fd)
    assert bytes.fromhex(out.stdout) == key
    assert key.hex() not in " ".join([sys.executable, "-c", code, str(fd)])
    fd = key_to_pipe(key)
    assert key_from_fd(fd) == key
    with pytest.raises(OSError):
        os.fstat(fd)  # key_from_fd closed it
