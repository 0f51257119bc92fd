"""``mp-eplb bench``: the demo engine in every mode x communicator the device allows, side by
side in one run, plus the microbenchmarks they are compared with; writes JSON, Markdown, PNG.

Each configuration runs on a fresh set of rank processes, one after the other, with the
same model, workload and schedule. The workload drifts by ``--drift-swaps`` popularity swaps
per layer every rebalance interval, half an interval before each rebalance starts, over
batches that repeat every ``--token-period`` steps; the policy reads the last half interval
(one drift epoch, a whole number of batch periods). So every rebalance after the first moves
what the drift changed (about 4-5 experts of 84 MiB per rank and layer with the CUDA preset;
``--stress`` redraws the hot set whole instead), and a worker reading the load window a few
steps late still sees the same load.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mp_eplb.argtypes import device, positive_float, positive_int
from mp_eplb.bench.metrics import (BenchConfig, add_relative, combine_runs, config_metrics, goals,
                                   measured)
from mp_eplb.bench.micro import MicroSpec, run_micro
from mp_eplb.bench.output import markdown, plot
from mp_eplb.demo.engine import RankResult, rebalance_report
from mp_eplb.demo.launch import (DemoFailure, add_engine_arguments, add_model_arguments,
                                 add_schedule_arguments, config_from_args, run_ranks)
from mp_eplb.demo.model import ConfigError, MoEConfig

__all__ = ["CONFIGS", "PRESETS", "Preset", "add_bench_arguments", "config_list",
           "resolve_options", "run_bench"]

logger = logging.getLogger(__name__)

#: Configurations per device, in the order they run (sync first: others are relative to it).
CONFIGS: dict[str, list[BenchConfig]] = {
    "cpu": [BenchConfig("none", "none", "auto", None),
            BenchConfig("sync", "sync", "auto", "gloo"),
            BenchConfig("thread-gloo", "thread", "gloo", "gloo"),
            BenchConfig("process-gloo", "process", "gloo", "gloo")],
    "cuda": [BenchConfig("none", "none", "auto", None),
             BenchConfig("sync", "sync", "auto", "nccl"),
             # Thread mode moves weights with gloo (NCCL beside the engine's NCCL deadlocks).
             BenchConfig("thread-gloo", "thread", "gloo", "gloo"),
             BenchConfig("process-nccl", "process", "nccl", "nccl"),
             BenchConfig("process-cuda_ipc", "process", "cuda_ipc", "cuda_ipc")],
}
#: The configuration the goals are checked on (the product's default).
PRODUCT = {"cpu": "process-gloo", "cuda": "process-cuda_ipc"}
_LINKS = {"cpu": ["gloo"], "cuda": ["gloo", "nccl", "cuda_ipc"]}


@dataclass(frozen=True)
class Preset:
    """Defaults of one device: model options (demo option names), schedule and step counts."""

    model: dict
    rebalance_interval: int
    drift_swaps: int
    token_period: int
    steps: int
    quick_steps: int


PRESETS: dict[str, Preset] = {
    # Tiny: a CPU step is a few ms of real compute; the numbers show the mechanics only.
    "cpu": Preset(model=dict(layers=4, experts=16, redundant=4, hidden=128, inter=256, top_k=2,
                             tokens=32, zipf=1.2, dtype="float32"),
                  rebalance_interval=20, drift_swaps=2, token_period=5, steps=250,
                  quick_steps=110),
    # DeepSeek-V3 scaled: 84 MiB bf16 experts, 36 slots per rank and layer at 2 ranks, top-8
    # routing of 512 tokens per rank (GEMM-bound steps of several ms); 8 swaps per drift move
    # about 4-5 experts (~378 MiB) per rank and layer at each rebalance.
    "cuda": Preset(model=dict(layers=6, experts=64, redundant=8, hidden=7168, inter=2048,
                              top_k=8, tokens=512, zipf=1.2, dtype="bfloat16"),
                   rebalance_interval=40, drift_swaps=8, token_period=5, steps=420,
                   quick_steps=220),
}
_MODEL_DESTS = {"layers", "experts", "redundant", "hidden", "inter", "top_k", "tokens", "zipf",
                "dtype"}


def config_list(text: str) -> list[tuple[str, int | None]]:
    """``--configs`` as ``[(name, steps or None)]``, checked at parse time: every entry is
    ``NAME[:STEPS]`` with a configuration name of some device and a positive STEPS (whether
    the name suits ``--device`` is checked once the options are complete)."""
    names = list(dict.fromkeys(c.name for configs in CONFIGS.values() for c in configs))
    chosen = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, colon, steps = item.partition(":")
        if name not in names:
            raise argparse.ArgumentTypeError(f"{name!r} is not a configuration; choose from "
                                             f"{', '.join(names)}")
        if colon and not (steps.isdigit() and int(steps) >= 1):
            raise argparse.ArgumentTypeError(f"{item!r}: STEPS must be a positive integer, got "
                                             f"{steps!r}")
        chosen.append((name, int(steps) if colon else None))
    return chosen


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``mp-eplb bench``'s options to ``parser``. Unset options come from the device's
    preset (:data:`PRESETS`)."""
    run = parser.add_argument_group("bench")
    run.add_argument("--device", type=device, choices=("cpu", "cuda"), default="cpu",
                     help="cpu (gloo) or cuda (one GPU per rank)")
    run.add_argument("--ranks", type=positive_int, default=2, help="rank processes (default 2; the "
                     "microbenchmarks always use 2)")
    run.add_argument("--steps", type=positive_int, default=None,
                     help="decode steps per configuration (default: preset)")
    run.add_argument("--configs", type=config_list, default="",
                     help="comma-separated NAME[:STEPS] to run (default: all of the device: "
                          + "; ".join(f"{d}: {','.join(c.name for c in cs)}"
                                      for d, cs in CONFIGS.items()) + ")")
    run.add_argument("--quick", action="store_true",
                     help="fewer steps (CPU: about a minute on 2 cores)")
    run.add_argument("--stress", action="store_true",
                     help="heavier moves: redraw each layer's hot set whole at every drift "
                          "(--drift-swaps 0) instead of a few swaps")
    run.add_argument("--out", type=Path, default=Path("bench-results"),
                     help="directory for bench.json, bench.md and bench.png (default %(default)s)")
    run.add_argument("--seed", type=int, default=0, help="seed of weights, tokens and routing")
    run.add_argument("--repeats", type=positive_int, default=10, help="microbenchmark repeats (default 10)")
    run.add_argument("--runs", type=positive_int, default=None,
                     help="runs of each configuration, interleaved (all configurations once, "
                          "then again); medians and spread are reported (default: 3 on cuda, "
                          "1 on cpu)")
    run.add_argument("--no-micro", action="store_true", help="skip the microbenchmarks")
    run.add_argument("--rank-logs", action="store_true",
                     help="show rank 0's start line and progress for each run (the ranks' "
                          "logs: -v or MP_EPLB_LOG)")
    run.add_argument("--timeout", type=positive_float, default=300.0,
                     help="seconds one configuration may take (default 300)")
    run.add_argument("--collective-timeout", type=positive_float, default=120.0,
                     help="seconds one collective of the engine group may wait (default 120)")
    add_schedule_arguments(parser, rebalance_interval=None)
    add_model_arguments(parser, None)
    add_engine_arguments(parser)


def resolve_options(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of ``args`` with every unset option taken from the device's preset, in the
    names :func:`mp_eplb.demo.launch.run_ranks` reads. ``ConfigError`` names a bad option."""
    preset = PRESETS[args.device]
    opts = argparse.Namespace(**vars(args))
    for dest, value in preset.model.items():
        if getattr(opts, dest, None) is None:
            setattr(opts, dest, value)
    if opts.rebalance_interval is None:
        opts.rebalance_interval = preset.rebalance_interval
    if opts.drift_interval is None:
        opts.drift_interval = opts.rebalance_interval
    if opts.drift_swaps is None:
        opts.drift_swaps = 0 if args.stress else preset.drift_swaps
    if opts.drift_offset is None:
        opts.drift_offset = opts.rebalance_interval // 2
    if not opts.window:
        opts.window = max(1, opts.rebalance_interval // 2)
    if opts.token_period is None:
        opts.token_period = preset.token_period
    if opts.steps is None:
        opts.steps = preset.quick_steps if args.quick else preset.steps
    if opts.runs is None:
        opts.runs = 3 if args.device == "cuda" else 1
    window = opts.window
    if opts.token_period and window % opts.token_period:
        raise ConfigError(f"--window {window} must be a multiple of --token-period "
                          f"{opts.token_period} (or pass --token-period 0)")
    if opts.steps < 2 * opts.rebalance_interval + 2:
        raise ConfigError(f"--steps {opts.steps} leaves no measured rebalance: use at least "
                          f"{2 * opts.rebalance_interval + 2} (two rebalance intervals)")
    opts.verify, opts.quiet, opts.communicator, opts.mode = False, not args.rank_logs, "auto", None
    opts.progress_every = max(1, opts.steps // 5)
    config_from_args(opts)
    return opts


def _selected(opts: argparse.Namespace) -> list[tuple[BenchConfig, int]]:
    known = {c.name: c for c in CONFIGS[opts.device]}
    if not opts.configs:
        return [(c, opts.steps) for c in known.values()]
    chosen = []
    for name, steps in opts.configs:
        if name not in known:
            raise ConfigError(f"--configs: {name!r} is not a {opts.device} configuration; "
                              f"choose from {', '.join(known)}")
        chosen.append((known[name], steps or opts.steps))
    order = list(known)
    return sorted(chosen, key=lambda item: order.index(item[0].name))


def _run_config(opts: argparse.Namespace, config: BenchConfig, steps: int) -> list[RankResult]:
    ns = argparse.Namespace(**vars(opts))
    ns.mode, ns.communicator, ns.steps, ns.timeout = (config.mode, config.communicator, steps,
                                                      opts.timeout)
    ns.progress_every = max(1, steps // 5)
    return run_ranks(ns)


def _micro_spec(opts: argparse.Namespace, cfg: MoEConfig, runs: dict[str, list[RankResult]],
                reports: dict) -> MicroSpec:
    """Replay the median recorded layer move (by rows rank 0 changes; a synthetic swap of 4
    experts between the 2 ranks when no run moved anything) at 2 ranks."""
    slots = cfg.num_physical // 2
    moves = []
    for name, results in runs.items():
        if opts.ranks != 2:
            break
        first = min(results, key=lambda r: r.rank)
        for r in measured(reports[name]):
            before = np.asarray(first.placement_before[r.index])
            after = np.asarray(first.placement_after[r.index])
            for layer in np.nonzero((before != after).any(axis=1))[0]:
                changed = int((before[layer, :slots] != after[layer, :slots]).sum())
                if changed:
                    moves.append((changed, before[layer].tolist(), after[layer].tolist()))
    if moves:
        moves.sort(key=lambda m: m[0])
        rows, old, new = moves[len(moves) // 2]
    else:
        rows = min(4, slots)
        old = (np.arange(cfg.num_physical) % cfg.num_experts).tolist()
        new = list(old)
        for i in range(rows):
            new[i], new[slots + i] = old[slots + i], old[i]
    shapes = [[slots, 2 * cfg.inter, cfg.hidden], [slots, cfg.hidden, cfg.inter]]
    return MicroSpec(device=opts.device, dtype=opts.dtype, weight_shapes=shapes, old_map=old,
                     new_map=new, link_bytes=rows * cfg.expert_bytes(),
                     links=_LINKS[opts.device], repeats=opts.repeats)


def _device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return "CPU"


def _json_safe(value: object) -> object:
    """NaN/inf become None, numpy scalars plain numbers (strict JSON)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_bench(args: argparse.Namespace) -> int:
    """``mp-eplb bench``: run, write ``bench.json``, ``bench.md``, ``bench.png`` under
    ``args.out``, print the tables; 0 when every configuration and microbenchmark ran."""
    try:
        opts = resolve_options(args)
        selected = _selected(opts)
        gpus = opts.ranks if opts.no_micro else max(opts.ranks, 2)
        if opts.device == "cuda" and torch.cuda.device_count() < gpus:
            raise ConfigError(f"--device cuda needs {gpus} GPUs (the microbenchmarks 2; "
                              f"--no-micro skips them), {torch.cuda.device_count()} visible")
    except (ConfigError, ValueError) as exc:
        print(f"mp-eplb bench: {exc}", file=sys.stderr)
        return 1
    cfg = config_from_args(opts)
    window = opts.window
    started = time.monotonic()
    runs: dict[str, list[RankResult]] = {}
    reports: dict = {}
    repeated: dict[str, list[dict]] = {config.name: [] for config, _ in selected}
    total = len(selected) * opts.runs
    for i, (run, (config, steps)) in enumerate(
            ((run, item) for run in range(opts.runs) for item in selected), 1):
        print(f"[{i}/{total}] {config.name}: {steps} steps on {opts.ranks} ranks"
              + (f", run {run + 1} of {opts.runs}" if opts.runs > 1 else "")
              + f" ({time.monotonic() - started:.0f} s so far)", flush=True)
        t0 = time.monotonic()
        try:
            results = _run_config(opts, config, steps)
        except (DemoFailure, ConfigError) as exc:
            print(f"    failed: {exc}", flush=True)
            repeated[config.name].append({"name": config.name, "mode": config.mode,
                                          "error": str(exc)})
            continue
        if config.name not in runs:
            runs[config.name] = results
            reports[config.name] = rebalance_report(results, expert_bytes=cfg.expert_bytes(),
                                                    window=window)
        metrics = config_metrics(config, results, expert_bytes=cfg.expert_bytes(),
                                 window=window, num_redundant=cfg.num_redundant)
        repeated[config.name].append(metrics)
        steady = metrics["steady_ms"] or {"p50": math.nan, "p99": math.nan}
        print(f"    {time.monotonic() - t0:.0f} s: steady p50/p99 {steady['p50']:.2f}/"
              f"{steady['p99']:.2f} ms, {metrics['rebalances_completed']} rebalances completed "
              f"({metrics['rebalances_measured']} measured)", flush=True)
    configs = [combine_runs(repeated[config.name]) for config, _ in selected]
    micro, micro_error = None, None
    if not opts.no_micro:
        spec = _micro_spec(opts, cfg, runs, reports)
        print(f"[micro] links {', '.join(spec.links)} at {spec.link_bytes / 2**20:.1f} MiB, "
              "move_from_buffer vs plain copy", flush=True)
        try:
            micro = run_micro(spec, timeout_s=opts.timeout,
                              collective_timeout_s=opts.collective_timeout)
        except DemoFailure as exc:
            micro_error = str(exc)
            print(f"    failed: {exc}", flush=True)
    add_relative(configs, micro)
    shape = (f"{cfg.num_layers} layers x ({cfg.num_experts} experts + {cfg.num_redundant} "
             f"redundant), hidden {cfg.hidden}, inter {cfg.inter}, {opts.dtype} "
             f"({cfg.expert_bytes() / 2**20:.1f} MiB per expert), top-{cfg.top_k}, "
             f"{cfg.tokens_per_rank} tokens per rank; rebalance every {opts.rebalance_interval} "
             f"steps (window {window}), drift every {opts.drift_interval} steps (offset "
             f"{opts.drift_offset}) by "
             f"{opts.drift_swaps or 'a whole redraw'} swaps, batches repeating every "
             f"{opts.token_period or 'never'} steps, {opts.layers_per_step} layer(s) per step; "
             f"engine {opts.engine}" + (f" (capacity factor {opts.capacity_factor:g}, "
                                        f"{'CUDA graph' if opts.cuda_graph else 'eager'})"
                                        if opts.engine == "graph" else "")
             + f"; {opts.runs} run(s) of each configuration, interleaved")
    data = {
        "meta": {"command": shlex.join(["mp-eplb", *sys.argv[1:]])
                 if Path(sys.argv[0]).name in ("mp-eplb", "__main__.py") else None,
                 "device": opts.device, "device_name": _device_name(opts.device),
                 "ranks": opts.ranks, "shape": shape, "torch": torch.__version__,
                 "date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "wall_s": time.monotonic() - started,
                 "options": {k: (str(v) if isinstance(v, Path) else v)
                             for k, v in vars(opts).items() if not callable(v)},
                 "model": {k: (str(v) if isinstance(v, torch.dtype) else v)
                           for k, v in dataclasses.asdict(cfg).items()}},
        "configs": configs,
        "micro": micro, "micro_error": micro_error,
        "product": PRODUCT[opts.device],
        "goals": goals(configs, micro, PRODUCT[opts.device]),
    }
    data["meta"]["command"] = data["meta"]["command"] or "mp-eplb bench (called from Python)"
    opts.out.mkdir(parents=True, exist_ok=True)
    data = _json_safe(data)
    (opts.out / "bench.json").write_text(json.dumps(data, indent=1))
    text = markdown(data)
    (opts.out / "bench.md").write_text(text)
    wrote_png = plot(data, opts.out / "bench.png")
    print(text)
    print(f"wrote {opts.out / 'bench.json'}, {opts.out / 'bench.md'}"
          + (f", {opts.out / 'bench.png'}" if wrote_png else " (no plot)")
          + f" in {time.monotonic() - started:.0f} s")
    failed = micro_error is not None or any("error" in c for c in configs)
    return 1 if failed else 0
