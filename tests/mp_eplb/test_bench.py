"""``mp-eplb bench``: option resolution and errors, the plot's optional dependency, and one
``--quick`` CPU run whose JSON is checked for schema and sanity (no timing thresholds)."""

from __future__ import annotations

import argparse
import builtins
import importlib.util
import json
import logging
import math
import multiprocessing
import os
from pathlib import Path

import pytest

from ipc import naming
from ipc.handles import SHM_DIR
from mp_eplb.bench import CONFIGS, PRESETS, add_bench_arguments, resolve_options, run_bench
from mp_eplb.bench.metrics import combine_runs, goals
from mp_eplb.bench.output import markdown, plot
from mp_eplb.cli import build_parser
from mp_eplb.demo.model import ConfigError

CONFIG_KEYS = {
    "name", "mode", "communicator", "link", "ranks", "steps", "rebalances_started",
    "rebalances_completed", "rebalances_measured", "steady_ms", "during_ms",
    "added_ms_per_rebalance", "steps_per_rebalance", "layers_per_rebalance",
    "bytes_per_rank_per_rebalance", "transfer_ms", "transfer_gbps_per_rank",
    "commit_ms_per_layer", "ready_latency_ms", "agreement_ms", "policy_ms",
    "engine_cpu_ms_per_rebalance", "engine_cpu_extra_ms_per_rebalance", "steady_cpu_ms_per_step",
    "setup", "policy", "series", "added_vs_sync", "floor_ms", "added_vs_floor", "link_best_gbps",
    "rate_vs_link_best", "steady_gpu_ms", "runs", "spread"}


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args(list(argv))


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _finite_numbers(value: object) -> bool:
    if isinstance(value, dict):
        return all(_finite_numbers(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite_numbers(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def test_options_come_from_the_device_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    opts = resolve_options(_args("--quick"))
    cpu = PRESETS["cpu"]
    assert (opts.steps, opts.rebalance_interval, opts.drift_interval) == (
        cpu.quick_steps, cpu.rebalance_interval, cpu.rebalance_interval)
    assert (opts.drift_swaps, opts.token_period, opts.hidden) == (
        cpu.drift_swaps, cpu.token_period, cpu.model["hidden"])
    half = cpu.rebalance_interval // 2  # drifts half an interval before each rebalance
    assert (opts.drift_offset, opts.window) == (half, half)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # --device cuda parses here
    stress = resolve_options(_args("--device", "cuda", "--stress", "--steps", "100"))
    assert (stress.drift_swaps, stress.hidden, stress.inter, stress.dtype) == (
        0, 7168, 2048, "bfloat16")
    assert stress.experts + stress.redundant == 72 and stress.steps == 100
    with pytest.raises(ConfigError, match="must be a multiple of --token-period"):
        resolve_options(_args("--token-period", "7"))  # window 10
    with pytest.raises(ConfigError, match="leaves no measured rebalance"):
        resolve_options(_args("--steps", "30"))


def test_cli_wires_bench_and_rejects_bad_configs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):  # syntax and names: at parse time (tests/test_cli.py)
        build_parser().parse_args(["bench", "--quick", "--configs", "process-gloo,bogus"])
    assert "argument --configs: 'bogus' is not a configuration" in capsys.readouterr().err
    # A configuration of the other device: once the options are complete, before any run.
    args = build_parser().parse_args(["bench", "--quick", "--configs", "process-gloo,process-nccl"])
    assert args.func(args) == 1
    assert "--configs: 'process-nccl' is not a cpu configuration" in capsys.readouterr().err
    assert [c.name for c in CONFIGS["cuda"]] == [
        "none", "sync", "thread-gloo", "process-nccl", "process-cuda_ipc"]


def test_plot_is_skipped_with_a_warning_without_matplotlib(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with caplog.at_level(logging.WARNING):
        assert plot({"configs": [], "meta": {}}, tmp_path / "x.png") is False
    assert "matplotlib is not installed" in caplog.text
    assert not (tmp_path / "x.png").exists()


def test_plot_draws_panels_on_one_axis_and_bars_of_added_ms(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    series = {"step_ms": [5.0 + (i % 3) for i in range(100)],
              "windows": [[20, 25, False], [60, 66, True]], "added_ms": [9.0, 4.0]}
    data = {"meta": {"device_name": "test", "ranks": 1},
            "configs": [{"name": "none", "steady_ms": {"p50": 6.0, "p99": 7.0},
                         "series": {"step_ms": series["step_ms"], "windows": [], "added_ms": []}},
                        {"name": "sync", "steady_ms": {"p50": 6.0, "p99": 7.0}, "series": series}]}
    assert plot(data, tmp_path / "p.png") is True and (tmp_path / "p.png").stat().st_size > 0


def _segments() -> set[str]:
    return {n for n in os.listdir(SHM_DIR) if n.startswith(naming.segment_prefix())}


def _owner_alive(segment: str) -> bool:
    """Segment names carry their owner's pid (``mp_eplb_<pid>_...``)."""
    return Path(f"/proc/{segment[len(naming.segment_prefix()):].split('_')[0]}").exists()


@pytest.mark.timeout(400)
def test_quick_cpu_bench_writes_sane_results(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    segments = _segments()
    assert run_bench(_args("--quick", "--out", str(tmp_path), "--repeats", "3")) == 0
    out = capsys.readouterr().out
    assert "[1/4] none" in out and "[4/4] process-gloo" in out and "[micro]" in out
    data = json.loads((tmp_path / "bench.json").read_text())
    assert set(data) == {"meta", "configs", "micro", "micro_error", "product", "goals"}
    assert data["meta"]["device"] == "cpu" and data["meta"]["ranks"] == 2
    assert data["micro_error"] is None and data["product"] == "process-gloo"
    assert _finite_numbers(data)
    configs = {c["name"]: c for c in data["configs"]}
    assert list(configs) == [c.name for c in CONFIGS["cpu"]]
    for name, c in configs.items():
        assert set(c) == CONFIG_KEYS, name
        steps = c["steps"]
        assert steps == PRESETS["cpu"].quick_steps and len(c["series"]["step_ms"]) == steps
        assert all(_positive(v) for v in c["series"]["step_ms"])
        assert _positive(c["steady_ms"]["p50"]) and c["steady_ms"]["p99"] >= c["steady_ms"]["p50"]
        if name == "none":
            assert c["rebalances_started"] == 0 and c["policy"] is None
            continue
        assert c["rebalances_completed"] >= 1 and c["rebalances_measured"] >= 1, name
        for key in ("steps_per_rebalance", "layers_per_rebalance", "bytes_per_rank_per_rebalance",
                    "transfer_ms", "transfer_gbps_per_rank", "engine_cpu_ms_per_rebalance",
                    "floor_ms", "link_best_gbps", "rate_vs_link_best"):
            assert _positive(c[key]), (name, key)
        assert c["added_ms_per_rebalance"] is not None and c["during_ms"]["steps"] >= 1
        assert c["added_vs_sync"] is not None
        windows = c["series"]["windows"]
        assert len(windows) == c["rebalances_started"]
        assert sum(measured for _, _, measured in windows) == c["rebalances_measured"]
        assert all(0 <= start <= end < steps for start, end, _ in windows)
        policy = c["policy"]
        assert len(policy["per_rebalance"]) == c["rebalances_measured"]
        for row in policy["per_rebalance"]:
            assert 0 < row["aware_slots"] <= row["agnostic_slots"]
            assert row["aware_matches_plan"] is True  # the run's plan is the aware policy's
        assert 0 < policy["ratio"] <= 1
        if c["mode"] != "sync":
            assert _positive(c["commit_ms_per_layer"]["p50"])
            assert c["ready_latency_ms"]["p50"] >= 0 and c["agreement_ms"]["p50"] >= 0
    assert configs["sync"]["added_vs_sync"] == pytest.approx(1.0)
    process = configs["process-gloo"]["setup"]
    assert _positive(process["worker_start_s"]) and _positive(process["shm_bytes"])
    assert _positive(process["worker_rss_bytes"])
    assert configs["thread-gloo"]["setup"]["worker_start_s"] is None
    gloo = data["micro"]["links"]["gloo"]
    assert _positive(gloo["best_gbps"]) and gloo["best_gbps"] >= gloo["median_gbps"]
    copy = data["micro"]["copy"]
    assert copy["rows"] >= 1 and copy["bytes"] > 0 and _positive(copy["ratio"])
    assert [g["goal"] for g in data["goals"]][0].startswith("step p99")
    assert len(data["goals"]) == 6 and all(set(g) == {"goal", "value", "limit", "met", "text"}
                                           for g in data["goals"])
    text = (tmp_path / "bench.md").read_text()
    assert text == markdown(data) and text.startswith("# mp-eplb bench: CPU, 2 ranks")
    assert (tmp_path / "bench.png").exists() == (importlib.util.find_spec("matplotlib") is not None)
    assert multiprocessing.active_children() == []
    leaked = [s for s in _segments() - segments if not _owner_alive(s)]
    assert leaked == []  # the ranks and workers are gone, so are their segments


def test_runs_combine_into_medians_and_spread() -> None:
    runs = [{"name": "x", "steady_ms": {"p50": v, "p99": 2 * v}, "added_ms_per_rebalance": None,
             "series": {"run": v}} for v in (3.0, 1.0, 2.0)]
    combined = combine_runs([*runs, {"name": "x", "error": "boom"}])
    assert combined["runs"] == 3 and combined["series"] == {"run": 3.0}  # the first good run's
    assert combined["steady_ms"] == {"p50": 2.0, "p99": 4.0}
    assert combined["spread"] == {"steady_ms.p50": [1.0, 3.0], "steady_ms.p99": [2.0, 6.0]}
    assert runs[0]["steady_ms"] == {"p50": 3.0, "p99": 6.0}  # inputs untouched


def test_goal_of_the_transfer_rate_is_a_share_of_the_link_best() -> None:
    config = {"name": "p", "steady_ms": {"p99": 10.0}, "during_ms": {"p99": 10.5},
              "policy": None, "rate_vs_link_best": 0.5}
    rate = next(g for g in goals([config], None, "p") if g["goal"].startswith("transfer rate"))
    assert "% of the link's best" in rate["goal"] and rate["value"] == pytest.approx(50.0)
    assert rate["met"] is False and rate["text"] == ">= 80%"
    config["rate_vs_link_best"] = 0.85
    rate = next(g for g in goals([config], None, "p") if g["goal"].startswith("transfer rate"))
    assert rate["met"] is True


@pytest.mark.timeout(400)
def test_graph_engine_bench_repeats_runs_interleaved(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    args = _args("--configs", "none:44,process-gloo:44", "--runs", "2", "--engine", "graph",
                 "--capacity-factor", "16", "--no-micro", "--out", str(tmp_path))
    assert run_bench(args) == 0
    out = capsys.readouterr().out
    order = [line.split("] ")[1].split(":")[0] for line in out.splitlines()
             if line.startswith("[") and "run " in line]
    assert order == ["none", "process-gloo", "none", "process-gloo"]
    data = json.loads((tmp_path / "bench.json").read_text())
    assert "engine graph" in data["meta"]["shape"]
    for c in data["configs"]:
        assert c["runs"] == 2 and set(c) == CONFIG_KEYS
        low, high = c["spread"]["steady_ms.p50"]
        assert low <= c["steady_ms"]["p50"] <= high
    assert "## Spread over repeated runs" in (tmp_path / "bench.md").read_text()


@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_graph_engine_bench_on_one_gpu(tmp_path: Path) -> None:
    """World size 1 (nothing crosses ranks): the graph engine captured, GPU time reported."""
    args = _args("--device", "cuda", "--ranks", "1", "--configs", "none:100,process-cuda_ipc:100",
                 "--engine", "graph", "--runs", "2", "--no-micro", "--hidden", "1024",
                 "--inter", "512", "--tokens", "128", "--layers", "3", "--out", str(tmp_path))
    assert run_bench(args) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    for c in data["configs"]:
        assert c["runs"] == 2 and _positive(c["steady_gpu_ms"]["p50"]), c["name"]


@pytest.mark.gpu
@pytest.mark.timeout(900)
def test_quick_cuda_bench_on_two_gpus(tmp_path: Path) -> None:
    """Every CUDA configuration and both GPU links, on a smaller model (sanity, no thresholds)."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    args = _args("--device", "cuda", "--quick", "--hidden", "1024", "--inter", "512",
                 "--tokens", "128", "--layers", "3", "--out", str(tmp_path), "--repeats", "3")
    assert run_bench(args) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert _finite_numbers(data) and data["product"] == "process-cuda_ipc"
    configs = {c["name"]: c for c in data["configs"]}
    assert list(configs) == [c.name for c in CONFIGS["cuda"]]
    for name, c in configs.items():
        assert set(c) == CONFIG_KEYS, name
        if name != "none":
            assert c["rebalances_measured"] >= 1 and _positive(c["transfer_gbps_per_rank"]), name
            assert all(row["aware_matches_plan"] for row in c["policy"]["per_rebalance"]), name
    for name in ("process-nccl", "process-cuda_ipc"):
        setup = configs[name]["setup"]
        assert _positive(setup["worker_start_s"]) and _positive(setup["gpu_extra_bytes"]), name
    links = data["micro"]["links"]
    assert set(links) == {"nccl", "cuda_ipc"} and all(_positive(l["best_gbps"]) for l in links.values())
    assert data["micro"]["copy"]["timer"] == "cuda events" and _positive(data["micro"]["copy"]["ratio"])
