"""Command-line interface: ``mp-eplb`` (also ``python -m mp_eplb``)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from mp_eplb import __version__
from mp_eplb.bench import add_bench_arguments, run_bench
from mp_eplb.faults import add_faults_arguments, run_faults
from mp_eplb.demo.launch import add_demo_arguments, run_demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mp-eplb",
        description="Expert-parallel load balancing with the transfer in a subprocess.",
    )
    parser.add_argument("--version", action="version", version=f"mp-eplb {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v info, -vv debug)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="run the demo MoE engine with EPLB (CPU/gloo by default)",
        description="Start N rank processes of a small MoE engine with real expert "
                    "parallelism; rebalance while decoding and report what moved.")
    add_demo_arguments(demo)
    demo.set_defaults(func=run_demo)
    bench = commands.add_parser(
        "bench", help="benchmark every EPLB mode x communicator side by side (JSON, Markdown, PNG)",
        description="Run the demo engine in each mode x communicator the device allows, one "
                    "after the other, plus link and copy microbenchmarks; write the results.")
    add_bench_arguments(bench)
    bench.set_defaults(func=run_bench)
    faults = commands.add_parser(
        "faults", help="run fault-injection scenarios against real multi-rank runs",
        description="Kill, hang or disturb transfer workers and their messages at each phase; "
                    "report detection time, consistency, recovery and leftovers.")
    add_faults_arguments(faults)
    faults.set_defaults(func=run_faults)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)
