"""``mp-eplb bench``: every EPLB mode x communicator on the demo engine, side by side in one
run, next to microbenchmarks of the links and the local copy; JSON, Markdown and a plot.

See ``docs/benchmarks.md`` for what each number means.
"""

from __future__ import annotations

from mp_eplb.bench.run import CONFIGS, PRESETS, add_bench_arguments, resolve_options, run_bench

__all__ = ["CONFIGS", "PRESETS", "add_bench_arguments", "resolve_options", "run_bench"]
