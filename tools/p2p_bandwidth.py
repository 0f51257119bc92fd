"""Measure P2P bandwidth of one MoE layer's rearrangement between 2 ranks.

DeepSeek-V3-like experts by default: hidden 7168, intermediate 2048, bf16, weights
``gate_up [n, 2 * 2048, 7168]`` and ``down [n, 7168, 2048]`` (84 MiB per expert). The
two ranks swap all their ``n`` experts, so each rank sends and receives ``n`` experts per
iteration; the direction flips every iteration. Reported per rank and per direction:

- ``move_to_buffer``: the P2P exchange into the staging buffers (GB/s = 1e9 B/s);
- ``rearrange``: ``rearrange_expert_weights_inplace`` of the layer (exchange plus the
  buffer -> weights copy, buffers allocated per call as the function does).

Run (2 GPUs, NCCL):
    torchrun --standalone --nproc-per-node 2 tools/p2p_bandwidth.py
CPU smoke run (gloo, tiny shapes):
    torchrun --standalone --nproc-per-node 2 tools/p2p_bandwidth.py --device cpu \\
        --hidden 64 --intermediate 32 --experts-per-rank 2 --iters 2
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist

from mp_eplb.transfer.communicators import make_communicator
from mp_eplb.transfer import move_to_buffer, rearrange_expert_weights_inplace

__all__ = ["main"]

logger = logging.getLogger(__name__)


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts-per-rank", type=int, default=9, help="local expert slots n")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--dtype", choices=("bfloat16", "uint8"), default="bfloat16",
                   help="uint8 stands for fp8 storage")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--communicator", choices=("nccl", "gloo"), default=None,
                   help="default: nccl on cuda, gloo on cpu")
    p.add_argument("--max-ops-per-batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    return p.parse_args()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def main() -> None:
    args = _parse()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != 2:
        raise SystemExit(f"run with exactly 2 ranks (got {world}): --nproc-per-node 2")
    name = args.communicator or ("nccl" if device.type == "cuda" else "gloo")
    dtype = getattr(torch, args.dtype)
    n, h, i = args.experts_per_rank, args.hidden, args.intermediate
    weights = [torch.zeros(n, 2 * i, h, dtype=dtype, device=device),
               torch.zeros(n, h, i, dtype=dtype, device=device)]
    buffers = [torch.empty_like(w) for w in weights]
    bytes_per_rank = sum(w.numel() * w.element_size() for w in weights)
    maps = [np.arange(2 * n, dtype=np.int64), np.roll(np.arange(2 * n, dtype=np.int64), n)]
    comm = make_communicator(name, dist.group.WORLD, max_ops_per_batch=args.max_ops_per_batch)

    timings: dict[str, list[float]] = {"move_to_buffer": [], "rearrange": []}
    for step in range(args.warmup + args.iters):
        old, new = maps[step % 2], maps[(step + 1) % 2]
        _sync(device)
        start = time.perf_counter()
        move_to_buffer(n, old, new, weights, buffers, None, dist.group.WORLD, communicator=comm)
        _sync(device)
        moved = time.perf_counter()
        rearrange_expert_weights_inplace(torch.from_numpy(old[None]), torch.from_numpy(new[None]),
                                         [weights], dist.group.WORLD, communicator=comm)
        _sync(device)
        done = time.perf_counter()
        if step >= args.warmup:
            timings["move_to_buffer"].append(moved - start)
            timings["rearrange"].append(done - moved)
    if rank == 0:
        logger.info("%s on %s: %d experts/rank, %.1f MiB/rank per direction, %s, "
                    "max_ops_per_batch=%d", name, device.type, n, bytes_per_rank / 2**20,
                    args.dtype, args.max_ops_per_batch)
        for label, values in timings.items():
            med, best = statistics.median(values), min(values)
            logger.info("%-15s median %8.2f ms  %7.1f GB/s   best %8.2f ms  %7.1f GB/s", label,
                        med * 1e3, bytes_per_rank / med / 1e9, best * 1e3,
                        bytes_per_rank / best / 1e9)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
