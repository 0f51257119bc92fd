"""Tensors that another process can open: unnamed shared memory (CPU) and CUDA IPC allocations
(GPU), exported as handles of plain data.

Segments. :func:`shared_empty` allocates a new one: a ``memfd`` (CPU; it never has a name in any
file system, so an owner killed by any signal leaves nothing behind) or a dedicated ``cuMemAlloc``
allocation (CUDA). :func:`share_storage` makes memory a tensor *already has* shareable without
changing any address a CUDA kernel or graph may hold: a CUDA tensor of any allocator block is
exported in place (the handle names its whole driver allocation plus the tensor's offset in it);
a CPU tensor's *storage* moves into unlinked shared memory in place (every tensor and view on that
storage follows, since they address it through the storage).

Ownership. The owner keeps a segment registered (exportable, openable) until :func:`release` or
interpreter exit; the registration keeps the memory alive. Releasing ends it at once (a CPU
segment's owner-side descriptor is closed, so further opens fail with HandleError); the memory
itself is returned when the last tensor using it is gone. Consumers that die leak nothing.

Consumers. :func:`open_tensor` validates every field of a handle before it touches memory, maps each
segment once per process and returns views of that one mapping; :func:`close` / :func:`close_all`
drop the mapping (unmapped once the views are gone). A CPU segment is opened through the owner's
descriptor (``/proc/<pid>/fd/<fd>``): it must be a regular file of this user whose identity (its
``readlink``, e.g. ``/memfd:ipc_... (deleted)``) matches the handle's ``path``, so a stale or
tampered descriptor number is refused. A handle never names code to run.

Segment names are ``<prefix>_<pid>_<n>_<8 hex>`` (:mod:`ipc.naming`; a handle of another prefix is
refused). Nothing stays named in
/dev/shm (:data:`SHM_DIR`; torch's in-place move unlinks its file inside the call): a leftover there
is a bug.
"""

from __future__ import annotations

import atexit
import errno
import itertools
import logging
import mmap
import os
import re
import secrets
import stat
import statistics
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ipc import _cuda, naming
from ipc.errors import HandleError, IpcError

__all__ = [
    "SHM_DIR",
    "HANDLE_VERSION",
    "TensorSpec",
    "HandleTiming",
    "shared_empty",
    "share_storage",
    "export_tensor",
    "open_tensor",
    "release",
    "close",
    "close_all",
    "live_segments",
    "live_bytes",
    "opened_segments",
    "check_fields",
    "time_export",
    "time_open",
]

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
HANDLE_VERSION = 2
_MAX_DIMS = 32
_MAX_INT = 2**62
_MAX_PATH = 4096
#: A segment name after its prefix (:func:`ipc.naming.segment_prefix`).
_NAME_TAIL_RE = re.compile(r"[0-9]{1,10}_[0-9]{1,12}_[0-9a-f]{8}\Z")
_UUID_RE = re.compile(r"[0-9a-f]{32}\Z")

# Only these dtypes travel; a handle's dtype string is looked up here, never with getattr.
_DTYPES: dict[str, torch.dtype] = {
    name: dtype
    for name in ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
                 "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool")
    if isinstance(dtype := getattr(torch, name, None), torch.dtype)
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}

_COMMON_FIELDS: dict[str, type] = {
    "version": int, "kind": str, "name": str, "pid": int, "device": int, "dtype": str,
    "shape": list, "strides": list, "offset": int, "nbytes": int,
}
_FIELDS: dict[str, dict[str, type]] = {
    "shm": {**_COMMON_FIELDS, "fd": int, "path": str},
    "cuda": {**_COMMON_FIELDS, "ipc_handle": bytes, "device_uuid": str},
}


@dataclass(frozen=True)
class TensorSpec:
    """What a consumer expects a handle to hold; a field left None is not checked."""

    shape: Sequence[int] | None = None
    dtype: torch.dtype | str | None = None
    device: torch.device | str | None = None


@dataclass
class _Segment:
    """One mapping of a segment in this process; ``base`` (uint8, ``nbytes`` long, covering the whole
    segment) keeps it alive. Owner side: ``fd`` is the descriptor consumers open (CPU; closed at
    release), ``keep`` the storage of an in-place CUDA export (kept alive while registered)."""

    name: str
    kind: str
    nbytes: int
    device: int
    base: torch.Tensor
    owner_pid: int
    ipc_handle: bytes = b""
    device_uuid: str = ""
    fd: int = -1
    path: str = ""
    keep: torch.UntypedStorage | None = None
    #: Registrations not yet released (one per ``shared_empty`` / ``share_storage`` call).
    refs: int = 1
    #: Registry keys of the storages shared into this segment besides its base (CUDA blocks
    #: inside the allocation), so finding them again needs no driver call.
    aliases: set[tuple[str, int, int]] = field(default_factory=set)

    @property
    def key(self) -> tuple[str, int, int]:
        return _key(self.base.device.type, self.device, self.base.data_ptr())


@dataclass(frozen=True)
class _Handle:
    """A handle whose fields passed every check that needs no memory."""

    kind: str
    name: str
    pid: int
    device: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int
    nbytes: int
    ipc_handle: bytes
    device_uuid: str
    fd: int
    path: str

    @property
    def cache_key(self) -> str:
        return self.name if self.kind == "shm" else self.ipc_handle.hex()


_lock = threading.RLock()
_counter = itertools.count()
_owned: dict[str, _Segment] = {}  # name -> segment this process allocated
_owned_keys: dict[tuple[str, int, int], str] = {}  # (device type, ordinal, address of a base or alias) -> name
_owned_ipc: dict[bytes, str] = {}  # CUDA IPC handle -> name
_opened: dict[str, _Segment] = {}  # cache key -> segment opened from another process


class _DeviceMemory:
    """Raw device bytes exposed through ``__cuda_array_interface__`` so torch can wrap them.

    torch keeps this object alive as long as any tensor uses the memory; ``on_free`` (free or close the
    mapping) runs once when it is collected, unless ``finalizer`` was detached.
    """

    def __init__(self, ptr: int, nbytes: int, on_free: Callable[[], None]) -> None:
        self.ptr = ptr
        self.nbytes = nbytes
        self.finalizer = weakref.finalize(self, _run_quietly, on_free)
        self.finalizer.atexit = False

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": (self.nbytes,), "typestr": "|u1", "data": (self.ptr, False),
                "strides": None, "version": 2}


def _run_quietly(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - a finalizer must not raise; the failure is logged
        logger.exception("failed to free or close CUDA IPC memory")


def _wrap_device_memory(ordinal: int, ptr: int, nbytes: int, on_free: Callable[[], None]) -> torch.Tensor:
    """A uint8 tensor of ``nbytes`` over device memory at ``ptr`` (no copy: checked) that runs ``on_free``
    when its storage dies. On failure ``on_free`` never runs: the caller still owns the memory."""
    device = torch.device("cuda", ordinal)
    memory = _DeviceMemory(ptr, nbytes, on_free)
    try:
        base = torch.as_tensor(memory, device=device)
        if base.data_ptr() != ptr or base.device != device or base.numel() != nbytes:
            raise IpcError(f"torch did not wrap CUDA memory {ptr:#x} on {device} in place "
                           f"(got {base.device}, {base.data_ptr():#x}); this torch build is unsupported")
    except BaseException:
        memory.finalizer.detach()
        raise
    return base


def _normalize_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise ValueError(f"shape must be non-negative ints, got {shape!r}")
    return dims


def _key(device_type: str, ordinal: int, address: int) -> tuple[str, int, int]:
    """Registry key of a segment: its device and the address of its first byte."""
    return device_type, ordinal, address


def _new_name() -> str:
    return f"{naming.segment_prefix()}{os.getpid()}_{next(_counter)}_{secrets.token_hex(4)}"


def _register(segment: _Segment) -> None:
    with _lock:
        _owned[segment.name] = segment
        _owned_keys[segment.key] = segment.name
        if segment.ipc_handle:
            _owned_ipc[segment.ipc_handle] = segment.name
    logger.debug("registered shared segment %s (%s, %d bytes)", segment.name, segment.kind,
                 segment.nbytes)


def shared_empty(shape: int | Sequence[int], dtype: torch.dtype,
                 device: torch.device | str | int = "cpu") -> torch.Tensor:
    """A new contiguous, uninitialised tensor that other processes can open through :func:`export_tensor`.

    CPU: an unnamed ``memfd`` (pages reserved up front, so a memory limit fails here, not later with
    SIGBUS). CUDA: a dedicated cuMemAlloc allocation in torch's primary context of the device, so its
    IPC handle covers exactly this tensor. This process owns the memory until :func:`release`.
    """
    dims = _normalize_shape(shape)
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype {dtype} cannot be shared; use one of {sorted(_DTYPES)}")
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for d in dims:
        numel *= d
    # An empty tensor still gets one element of memory: zero-byte segments cannot be mapped.
    nbytes = max(numel, 1) * itemsize
    name = _new_name()
    if dev.type == "cpu":
        segment = _create_shm(name, nbytes)
    elif dev.type == "cuda":
        segment = _create_cuda(name, nbytes, torch.cuda.current_device() if dev.index is None else dev.index)
    else:
        raise ValueError(f"device {dev} cannot be shared; use 'cpu' or 'cuda[:N]'")
    _register(segment)
    return _view(segment, dtype, dims, _contiguous_strides(dims), 0)


def _contiguous_strides(dims: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    step = 1
    for d in reversed(dims):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


def _fd_path(fd: int) -> str:
    """The identity of an open file: what ``/proc/self/fd/<fd>`` links to."""
    return os.readlink(f"/proc/self/fd/{fd}")


def _create_shm(name: str, nbytes: int) -> _Segment:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.ENOMEM):
                raise
            raise IpcError(f"cannot reserve {nbytes} bytes of shared memory ({exc.strerror}): raise "
                           f"this process's memory limit or share less") from exc
        mapping = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        path = _fd_path(fd)
    except BaseException:
        os.close(fd)
        raise
    base = torch.frombuffer(mapping, dtype=torch.uint8)  # holds a reference to the mapping
    return _Segment(name, "shm", nbytes, -1, base, os.getpid(), fd=fd, path=path)


def _create_cuda(name: str, nbytes: int, ordinal: int) -> _Segment:
    torch.cuda.init()
    ptr = _cuda.mem_alloc(ordinal, nbytes)
    try:
        ipc_handle = _cuda.ipc_get_mem_handle(ordinal, ptr)
        uuid = _cuda.device_uuid(ordinal)
        base = _wrap_device_memory(ordinal, ptr, nbytes, lambda: _cuda.mem_free(ordinal, ptr))
    except BaseException:
        _cuda.mem_free(ordinal, ptr)
        raise
    return _Segment(name, "cuda", nbytes, ordinal, base, os.getpid(), ipc_handle, uuid)


def _storage_of(t: torch.Tensor) -> torch.UntypedStorage:
    if not isinstance(t, torch.Tensor):
        raise HandleError(f"expected a torch.Tensor, got {type(t).__name__}")
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError) as exc:
        raise HandleError(f"tensor has no plain storage ({exc}); allocate it with ipc.shared_empty") from exc


def _registered(t: torch.Tensor, storage: torch.UntypedStorage) -> _Segment | None:
    """The owned segment holding ``storage`` (a CUDA storage inside a registered allocation counts)."""
    ordinal = t.device.index if t.device.type == "cuda" else -1
    ptr = storage.data_ptr()
    with _lock:
        name = _owned_keys.get(_key(t.device.type, ordinal, ptr))
    if name is None and t.device.type == "cuda" and ptr:
        try:
            base, _ = _cuda.address_range(ordinal, ptr)
        except IpcError:
            return None
        with _lock:
            name = _owned_keys.get(_key("cuda", ordinal, base))
    with _lock:
        return _owned.get(name) if name is not None else None


_NOT_EXPORTABLE = (
    "cannot export the CUDA memory of this tensor in place ({why}): CUDA IPC shares only memory of "
    "cudaMalloc/cuMemAlloc, and PyTorch's expandable segments (cuMemCreate) are not; set "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False before the process allocates the weights, or "
    "allocate them with ipc.shared_empty")


def share_storage(t: torch.Tensor) -> bool:
    """Make the memory under ``t`` exportable by :func:`export_tensor` (for ``t`` and every view of
    it); returns True when this call registered its segment, False when it joined the segment
    already registered (nothing moves then). Either way the call holds one reference, which one
    :func:`release` gives back: two owners sharing one storage or allocation (two states, two
    weights of one Parameter) each release theirs, and the segment stays exportable until the last.

    CUDA: nothing moves. The driver allocation holding ``t`` (any block of torch's caching allocator)
    is registered as a segment; its IPC handle covers the whole allocation and a handle carries the
    tensor's offset in it. Tensors of one allocation share one segment (and one handle, which a
    consumer opens once): sharing a second one returns False. HandleError if the memory cannot be
    shared through CUDA IPC (expandable segments): the message says what to set. CPU: the storage's bytes move into unlinked shared
    memory *in place* (``UntypedStorage._share_fd_cpu_``): the storage object, every tensor and view
    on it and every Parameter keep their identity and see the shared bytes; only the storage's data
    address changes, which no CPU tensor caches. The registration keeps the storage alive until
    :func:`release`.
    """
    storage = _storage_of(t)
    segment = _registered(t, storage)
    if segment is not None:
        with _lock:
            segment.refs += 1
        _alias(segment, t, storage)
        return False
    if storage.nbytes() == 0 or not storage.data_ptr():
        raise HandleError("an empty tensor has no memory to share")
    if t.device.type == "cpu":
        segment = _share_cpu_storage(storage)
    elif t.device.type == "cuda":
        segment = _share_cuda_allocation(storage, t.device.index)
    else:
        raise HandleError(f"device {t.device} cannot be shared; use 'cpu' or 'cuda[:N]'")
    _register(segment)
    _alias(segment, t, storage)
    return True


def _alias(segment: _Segment, t: torch.Tensor, storage: torch.UntypedStorage) -> None:
    """Find ``storage`` in ``segment`` by its own address from now on (export and release of a
    block inside a CUDA allocation then ask the driver nothing, e.g. on a reaper thread)."""
    key = _key(t.device.type, t.device.index if t.device.type == "cuda" else -1,
               storage.data_ptr())
    if key != segment.key:
        with _lock:
            _owned_keys[key] = segment.name
            segment.aliases.add(key)


def _share_cpu_storage(storage: torch.UntypedStorage) -> _Segment:
    nbytes = storage.nbytes()
    if not storage.is_shared():
        free = os.statvfs(SHM_DIR)
        if free.f_bavail * free.f_frsize < nbytes:
            # torch copies the bytes into a file of SHM_DIR (unlinked at once): a full one would SIGBUS.
            raise IpcError(f"cannot move {nbytes} bytes into shared memory: {SHM_DIR} has "
                           f"{free.f_bavail * free.f_frsize} free; enlarge {SHM_DIR} (e.g. docker "
                           f"--shm-size) or share less")
    torch_fd, size = storage._share_fd_cpu_()
    fd = os.dup(torch_fd)  # ours, closed at release; torch closes its own when the storage dies
    try:
        path = _fd_path(fd)
        base = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (size,), (1,))
    except BaseException:
        os.close(fd)
        raise
    return _Segment(_new_name(), "shm", size, -1, base, os.getpid(), fd=fd, path=path)


def _share_cuda_allocation(storage: torch.UntypedStorage, ordinal: int) -> _Segment:
    ptr = storage.data_ptr()
    try:
        if not _cuda.legacy_ipc_capable(ordinal, ptr):
            raise HandleError(_NOT_EXPORTABLE.format(why="the driver reports it not IPC-capable"))
        base_ptr, size = _cuda.address_range(ordinal, ptr)
        ipc_handle = _cuda.ipc_get_mem_handle(ordinal, base_ptr)
        _cuda.set_sync_memops(ordinal, base_ptr)
    except IpcError as exc:
        if isinstance(exc, HandleError):
            raise
        raise HandleError(_NOT_EXPORTABLE.format(why=str(exc))) from exc
    # The whole allocation as bytes, for views an owner opens of its own handle; never freed here:
    # the memory is the allocator's. Keeping ``storage`` alive keeps the allocator from returning the
    # allocation to the driver (and a later one at the same address from meeting a stale handle).
    base = _wrap_device_memory(ordinal, base_ptr, size, lambda: None)
    return _Segment(_new_name(), "cuda", size, ordinal, base, os.getpid(), ipc_handle,
                    _cuda.device_uuid(ordinal), keep=storage)


def _owned_segment_of(t: torch.Tensor) -> _Segment:
    segment = _registered(t, _storage_of(t))
    if segment is None:
        raise HandleError("tensor was not allocated by this process with ipc.shared_empty nor shared with "
                          "ipc.share_storage (or was released): allocate it with shared_empty(shape, dtype, "
                          "device) or call share_storage(tensor) to share it")
    return segment


def export_tensor(t: torch.Tensor) -> dict[str, Any]:
    """A handle to ``t`` (a tensor of :func:`shared_empty` or :func:`share_storage`, or any view of one)
    made of plain data only.

    Keys: version, kind ("shm"/"cuda"), name, pid (owner), device (-1 for CPU), dtype (str), shape,
    strides and offset (elements of dtype, from the segment's first byte), nbytes (segment size); shm
    adds fd and path (the owner's descriptor and its identity), CUDA adds ipc_handle (64 bytes) and
    device_uuid (32 hex digits). msgpack-packable; the memory stays the owner's.
    """
    segment = _owned_segment_of(t)
    dtype_name = _DTYPE_NAMES.get(t.dtype)
    if dtype_name is None:
        raise HandleError(f"dtype {t.dtype} cannot be shared; view the tensor as one of {sorted(_DTYPES)}")
    itemsize = t.element_size()
    start = t.untyped_storage().data_ptr() - segment.base.data_ptr() + t.storage_offset() * itemsize
    if start % itemsize:
        raise HandleError(f"tensor starts {start} bytes into segment {segment.name}, not a multiple of "
                          f"its element size {itemsize}: view it as uint8 or allocate it apart")
    handle: dict[str, Any] = {
        "version": HANDLE_VERSION, "kind": segment.kind, "name": segment.name, "pid": segment.owner_pid,
        "device": segment.device, "dtype": dtype_name, "shape": list(t.shape),
        "strides": list(t.stride()), "offset": start // itemsize, "nbytes": segment.nbytes,
    }
    if segment.kind == "shm":
        handle["fd"] = segment.fd
        handle["path"] = segment.path
    else:
        handle["ipc_handle"] = segment.ipc_handle
        handle["device_uuid"] = segment.device_uuid
    return handle


def check_fields(handle: object, fields: Mapping[str, type], what: str) -> Mapping[str, Any]:
    """Check that ``handle`` is a dict with exactly ``fields`` of exactly those types (ints: not bool,
    within [0, 2**62) unless named "device"); raise HandleError naming the first offending field."""
    if not isinstance(handle, Mapping):
        raise HandleError(f"{what} must be a dict, got {type(handle).__name__}")
    missing = sorted(set(fields) - set(handle))
    extra = sorted(str(k) for k in set(handle) - set(fields))
    if missing or extra:
        raise HandleError(f"{what} has missing fields {missing} / unexpected fields {extra}; "
                          f"expected exactly {sorted(fields)}")
    for key, typ in fields.items():
        value = handle[key]
        if type(value) is not typ:
            raise HandleError(f"{what} field {key!r} must be {typ.__name__}, got {type(value).__name__}")
        if typ is int:
            low = -1 if key == "device" else 0
            if not low <= value < _MAX_INT:
                raise HandleError(f"{what} field {key!r} is {value}, outside [{low}, {_MAX_INT})")
    return handle


def _int_list(value: list, key: str) -> tuple[int, ...]:
    if len(value) > _MAX_DIMS:
        raise HandleError(f"tensor handle field {key!r} has {len(value)} dims, more than {_MAX_DIMS}")
    for v in value:
        if type(v) is not int or not 0 <= v < _MAX_INT:
            raise HandleError(f"tensor handle field {key!r} must hold ints in [0, {_MAX_INT}), got {v!r}")
    return tuple(value)


def _parse(handle: object) -> _Handle:
    """Validate everything that can be checked without opening memory."""
    if not isinstance(handle, Mapping):
        raise HandleError(f"tensor handle must be a dict, got {type(handle).__name__}")
    kind = handle.get("kind")
    if kind not in _FIELDS:
        raise HandleError(f"tensor handle kind {kind!r} is unknown; expected one of {sorted(_FIELDS)}")
    h = check_fields(handle, _FIELDS[kind], f"{kind} tensor handle")
    if h["version"] != HANDLE_VERSION:
        raise HandleError(f"tensor handle version {h['version']} is unsupported; this side speaks "
                          f"version {HANDLE_VERSION}: run the same ipc on both sides")
    prefix = naming.segment_prefix()
    if not (h["name"].startswith(prefix) and _NAME_TAIL_RE.match(h["name"][len(prefix):])):
        raise HandleError(f"tensor handle name {h['name']!r} is not a segment name of ours "
                          f"({prefix}<pid>_<n>_<8 hex>): both sides must call "
                          "ipc.naming.set_name_prefix with the same prefix")
    dtype = _DTYPES.get(h["dtype"])
    if dtype is None:
        raise HandleError(f"tensor handle dtype {h['dtype']!r} is unknown; expected one of {sorted(_DTYPES)}")
    shape = _int_list(h["shape"], "shape")
    strides = _int_list(h["strides"], "strides")
    if len(shape) != len(strides):
        raise HandleError(f"tensor handle shape {list(shape)} and strides {list(strides)} differ in length")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if 0 in shape:
        end = h["offset"]
    else:
        end = h["offset"] + 1 + sum((n - 1) * s for n, s in zip(shape, strides))
    if end * itemsize > h["nbytes"]:
        raise HandleError(f"tensor handle shape {list(shape)}, strides {list(strides)}, offset {h['offset']} "
                          f"({h['dtype']}) reach byte {end * itemsize}, past the segment's {h['nbytes']} bytes")
    if kind == "shm" and h["device"] != -1:
        raise HandleError(f"shm tensor handle device must be -1 (CPU), got {h['device']}")
    if kind == "shm" and not 0 < len(h["path"]) <= _MAX_PATH:
        raise HandleError(f"shm tensor handle path has {len(h['path'])} characters, expected 1 to {_MAX_PATH}")
    ipc_handle = h.get("ipc_handle", b"")
    uuid = h.get("device_uuid", "")
    if kind == "cuda":
        if h["device"] < 0:
            raise HandleError(f"cuda tensor handle device must be >= 0, got {h['device']}")
        if len(ipc_handle) != _cuda.IPC_HANDLE_BYTES:
            raise HandleError(f"cuda tensor handle ipc_handle has {len(ipc_handle)} bytes, "
                              f"expected {_cuda.IPC_HANDLE_BYTES}")
        if not _UUID_RE.match(uuid):
            raise HandleError(f"cuda tensor handle device_uuid {uuid!r} is not 32 lowercase hex digits")
    return _Handle(kind, h["name"], h["pid"], h["device"], dtype, shape, strides, h["offset"],
                   h["nbytes"], ipc_handle, uuid, h.get("fd", -1), h.get("path", ""))


def _view(segment: _Segment, dtype: torch.dtype, shape: tuple[int, ...], strides: tuple[int, ...],
          offset: int) -> torch.Tensor:
    itemsize = torch.empty((), dtype=dtype).element_size()
    usable = segment.nbytes - segment.nbytes % itemsize
    return segment.base[:usable].view(dtype).as_strided(shape, strides, offset)


def _open_shm(h: _Handle) -> _Segment:
    owner_fd = f"/proc/{h.pid}/fd/{h.fd}"
    try:
        fd = os.open(owner_fd, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise HandleError(f"shared-memory segment {h.name} does not exist: its owner (pid {h.pid}) "
                          f"released it or exited") from None
    except PermissionError as exc:
        raise HandleError(f"cannot open shared-memory segment {h.name} through {owner_fd}: {exc}; the "
                          f"opener must run as the owner's user and the owner must stay dumpable "
                          f"(no prctl PR_SET_DUMPABLE 0)") from exc
    except OSError as exc:
        raise HandleError(f"cannot open shared-memory segment {h.name}: {exc}") from exc
    try:
        # The identity check runs on our own descriptor: no race with the owner closing and reusing its fd.
        found = _fd_path(fd)
        if found != h.path:
            raise HandleError(f"descriptor {h.fd} of pid {h.pid} is {found!r}, not segment {h.name} "
                              f"({h.path!r}): the handle is stale or tampered with")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise HandleError(f"{owner_fd} is not a shared-memory file of this user")
        if st.st_size < h.nbytes or st.st_size == 0:
            raise HandleError(f"tensor handle claims {h.nbytes} bytes but segment {h.name} has "
                              f"{st.st_size}: the handle is stale or tampered with")
        mapping = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return _Segment(h.name, "shm", st.st_size, -1, torch.frombuffer(mapping, dtype=torch.uint8), h.pid,
                    path=h.path)


def _local_ordinal(h: _Handle) -> int:
    if not torch.cuda.is_available():
        raise HandleError(f"cuda tensor handle {h.name} cannot be opened: this process has no CUDA device")
    ordinal = _cuda.ordinal_of_uuid(h.device_uuid)
    if ordinal is None:
        raise HandleError(f"cuda tensor handle {h.name} names GPU {h.device_uuid} (cuda:{h.device} of its "
                          f"owner), which this process cannot see: check CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}")
    return ordinal


def _open_cuda(h: _Handle, ordinal: int) -> _Segment:
    torch.cuda.init()
    try:
        ptr = _cuda.ipc_open_mem_handle(ordinal, h.ipc_handle)
    except IpcError as exc:
        raise HandleError(f"cannot open CUDA IPC handle of segment {h.name} (owner pid {h.pid}): {exc}; "
                          f"the owner released it or exited, or the handle is tampered with") from exc
    try:
        base_ptr, size = _cuda.address_range(ordinal, ptr)
        if base_ptr != ptr or size < h.nbytes:
            raise HandleError(f"tensor handle claims {h.nbytes} bytes but the CUDA allocation of segment "
                              f"{h.name} has {size}: the handle is stale or tampered with")
        base = _wrap_device_memory(ordinal, ptr, size, lambda: _cuda.ipc_close_mem_handle(ordinal, ptr))
    except BaseException:
        _cuda.ipc_close_mem_handle(ordinal, ptr)
        raise
    return _Segment(h.name, "cuda", size, ordinal, base, h.pid, h.ipc_handle, h.device_uuid)


def _check_expect(t: torch.Tensor, expect: TensorSpec | Mapping[str, Any], name: str) -> None:
    if isinstance(expect, TensorSpec):
        spec = expect
    elif isinstance(expect, Mapping) and set(expect) <= {"shape", "dtype", "device"}:
        spec = TensorSpec(**expect)
    else:
        raise HandleError(f"expect must be a TensorSpec or a dict of shape/dtype/device, got {expect!r}")
    if spec.shape is not None and tuple(t.shape) != tuple(spec.shape):
        raise HandleError(f"segment {name} holds shape {list(t.shape)}, expected {list(spec.shape)}")
    if spec.dtype is not None:
        want = spec.dtype if isinstance(spec.dtype, torch.dtype) else _DTYPES.get(spec.dtype)
        if t.dtype != want:
            raise HandleError(f"segment {name} holds dtype {t.dtype}, expected {spec.dtype}")
    if spec.device is not None:
        want_dev = torch.device(spec.device)
        if want_dev.type == "cuda" and want_dev.index is None:
            want_dev = torch.device("cuda", torch.cuda.current_device())
        if t.device != want_dev:
            raise HandleError(f"segment {name} lives on {t.device}, expected {want_dev}")


def open_tensor(handle: Mapping[str, Any], expect: TensorSpec | Mapping[str, Any] | None = None, *,
                map_on: int | None = None) -> torch.Tensor:
    """Open a handle of :func:`export_tensor` (from any process of this user) as a tensor view.

    Every field is checked first (types, dtype, shape/strides/offset within the segment's real size,
    device visible here, and ``expect`` when given); any failure raises HandleError saying what is wrong.
    A CUDA tensor is opened on the GPU it lives on (found by UUID), so a process working on another GPU
    gets a peer tensor to copy from. The first open of a segment maps it; later opens reuse the mapping.
    Opening a handle of this process's own segment returns a view of it.

    ``map_on``: map a CUDA segment into the context of GPU ``map_on`` instead (peer access is
    enabled for it): the tensor then reports ``cuda:map_on`` although its memory stays on the
    owner's GPU, so copies issued on ``map_on``'s streams read it directly over the peer link
    (a copy-engine DMA). Measured on the H200 pair: a copy from a tensor opened on its own GPU
    into IPC memory of the other GPU ran on the source GPU's stream at ~25 GB/s; mapped on
    the reading GPU it runs at the link's rate.
    """
    h = _parse(handle)
    if h.kind != "cuda":
        ordinal = -1
    elif map_on is not None:
        _local_ordinal(h)  # the memory's GPU must be visible here too
        if not isinstance(map_on, int) or not 0 <= map_on < torch.cuda.device_count():
            raise HandleError(f"map_on={map_on!r} is not a CUDA device index of this process")
        ordinal = map_on
    else:
        ordinal = _local_ordinal(h)
    key = h.cache_key if map_on is None else f"{h.cache_key}@{ordinal}"
    with _lock:
        owned_name = _owned_ipc.get(h.ipc_handle) if h.kind == "cuda" else h.name
        segment = _owned.get(owned_name) if owned_name is not None else None
        if segment is None:
            segment = _opened.get(key)
        if segment is None:
            segment = _open_shm(h) if h.kind == "shm" else _open_cuda(h, ordinal)
            _opened[key] = segment
            logger.debug("opened shared segment %s (%s, %d bytes)", h.name, h.kind, segment.nbytes)
    if segment.name != h.name or segment.kind != h.kind or segment.path != h.path:
        raise HandleError(f"tensor handle names segment {h.name} ({h.kind}) but its memory is segment "
                          f"{segment.name} ({segment.kind}): the handle is tampered with")
    if segment.nbytes < h.nbytes:
        raise HandleError(f"tensor handle claims {h.nbytes} bytes but segment {h.name} has "
                          f"{segment.nbytes}: the handle is stale or tampered with")
    t = _view(segment, h.dtype, h.shape, h.strides, h.offset)
    if expect is not None:
        _check_expect(t, expect, h.name)
    return t


def release(t: torch.Tensor) -> None:
    """Give back one reference to the segment holding ``t`` (a tensor of :func:`shared_empty` or
    :func:`share_storage`, or a view); the registration ends with the last reference.

    The handle can no longer be exported or opened from then on (a CPU segment's owner descriptor is
    closed at once; a CUDA allocation of :func:`shared_empty` is freed once this process's last view of
    it dies). Memory shared in place stays the tensor's, in place. Release only once consumers have
    closed the segment (the protocol's job): CUDA does not promise that memory freed by its owner stays
    valid in a process that still maps it.
    """
    segment = _owned_segment_of(t)
    with _lock:
        segment.refs -= 1
        last = segment.refs == 0
    if last:
        _forget(segment)


def _forget(segment: _Segment) -> None:
    with _lock:
        _owned.pop(segment.name, None)
        for key in (segment.key, *segment.aliases):
            _owned_keys.pop(key, None)
        _owned_ipc.pop(segment.ipc_handle, None)
    if segment.fd >= 0 and segment.owner_pid == os.getpid():
        os.close(segment.fd)
        segment.fd = -1
    logger.debug("released shared segment %s", segment.name)


def close(handle: Mapping[str, Any]) -> bool:
    """Drop this process's mapping of a segment opened with :func:`open_tensor` (unmapped once its views
    are gone). Returns False when it was not open here (or is this process's own segment)."""
    h = _parse(handle)
    with _lock:
        mapped = [key for key in _opened if key.split("@")[0] == h.cache_key]
        for key in mapped:
            del _opened[key]
        return bool(mapped)


def close_all() -> int:
    """Drop every mapping opened with :func:`open_tensor`; returns how many there were."""
    with _lock:
        count = len(_opened)
        _opened.clear()
    return count


def live_segments() -> list[str]:
    """Names of the segments this process owns (allocated and not yet released), sorted."""
    with _lock:
        return sorted(_owned)


def live_bytes() -> int:
    """Bytes of the CPU shared-memory segments this process owns (weights shared in place included)."""
    with _lock:
        return sum(s.nbytes for s in _owned.values() if s.kind == "shm")


def opened_segments() -> list[str]:
    """Names of the segments this process has opened from other processes, sorted."""
    with _lock:
        return sorted(s.name for s in _opened.values())


def _release_all_at_exit() -> None:
    with _lock:
        segments = [s for s in _owned.values() if s.owner_pid == os.getpid()]
    for segment in segments:
        _forget(segment)


atexit.register(_release_all_at_exit)


@dataclass(frozen=True)
class HandleTiming:
    """Median seconds per operation over ``repeats`` runs."""

    seconds: float
    repeats: int


def time_export(t: torch.Tensor, repeats: int = 100) -> HandleTiming:
    """Median time of :func:`export_tensor` on ``t`` (run in the owner)."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        export_tensor(t)
        samples.append(time.perf_counter() - start)
    return HandleTiming(statistics.median(samples), repeats)


def time_open(handle: Mapping[str, Any], repeats: int = 20, cached: bool = False) -> HandleTiming:
    """Median time of :func:`open_tensor` on ``handle`` (run in a consumer process).

    ``cached=False`` maps the segment anew each time (the first-open cost: mmap or cuIpcOpenMemHandle);
    ``cached=True`` measures opens of an already mapped segment. Leaves the segment closed.
    """
    samples = []
    keep = open_tensor(handle) if cached else None
    for _ in range(repeats):
        start = time.perf_counter()
        view = open_tensor(handle)
        samples.append(time.perf_counter() - start)
        del view
        if not cached:
            close(handle)
    del keep
    close(handle)
    return HandleTiming(statistics.median(samples), repeats)
