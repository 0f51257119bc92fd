"""``mp-eplb faults``: options, the run, the table on stdout and the optional JSON file."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict

import torch

from mp_eplb.argtypes import device, positive_float, positive_int
from mp_eplb.faults.runner import run_scenarios
from mp_eplb.faults.scenarios import FaultOptions, ScenarioResult, scenarios

__all__ = ["add_faults_arguments", "format_table", "run_faults"]


def format_table(rows: Sequence[ScenarioResult]) -> str:
    """A markdown table of the results."""
    head = ("| scenario | expect | outcome | detection (s) | bound (s) | consistent | recovered "
            "| leftovers | ok | notes |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        det = "-" if r.detection_s is None else f"{r.detection_s:.3f}"
        bound = "-" if r.bound_s is None else f"{r.bound_s:.1f}"
        lines.append(f"| {r.name} | {r.expect} | {r.outcome} | {det} | {bound} | "
                     f"{'yes' if r.consistent else 'NO'} | {'yes' if r.recovered else 'NO'} | "
                     f"{r.leftovers} | {'ok' if r.ok else 'FAIL'} | {r.notes} |")
    return "\n".join(lines)


def add_faults_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mp-eplb faults``."""
    defaults = FaultOptions()
    parser.add_argument("--scenario", action="append", default=None, metavar="NAME",
                        help="run this scenario (repeatable; default: all, see --list)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--ranks", type=positive_int, default=defaults.ranks,
                        help="rank processes (default %(default)s)")
    parser.add_argument("--device", type=device, choices=("cpu", "cuda"), default=defaults.device,
                        help="cpu (gloo) or cuda (one GPU per rank)")
    parser.add_argument("--communicator", choices=("auto", "cuda_ipc", "nccl", "gloo"),
                        default=defaults.communicator,
                        help="how workers move weights (default: cuda_ipc on cuda, gloo on cpu)")
    parser.add_argument("--timeout", type=positive_float, default=defaults.timeout_s,
                        help="seconds one run may take before its ranks are killed "
                             "(default %(default)s)")
    parser.add_argument("--heartbeat-timeout", type=positive_float, default=defaults.heartbeat_timeout_s,
                        help="EplbConfig.heartbeat_timeout_s of the runs (default %(default)s)")
    parser.add_argument("--layer-timeout", type=positive_float, default=defaults.layer_timeout_s,
                        help="EplbConfig.layer_timeout_s of the runs (default %(default)s)")
    parser.add_argument("--detect-bound", type=positive_float, default=defaults.detect_bound_s,
                        help="seconds within which a dead worker must be detected on every "
                             "rank (default %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--log-dir", metavar="DIR",
                        help="keep the ranks' and workers' logs (the injected failures) there, "
                             "one file per run and rank (default: discarded)")


def run_faults(args: argparse.Namespace) -> int:
    """``mp-eplb faults``: run, print the table; 0 if every scenario kept every invariant."""
    if args.list:
        for sc in scenarios(args.ranks):
            print(f"{sc.name:22} expect {sc.expect:8} {sc.doc}")
        return 0
    options = FaultOptions(ranks=args.ranks, device=args.device, communicator=args.communicator,
                           timeout_s=args.timeout, heartbeat_timeout_s=args.heartbeat_timeout,
                           layer_timeout_s=args.layer_timeout, detect_bound_s=args.detect_bound)
    if args.device == "cuda" and torch.cuda.device_count() < args.ranks:
        print(f"--ranks {args.ranks} needs {args.ranks} GPUs, "
              f"{torch.cuda.device_count()} visible", file=sys.stderr)
        return 2
    try:
        rows = run_scenarios(args.scenario, options, log_dir=args.log_dir)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(rows))
    failed = [r.name for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} scenarios kept every invariant"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 1 if failed else 0
