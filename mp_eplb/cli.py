"""Command-line interface: ``mp-eplb`` (also ``python -m mp_eplb``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from mp_eplb import __version__, logs
from mp_eplb.bench import add_bench_arguments, run_bench
from mp_eplb.faults import add_faults_arguments, run_faults

__all__ = ["build_parser", "main"]
from mp_eplb.demo.launch import add_demo_arguments, run_demo


#: Subcommands: name, options, runner (args -> exit status), one-line help, description.
_COMMANDS = (
    ("demo", add_demo_arguments, run_demo,
     "run the demo MoE engine with EPLB (CPU/gloo by default)",
     "Start N rank processes of a small MoE engine with real expert parallelism; rebalance "
     "while decoding and report what moved."),
    ("bench", add_bench_arguments, run_bench,
     "benchmark every EPLB mode x communicator side by side (JSON, Markdown, PNG)",
     "Run the demo engine in each mode x communicator the device allows, one after the "
     "other, plus link and copy microbenchmarks; write the results."),
    ("faults", add_faults_arguments, run_faults,
     "run fault-injection scenarios against real multi-rank runs",
     "Kill, hang or disturb transfer workers and their messages at each phase; report "
     "detection time, consistency, recovery and leftovers."),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mp-eplb",
        description="Expert-parallel load balancing with the transfer in a subprocess.",
    )
    parser.add_argument("--version", action="version", version=f"mp-eplb {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging in every process, ranks and transfer workers "
                             "included (-v info, -vv debug; sets MP_EPLB_LOG)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, add_arguments, run, summary, description in _COMMANDS:
        command = commands.add_parser(name, help=summary, description=description)
        add_arguments(command)
        command.set_defaults(func=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # -v/-vv reach every rank process and transfer worker through MP_EPLB_LOG (inherited).
    logs.configure("main", export=logs.verbosity_level(args.verbose) if args.verbose else None)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)
