"""Microbenchmarks of the engine's per-step and per-layer costs, side by side in one run.

* commit: one layer's ``move_from_buffer`` rows as a per-row loop of ``copy_`` vs one
  ``torch._foreach_copy_`` of the rows vs what ``move_from_buffer`` does (runs of consecutive
  rows merged, one ``copy_`` per run and tensor), and the map switch as five row
  copies (one per map) vs one copy of the flat map row; host ms per layer (the call, not its
  GPU work) and GPU ms (CUDA events, after a synchronise).
* agreement: two gloo ranks, each step a simulated ``--step-ms`` of GPU wait (a sleep) with
  up to 1 ms of skew between the ranks, then the commit agreement: a blocking MIN all-reduce
  vs the pipelined one (wait for the previous step's, issue this step's); host ms per step.
* pull: a copy-engine pull of ``--pull-mib`` from memory another process exported through
  CUDA IPC (opened on the pulling GPU, ``map_on``; the peer GPU with 2 GPUs, the same one with
  1), by row granularity and stream count, vs one plain device copy of the same bytes; GB/s.

Usage: ``python tools/copy_bench.py [--out DIR]`` (CUDA if present; on the CPU the commit and
agreement parts run and the pull part is skipped). Prints Markdown, writes ``copy_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import numpy as np
import torch
import torch.distributed as dist

from ipc import handles
from mp_eplb.demo.launch import RankEnv, spawn_ranks
from mp_eplb.transfer.cuda_ipc import all_gather_bytes
from mp_eplb.transfer.execute import _copy_rows

__all__ = ["bench_agreement", "bench_commit", "bench_pull", "main"]


def _median_ms(seconds: list[float]) -> float:
    return 1e3 * statistics.median(seconds)


def _p99_ms(seconds: list[float]) -> float:
    return 1e3 * float(np.percentile(seconds, 99))


def _time_host_and_gpu(fn: Callable[[], None], device: torch.device,
                       repeats: int) -> tuple[list[float], list[float]]:
    """Per call: host seconds of ``fn`` (no sync inside) and GPU seconds between events
    (``[]`` on the CPU, where the host time is the copy)."""
    host, gpu = [], []
    for _ in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t0)
        if device.type == "cuda":
            end.record()
            end.synchronize()
            gpu.append(start.elapsed_time(end) / 1e3)
    return host[2:], gpu[2:]


def bench_commit(device: torch.device, *, slots: int, hidden: int, inter: int, rows: int,
                 dtype: torch.dtype, layers: int, experts: int, repeats: int) -> dict:
    """Per-layer commit cost of each way to copy the rows (module docstring); ms."""
    weights = [torch.zeros((slots, 2 * inter, hidden), dtype=dtype, device=device),
               torch.zeros((slots, hidden, inter), dtype=dtype, device=device)]
    buffers = [torch.ones_like(w) for w in weights]
    changed = sorted(random.Random(0).sample(range(slots), rows))

    def per_row() -> None:
        for row in changed:
            for w, b in zip(weights, buffers):
                w[row].copy_(b[row], non_blocking=True)

    def foreach() -> None:
        torch._foreach_copy_([w[row] for w in weights for row in changed],
                             [b[row] for b in buffers for row in changed], non_blocking=True)

    def merged_runs() -> None:
        _copy_rows(weights, buffers, changed, changed)

    widths = [slots, experts * (slots + 1), experts, slots, slots]  # the five maps of a layer
    maps = [torch.zeros((layers, n), dtype=torch.int64, device=device) for n in widths]
    flat = torch.zeros((layers, sum(widths)), dtype=torch.int64, device=device)
    pin = device.type == "cuda"
    map_rows = [torch.ones(n, dtype=torch.int64, pin_memory=pin) for n in widths]
    flat_row = torch.ones(sum(widths), dtype=torch.int64, pin_memory=pin)

    def five_maps() -> None:
        for target, row in zip(maps, map_rows):
            target[0].copy_(row, non_blocking=True)

    def one_map() -> None:
        flat[0].copy_(flat_row, non_blocking=True)

    def plain() -> None:
        for w, b in zip(weights, buffers):
            w[:rows].copy_(b[:rows], non_blocking=True)

    out: dict = {"rows": rows, "bytes": rows * sum(w[0].numel() * w.element_size() for w in weights)}
    for name, fn in (("per_row_loop", per_row), ("foreach", foreach),
                     ("merged_runs", merged_runs), ("maps_five_copies", five_maps),
                     ("maps_one_copy", one_map), ("plain_copy", plain)):
        host, gpu = _time_host_and_gpu(fn, device, repeats)
        out[name] = {"host_ms": _median_ms(host), "gpu_ms": _median_ms(gpu) if gpu else None}
    return out


def _agreement_rank(env: RankEnv, spec: dict) -> dict:
    rng = random.Random(env.rank)
    status = torch.tensor([3, 1, 1], dtype=torch.int64)
    result = {}
    for name in ("blocking", "pipelined"):
        pending: tuple[dist.Work, torch.Tensor] | None = None
        host = []
        dist.barrier(group=env.cpu_group)
        for _ in range(spec["steps"]):
            time.sleep(spec["step_ms"] / 1e3 + rng.random() / 1e3)  # the step's GPU wait, skewed
            t0 = time.perf_counter()
            if name == "blocking":
                dist.all_reduce(status.clone(), op=dist.ReduceOp.MIN, group=env.cpu_group)
            else:
                if pending is not None:
                    pending[0].wait()
                mine = status.clone()
                pending = (dist.all_reduce(mine, op=dist.ReduceOp.MIN, group=env.cpu_group,
                                           async_op=True), mine)
            host.append(time.perf_counter() - t0)
        if pending is not None:
            pending[0].wait()
        result[name] = {"p50_ms": _median_ms(host), "p99_ms": _p99_ms(host)}
    return result


def bench_agreement(*, steps: int, step_ms: float) -> dict:
    """Host ms per step of the commit agreement, blocking vs pipelined, on 2 gloo ranks
    (rank 0's numbers; both ranks are in the JSON)."""
    results = spawn_ranks(_agreement_rank, {"steps": steps, "step_ms": step_ms}, world_size=2,
                          device="cpu", timeout_s=300.0)
    return {"step_ms": step_ms, "steps": steps, "rank0": results[0], "rank1": results[1]}


def _pull_rank(env: RankEnv, spec: dict) -> dict:
    owner_gpu, puller_gpu = 0, spec["puller_gpu"]
    nbytes, result = spec["mib"] << 20, {}
    if env.rank == 0:
        src = handles.shared_empty((nbytes,), torch.uint8, torch.device("cuda", owner_gpu))
        src.fill_(7)
        all_gather_bytes(msgpack.packb(handles.export_tensor(src), use_bin_type=True),
                         env.cpu_group)
        dist.barrier(group=env.cpu_group)  # the puller has finished and closed its mapping
        handles.release(src)
        return result
    device = torch.device("cuda", puller_gpu)
    torch.cuda.set_device(device)
    handle = msgpack.unpackb(all_gather_bytes(b"", env.cpu_group)[0], raw=False)
    src = handles.open_tensor(handle, {"dtype": "uint8"},
                              map_on=puller_gpu if puller_gpu != owner_gpu else None)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    local = torch.empty_like(dst)
    streams = [torch.cuda.Stream(device) for _ in range(max(spec["streams"]))]
    current = torch.cuda.current_stream(device)

    def pull(row_bytes: int, count: int) -> Callable[[], None]:
        def run() -> None:
            for stream in streams[:count]:
                stream.wait_stream(current)
            for i, offset in enumerate(range(0, nbytes, row_bytes)):
                with torch.cuda.stream(streams[i % count]):
                    dst[offset:offset + row_bytes].copy_(src[offset:offset + row_bytes],
                                                        non_blocking=True)
            for stream in streams[:count]:
                current.wait_stream(stream)
        return run

    def gbps(fn: Callable[[], None]) -> float:
        _, gpu = _time_host_and_gpu(fn, device, spec["repeats"])
        return nbytes / min(gpu) / 1e9

    result["plain_copy_gbps"] = gbps(lambda: local.copy_(dst, non_blocking=True))
    result["pulls"] = [{"row_mib": row_mib, "streams": count,
                        "gbps": gbps(pull(row_mib << 20, count))}
                       for row_mib in spec["row_mib"] for count in spec["streams"]
                       if (row_mib << 20) <= nbytes]
    if int(dst[0]) != 7 or int(dst[-1]) != 7:
        raise RuntimeError("the pull read the wrong data")
    del src
    handles.close(handle)
    dist.barrier(group=env.cpu_group)
    return result


def bench_pull(*, mib: int, row_mib: list[int], streams: list[int], repeats: int) -> dict:
    """cuda_ipc pull GB/s by row size and stream count vs a plain copy (module docstring)."""
    puller = 1 if torch.cuda.device_count() > 1 else 0
    spec = {"mib": mib, "row_mib": row_mib, "streams": streams, "repeats": repeats,
            "puller_gpu": puller}
    results = spawn_ranks(_pull_rank, spec, world_size=2, device="cpu", timeout_s=300.0)
    return {"owner_gpu": 0, "puller_gpu": puller, "mib": mib, **results[1]}


def _markdown(data: dict) -> str:
    c, a = data["commit"], data["agreement"]
    lines = [f"# copy_bench on {data['device']}", "",
             f"## Commit of one layer ({c['rows']} changed rows, {c['bytes'] / 2**20:.1f} MiB)", "",
             "| what | host ms | GPU ms |", "|---|---|---|"]
    for key in ("per_row_loop", "foreach", "merged_runs", "plain_copy", "maps_five_copies", "maps_one_copy"):
        gpu = c[key]["gpu_ms"]
        lines.append(f"| {key} | {c[key]['host_ms']:.3f} | {'–' if gpu is None else f'{gpu:.3f}'} |")
    lines += ["", f"## Agreement per step (2 gloo ranks, {a['step_ms']:g} ms steps + up to 1 ms "
                  f"skew, {a['steps']} steps; rank 0)", "", "| agreement | host ms p50 | host ms p99 |",
              "|---|---|---|"]
    for key in ("blocking", "pipelined"):
        lines.append(f"| {key} | {a['rank0'][key]['p50_ms']:.3f} | {a['rank0'][key]['p99_ms']:.3f} |")
    p = data.get("pull")
    if p:
        lines += ["", f"## cuda_ipc pull of {p['mib']} MiB (GPU {p['owner_gpu']} -> GPU "
                      f"{p['puller_gpu']}) vs plain copy {p['plain_copy_gbps']:.1f} GB/s", "",
                  "| row MiB | streams | GB/s | % of plain copy |", "|---|---|---|---|"]
        for row in p["pulls"]:
            lines.append(f"| {row['row_mib']} | {row['streams']} | {row['gbps']:.1f} | "
                         f"{100 * row['gbps'] / p['plain_copy_gbps']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("copy-bench-results"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rows", type=int, default=5, help="changed rows of the layer (default 5)")
    parser.add_argument("--steps", type=int, default=300, help="agreement steps (default 300)")
    parser.add_argument("--step-ms", type=float, default=5.0, help="simulated step (default 5)")
    parser.add_argument("--pull-mib", type=int, default=1024, help="bytes pulled (default 1024)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    shape = (dict(slots=36, hidden=7168, inter=2048, dtype=torch.bfloat16) if cuda else
             dict(slots=20, hidden=128, inter=256, dtype=torch.float32))
    data = {"device": torch.cuda.get_device_name(0) if cuda else "CPU",
            "commit": bench_commit(device, rows=args.rows, layers=6, experts=64,
                                   repeats=args.repeats, **shape),
            "agreement": bench_agreement(steps=args.steps, step_ms=args.step_ms)}
    if cuda:
        data["pull"] = bench_pull(mib=args.pull_mib, row_mib=[16, 84, 256, args.pull_mib],
                                  streams=[1, 2, 4], repeats=args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "copy_bench.json").write_text(json.dumps(data, indent=1))
    text = _markdown(data)
    (args.out / "copy_bench.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
