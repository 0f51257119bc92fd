"""Message declarations: typed, frozen dataclasses registered under a string tag.

This module knows what a message *is* (its tag and typed fields) and how to turn it into
plain msgpack-able values and back, checking every field strictly. It knows nothing of
bytes on a wire (:mod:`ipc.codec`) or of sockets (:mod:`ipc.channel`).

Declare a message type (any package may, e.g. mp_eplb's Rebalance/Ready)::

    @message("heartbeat")
    class Heartbeat:
        progress: int

Allowed field types: ``int``, ``float``, ``bool``, ``str``, ``bytes``, ``X | None``,
``list[X]``, ``dict[str, X]`` and other registered message classes (declared earlier),
nested freely. ``Any`` means plain data: None, scalars, lists and str-keyed dicts of
plain data, at most 32 levels deep; its owner checks the layout (e.g. a tensor handle dict
is checked by :mod:`ipc.handles` before it is opened). Checks are exact: ``bool`` is not ``int``, ``int`` is not ``float``,
subclasses (IntEnum, numpy scalars) are refused. Every field is required on the wire,
defaults included; a missing or extra field is an error.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from ipc.errors import ProtocolError

__all__ = [
    "SCHEMA_VERSION",
    "message",
    "is_message",
    "message_tag",
    "message_type",
    "to_fields",
    "from_fields",
    "Hello",
    "Heartbeat",
    "ErrorReply",
    "Shutdown",
    "Goodbye",
]

SCHEMA_VERSION = 1
"""Version of the envelope layout and of ipc's own message types; both sides must match."""

T = TypeVar("T")

_SCALARS: tuple[type, ...] = (int, float, bool, str, bytes)
_MAX_PLAIN_DEPTH = 32


class _BadField(Exception):
    """Internal: a value does not fit its declared type. Path segments are collected,
    innermost first, while the error travels up, so that the happy path formats nothing."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.segments: list[str] = []

    def at(self, segment: str) -> _BadField:
        self.segments.append(segment)
        return self

    def protocol_error(self, tag: str) -> ProtocolError:
        return ProtocolError(f"field '{tag}{''.join(reversed(self.segments))}' {self.problem}")


def _type_name(value: object) -> str:
    cls = type(value)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _mismatch(expected: str, value: object) -> _BadField:
    return _BadField(f"expects {expected}, got {_type_name(value)} ({value!r:.60})")


Convert = Callable[[Any], Any]


class _Field:
    """Converter of one declared type: ``to_wire`` checks a Python value and returns its
    msgpack-able form; ``from_wire`` checks a decoded value and rebuilds the Python one;
    both raise _BadField. ``kind`` is set for scalars, which are checked inline."""

    __slots__ = ("name", "kind", "to_wire", "from_wire")

    def __init__(self, name: str, to_wire: Convert, from_wire: Convert,
                 kind: type | None = None) -> None:
        self.name = name
        self.kind = kind
        self.to_wire = to_wire
        self.from_wire = from_wire


def _scalar(kind: type) -> _Field:
    def check(value: Any) -> Any:
        if type(value) is not kind:
            raise _mismatch(kind.__name__, value)
        return value
    return _Field(kind.__name__, check, check, kind)


def _optional(inner: _Field) -> _Field:
    def to_wire(value: Any) -> Any:
        return None if value is None else inner.to_wire(value)

    def from_wire(value: Any) -> Any:
        return None if value is None else inner.from_wire(value)
    return _Field(f"{inner.name} | None", to_wire, from_wire)


def _list(item: _Field) -> _Field:
    name = f"list[{item.name}]"

    def convert(value: Any, one: Convert) -> list[Any]:
        if type(value) is not list:
            raise _mismatch(name, value)
        out = []
        for i, v in enumerate(value):
            try:
                out.append(one(v))
            except _BadField as err:
                raise err.at(f"[{i}]")
        return out
    return _Field(name, lambda v: convert(v, item.to_wire), lambda v: convert(v, item.from_wire))


def _dict_items(value: dict[Any, Any], one: Convert) -> dict[str, Any]:
    out = {}
    for k, v in value.items():
        if type(k) is not str:
            raise _mismatch("str", k).at(" key")
        try:
            out[k] = one(v)
        except _BadField as err:
            raise err.at(f"[{k!r}]")
    return out


def _dict(item: _Field) -> _Field:
    name = f"dict[str, {item.name}]"

    def convert(value: Any, one: Convert) -> dict[str, Any]:
        if type(value) is not dict:
            raise _mismatch(name, value)
        return _dict_items(value, one)
    return _Field(name, lambda v: convert(v, item.to_wire), lambda v: convert(v, item.from_wire))


def _nested(spec: _Spec) -> _Field:
    def to_wire(value: Any) -> Any:
        if type(value) is not spec.cls:
            raise _mismatch(spec.cls.__name__, value)
        return spec.encode(value)
    return _Field(spec.cls.__name__, to_wire, spec.decode)


def _check_plain(value: Any, depth: int = 0) -> Any:
    if type(value) in _SCALARS or value is None:
        return value
    if depth >= _MAX_PLAIN_DEPTH:
        raise _BadField(f"nests deeper than {_MAX_PLAIN_DEPTH} levels")
    if type(value) is list:
        for i, v in enumerate(value):
            try:
                _check_plain(v, depth + 1)
            except _BadField as err:
                raise err.at(f"[{i}]")
        return value
    if type(value) is dict:
        return _dict_items(value, lambda v: _check_plain(v, depth + 1))
    raise _mismatch("plain data (None, bool, int, float, str, bytes, list, dict[str, ...])", value)


_PLAIN = _Field("Any", _check_plain, _check_plain)


def _field_for(annotation: Any, where: str) -> _Field:
    """Compile a converter for ``annotation``; TypeError names what is not allowed."""
    if annotation is Any:
        return _PLAIN
    if annotation in _SCALARS:
        return _scalar(annotation)
    if isinstance(annotation, type) and annotation in _SPECS_BY_CLASS:
        return _nested(_SPECS_BY_CLASS[annotation])
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        others = [a for a in args if a is not type(None)]
        if len(args) == 2 and len(others) == 1:
            return _optional(_field_for(others[0], where))
    elif origin is list and len(args) == 1:
        return _list(_field_for(args[0], where))
    elif origin is dict and len(args) == 2 and args[0] is str:
        return _dict(_field_for(args[1], where))
    raise TypeError(
        f"{where}: type {annotation!r} is not allowed in a message; use int, float, bool, "
        "str, bytes, X | None, list[X], dict[str, X], Any (plain data) or a message class "
        "registered earlier")


class _Spec:
    """A registered message class: its tag and one converter per field, in order."""

    __slots__ = ("tag", "cls", "fields", "names")

    def __init__(self, tag: str, cls: type, fields: tuple[tuple[str, _Field], ...]) -> None:
        self.tag = tag
        self.cls = cls
        self.fields = fields
        self.names = frozenset(name for name, _ in fields)

    def _convert(self, values: Iterable[Any], to_wire: bool) -> dict[str, Any]:
        out = {}
        for (name, f), v in zip(self.fields, values):
            if f.kind is not None:
                if type(v) is not f.kind:
                    raise _mismatch(f.kind.__name__, v).at(f".{name}")
            else:
                try:
                    v = f.to_wire(v) if to_wire else f.from_wire(v)
                except _BadField as err:
                    raise err.at(f".{name}")
            out[name] = v
        return out

    def encode(self, msg: Any) -> dict[str, Any]:
        return self._convert([getattr(msg, name) for name, _ in self.fields], True)

    def decode(self, value: Any) -> Any:
        if type(value) is not dict:
            raise _mismatch(f"a map of {self.cls.__name__} fields", value)
        if len(value) != len(self.fields) or not self.names.issuperset(value):
            missing = sorted(self.names.difference(value))
            extra = sorted(repr(k) for k in value if k not in self.names)
            raise _BadField(f"({self.cls.__name__}) has missing fields {missing} and "
                            f"unexpected fields [{', '.join(extra)}]")
        kwargs = self._convert([value[name] for name, _ in self.fields], False)
        try:
            return self.cls(**kwargs)
        except (TypeError, ValueError) as err:  # the class's own __post_init__ checks
            raise _BadField(f"({self.cls.__name__}) rejected its fields: {err}") from None


_SPECS_BY_TAG: dict[str, _Spec] = {}
_SPECS_BY_CLASS: dict[type, _Spec] = {}


def message(tag: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make ``cls`` a frozen dataclass and register it under ``tag``.

    A class already decorated with ``@dataclass`` must be ``frozen=True``. Field types are
    checked now (TypeError names a forbidden type); a tag already held by another class is
    a ValueError. Re-declaring the same module-qualified class (module reload) replaces it.
    """
    if not isinstance(tag, str) or not tag or len(tag) > 64:
        raise ValueError(f"message tag must be a non-empty str of at most 64 chars, got {tag!r}")

    def register(cls: type[T]) -> type[T]:
        if not dataclasses.is_dataclass(cls):
            cls = dataclasses.dataclass(frozen=True)(cls)
        elif not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            raise TypeError(f"message class {cls.__qualname__} must be a frozen dataclass: "
                            "use @dataclass(frozen=True) or drop @dataclass")
        old = _SPECS_BY_TAG.get(tag)
        if old is not None and (old.cls.__module__, old.cls.__qualname__) != (
                cls.__module__, cls.__qualname__):
            raise ValueError(f"message tag {tag!r} is already registered by "
                             f"{old.cls.__module__}.{old.cls.__qualname__}; choose another tag")
        hints = typing.get_type_hints(cls)
        fields = tuple((f.name, _field_for(hints[f.name], f"{cls.__qualname__}.{f.name}"))
                       for f in dataclasses.fields(cls))
        spec = _Spec(tag, cls, fields)
        if old is not None:
            _SPECS_BY_CLASS.pop(old.cls, None)
        _SPECS_BY_TAG[tag] = spec
        _SPECS_BY_CLASS[cls] = spec
        return cls
    return register


def is_message(obj: object) -> bool:
    """Whether ``obj`` is an instance of a registered message class."""
    return type(obj) in _SPECS_BY_CLASS


def message_tag(cls_or_msg: type | object) -> str:
    """The tag of a registered message class or instance; ProtocolError if unregistered."""
    cls = cls_or_msg if isinstance(cls_or_msg, type) else type(cls_or_msg)
    spec = _SPECS_BY_CLASS.get(cls)
    if spec is None:
        raise ProtocolError(f"{cls.__qualname__} is not a registered message type; "
                            "declare it with @ipc.schema.message(tag)")
    return spec.tag


def message_type(tag: str) -> type:
    """The class registered under ``tag``; ProtocolError for an unknown tag."""
    spec = _SPECS_BY_TAG.get(tag)
    if spec is None:
        raise ProtocolError(f"unknown message type {tag!r}: the peer sent a type this side "
                            "never declared (import the module that declares it, or align "
                            "versions)")
    return spec.cls


def to_fields(msg: object) -> tuple[str, dict[str, Any]]:
    """``(tag, fields)`` of a message, fields as plain msgpack-able values (nested messages
    become maps). ProtocolError if ``msg`` is unregistered or a field has the wrong type."""
    spec = _SPECS_BY_TAG[message_tag(msg)]
    try:
        return spec.tag, spec.encode(msg)
    except _BadField as err:
        raise err.protocol_error(spec.tag) from None


def from_fields(tag: str, fields: Any) -> Any:
    """Build the message registered under ``tag`` from decoded ``fields``, checking every
    field's type exactly. ProtocolError for an unknown tag, a missing, extra or ill-typed
    field; the message names the field path, the expected and the received type."""
    message_type(tag)
    try:
        return _SPECS_BY_TAG[tag].decode(fields)
    except _BadField as err:
        raise err.protocol_error(tag) from None


# --- ipc's own generic message types ---------------------------------------------------


@message("hello")
class Hello:
    """Handshake, first message each side sends. ``protocol_version`` is the application
    protocol's version (the envelope's :data:`SCHEMA_VERSION` is checked by the codec);
    ``role`` says what the sender is (e.g. "engine", "worker")."""

    protocol_version: int
    pid: int
    role: str


@message("heartbeat")
class Heartbeat:
    """Application progress counter: increases only when the sender's loop does real work,
    unlike a transport-level ping, which libzmq's I/O thread would answer on its own."""

    progress: int


@message("error")
class ErrorReply:
    """The request with sequence number ``request_seq`` failed (None: not tied to one
    request). ``kind`` is a short category such as the exception class name."""

    request_seq: int | None
    kind: str
    message: str


@message("shutdown")
class Shutdown:
    """Ask the peer to finish and exit; it answers with :class:`Goodbye`."""

    reason: str


@message("goodbye")
class Goodbye:
    """In-band exit notice: the sender is about to exit with ``exit_code`` for ``reason``.
    The receiver still confirms the real exit through the OS process handle."""

    reason: str
    exit_code: int
