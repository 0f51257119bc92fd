"""Time ``mp_eplb.rebalance_experts`` and measure what placement awareness saves.

Prints, for one shape (default DeepSeek-V3: 58 layers, 256 experts, 288 replicas, 8
groups, 4 nodes, 32 ranks), on one CPU thread:
- the median time of the policy without and with ``old_phy2log``;
- over drifting Zipf-skewed load windows, per rebalance: slots that change expert, and
  of those the slots whose expert the rank did not hold before (they must be received
  from another rank; GiB at ``--expert-mib`` per expert), with and without awareness;
- balancedness (mean / max tokens per rank) both ways (identical by construction).

Usage: python tools/policy_timing.py [--groups 1 for the global policy] [--help]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from mp_eplb.policy import balancedness, rebalance_experts

__all__ = ["drifting_zipf_loads", "main", "moved_slots"]


def drifting_zipf_loads(layers: int, experts: int, windows: int, *, exponent: float, drift: float,
                        tokens: int, seed: int) -> list[np.ndarray]:
    """Token counts [layers, experts] per window: Zipf popularity over a random expert order
    per layer, whose log-popularity takes a Gaussian random-walk step of ``drift`` per window."""
    rng = np.random.default_rng(seed)
    log_pop = -exponent * np.log(np.argsort(rng.random((layers, experts)), 1) + 1.0)
    loads = []
    for _ in range(windows):
        log_pop = log_pop + rng.normal(0.0, drift, log_pop.shape)
        p = np.exp(log_pop - log_pop.max(1, keepdims=True))
        loads.append(np.stack([rng.multinomial(tokens, row / row.sum()) for row in p]).astype(np.float64))
    return loads


def moved_slots(old: torch.Tensor, new: torch.Tensor, num_ranks: int) -> tuple[int, int]:
    """(slots whose expert changes, of those: slots whose new expert the rank did not hold)."""
    old_np, new_np = old.numpy(), new.numpy()
    layers, slots = old_np.shape
    changed = old_np != new_np
    rank_old = old_np.reshape(layers, num_ranks, -1)
    rank_new = new_np.reshape(layers, num_ranks, -1)
    held = (rank_new[..., :, None] == rank_old[..., None, :]).any(-1).reshape(layers, slots)
    return int(changed.sum()), int((changed & ~held).sum())


def _median_ms(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=58)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--replicas", type=int, default=288)
    parser.add_argument("--groups", type=int, default=8, help="groups %% nodes != 0 selects the global policy")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--ranks", type=int, default=32)
    parser.add_argument("--runs", type=int, default=9, help="timed runs per mode (median reported)")
    parser.add_argument("--windows", type=int, default=10, help="rebalances over drifting loads")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of expert popularity")
    parser.add_argument("--drift", type=float, default=0.3, help="log-popularity random-walk step per window")
    parser.add_argument("--tokens", type=int, default=1_000_000, help="tokens routed per layer per window")
    parser.add_argument("--expert-mib", type=float, default=42.0, help="MiB per expert (DeepSeek-V3 fp8: 42)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    shape = (args.replicas, args.groups, args.nodes, args.ranks)
    loads = drifting_zipf_loads(args.layers, args.experts, args.windows + 1, exponent=args.zipf,
                                drift=args.drift, tokens=args.tokens, seed=args.seed)
    policy = "hierarchical" if args.groups % args.nodes == 0 else "global"
    print(f"shape: {args.layers} layers, {args.experts} experts, {args.replicas} replicas, {args.groups} groups, "
          f"{args.nodes} nodes, {args.ranks} ranks ({policy} policy); 1 torch thread, median of {args.runs}")

    first = rebalance_experts(loads[0], *shape)[0]
    plain_ms = _median_ms(lambda: rebalance_experts(loads[1], *shape), args.runs)
    aware_ms = _median_ms(lambda: rebalance_experts(loads[1], *shape, first), args.runs)
    print(f"rebalance_experts: {plain_ms:.1f} ms without old_phy2log, {aware_ms:.1f} ms with it")

    gib = args.expert_mib / 1024
    total = args.layers * args.replicas
    print(f"\n{'window':>6} | {'changed plain':>13} {'aware':>6} | {'received plain':>14} {'aware':>6} "
          f"| {'GiB plain':>9} {'aware':>6} | {'balancedness plain':>18} {'aware':>6}")
    plain_prev = aware_prev = first
    sums = np.zeros(4)
    for window, w in enumerate(loads[1:], 1):
        plain = rebalance_experts(w, *shape)[0]
        aware = rebalance_experts(w, *shape, aware_prev)[0]
        moves = moved_slots(plain_prev, plain, args.ranks) + moved_slots(aware_prev, aware, args.ranks)
        sums += moves
        bal_plain = balancedness(w, plain, args.ranks).mean()
        bal_aware = balancedness(w, aware, args.ranks).mean()
        print(f"{window:>6} | {moves[0]:>13} {moves[2]:>6} | {moves[1]:>14} {moves[3]:>6} "
              f"| {moves[1] * gib:>9.1f} {moves[3] * gib:>6.1f} | {bal_plain:>18.4f} {bal_aware:>6.4f}")
        plain_prev, aware_prev = plain, aware
    n = args.windows
    print(f"\nper rebalance (mean of {n}, of {total} slots): changed {sums[0] / n:.0f} plain vs "
          f"{sums[2] / n:.0f} aware ({100 * sums[2] / max(sums[0], 1):.0f}%); received from other ranks "
          f"{sums[1] / n:.0f} vs {sums[3] / n:.0f} = {sums[1] / n * gib:.1f} vs {sums[3] / n * gib:.1f} GiB "
          f"over all ranks at {args.expert_mib:g} MiB per expert")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
