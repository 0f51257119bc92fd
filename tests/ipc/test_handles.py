"""Shared tensor handles: CPU round trips through spawned children, validation of tampered handles,
caching, ownership and leak checks; GPU (CUDA IPC) round trips and a peer pull when 2 GPUs exist.

Values encode their position: element k of a base tensor (row-major) holds ``k % 97 + shift``
(exact in every dtype tested), so each side checks the other's data against an expectation it
computes itself from the base shape and the view's slicing, not from the handle.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import torch

from ipc import _cuda, naming
from ipc.errors import HandleError
from ipc.handles import (
    SHM_DIR,
    TensorSpec,
    close,
    close_all,
    export_tensor,
    live_segments,
    open_tensor,
    opened_segments,
    release,
    share_storage,
    shared_empty,
    time_export,
    time_open,
)
from tests.ipc.spawn_utils import CHILD_GPUS, TEST_PREFIX, Link, spawn_child

SEGMENT_PREFIX = f"{TEST_PREFIX}_"

DTYPES = ["float32", "bfloat16", "int64", "uint8"]
BASE_SHAPE = (5, 8)
VIEW = (slice(1, 4), slice(2, 7))  # a strided view with a storage offset
PARENT_SHIFT, CHILD_SHIFT = 1, 101


def pattern(shift: int, dtype: torch.dtype, shape: tuple[int, ...] = BASE_SHAPE,
            device: str = "cpu") -> torch.Tensor:
    numel = 1
    for d in shape:
        numel *= d
    return (torch.arange(numel) % 97 + shift).reshape(shape).to(device=device, dtype=dtype)


def after_child_write(dtype: torch.dtype, index: Any, shape: tuple[int, ...] = BASE_SHAPE,
                      device: str = "cpu") -> torch.Tensor:
    """The base tensor once the child has written CHILD_SHIFT values into ``base[index]``."""
    expected = pattern(PARENT_SHIFT, dtype, shape, device)
    expected[index] = pattern(CHILD_SHIFT, dtype, shape, device)[index]
    return expected


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=0, atol=0)


def through_msgpack(handle: dict[str, Any]) -> dict[str, Any]:
    return msgpack.unpackb(msgpack.packb(handle, use_bin_type=True), raw=False)


def shm_files(pid: int | None = None) -> set[str]:
    """Named /dev/shm files of ours, of one owner pid when given: there must never be any."""
    prefix = SEGMENT_PREFIX if pid is None else f"{SEGMENT_PREFIX}{pid}_"
    return {n for n in os.listdir(SHM_DIR) if n.startswith(prefix)}


def segment_fds(pid: int) -> set[str]:
    """Names of the memfd segments ``pid`` holds a descriptor of: the owner's registration, and a
    mapping (Python's mmap keeps a duplicate) while a tensor uses it."""
    names = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if link.startswith(f"/memfd:{SEGMENT_PREFIX}"):
            names.add(link.removeprefix("/memfd:").removesuffix(" (deleted)"))
    return names


@pytest.fixture(autouse=True)
def no_leftovers():
    """Every test releases what it allocates, closes what it opens and reaps its children."""
    yield
    assert opened_segments() == []
    assert live_segments() == []
    assert segment_fds(os.getpid()) == set()
    assert shm_files(os.getpid()) == set()
    assert mp.active_children() == []


# ----------------------------------------------------------------------------- children

def consumer_child(link: Link) -> None:
    """Open the parent's views, check them, write CHILD_SHIFT values through them."""
    handles = link.recv()["handles"]
    for name, handle in handles.items():
        dtype = getattr(torch, name)
        view = open_tensor(handle, expect=TensorSpec(shape=(3, 5), dtype=dtype, device="cpu"))
        assert_same(view, pattern(PARENT_SHIFT, dtype)[VIEW])
        again = open_tensor(handle, expect={"dtype": name})
        assert again.data_ptr() == view.data_ptr()
        view.copy_(pattern(CHILD_SHIFT, dtype)[VIEW])
    opened = opened_segments()
    assert close_all() == len(DTYPES)
    link.send({"opened": opened})


def owner_child(link: Link) -> None:
    """Own one tensor per dtype, export views, check what the parent wrote; release half explicitly,
    leave the rest to the interpreter-exit cleanup."""
    bases = {}
    for name in DTYPES:
        bases[name] = shared_empty(BASE_SHAPE, getattr(torch, name))
        bases[name].copy_(pattern(PARENT_SHIFT, bases[name].dtype))
    link.send({"handles": {name: export_tensor(base[2:, ::2]) for name, base in bases.items()},
               "segments": live_segments()})
    assert link.recv() == "written"
    for name, base in bases.items():
        assert_same(base, after_child_write(base.dtype, (slice(2, None), slice(None, None, 2))))
    for name in DTYPES[:2]:
        release(bases.pop(name))
    link.send("verified")


def open_and_wait_child(link: Link) -> None:
    view = open_tensor(link.recv())
    link.send(float(view.sum()))
    link.recv()  # never comes: the parent kills this process


def fill_child(link: Link, device: int) -> None:
    """Open each handle it gets (on ``device``, -1: CPU) and fill it with -1; report what it opened."""
    if device >= 0:
        torch.cuda.set_device(device)
    for handle in link.recv():
        open_tensor(handle).fill_(-1)
    if device >= 0:
        torch.cuda.synchronize()
    opened = opened_segments()
    close_all()
    link.send({"opened": opened})


# ----------------------------------------------------------------------------- CPU tests

@pytest.mark.timeout(120)
def test_child_opens_parent_views_and_writes_through_them() -> None:
    bases = {name: shared_empty(BASE_SHAPE, getattr(torch, name)) for name in DTYPES}
    for base in bases.values():
        base.copy_(pattern(PARENT_SHIFT, base.dtype))
    try:
        with spawn_child(consumer_child) as child:
            child.send({"handles": {name: export_tensor(base[VIEW]) for name, base in bases.items()}})
            opened = child.recv()["opened"]
        assert sorted(opened) == sorted(export_tensor(b)["name"] for b in bases.values())
        for base in bases.values():
            assert_same(base, after_child_write(base.dtype, VIEW))
    finally:
        for base in bases.values():
            release(base)


@pytest.mark.timeout(120)
def test_parent_opens_child_views_cached_and_gone_after_owner_exits() -> None:
    index = (slice(2, None), slice(None, None, 2))
    with spawn_child(owner_child) as child:
        message = child.recv()
        handles, segments = message["handles"], message["segments"]
        assert segment_fds(child.pid) == set(segments) and shm_files(child.pid) == set()
        for name, handle in handles.items():
            dtype = getattr(torch, name)
            assert handle["offset"] == 16 and handle["strides"] == [8, 2]
            tampered = dict(handle, nbytes=handle["nbytes"] + 8)
            with pytest.raises(HandleError, match="claims .* bytes but segment .* has"):
                open_tensor(tampered)
            view = open_tensor(handle, expect=TensorSpec((3, 4), dtype, "cpu"))
            assert_same(view, pattern(PARENT_SHIFT, dtype)[index])
            cached = open_tensor(handle)
            assert cached.data_ptr() == view.data_ptr()
            view.copy_(pattern(CHILD_SHIFT, dtype)[index])
            del view, cached
        assert opened_segments() == sorted(segments)
        child.send("written")
        assert child.recv() == "verified"
    assert not os.path.exists(f"/proc/{child.pid}") and shm_files(child.pid) == set()
    assert close(handles["uint8"]) is True
    assert close(handles["uint8"]) is False
    assert close_all() == len(DTYPES) - 1
    for handle in handles.values():
        with pytest.raises(HandleError, match="does not exist: its owner .* released it or exited"):
            open_tensor(handle)


@pytest.mark.timeout(120)
def test_killed_consumer_leaks_nothing() -> None:
    t = shared_empty((64,), torch.float32)
    t.fill_(2.0)
    name = export_tensor(t)["name"]
    with spawn_child(open_and_wait_child, expect_exit=-signal.SIGKILL) as child:
        child.send(export_tensor(t))
        assert child.recv() == 128.0
        os.kill(child.pid, signal.SIGKILL)
    release(t)
    del t  # its mapping was the last user of the memory
    assert name not in segment_fds(os.getpid())


def test_handle_is_plain_data_and_round_trips_msgpack() -> None:
    t = shared_empty((4, 6), torch.bfloat16)
    try:
        handle = export_tensor(t[1:, 2:])
        assert through_msgpack(handle) == handle
        assert handle["kind"] == "shm" and handle["dtype"] == "bfloat16" and handle["pid"] == os.getpid()
        assert handle["shape"] == [3, 4] and handle["strides"] == [6, 1] and handle["offset"] == 8
        assert handle["nbytes"] == 48 and handle["device"] == -1
        assert handle["name"].startswith(f"{SEGMENT_PREFIX}{os.getpid()}_")
        assert handle["path"] == f"/memfd:{handle['name']} (deleted)"
        assert os.readlink(f"/proc/self/fd/{handle['fd']}") == handle["path"]
        assert live_segments() == [handle["name"]]
        same = open_tensor(through_msgpack(handle))  # the owner gets a view of its own mapping
        t.copy_(pattern(PARENT_SHIFT, torch.bfloat16, (4, 6)))
        assert_same(same, pattern(PARENT_SHIFT, torch.bfloat16, (4, 6))[1:, 2:])
        assert opened_segments() == []
    finally:
        release(t)


@pytest.mark.timeout(120)
def test_share_storage_moves_a_cpu_storage_in_place_so_views_and_parameters_follow() -> None:
    param = torch.nn.Parameter(pattern(PARENT_SHIFT, torch.float32, (4, 6)), requires_grad=False)
    view = param.view(8, 3)  # taken before sharing, like vLLM's expert-weight accessor
    storage_id = param.untyped_storage()._cdata
    assert share_storage(view) is True
    assert share_storage(param) is False  # the same storage: one segment
    assert param.untyped_storage()._cdata == storage_id and param.untyped_storage().is_shared()
    assert view.data_ptr() == param.data_ptr()
    assert_same(param, pattern(PARENT_SHIFT, torch.float32, (4, 6)))  # the bytes moved along
    handle = export_tensor(view[2:6])
    assert handle["offset"] == 6 and handle["nbytes"] == 96 and handle["kind"] == "shm"
    assert os.readlink(f"/proc/self/fd/{handle['fd']}") == handle["path"]
    try:
        with spawn_child(fill_child, -1) as child:
            child.send([handle])
            assert child.recv()["opened"] == [handle["name"]]
        expected = pattern(PARENT_SHIFT, torch.float32, (24,))
        expected[6:18] = -1
        assert_same(param.reshape(-1), expected)
        assert_same(view.reshape(-1), expected)
    finally:
        release(param)
    assert export_tensor(view)["name"] == handle["name"]  # view's reference still holds it
    release(view)
    with pytest.raises(HandleError, match="was released"):
        export_tensor(view)
    assert share_storage(view) is True  # registered anew: the storage stays shared, in place
    release(view)
    with pytest.raises(HandleError, match="an empty tensor has no memory to share"):
        share_storage(torch.empty(0))


def test_tampered_descriptor_number_is_refused() -> None:
    t = shared_empty((4,), torch.float32)
    other = shared_empty((64,), torch.float32)
    try:
        handle = export_tensor(t)
        forged = dict(handle, name=f"{SEGMENT_PREFIX}1_999999_deadbeef", fd=export_tensor(other)["fd"])
        with pytest.raises(HandleError, match=rf"descriptor \d+ of pid \d+ is '/memfd:{SEGMENT_PREFIX}.*', not "
                                              r"segment .* stale or tampered"):
            open_tensor(forged)
    finally:
        release(t)
        release(other)


def test_a_handle_of_another_name_prefix_is_refused(test_name_prefix: str) -> None:
    t = shared_empty((4,), torch.float32)
    try:
        handle = export_tensor(t)
        naming.set_name_prefix("other")
        with pytest.raises(HandleError, match=rf"name '{test_name_prefix}_\d+_.*' is not a segment "
                                              r"name of ours \(other_<pid>_<n>_<8 hex>\): both "
                                              "sides must call ipc.naming.set_name_prefix"):
            open_tensor(handle)
        other = shared_empty((2,), torch.float32)  # named under the new prefix
        try:
            assert export_tensor(other)["name"].startswith(f"other_{os.getpid()}_")
        finally:
            release(other)
    finally:
        naming.set_name_prefix(test_name_prefix)
        release(t)


@pytest.mark.parametrize("prefix", ["", "1ab", "a-b", "a/b", "x" * 17, None])
def test_a_bad_name_prefix_is_refused(prefix: object) -> None:
    with pytest.raises(ValueError, match="must be 1-16 letters, digits or underscores"):
        naming.set_name_prefix(prefix)  # type: ignore[arg-type]


def _mutations() -> list[tuple[str, Callable[[dict[str, Any]], Any], str]]:
    cuda_fields = {"kind": "cuda", "device": 0, "ipc_handle": bytes(64), "device_uuid": "0" * 32}

    def as_cuda(h: dict[str, Any], **changes: Any) -> dict[str, Any]:
        return {**{k: v for k, v in h.items() if k not in ("fd", "path")}, **cuda_fields, **changes}

    # Another name makes the owner open its own handle like a consumer: through /proc/<pid>/fd.
    foreign = f"{SEGMENT_PREFIX}1_999999_deadbeef"
    return [
        ("not a dict", lambda h: list(h.items()), "must be a dict"),
        ("unknown kind", lambda h: dict(h, kind="nfs"), "kind 'nfs' is unknown"),
        ("no kind", lambda h: {k: v for k, v in h.items() if k != "kind"}, "kind None is unknown"),
        ("missing field", lambda h: {k: v for k, v in h.items() if k != "strides"}, r"missing fields \['strides'\]"),
        ("extra field", lambda h: dict(h, rebuild="os:system"), r"unexpected fields \['rebuild'\]"),
        ("version", lambda h: dict(h, version=1), "version 1 is unsupported"),
        ("bool as int", lambda h: dict(h, offset=True), "'offset' must be int, got bool"),
        ("str shape", lambda h: dict(h, shape="3,6"), "'shape' must be list, got str"),
        ("negative offset", lambda h: dict(h, offset=-1), r"'offset' is -1, outside \[0,"),
        ("negative dim", lambda h: dict(h, shape=[-3, 6]), "'shape' must hold ints in"),
        ("float stride", lambda h: dict(h, strides=[6.0, 1]), "'strides' must hold ints in"),
        ("rank mismatch", lambda h: dict(h, strides=[6]), "differ in length"),
        ("unknown dtype", lambda h: dict(h, dtype="float128"), "dtype 'float128' is unknown"),
        ("dtype as code", lambda h: dict(h, dtype="torch.float32"), "dtype 'torch.float32' is unknown"),
        ("wider dtype", lambda h: dict(h, dtype="float64"), "past the segment's 96 bytes"),
        ("shape too big", lambda h: dict(h, shape=[4, 6]), "past the segment's 96 bytes"),
        ("offset too big", lambda h: dict(h, offset=20), "past the segment's 96 bytes"),
        ("size larger than segment", lambda h: dict(h, nbytes=1 << 20), "claims 1048576 bytes but segment"),
        ("path traversal", lambda h: dict(h, name="../../etc/passwd"), "is not a segment name of ours"),
        ("slash in name", lambda h: dict(h, name=h["name"] + "/x"), "is not a segment name of ours"),
        ("foreign file", lambda h: dict(h, name="pym-123-abc"), "is not a segment name of ours"),
        ("missing segment", lambda h: dict(h, name=foreign, fd=999999), "does not exist"),
        ("dead owner", lambda h: dict(h, name=foreign, pid=2**22 + 7), "does not exist"),
        ("other file", lambda h: dict(h, name=foreign, path=f"/memfd:{SEGMENT_PREFIX}x (deleted)"),
         "not segment .* stale or tampered"),
        ("empty path", lambda h: dict(h, path=""), "path has 0 characters"),
        ("fd as str", lambda h: dict(h, fd=str(h["fd"])), "'fd' must be int, got str"),
        ("cpu with device", lambda h: dict(h, device=0), "device must be -1"),
        ("short ipc handle", lambda h: as_cuda(h, ipc_handle=b"x" * 10), "has 10 bytes, expected 64"),
        ("bad uuid", lambda h: as_cuda(h, device_uuid="GPU-1"), "not 32 lowercase hex"),
        ("cuda with fd", lambda h: dict(h, **cuda_fields), r"unexpected fields \['fd', 'path'\]"),
        ("unknown gpu", lambda h: as_cuda(h), "no CUDA device|cannot see"),
    ]


@pytest.mark.parametrize(("mutate", "message"), [(m, msg) for _, m, msg in _mutations()],
                         ids=[label for label, _, _ in _mutations()])
def test_tampered_handle_raises_handle_error(mutate: Callable[[dict[str, Any]], Any], message: str) -> None:
    t = shared_empty((4, 6), torch.float32)
    try:
        handle = export_tensor(t[1:])
        with pytest.raises(HandleError, match=message):
            open_tensor(through_msgpack(mutate(handle)))
    finally:
        release(t)


def test_expectation_mismatch_raises_handle_error() -> None:
    t = shared_empty((4, 6), torch.int64)
    try:
        handle = export_tensor(t)
        assert open_tensor(handle, expect={"shape": [4, 6], "dtype": torch.int64, "device": "cpu"}).shape == (4, 6)
        with pytest.raises(HandleError, match=r"holds shape \[4, 6\], expected \[6, 4\]"):
            open_tensor(handle, expect=TensorSpec(shape=(6, 4)))
        with pytest.raises(HandleError, match="holds dtype torch.int64, expected float32"):
            open_tensor(handle, expect={"dtype": "float32"})
        with pytest.raises(HandleError, match="lives on cpu, expected cuda:0"):
            open_tensor(handle, expect=TensorSpec(device="cuda:0"))
        with pytest.raises(HandleError, match="expect must be a TensorSpec"):
            open_tensor(handle, expect={"layout": "strided"})
    finally:
        release(t)


def test_export_of_foreign_or_released_tensor_raises() -> None:
    with pytest.raises(HandleError, match="allocate it with shared_empty"):
        export_tensor(torch.zeros(3))
    with pytest.raises(HandleError, match="expected a torch.Tensor"):
        export_tensor([1.0, 2.0])  # type: ignore[arg-type]
    t = shared_empty((3,), torch.float32)
    handle = export_tensor(t)
    release(t)
    with pytest.raises(HandleError, match="or was released"):
        export_tensor(t)
    with pytest.raises(HandleError, match="does not exist"):
        open_tensor(handle)


def test_dtype_reinterpreting_view_and_empty_tensor() -> None:
    t = shared_empty((4,), torch.int64)
    empty = shared_empty((0, 3), torch.float32)
    try:
        t.copy_(torch.tensor([1, 2, 3, 4]))
        as_bytes = export_tensor(t.view(torch.uint8)[8:16])
        assert as_bytes["dtype"] == "uint8" and as_bytes["offset"] == 8
        assert_same(open_tensor(as_bytes), torch.tensor([2, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8))
        handle = export_tensor(empty)
        assert handle["shape"] == [0, 3] and handle["nbytes"] == 4
        assert open_tensor(handle).shape == (0, 3)
    finally:
        release(t)
        release(empty)


def test_shared_empty_rejects_unshareable_arguments() -> None:
    with pytest.raises(ValueError, match="dtype torch.complex64 cannot be shared"):
        shared_empty((2,), torch.complex64)
    with pytest.raises(ValueError, match="device meta cannot be shared"):
        shared_empty((2,), torch.float32, "meta")
    with pytest.raises(ValueError, match="shape must be non-negative ints"):
        shared_empty((2, -1), torch.float32)


def test_timing_helpers_measure_export_and_open() -> None:
    t = shared_empty((1024,), torch.float32)
    try:
        handle = export_tensor(t)
        export_timing = time_export(t, repeats=5)
        open_timing = time_open(handle, repeats=5)
        assert export_timing.repeats == 5 and 0 < export_timing.seconds < 1
        assert 0 < open_timing.seconds < 1
    finally:
        release(t)


# ----------------------------------------------------------------------------- GPU tests

GPU_SHAPE = (64, 1000)
GPU_VIEW = (slice(8, None), slice(100, 900))


def cuda_consumer_child(link: Link, device: int) -> None:
    """Work on ``device``; open the parent's cuda:0 view, check it, pull it into a tensor of our own
    device, write CHILD_SHIFT values through the view; then measure open costs."""
    torch.cuda.set_device(device)
    handle = link.recv()
    dtype = torch.bfloat16
    view = open_tensor(handle, expect=TensorSpec((56, 800), dtype, "cuda:0"))
    assert open_tensor(handle).data_ptr() == view.data_ptr()
    local = torch.empty(view.shape, dtype=dtype, device=f"cuda:{device}")
    local.copy_(view)  # a peer pull when device != 0
    torch.cuda.synchronize()
    assert_same(local, pattern(PARENT_SHIFT, dtype, GPU_SHAPE)[GPU_VIEW])
    # Write from the memory's own device: a kernel on the peer GPU writing a strided view of
    # IPC-opened memory faulted (illegal address) on the H200 pair; pulls are plain copies.
    view.copy_(pattern(CHILD_SHIFT, dtype, GPU_SHAPE, "cuda:0")[GPU_VIEW])
    torch.cuda.synchronize()
    del view, local
    assert close_all() == 1
    # Mapped on this GPU's context: the tensor reports our device and a copy on our stream
    # reads the owner's GPU memory directly (a peer DMA when device != 0).
    mapped = open_tensor(handle, map_on=device)
    assert mapped.device == torch.device("cuda", device)
    pulled = torch.empty(mapped.shape, dtype=dtype, device=f"cuda:{device}")
    pulled.copy_(mapped)
    torch.cuda.synchronize()
    assert_same(pulled, pattern(CHILD_SHIFT, dtype, GPU_SHAPE)[GPU_VIEW])
    del mapped, pulled
    assert close_all() == 1
    with pytest.raises(HandleError, match="claims .* bytes but the CUDA allocation"):
        open_tensor(dict(handle, nbytes=handle["nbytes"] + (64 << 20)))
    first = time_open(handle, repeats=5)
    cached = time_open(handle, repeats=20, cached=True)
    assert opened_segments() == []
    link.send({"open_s": first.seconds, "cached_open_s": cached.seconds})
    assert link.recv() == "released"
    with pytest.raises(HandleError, match="cannot open CUDA IPC handle"):
        open_tensor(handle)
    link.send("refused")


def _cuda_round_trip(device: int) -> None:
    base = shared_empty(GPU_SHAPE, torch.bfloat16, "cuda:0")
    base.copy_(pattern(PARENT_SHIFT, torch.bfloat16, GPU_SHAPE, "cuda:0"))
    torch.cuda.synchronize()
    with spawn_child(cuda_consumer_child, device) as child:
        handle = export_tensor(base[GPU_VIEW])
        assert handle["kind"] == "cuda" and len(handle["ipc_handle"]) == 64 and handle["offset"] == 8 * 1000 + 100
        child.send(handle)
        timings = child.recv()
        export_s = time_export(base, repeats=20).seconds
        print(f"\nCUDA handle, child on cuda:{device}: export {export_s * 1e6:.1f} us, first open "
              f"{timings['open_s'] * 1e6:.1f} us, cached open {timings['cached_open_s'] * 1e6:.1f} us")
        assert_same(base, after_child_write(torch.bfloat16, GPU_VIEW, GPU_SHAPE, "cuda:0"))
        release(base)
        del base  # the last view: the allocation is freed now
        child.send("released")
        assert child.recv() == "refused"


@pytest.mark.gpu
@pytest.mark.timeout(180)
@pytest.mark.parametrize("device", CHILD_GPUS)
def test_cuda_tensor_opened_by_child(device: int) -> None:
    """The child works on ``device``: on the peer GPU its copy out of the opened tensor is a peer pull."""
    _cuda_round_trip(device)


@pytest.mark.gpu
@pytest.mark.timeout(180)
def test_cuda_share_storage_exports_allocator_blocks_in_place() -> None:
    """Tensors of torch's caching allocator are exported where they are: same addresses, the
    handle names their driver allocation and their offset in it; a child's writes land in them."""
    torch.cuda.set_device(0)
    a = torch.nn.Parameter(torch.arange(4096.0, device="cuda:0"), requires_grad=False)
    b = torch.arange(4096.0, device="cuda:0") + 10000
    view = a.view(64, 64)
    ptrs = (a.data_ptr(), b.data_ptr())
    base_a, size_a = _cuda.address_range(0, a.data_ptr())
    same_allocation = _cuda.address_range(0, b.data_ptr()) == (base_a, size_a)
    assert share_storage(view) is True
    assert share_storage(b) is (not same_allocation)
    handles = [export_tensor(view[8:16]), export_tensor(b[100:200])]
    assert (a.data_ptr(), b.data_ptr()) == ptrs
    assert handles[0]["offset"] == (a.data_ptr() - base_a) // 4 + 8 * 64
    assert handles[0]["nbytes"] == size_a and handles[0]["shape"] == [8, 64]
    if same_allocation:  # one allocation, one handle: a consumer opens it once
        assert handles[0]["ipc_handle"] == handles[1]["ipc_handle"]
    try:
        with spawn_child(fill_child, 0) as child:
            child.send(handles)
            opened = child.recv()["opened"]
        assert len(opened) == (1 if same_allocation else 2)
        expected_a = torch.arange(4096.0)
        expected_a[512:1024] = -1
        expected_b = torch.arange(4096.0) + 10000
        expected_b[100:200] = -1
        assert_same(a, expected_a)
        assert_same(view.reshape(-1), expected_a)
        assert_same(b, expected_b)
    finally:
        release(a)
        release(b)
