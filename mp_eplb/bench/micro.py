"""Microbenchmarks the bench compares the engine against, run on 2 spawned rank processes.

* Links: the best rate of each link at one layer's bytes, both ranks exchanging at once (as a
  rebalance does): ``gloo`` (CPU tensors, ``batch_isend_irecv``), ``nccl`` (GPU tensors,
  ``batch_isend_irecv``), ``cuda_ipc`` (each rank opens its peer's ``ipc.handles`` tensor and
  pulls it with ``copy_``: a copy-engine read from the peer GPU, as the worker does).
* Local copy: ``mp_eplb.transfer.move_from_buffer`` of one layer with the metadata a real
  ``move_to_buffer`` produced for a recorded placement change, next to one plain copy of the
  same bytes (GPU time from CUDA events, the GPU kept busy until the host has issued the
  copies, plus the call's host time; on CPU, wall time).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import msgpack
import numpy as np
import torch
import torch.distributed as dist

from ipc import handles
from mp_eplb.demo.launch import RankEnv, spawn_ranks
from mp_eplb.transfer.cuda_ipc import all_gather_bytes
from mp_eplb.transfer import move_from_buffer, move_to_buffer

__all__ = ["MicroSpec", "run_micro", "summarize_micro"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class MicroSpec:
    """What to measure. ``weight_shapes``: one layer's tensors on one rank, each
    ``[slots, ...]``; ``old_map``/``new_map``: one layer's placement over 2 ranks (the move
    whose metadata ``move_from_buffer`` replays); ``link_bytes``: bytes each rank receives per
    link exchange; ``links``: names among ``gloo``, ``nccl``, ``cuda_ipc``."""

    device: str
    dtype: str
    weight_shapes: list[list[int]]
    old_map: list[int]
    new_map: list[int]
    link_bytes: int
    links: list[str]
    warmup: int = 2
    repeats: int = 10


def run_micro(spec: MicroSpec, *, timeout_s: float, collective_timeout_s: float) -> dict:
    """Run the microbenchmarks on 2 fresh rank processes; :func:`summarize_micro` of them."""
    results = spawn_ranks(_micro_rank, asdict(spec), world_size=2, device=spec.device,
                          timeout_s=timeout_s, collective_timeout_s=collective_timeout_s)
    return summarize_micro(results)


def summarize_micro(results: list[dict]) -> dict:
    """Per link: ``bytes``, ``best_gbps``/``median_gbps`` (bytes received per rank / the slower
    rank's time of each repeat); copy: ``bytes``, ``rows``, best/median ms of
    ``move_from_buffer`` and of the plain copy, and their ratio (best over best)."""
    out: dict = {"links": {}, "copy": {}}
    for name in results[0]["links"]:
        seconds = np.max([r["links"][name]["seconds"] for r in results], axis=0)
        nbytes = results[0]["links"][name]["bytes"]
        out["links"][name] = {"bytes": nbytes, "best_gbps": nbytes / seconds.min() / 1e9,
                              "median_gbps": nbytes / float(np.median(seconds)) / 1e9,
                              "repeats": len(seconds)}
    copy = results[0]["copy"]
    mfb, plain = np.asarray(copy["move_from_buffer_s"]), np.asarray(copy["plain_copy_s"])
    out["copy"] = {"bytes": copy["bytes"], "rows": copy["rows"],
                   "move_from_buffer_ms_best": mfb.min() * 1e3,
                   "move_from_buffer_ms_median": float(np.median(mfb)) * 1e3,
                   "move_from_buffer_host_ms_median":
                       float(np.median(copy["move_from_buffer_host_s"])) * 1e3,
                   "plain_copy_ms_best": plain.min() * 1e3,
                   "plain_copy_ms_median": float(np.median(plain)) * 1e3,
                   "plain_copy_gbps": copy["bytes"] / plain.min() / 1e9 if copy["bytes"] else None,
                   "ratio": float(mfb.min() / plain.min()) if copy["bytes"] else None,
                   "timer": copy["timer"]}
    return out


def _timed(fn: Callable[[], None], device: torch.device, group: dist.ProcessGroup, *,
           warmup: int, repeats: int) -> list[float]:
    """Seconds of ``fn`` per repeat (wall clock, device synchronised, ranks lined up first)."""
    seconds = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier(group=group)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    return seconds


def _exchange(send: torch.Tensor, recv: torch.Tensor, peer: int, group: dist.ProcessGroup) -> None:
    ops = [dist.P2POp(dist.isend, send, peer, group), dist.P2POp(dist.irecv, recv, peer, group)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()


def _link_p2p(env: RankEnv, spec: MicroSpec, device: torch.device) -> list[float]:
    send = torch.full((spec.link_bytes,), env.rank, dtype=torch.uint8, device=device)
    recv = torch.empty_like(send)
    peer = 1 - env.rank
    group = env.ep_group if device.type == env.device.type else env.cpu_group
    seconds = _timed(lambda: _exchange(send, recv, peer, group), device, env.cpu_group,
                     warmup=spec.warmup, repeats=spec.repeats)
    if int(recv[0]) != peer or int(recv[-1]) != peer:
        raise RuntimeError(f"link exchange received {int(recv[0])}, expected {peer}")
    return seconds


def _puller(dst: torch.Tensor, src: torch.Tensor) -> Callable[[], None]:
    return lambda: dst.copy_(src, non_blocking=True)


def _link_cuda_ipc(env: RankEnv, spec: MicroSpec) -> list[float]:
    src = handles.shared_empty((spec.link_bytes,), torch.uint8, env.device)
    src.fill_(env.rank)
    handle = handles.export_tensor(src)
    blobs = all_gather_bytes(msgpack.packb(handle, use_bin_type=True), env.cpu_group)
    peer_handle = msgpack.unpackb(blobs[1 - env.rank], raw=False)
    dst = torch.empty(spec.link_bytes, dtype=torch.uint8, device=env.device)
    pull = _puller(dst, handles.open_tensor(peer_handle, {"dtype": "uint8"}))
    seconds = _timed(pull, env.device, env.cpu_group, warmup=spec.warmup, repeats=spec.repeats)
    if int(dst[0]) != 1 - env.rank or int(dst[-1]) != 1 - env.rank:
        raise RuntimeError("cuda_ipc pull read the wrong data")
    del pull  # the last view of the peer's memory, before its mapping is closed
    handles.close(peer_handle)
    dist.barrier(group=env.cpu_group)  # both have closed the peer's mapping
    handles.release(src)
    return seconds


#: GPU cycles of busy-wait queued before each timed copy, so the host has launched all of
#: it before the GPU reaches the start event and the events time the copies alone.
_GPU_HEAD_START_CYCLES = 5_000_000


def _event_seconds(fn: Callable[[], None], device: torch.device, *, warmup: int,
                   repeats: int) -> tuple[list[float], list[float], str]:
    """Per repeat: ``(device seconds, host seconds of the call)``. On CUDA the device time is
    between CUDA events around ``fn`` with the GPU held busy until the host is done; on CPU
    both are wall time."""
    device_s, host_s = [], []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(_GPU_HEAD_START_CYCLES)
            start.record()
            t0 = time.perf_counter()
            fn()
            host = time.perf_counter() - t0
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            elapsed = host = time.perf_counter() - t0
        if i >= warmup:
            device_s.append(elapsed)
            host_s.append(host)
    return device_s, host_s, "cuda events" if device.type == "cuda" else "wall clock"


def _copy_bench(env: RankEnv, spec: MicroSpec) -> dict:
    """``move_from_buffer`` of the recorded layer move on this rank vs a plain copy."""
    dtype, device = _DTYPES[spec.dtype], env.device
    weights = [torch.zeros(shape, dtype=dtype, device=device) for shape in spec.weight_shapes]
    for row in range(spec.weight_shapes[0][0]):  # row r of rank k holds value k * slots + r
        for w in weights:
            w[row].fill_(float(env.rank * spec.weight_shapes[0][0] + row))
    buffers = [torch.empty_like(w) for w in weights]
    old, new = np.asarray(spec.old_map), np.asarray(spec.new_map)
    slots = spec.weight_shapes[0][0]
    metadata = move_to_buffer(slots, old, new, weights, buffers, None, env.ep_group)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    new_local = new[env.rank * slots:(env.rank + 1) * slots]
    rows = int((~metadata.is_unchanged & (new_local != -1)).sum())
    row_bytes = sum(w[0].numel() * w.element_size() for w in weights)
    nbytes = rows * row_bytes
    mfb, mfb_host, timer = _event_seconds(
        lambda: move_from_buffer(weights, buffers, metadata, new, env.rank), device,
        warmup=spec.warmup, repeats=spec.repeats)
    src = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    plain, _, _ = _event_seconds(lambda: dst.copy_(src, non_blocking=True), device,
                                 warmup=spec.warmup, repeats=spec.repeats)
    return {"bytes": nbytes, "rows": rows, "move_from_buffer_s": mfb,
            "move_from_buffer_host_s": mfb_host, "plain_copy_s": plain, "timer": timer}


def _micro_rank(env: RankEnv, spec_dict: dict) -> dict:
    spec = MicroSpec(**spec_dict)
    if env.rank == 0:
        logger.info("microbenchmarks: links %s at %.1f MiB, move_from_buffer vs plain copy",
                    spec.links, spec.link_bytes / 2**20)
    links: dict[str, dict] = {}
    for name in spec.links:
        if name == "cuda_ipc":
            seconds = _link_cuda_ipc(env, spec)
        else:
            seconds = _link_p2p(env, spec, env.device if name == "nccl" else torch.device("cpu"))
        links[name] = {"bytes": spec.link_bytes, "seconds": seconds}
    return {"links": links, "copy": _copy_bench(env, spec)}
