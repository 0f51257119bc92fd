"""``mp-eplb demo``: start N rank processes that decode with the demo MoE engine.

The launcher spawns one process per rank; each joins the engine's own process group
(gloo on 127.0.0.1, or NCCL for ``--device cuda`` plus a gloo group for CPU-side agreement,
one GPU per rank), builds its model shard and balancer, runs the step loop and returns its
:class:`~mp_eplb.demo.engine.RankResult` as a plain dict (:mod:`mp_eplb.ranks` starts the
processes and gathers the returns). Any rank's failure, or the run passing ``--timeout``, makes
the run fail.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ipc import handles

from mp_eplb import logs
from mp_eplb.argtypes import device, non_negative_int, positive_float, positive_int
from mp_eplb.progress import Progress, announce
from mp_eplb.ranks import RankFailure, launch_ranks
from mp_eplb.config import COMMUNICATORS, EplbConfig
from mp_eplb.engine.state import EplbState
from mp_eplb.demo.engine import (Balancer, DriftingModel, RankResult, StaticBalancer,
                                 format_report, rebalance_report, run_engine, summarize)
from mp_eplb.demo.graph import GraphMoEModel, GraphOptions
from mp_eplb.demo.model import ConfigError, MoEConfig, MoEModel
from mp_eplb.demo.schedule import Schedule, default_schedule, settle_steps

__all__ = [
    "DemoFailure",
    "RankContext",
    "RankEnv",
    "RankTarget",
    "add_demo_arguments",
    "add_engine_arguments",
    "add_model_arguments",
    "add_schedule_arguments",
    "build_model",
    "config_from_args",
    "init_rank_groups",
    "join_rank_env",
    "make_balancer",
    "run_demo",
    "run_ranks",
    "spawn_ranks",
]

logger = logging.getLogger(__name__)

MODES = ("process", "thread", "sync", "none")
ENGINES = ("python", "graph")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


#: A rank failed, died or the run timed out (the launcher's error, under the demo's name).
DemoFailure = RankFailure


#: A rank's work for :func:`spawn_ranks`: ``target(env, arg)`` returns picklable data.
RankTarget = Callable[["RankEnv", Any], Any]


@dataclass(frozen=True)
class RankEnv:
    """One rank process's place in the engine group.

    ``ep_group`` carries the token all-to-all (NCCL on CUDA, gloo on CPU); ``cpu_group`` is
    gloo over the same ranks, for CPU-side agreement.
    """

    rank: int
    world_size: int
    device: torch.device
    ep_group: dist.ProcessGroup
    cpu_group: dist.ProcessGroup


@dataclass(frozen=True)
class RankContext:
    """What a rank has built before its balancer: passed to :func:`make_balancer`."""

    env: RankEnv
    model: MoEModel


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser`` (the ``demo`` subcommand's). The default steps,
    interval and drifts are :func:`~mp_eplb.demo.schedule.default_schedule`'s."""
    schedule = default_schedule(MoEConfig.num_layers)
    run = parser.add_argument_group("run")
    run.add_argument("--ranks", type=positive_int, default=2, help="rank processes (default 2)")
    run.add_argument("--device", type=device, choices=("cpu", "cuda"), default="cpu",
                     help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    run.add_argument("--steps", type=positive_int, default=schedule.steps,
                     help="decode steps (default %(default)s)")
    run.add_argument("--seed", type=int, default=0, help="seed of weights, tokens and routing")
    run.add_argument("--verify", action="store_true",
                     help="check every layer's output against a dense reference at every step")
    run.add_argument("--mode", choices=MODES, default="process",
                     help="EPLB mode: process (transfer subprocess per rank, default), thread "
                          "(vLLM-style transfer thread), sync (one blocking rearrangement), "
                          "none (EPLB off)")
    run.add_argument("--communicator", choices=COMMUNICATORS, default="auto",
                     help="how weights move: auto (cuda_ipc on GPUs, gloo on CPU), cuda_ipc, "
                          "nccl, gloo")
    run.add_argument("--quiet", action="store_true", help="no progress bar or lines")
    run.add_argument("--progress-every", type=non_negative_int, default=0,
                     help="also log step latency every that many steps (default: off)")
    run.add_argument("--timeout", type=positive_float, default=600.0,
                     help="seconds the whole run may take before it is stopped (default 600)")
    run.add_argument("--collective-timeout", type=positive_float, default=120.0,
                     help="seconds one collective of the engine group may wait (default 120)")
    add_schedule_arguments(parser, rebalance_interval=schedule.rebalance_interval)
    add_model_arguments(parser, MoEConfig(drift_interval=schedule.drift_interval))
    parser.set_defaults(drift_offset=schedule.drift_offset)
    add_engine_arguments(parser)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """``--engine`` and the graph engine's options (:mod:`mp_eplb.demo.graph`)."""
    group = parser.add_argument_group("engine")
    group.add_argument("--engine", choices=ENGINES, default="python",
                       help="python: the realistic Python engine (variable shapes, host syncs "
                            "per layer; default); graph: fixed shapes, no host sync in the "
                            "step, MoE layers captured in a CUDA graph")
    group.add_argument("--capacity-factor", type=positive_float, default=2.0,
                       help="graph engine: dispatch and expert capacity as a multiple of the "
                            "balanced share (default 2; >= slots per rank never drops a pair)")
    group.add_argument("--dense-width", type=non_negative_int, default=0,
                       help="graph engine: width of the dense MLP per layer (default 4 x hidden)")
    group.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                       help="graph engine: run the step eagerly on CUDA too (the CPU always does)")
    group.add_argument("--no-scheduler", dest="scheduler", action="store_false",
                       help="skip the fake scheduler's Python bookkeeping each step (a few ms "
                            "at 512 tokens; the graph engine overlaps it with the GPU work)")


def add_schedule_arguments(parser: argparse.ArgumentParser, *,
                           rebalance_interval: int | None) -> None:
    """``--window-size``, ``--layers-per-step``, ``--step-interval`` (named like
    :class:`~mp_eplb.EplbConfig`'s fields; the older ``--window`` and ``--rebalance-interval``
    still work). ``rebalance_interval`` ``None``: no default."""
    group = parser.add_argument_group("rebalancing")
    group.add_argument("--window-size", "--window", dest="window", metavar="STEPS",
                       type=non_negative_int,
                       default=0, help="steps of load the policy reads (default: the step "
                                       "interval)")
    group.add_argument("--layers-per-step", type=positive_int, default=1,
                       help="layers switched per step at most (default 1)")
    group.add_argument("--step-interval", "--rebalance-interval", dest="rebalance_interval",
                       metavar="STEPS",
                       type=positive_int, default=rebalance_interval,
                       help="steps between rebalances (default %(default)s)")


def add_model_arguments(parser: argparse.ArgumentParser, default: MoEConfig | None) -> None:
    """The model's shape and workload options; ``default`` ``None``: every default is ``None``
    (the caller fills them, e.g. from a per-device preset)."""
    model = parser.add_argument_group("model")
    base = default or MoEConfig()
    # flags: the name (like EplbConfig's field where there is one), then older spellings; the
    # last one names the attribute
    for flags, name, text, kind in (
            (("--layers",), "num_layers", "MoE layers", positive_int),
            (("--experts",), "num_experts", "logical experts per layer", positive_int),
            (("--num-redundant-experts", "--redundant"), "num_redundant",
             "redundant physical slots per layer", non_negative_int),
            (("--hidden",), "hidden", "hidden size", positive_int),
            (("--inter",), "inter", "expert intermediate size", positive_int),
            (("--top-k",), "top_k", "experts per token", positive_int),
            (("--tokens",), "tokens_per_rank", "tokens per rank per step", positive_int),
            (("--drift-interval",), "drift_interval",
             "steps between changes of each layer's hot experts", positive_int)):
        model.add_argument(*flags, dest=flags[-1][2:].replace("-", "_"), type=kind,
                           default=getattr(default, name, None),
                           help=f"{text} (default {getattr(base, name) if default else 'preset'})")
    model.add_argument("--zipf", type=float, default=getattr(default, "zipf", None),
                       help="routing skew: Zipf exponent of the router bias "
                            f"(default {base.zipf if default else 'preset'})")
    model.add_argument("--drift-swaps", type=non_negative_int, default=0 if default else None,
                       help="drift amount: expert pairs whose popularity swaps at each drift "
                            "(0: the hot set is redrawn whole; default "
                            f"{0 if default else 'preset'})")
    model.add_argument("--drift-offset", type=int, default=0 if default else None,
                       help="steps by which the drifts come early (the first is at "
                            "drift interval - offset; default "
                            f"{0 if default else 'preset'})")
    model.add_argument("--token-period", type=non_negative_int, default=0 if default else None,
                       help="steps after which the decode batches repeat, so loads repeat "
                            f"(0: never; default {0 if default else 'preset'})")
    model.add_argument("--dtype", choices=tuple(_DTYPES), default="float32" if default else None,
                       help="weight dtype (bfloat16 with --device cuda)")


def config_from_args(args: argparse.Namespace) -> MoEConfig:
    """The model config the options describe; ``ConfigError`` names a bad option."""
    if args.dtype == "bfloat16" and args.device != "cuda":
        raise ConfigError("--dtype bfloat16 needs --device cuda; use float32 on CPU")
    cfg = MoEConfig(hidden=args.hidden, inter=args.inter, num_layers=args.layers,
                    num_experts=args.experts, top_k=args.top_k, num_redundant=args.redundant,
                    tokens_per_rank=args.tokens, seed=args.seed, zipf=args.zipf,
                    drift_interval=args.drift_interval, dtype=_DTYPES[args.dtype])
    cfg.slots_per_rank(args.ranks)
    return cfg


def make_balancer(args: argparse.Namespace, ctx: RankContext) -> Balancer:
    """The balancer of ``args.mode`` for this rank (the one place modes are built)."""
    if args.mode == "none":
        return StaticBalancer.for_model(ctx.model)
    if args.mode not in MODES:
        raise ConfigError(f"--mode {args.mode!r} is not one of {MODES}")
    cfg = ctx.model.cfg
    config = EplbConfig(mode=args.mode, communicator=args.communicator,
                        window_size=args.window or args.rebalance_interval,
                        step_interval=args.rebalance_interval,
                        num_redundant_experts=cfg.num_redundant,
                        layers_per_step=args.layers_per_step)
    return EplbState(ctx.model.expert_weights, rank=ctx.env.rank,
                     world_size=ctx.env.world_size, num_logical_experts=cfg.num_experts,
                     config=config, cpu_group=ctx.env.cpu_group, ep_group=ctx.env.ep_group,
                     initial_phy2log=ctx.model.initial_phy2log.cpu().numpy())


def init_rank_groups(rank: int, world_size: int, device: torch.device,
                     timeout_s: float) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """Join the engine's process group at ``MASTER_ADDR``/``MASTER_PORT`` (set by
    :func:`mp_eplb.ranks.launch_ranks`): ``(ep_group, cpu_group)``.

    ``ep_group`` is the default group (NCCL for a CUDA ``device``, else gloo); ``cpu_group`` a
    gloo group over the same ranks. Every collective waits at most ``timeout_s`` seconds.
    """
    timeout = timedelta(seconds=timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method="env://", rank=rank, world_size=world_size,
                                timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", init_method="env://", rank=rank,
                                world_size=world_size, timeout=timeout)
    return dist.group.WORLD, dist.new_group(backend="gloo", timeout=timeout)


def join_rank_env(rank: int, world_size: int, device: str, timeout_s: float) -> RankEnv:
    """In a rank process of :func:`mp_eplb.ranks.launch_ranks`: take this rank's device
    (``cuda:<rank>``, or the CPU with one torch thread, as a rank has one device) and join the
    engine group (:func:`init_rank_groups`)."""
    dev = torch.device(f"cuda:{rank}" if device == "cuda" else "cpu")
    if dev.type == "cpu":
        torch.set_num_threads(1)
    ep_group, cpu_group = init_rank_groups(rank, world_size, dev, timeout_s)
    return RankEnv(rank, world_size, dev, ep_group, cpu_group)


def build_model(args: argparse.Namespace, env: RankEnv) -> DriftingModel:
    """This rank's shard of the model ``args`` describe (with its drift workload), for the
    engine ``args.engine`` names."""
    kwargs: dict[str, Any] = dict(
        drift_swaps=args.drift_swaps, token_period=args.token_period,
        drift_offset=args.drift_offset, rank=env.rank, world_size=env.world_size,
        device=env.device, ep_group=env.ep_group, cpu_group=env.cpu_group)
    if args.engine == "graph":
        options = GraphOptions(capacity_factor=args.capacity_factor,
                               dense_width=args.dense_width, cuda_graph=args.cuda_graph)
        return GraphMoEModel(config_from_args(args), options=options, **kwargs)
    return DriftingModel(config_from_args(args), **kwargs)


def _rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _memory(device: torch.device) -> dict[str, int | None]:
    snap: dict[str, int | None] = {"rss": _rss_bytes(os.getpid()), "shm": handles.live_bytes(),
                                   "gpu_free": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        snap["gpu_free"] = torch.cuda.mem_get_info(device)[0]
    return snap


def _measured_balancer(args: argparse.Namespace, ctx: RankContext) -> tuple[Balancer, dict]:
    """:func:`make_balancer`, with what its construction cost this rank: seconds
    (``balancer_init_s``, ``worker_start_s``: the transfer subprocess's handshake), extra
    device memory (device-wide free memory before minus after, all ranks built), extra RSS
    of this process, bytes of shared-memory segments it owns, and the worker's RSS."""
    before = _memory(ctx.env.device)
    start = time.perf_counter()
    balancer = make_balancer(args, ctx)
    init_s = time.perf_counter() - start
    dist.barrier(group=ctx.env.cpu_group)
    after = _memory(ctx.env.device)
    pid = getattr(balancer, "worker_pid", None)
    setup = {
        "balancer_init_s": init_s,
        "worker_start_s": getattr(balancer, "worker_start_s", None),
        "gpu_extra_bytes": (None if before["gpu_free"] is None
                            else before["gpu_free"] - after["gpu_free"]),
        "rss_extra_bytes": (None if before["rss"] is None or after["rss"] is None
                            else after["rss"] - before["rss"]),
        "shm_bytes": after["shm"] - before["shm"],
        "worker_rss_bytes": None if pid is None else _rss_bytes(pid),
    }
    return balancer, setup


def _demo_rank(env: RankEnv, args: argparse.Namespace) -> dict:
    """One rank of the demo: build the model and balancer, decode, return the RankResult."""
    model = build_model(args, env)
    balancer, setup = _measured_balancer(args, RankContext(env, model))
    shown = env.rank == 0 and not args.quiet
    bar = Progress(args.steps, "demo steps") if shown else None
    try:
        result = run_engine(model, balancer, steps=args.steps, verify=args.verify,
                            progress_every=args.progress_every if shown else 0,
                            scheduler=args.scheduler,
                            on_step=bar and (lambda done, report: bar.update(
                                done, "rebalancing" if report.rebalance_active else "")))
    finally:
        balancer.shutdown()
    if bar:
        bar.close(f"{len(result.finished)} rebalances finished")
    result.setup = setup
    return result.to_dict()


@dataclass(frozen=True)
class _SpawnSpec:
    device: str
    collective_timeout_s: float


def _rank_entry(rank: int, world_size: int, spec: _SpawnSpec, target: RankTarget,
                arg: object) -> Any:
    """Spawned rank ``rank``: join the engine group, return ``target(env, arg)``."""
    logs.configure(f"rank{rank}", default=logging.WARNING)  # MP_EPLB_LOG (-v) raises it
    return target(join_rank_env(rank, world_size, spec.device, spec.collective_timeout_s), arg)


def spawn_ranks(target: RankTarget, arg: object, *, world_size: int, device: str = "cpu",
                timeout_s: float = 600.0, collective_timeout_s: float = 120.0) -> list:
    """Run ``target(env, arg)`` in ``world_size`` spawned rank processes; their returns, by rank.

    Each process joins the engine group (:func:`init_rank_groups`, one GPU per rank for
    ``device="cuda"``) through :func:`mp_eplb.ranks.launch_ranks`; ``target`` must be
    importable by name (a module-level function) and its ``arg`` and return picklable.
    Raises :class:`DemoFailure` if any rank raises or dies, or ``timeout_s`` seconds pass; no
    rank process outlives the call.
    """
    spec = _SpawnSpec(device, collective_timeout_s)
    return launch_ranks(_rank_entry, world_size, (spec, target, arg), timeout_s=timeout_s,
                        name="mp-eplb-rank").values()


def run_ranks(args: argparse.Namespace) -> list[RankResult]:
    """Run the demo on ``args.ranks`` spawned processes; every rank's result, by rank.

    Raises :class:`ConfigError` for bad options before starting anything, and
    :class:`DemoFailure` if any rank fails or dies, or the run exceeds ``args.timeout``
    seconds.
    """
    config_from_args(args)
    if args.device == "cuda" and torch.cuda.device_count() < args.ranks:
        raise ConfigError(f"--ranks {args.ranks} needs {args.ranks} GPUs, "
                          f"{torch.cuda.device_count()} visible; lower --ranks")
    plain = argparse.Namespace(**{k: v for k, v in vars(args).items() if not callable(v)})
    if args.mode != "none":
        schedule = Schedule(args.steps, args.rebalance_interval, args.drift_interval,
                            args.drift_offset)
        for problem in schedule.conflicts(settle_steps(args.layers, args.layers_per_step)):
            logger.warning("schedule: %s (mp_eplb.demo.schedule.default_schedule avoids it)",
                           problem)
    if not args.quiet:
        announce(f"mp-eplb demo: starting {args.ranks} rank processes ({args.device}, mode "
                 f"{args.mode}, {args.steps} steps, 0-based step numbers)")
    results = spawn_ranks(_demo_rank, plain, world_size=args.ranks, device=args.device,
                          timeout_s=args.timeout, collective_timeout_s=args.collective_timeout)
    return [RankResult.from_dict(result) for result in results]


def run_demo(args: argparse.Namespace) -> int:
    """``mp-eplb demo``: run, print a report per rebalance and the summary; 0 on success, 1 on
    any failure (a weight mismatch on any rank included)."""
    try:
        results = run_ranks(args)
    except (ConfigError, DemoFailure) as exc:
        print(f"mp-eplb demo failed: {exc}", file=sys.stderr)
        return 1
    cfg = config_from_args(args)
    window = max(1, min(args.window or args.rebalance_interval, args.rebalance_interval // 2))
    report = rebalance_report(results, expert_bytes=cfg.expert_bytes(), window=window)
    print(format_report(report, summarize(results)))
    print(f"weights verified against the final maps on all {args.ranks} ranks")
    return 0
