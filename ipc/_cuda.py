"""Thin ctypes binding of the CUDA driver API (libcuda.so.1) for dedicated, IPC-shareable allocations.

Every call runs inside the *primary* context of the device it names (the context the CUDA runtime,
and therefore torch, uses): the context is retained once per device and pushed/popped around each
call, so the calling thread's current context is left as it was. Device ordinals are the process's
own (they respect ``CUDA_VISIBLE_DEVICES``, like torch's); device UUIDs identify a GPU across
processes whose visible-device lists differ.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from collections.abc import Iterator

from ipc.errors import IpcError

__all__ = [
    "IPC_HANDLE_BYTES",
    "CudaDriverError",
    "device_count",
    "device_uuid",
    "ordinal_of_uuid",
    "mem_alloc",
    "mem_free",
    "ipc_get_mem_handle",
    "ipc_open_mem_handle",
    "ipc_close_mem_handle",
    "address_range",
    "legacy_ipc_capable",
    "set_sync_memops",
]

IPC_HANDLE_BYTES = 64
_CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 0x1
_CU_POINTER_ATTRIBUTE_SYNC_MEMOPS = 6
_CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE = 10

_CUdeviceptr = ctypes.c_uint64
_CUcontext = ctypes.c_void_p
_CUdevice = ctypes.c_int


class _IpcMemHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_BYTES)]


class _Uuid(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_char * 16)]


class CudaDriverError(IpcError):
    """A CUDA driver call failed; ``code`` is the CUresult and the message names the call."""

    def __init__(self, call: str, code: int, name: str) -> None:
        super().__init__(f"CUDA driver call {call} failed with {name} ({code})")
        self.call = call
        self.code = code


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_contexts: dict[int, int] = {}


def _driver() -> ctypes.CDLL:
    """Load libcuda.so.1 once, declare the signatures used here and call cuInit."""
    global _lib
    with _lock:
        if _lib is not None:
            return _lib
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise IpcError(f"cannot load the CUDA driver libcuda.so.1 ({exc}): CUDA tensors need "
                           f"an NVIDIA driver; use a CPU (shared-memory) tensor instead") from exc
        signatures: dict[str, list[object]] = {
            "cuInit": [ctypes.c_uint],
            "cuGetErrorName": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
            "cuDeviceGetCount": [ctypes.POINTER(ctypes.c_int)],
            "cuDeviceGet": [ctypes.POINTER(_CUdevice), ctypes.c_int],
            _uuid_call(lib): [ctypes.POINTER(_Uuid), _CUdevice],
            "cuDevicePrimaryCtxRetain": [ctypes.POINTER(_CUcontext), _CUdevice],
            "cuCtxPushCurrent_v2": [_CUcontext],
            "cuCtxPopCurrent_v2": [ctypes.POINTER(_CUcontext)],
            "cuMemAlloc_v2": [ctypes.POINTER(_CUdeviceptr), ctypes.c_size_t],
            "cuMemFree_v2": [_CUdeviceptr],
            "cuPointerSetAttribute": [ctypes.c_void_p, ctypes.c_int, _CUdeviceptr],
            "cuPointerGetAttribute": [ctypes.c_void_p, ctypes.c_int, _CUdeviceptr],
            "cuMemGetAddressRange_v2": [ctypes.POINTER(_CUdeviceptr), ctypes.POINTER(ctypes.c_size_t),
                                        _CUdeviceptr],
            "cuIpcGetMemHandle": [ctypes.POINTER(_IpcMemHandle), _CUdeviceptr],
            "cuIpcOpenMemHandle_v2": [ctypes.POINTER(_CUdeviceptr), _IpcMemHandle, ctypes.c_uint],
            "cuIpcCloseMemHandle": [_CUdeviceptr],
        }
        for name, argtypes in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
        _lib = lib
    _check("cuInit", lib.cuInit(0))
    return lib


def _uuid_call(lib: ctypes.CDLL) -> str:
    """cuDeviceGetUuid_v2 (MIG-aware, CUDA >= 11.4) where the driver has it, else cuDeviceGetUuid."""
    return "cuDeviceGetUuid_v2" if hasattr(lib, "cuDeviceGetUuid_v2") else "cuDeviceGetUuid"


def _check(call: str, code: int) -> None:
    if code == 0:
        return
    name = ctypes.c_char_p()
    lib = _lib
    if lib is not None and lib.cuGetErrorName(code, ctypes.byref(name)) == 0 and name.value:
        raise CudaDriverError(call, code, name.value.decode())
    raise CudaDriverError(call, code, "CUDA_ERROR_UNKNOWN_CODE")


def device_count() -> int:
    """Number of CUDA devices visible to this process."""
    lib = _driver()
    count = ctypes.c_int()
    _check("cuDeviceGetCount", lib.cuDeviceGetCount(ctypes.byref(count)))
    return count.value


def _device(ordinal: int) -> int:
    lib = _driver()
    count = device_count()
    if not 0 <= ordinal < count:
        raise IpcError(f"CUDA device {ordinal} does not exist: this process sees {count} device(s)")
    dev = _CUdevice()
    _check("cuDeviceGet", lib.cuDeviceGet(ctypes.byref(dev), ordinal))
    return dev.value


@functools.cache
def device_uuid(ordinal: int) -> str:
    """The UUID of device ``ordinal`` as 32 lowercase hex digits (same GPU, same UUID, in every process)."""
    lib = _driver()
    uuid = _Uuid()
    call = _uuid_call(lib)
    _check(call, getattr(lib, call)(ctypes.byref(uuid), _device(ordinal)))
    return ctypes.string_at(ctypes.addressof(uuid), 16).hex()


def ordinal_of_uuid(uuid: str) -> int | None:
    """This process's ordinal of the device with ``uuid``, or None when that GPU is not visible here."""
    for ordinal in range(device_count()):
        if device_uuid(ordinal) == uuid:
            return ordinal
    return None


@contextlib.contextmanager
def _in_context(ordinal: int) -> Iterator[ctypes.CDLL]:
    """Run the body with the primary context of ``ordinal`` current on this thread, then restore."""
    lib = _driver()
    with _lock:
        ctx = _contexts.get(ordinal)
    if ctx is None:
        handle = _CUcontext()
        _check("cuDevicePrimaryCtxRetain", lib.cuDevicePrimaryCtxRetain(ctypes.byref(handle),
                                                                        _device(ordinal)))
        with _lock:
            # The primary context is one per device: a second retain by a racing thread is harmless.
            ctx = _contexts.setdefault(ordinal, handle.value or 0)
    _check("cuCtxPushCurrent_v2", lib.cuCtxPushCurrent_v2(ctx))
    try:
        yield lib
    finally:
        popped = _CUcontext()
        _check("cuCtxPopCurrent_v2", lib.cuCtxPopCurrent_v2(ctypes.byref(popped)))


def mem_alloc(ordinal: int, nbytes: int) -> int:
    """A dedicated device allocation of ``nbytes`` on ``ordinal`` (its own IPC handle covers only it).

    Synchronous memory operations on it always synchronize (CU_POINTER_ATTRIBUTE_SYNC_MEMOPS), as the
    driver documentation asks for memory shared through IPC. The caller frees it with :func:`mem_free`.
    """
    with _in_context(ordinal) as lib:
        ptr = _CUdeviceptr()
        _check("cuMemAlloc_v2", lib.cuMemAlloc_v2(ctypes.byref(ptr), nbytes))
        try:
            set_sync_memops(ordinal, ptr.value)
        except CudaDriverError:
            lib.cuMemFree_v2(ptr.value)
            raise
        return ptr.value


def set_sync_memops(ordinal: int, ptr: int) -> None:
    """Make synchronous memory operations on the allocation at ``ptr`` always synchronize
    (CU_POINTER_ATTRIBUTE_SYNC_MEMOPS), as the driver documentation asks for memory shared via IPC."""
    with _in_context(ordinal) as lib:
        one = ctypes.c_uint(1)
        _check("cuPointerSetAttribute", lib.cuPointerSetAttribute(
            ctypes.byref(one), _CU_POINTER_ATTRIBUTE_SYNC_MEMOPS, ptr))


def legacy_ipc_capable(ordinal: int, ptr: int) -> bool:
    """Whether the memory at ``ptr`` can be shared with cuIpcGetMemHandle (False for memory of
    cuMemCreate/cuMemMap, which PyTorch's expandable segments use)."""
    with _in_context(ordinal) as lib:
        flag = ctypes.c_uint(0)
        _check("cuPointerGetAttribute", lib.cuPointerGetAttribute(
            ctypes.byref(flag), _CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE, ptr))
        return bool(flag.value)


def mem_free(ordinal: int, ptr: int) -> None:
    """Free an allocation made by :func:`mem_alloc`."""
    with _in_context(ordinal) as lib:
        _check("cuMemFree_v2", lib.cuMemFree_v2(ptr))


def ipc_get_mem_handle(ordinal: int, ptr: int) -> bytes:
    """The 64-byte interprocess handle of the allocation starting at ``ptr``."""
    with _in_context(ordinal) as lib:
        handle = _IpcMemHandle()
        _check("cuIpcGetMemHandle", lib.cuIpcGetMemHandle(ctypes.byref(handle), ptr))
        return ctypes.string_at(ctypes.addressof(handle), IPC_HANDLE_BYTES)


def ipc_open_mem_handle(ordinal: int, handle: bytes) -> int:
    """Map another process's allocation into this process, in the primary context of ``ordinal``.

    Peer access is enabled lazily when the memory lives on another device. Fails (CudaDriverError)
    for a handle of this very process, a freed allocation, or a handle that is not one.
    """
    if len(handle) != IPC_HANDLE_BYTES:
        raise IpcError(f"a CUDA IPC handle has {IPC_HANDLE_BYTES} bytes, got {len(handle)}")
    raw = _IpcMemHandle()
    ctypes.memmove(ctypes.addressof(raw), handle, IPC_HANDLE_BYTES)
    with _in_context(ordinal) as lib:
        ptr = _CUdeviceptr()
        _check("cuIpcOpenMemHandle_v2", lib.cuIpcOpenMemHandle_v2(
            ctypes.byref(ptr), raw, _CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS))
        return ptr.value


def ipc_close_mem_handle(ordinal: int, ptr: int) -> None:
    """Unmap memory opened with :func:`ipc_open_mem_handle` (the owner's allocation stays)."""
    with _in_context(ordinal) as lib:
        _check("cuIpcCloseMemHandle", lib.cuIpcCloseMemHandle(ptr))


def address_range(ordinal: int, ptr: int) -> tuple[int, int]:
    """(base, size in bytes) of the allocation containing ``ptr``."""
    with _in_context(ordinal) as lib:
        base = _CUdeviceptr()
        size = ctypes.c_size_t()
        _check("cuMemGetAddressRange_v2", lib.cuMemGetAddressRange_v2(
            ctypes.byref(base), ctypes.byref(size), ptr))
        return base.value, size.value
