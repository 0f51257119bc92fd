"""The bench's Markdown tables and its plot (matplotlib, optional: ``pip install mp-eplb[bench]``)."""

from __future__ import annotations

import logging
from pathlib import Path

__all__ = ["markdown", "plot"]

logger = logging.getLogger(__name__)

_MIB = 2**20


def _f(value: float | None, spec: str = ".2f", scale: float = 1.0) -> str:
    return "–" if value is None else format(value * scale, spec)


def _pair(stats: dict | None, a: str = "p50", b: str = "p99") -> str:
    if not stats or stats.get(a) is None:
        return "–"
    return f"{stats[a]:.2f} / {stats[b]:.2f}"


def markdown(data: dict) -> str:
    """Tables of a bench JSON document (:func:`mp_eplb.bench.run_bench` writes both)."""
    meta = data["meta"]
    ok = [c for c in data["configs"] if "error" not in c]
    lines = [
        f"# mp-eplb bench: {meta['device_name']}, {meta['ranks']} ranks",
        "",
        f"Command: `{meta['command']}`  ",
        f"Shape: {meta['shape']}  ",
        f"torch {meta['torch']}, {meta['date']}. Latencies per step are the slowest rank's; "
        "*during* covers the measured rebalances (completed, not the first, at least one layer).",
        "",
        "## Step latency",
        "",
        "| config | steady p50 / p99 ms | steady GPU p50 / p99 ms | during p50 / p99 ms | "
        "p99 during / steady | added ms per rebalance (total) | × sync stall | × floor | "
        "steps per rebalance | measured |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in ok:
        steady, during = c["steady_ms"], c["during_ms"]
        ratio = (during["p99"] / steady["p99"] if steady and during.get("p99") is not None
                 else None)
        lines.append(
            f"| {c['name']} | {_pair(steady)} | {_pair(c.get('steady_gpu_ms'))} | "
            f"{_pair(during)} | {_f(ratio)} | "
            f"{_f(c['added_ms_per_rebalance'], '.1f')} | {_f(c.get('added_vs_sync'))} | "
            f"{_f(c.get('added_vs_floor'), '.1f')} | {_f(c['steps_per_rebalance'], '.1f')} | "
            f"{c['rebalances_measured']} |")
    repeated = [c for c in ok if c.get("runs", 1) > 1]
    if repeated:
        keys = list(repeated[0]["spread"])
        lines += ["", "## Spread over repeated runs (median [min – max])", "",
                  "| config | runs | " + " | ".join(keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        for c in repeated:
            cells = []
            for key in keys:
                low_high = c["spread"].get(key)
                median = c.get(key.split(".")[0])
                median = median.get(key.split(".")[1]) if isinstance(median, dict) else median
                cells.append("–" if low_high is None else
                             f"{median:.2f} [{low_high[0]:.2f} – {low_high[1]:.2f}]")
            lines.append(f"| {c['name']} | {c['runs']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Transfer and engine cost per rebalance",
        "",
        "| config | MiB per rank | transfer ms (slowest rank) | GB/s per rank | link best GB/s | "
        "% of link best | "
        "commit ms per layer p50 / p99 (host) | ready msg ms p50 / p99 | agreement ms p50 / p99 "
        "| engine CPU ms (extra) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in ok:
        cpu = c["engine_cpu_ms_per_rebalance"]
        lines.append(
            f"| {c['name']} | {_f(c['bytes_per_rank_per_rebalance'], '.1f', 1 / _MIB)} | "
            f"{_f(c['transfer_ms'], '.1f')} | {_f(c['transfer_gbps_per_rank'], '.2f')} | "
            f"{_f(c.get('link_best_gbps'), '.2f')} | {_f(c.get('rate_vs_link_best'), '.0f', 100)} | "
            f"{_pair(c['commit_ms_per_layer'])} | {_pair(c['ready_latency_ms'])} | "
            f"{_pair(c['agreement_ms'])} | {_f(cpu, '.1f')} "
            f"({_f(c['engine_cpu_extra_ms_per_rebalance'], '+.1f')}) |")
    lines += [
        "",
        "## Set-up cost (largest over ranks)",
        "",
        "| config | balancer init s | worker start s | extra GPU MiB | extra RSS MiB | "
        "/dev/shm MiB | worker RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in ok:
        s = c["setup"]
        lines.append(
            f"| {c['name']} | {_f(s['balancer_init_s'])} | {_f(s['worker_start_s'])} | "
            f"{_f(s['gpu_extra_bytes'], '.0f', 1 / _MIB)} | {_f(s['rss_extra_bytes'], '.0f', 1 / _MIB)} | "
            f"{_f(s['shm_bytes'], '.0f', 1 / _MIB)} | {_f(s['worker_rss_bytes'], '.0f', 1 / _MIB)} |")
    micro = data.get("micro")
    if micro:
        copy = micro["copy"]
        lines += ["", "## Microbenchmarks (same run, 2 ranks exchanging at once)", "",
                  "| link | MiB per rank | best GB/s | median GB/s |", "|---|---|---|---|"]
        for name, link in micro["links"].items():
            lines.append(f"| {name} | {link['bytes'] / _MIB:.1f} | {link['best_gbps']:.2f} | "
                         f"{link['median_gbps']:.2f} |")
        lines += ["", f"`move_from_buffer` of one layer ({copy['rows']} rows, "
                      f"{copy['bytes'] / _MIB:.1f} MiB, {copy['timer']}): best "
                      f"{copy['move_from_buffer_ms_best']:.3f} ms vs a plain copy of the same bytes "
                      f"{copy['plain_copy_ms_best']:.3f} ms ({_f(copy['ratio'])}×; plain copy "
                      f"{_f(copy['plain_copy_gbps'])} GB/s); host time of the call "
                      f"{copy['move_from_buffer_host_ms_median']:.3f} ms (median)."]
    lines += ["", "## Bytes per rebalance: placement-aware vs agnostic policy (same loads)", "",
              "| config | aware MiB | agnostic MiB | aware / agnostic | balancedness aware / agnostic "
              "| aware result = run's plan |", "|---|---|---|---|---|---|"]
    for c in ok:
        p = c["policy"]
        if not p or not p["per_rebalance"]:
            continue
        matches = sum(row["aware_matches_plan"] for row in p["per_rebalance"])
        lines.append(
            f"| {c['name']} | {_f(p['aware_bytes'], '.1f', 1 / _MIB)} | "
            f"{_f(p['agnostic_bytes'], '.1f', 1 / _MIB)} | {_f(p['ratio'])} | "
            f"{_f(p['aware_balancedness'], '.4f')} / {_f(p['agnostic_balancedness'], '.4f')} | "
            f"{matches} of {len(p['per_rebalance'])} |")
    if data.get("goals"):
        lines += ["", f"## Goals (on {data['product']})", "", "| goal | value | target | met |",
                  "|---|---|---|---|"]
        for g in data["goals"]:
            met = "–" if g["met"] is None else ("yes" if g["met"] else "**no**")
            lines.append(f"| {g['goal']} | {_f(g['value'])} | {g['text']} | {met} |")
    failed = [c for c in data["configs"] if "error" in c]
    if failed:
        lines += ["", "## Failed configurations", ""]
        lines += [f"- {c['name']}: {c['error']}" for c in failed]
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> bool:
    """Step latency over steps, one panel per configuration on one shared linear ms axis (the
    first twentieth of the steps trimmed; clipped at the largest 99.5th percentile), the steady
    p50 as a dashed line, rebalance windows shaded (measured ones orange); below, a bar chart
    of the step time each rebalance added, per configuration. Returns False (with a warning)
    when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot written (pip install 'mp-eplb[bench]')")
        return False
    import numpy as np

    configs = [c for c in data["configs"] if "error" not in c]
    if not configs:
        return False
    trim = max(1, len(configs[0]["series"]["step_ms"]) // 20)
    top = 1.1 * max(float(np.percentile(c["series"]["step_ms"][trim:], 99.5)) for c in configs)
    fig, axes = plt.subplots(len(configs) + 1, 1, figsize=(11, 2.2 * (len(configs) + 1)),
                             squeeze=False)
    panels = axes[:-1, 0]
    for ax in panels[1:]:
        ax.sharex(panels[0])
        ax.sharey(panels[0])
    for ax, c in zip(panels, configs):
        series = c["series"]
        steps = np.arange(trim, len(series["step_ms"]))
        ax.plot(steps, series["step_ms"][trim:], linewidth=0.8, color="tab:blue")
        for start, end, is_measured in series["windows"]:
            ax.axvspan(start - 0.5, end + 0.5, color="tab:orange" if is_measured else "0.8",
                       alpha=0.35 if is_measured else 0.5, linewidth=0)
        steady = c["steady_ms"]
        if steady:
            ax.axhline(steady["p50"], color="k", linestyle="--", linewidth=0.8)
        title = c["name"] + ("" if not steady else
                             f"  (steady p50 {steady['p50']:.2f} ms, p99 {steady['p99']:.2f} ms)")
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_ylabel("step ms")
        ax.set_ylim(0, top)
    panels[-1].set_xlabel(f"engine step from {trim} (orange: measured rebalances; grey: others; "
                          f"dashed: steady p50; clipped at {top:.1f} ms)")
    bars = axes[-1, 0]
    added = {c["name"]: [a for a, w in zip(c["series"]["added_ms"], c["series"]["windows"]) if w[2]]
             for c in configs}
    added = {name: values for name, values in added.items() if values}
    width = 0.8 / max(1, len(added))
    for i, (name, values) in enumerate(added.items()):
        bars.bar(np.arange(len(values)) + (i - (len(added) - 1) / 2) * width, values, width,
                 label=name)
    bars.set_xticks(range(max(map(len, added.values()), default=0)))
    bars.set_xlabel("measured rebalance (0 = the first measured)")
    bars.set_ylabel("added ms (total)")
    bars.set_title("step time added per rebalance, by configuration", fontsize=9, loc="left")
    if added:
        bars.legend(fontsize=7, ncol=len(added))
    fig.suptitle(f"mp-eplb bench: {data['meta']['device_name']}, {data['meta']['ranks']} ranks",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
