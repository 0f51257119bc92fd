"""Time ``mp_eplb.rebalance_experts`` and measure what placement awareness saves.

For the DeepSeek-V3 shape (58 layers, 256 experts, 288 replicas, 32 ranks) on one node
(1 group: global policy) and on 4 nodes (8 groups: hierarchical policy), one CPU thread,
over drifting Zipf-skewed load windows at a small and a large drift, it prints per
rebalance and per mode:
- the median time of one call (wall, and CPU time of this process);
- slots that change expert, and of those the slots whose expert the rank did not hold
  before (received from another rank; GiB at ``--expert-mib`` per expert);
- balancedness (mean / max tokens per rank): mean over layers and windows, and the worst
  layer's balancedness minus the unaware result's (>= 0, or float rounding of ~1e-16: never
  less balanced).

Modes: ``unaware`` (no ``old_phy2log``: DeepSeek), ``relabel`` (``keep_packs=True``:
DeepSeek's packs relabelled onto the old placement), ``repair`` (default placement-aware:
relabelled or locally repaired, whichever changes fewer slots). Each mode follows its own
chain of placements from the same first one.

Usage: python tools/policy_timing.py [--topology 1x1 8x4] [--drift 0.05 0.3] [--help]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import numpy as np
import torch

from mp_eplb.policy import balancedness, rebalance_experts

__all__ = ["drifting_zipf_loads", "main", "moved_slots"]

MODES = ("unaware", "relabel", "repair")


def drifting_zipf_loads(layers: int, experts: int, windows: int, *, exponent: float, drift: float,
                        tokens: int, seed: int) -> list[np.ndarray]:
    """Token counts [layers, experts] per window: Zipf popularity over a random expert order
    per layer, whose log-popularity takes a Gaussian random-walk step of ``drift`` per window
    (0.05: about 5% multiplicative change per expert per window)."""
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


def _timed(fn, *args, **kwargs) -> tuple[torch.Tensor, float, float]:
    """(phy2log from ``fn``, wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    phy2log = fn(*args, **kwargs)[0]
    return phy2log, time.perf_counter() - wall, time.process_time() - cpu


def _run_windows(loads: list[np.ndarray], shape: tuple[int, ...], num_ranks: int) -> dict[str, dict[str, list]]:
    """Per mode: per-window moves (changed, received), balancedness [layers], wall and CPU s."""
    first = rebalance_experts(loads[0], *shape)[0]
    prev = dict.fromkeys(MODES, first)
    stats: dict[str, dict[str, list]] = {m: {"moves": [], "balance": [], "wall": [], "cpu": []} for m in MODES}
    for w in loads[1:]:
        now = {}
        for mode in MODES:
            kwargs = {} if mode == "unaware" else {"old_phy2log": prev[mode], "keep_packs": mode == "relabel"}
            now[mode], wall, cpu = _timed(rebalance_experts, w, *shape, **kwargs)
            stats[mode]["moves"].append(moved_slots(prev[mode], now[mode], num_ranks))
            stats[mode]["balance"].append(balancedness(w, now[mode], num_ranks))
            stats[mode]["wall"].append(wall)
            stats[mode]["cpu"].append(cpu)
        prev = now
    return stats


def _report(stats: dict[str, dict[str, list]], total_slots: int, gib_per_expert: float) -> None:
    base = np.array(stats["unaware"]["moves"], dtype=np.float64).mean(0)
    base_balance = np.stack(stats["unaware"]["balance"])
    print(f"  {'mode':<8} | {'ms wall':>7} {'ms CPU':>6} | {'changed':>7} {'% unaware':>9} | {'received':>8} "
          f"{'GiB':>6} | {'balancedness':>12} {'worst margin':>12}")
    for mode in MODES:
        s = stats[mode]
        changed, received = np.array(s["moves"], dtype=np.float64).mean(0)
        balance = np.stack(s["balance"])
        margin = (balance - base_balance).min()
        print(f"  {mode:<8} | {1e3 * statistics.median(s['wall']):>7.1f} {1e3 * statistics.median(s['cpu']):>6.1f} "
              f"| {changed:>7.0f} {100 * changed / max(base[0], 1):>8.1f}% | {received:>8.0f} "
              f"{received * gib_per_expert:>6.1f} | {balance.mean():>12.4f} {margin:>+12.1e}")
    print(f"  (per rebalance, mean of {len(stats['unaware']['moves'])} windows, of {total_slots} slots; "
          f"times: median per call)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=58)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--replicas", type=int, default=288)
    parser.add_argument("--ranks", type=int, default=32)
    parser.add_argument("--topology", nargs="+", default=["1x1", "8x4"],
                        help="GROUPSxNODES per run; groups %% nodes != 0 selects the global policy")
    parser.add_argument("--drift", type=float, nargs="+", default=[0.05, 0.3],
                        help="log-popularity random-walk step per window, one run each")
    parser.add_argument("--windows", type=int, default=10, help="rebalances per run")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of expert popularity")
    parser.add_argument("--tokens", type=int, default=1_000_000, help="tokens routed per layer per window")
    parser.add_argument("--expert-mib", type=float, default=42.0, help="MiB per expert (DeepSeek-V3 fp8: 42)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    total = args.layers * args.replicas
    for topology in args.topology:
        groups, nodes = (int(x) for x in topology.split("x"))
        policy = "hierarchical" if groups % nodes == 0 and nodes > 1 else "global"
        for drift in args.drift:
            print(f"\n{args.layers} layers, {args.experts} experts, {args.replicas} replicas, {groups} groups, "
                  f"{nodes} nodes, {args.ranks} ranks ({policy} policy); drift {drift:g} per window, "
                  f"Zipf {args.zipf:g}, {args.tokens} tokens per layer per window; 1 torch thread")
            loads = drifting_zipf_loads(args.layers, args.experts, args.windows + 1, exponent=args.zipf,
                                        drift=drift, tokens=args.tokens, seed=args.seed)
            stats = _run_windows(loads, (args.replicas, groups, nodes, args.ranks), args.ranks)
            _report(stats, total, args.expert_mib / 1024)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
