"""Fault injection against a real multi-rank run (same as ``mp-eplb faults``).

    python tools/fault_inject.py                       # every scenario, 2 CPU ranks
    python tools/fault_inject.py --scenario sigkill@stage --scenario hang@stage
    python tools/fault_inject.py --device cuda --communicator nccl
    python tools/fault_inject.py --list

Prints a table and exits non-zero if any scenario broke an invariant (see docs/faults.md).
"""

from __future__ import annotations

import argparse
import logging
import sys

from mp_eplb.faults import add_faults_arguments, run_faults

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_faults_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run_faults(args)


if __name__ == "__main__":
    sys.exit(main())
