"""The demo's drifting workload, its per-rebalance report, and a whole ``mp-eplb demo`` run in
process mode that rebalances and prints the report."""

from __future__ import annotations

import argparse
import multiprocessing
import re

import pytest
import torch

from mp_eplb.demo.engine import (DemoSummary, DriftingModel, RankResult, format_report,
                                 rebalance_report)
from mp_eplb.demo.launch import add_demo_arguments, run_demo
from mp_eplb.demo.model import ConfigError, MoEConfig, MoEModel

CFG = MoEConfig(hidden=32, inter=48, num_layers=2, num_experts=8, top_k=2, num_redundant=4,
                tokens_per_rank=16, drift_interval=10)


def test_drifting_model_swaps_a_set_number_of_experts_and_repeats_batches() -> None:
    model = DriftingModel(CFG, drift_swaps=2, token_period=3, rank=0, world_size=2, device="cpu")
    assert torch.equal(model.make_tokens(1), model.make_tokens(4))
    assert not torch.equal(model.make_tokens(1), model.make_tokens(2))
    plain = MoEModel(CFG, rank=0, world_size=2, device="cpu")
    epoch0 = model.router_bias(1, 0)
    assert torch.equal(epoch0, plain.router_bias(1, 0))  # epoch 0 is the plain model's
    assert torch.equal(model.router_bias(1, 9), epoch0)
    previous = epoch0
    for epoch in range(1, 6):
        bias = model.router_bias(1, epoch * CFG.drift_interval)
        assert sorted(bias.tolist()) == sorted(epoch0.tolist())  # a permutation of popularity
        assert int((bias != previous).sum()) <= 4  # two swaps touch at most four experts
        previous = bias
    assert int((previous != epoch0).sum()) > 0
    twin = DriftingModel(CFG, drift_swaps=2, token_period=3, rank=1, world_size=2, device="cpu")
    assert torch.equal(twin.router_bias(1, 50), model.router_bias(1, 50))  # same on every rank
    whole = DriftingModel(CFG, rank=0, world_size=2, device="cpu")
    assert torch.equal(whole.router_bias(0, 25), plain.router_bias(0, 25))
    early = DriftingModel(CFG, drift_swaps=2, drift_offset=4, rank=0, world_size=2, device="cpu")
    assert torch.equal(early.router_bias(1, 5), epoch0)  # the first drift comes at step 6
    assert torch.equal(early.router_bias(1, 6), model.router_bias(1, 10))
    with pytest.raises(ConfigError, match="drift_swaps"):
        DriftingModel(CFG, drift_swaps=-1, rank=0, world_size=2, device="cpu")


def _result(rank: int, latency_ms: list[float], received: list[int], **fields) -> RankResult:
    steps = len(latency_ms)
    return RankResult(rank=rank, step_latency_s=[v / 1e3 for v in latency_ms],
                      cpu_time_s=[0.001 * (rank + 1)] * steps,
                      received=[[v] for v in received], **fields)


def test_rebalance_report_from_rank_results() -> None:
    """Rebalance 0 in steps 3..5 moves 2 slots (staged by workers); rebalance 1 is sync-like
    (one step, 8); rebalance 2 is still running at the end (step 11)."""
    before = [[0, 1, 2, 3]]
    after = [[0, 2, 1, 3]]
    lat0 = [9, 5, 5, 7, 8, 9, 5, 5, 30, 5, 5, 6]
    lat1 = [1, 4, 4, 4, 4, 4, 6, 4, 4, 4, 4, 4]
    common = dict(started=[3, 8, 11], finished=[5, 8], committed=[[5, [0]]],
                  placement_before=[before, after, after], placement_after=[after, after])
    records = lambda stage, staged: [  # noqa: E731
        {"start_step": 4, "end_step": 6, "stage_s": stage, "bytes_staged": staged,
         "started_at": 0.0, "ended_at": 1.0, "aborted": False},
        {"start_step": 9, "end_step": 9, "stage_s": None, "bytes_staged": None,
         "started_at": 2.0, "ended_at": 2.25 + stage, "aborted": False},
        {"start_step": 12, "end_step": None, "stage_s": None, "bytes_staged": None,
         "started_at": 3.0, "ended_at": None, "aborted": False}]
    results = [_result(1, lat1, [2, 2, 2, 2, 2, 4, 4, 4, 4, 4, 4, 4], rebalances=records(0.2, 300),
                       **common),
               _result(0, lat0, [6, 6, 6, 6, 6, 4, 4, 4, 4, 4, 4, 4], rebalances=records(0.1, 100),
                       **common)]
    run = rebalance_report(results, expert_bytes=1000, window=2)
    assert run.latency_ms.tolist() == [max(a, b) for a, b in zip(lat0, lat1)]
    # steady: after the first finished rebalance (step 5), outside every window: 6, 7, 9, 10
    assert run.steady.steps == 4 and run.steady.p50_ms == 5.0
    assert run.steady_cpu_ms == pytest.approx(2.0)
    first, sync, running = run.rebalances
    assert (first.start_step, first.end_step, first.layers, first.completed) == (3, 5, 1, True)
    assert (first.slots_moved, first.bytes_moved, first.bytes_staged) == (2, 2000, 400)
    assert first.transfer_s == pytest.approx(0.2)
    assert first.balancedness_before == pytest.approx(4 / 6)  # steps 1, 2
    assert first.balancedness_after == 1.0  # steps 6, 7
    assert first.during.steps == 3 and first.during.p50_ms == 8.0
    assert first.added_ms == pytest.approx((7 - 5) + (8 - 5) + (9 - 5))
    assert first.cpu_ms == pytest.approx(3 * 2.0)  # the busier rank
    assert (sync.slots_moved, sync.layers, sync.during.steps) == (0, 0, 1)
    assert sync.transfer_s == pytest.approx(0.45)  # whole call from host clocks, slowest rank
    assert sync.added_ms == pytest.approx(25.0)
    assert running.end_step is None and not running.completed
    assert running.transfer_s is None and running.balancedness_after is None
    summary = DemoSummary(ranks=2, steps=12, p50_ms=5, p99_ms=30, balancedness_start=0.6,
                          balancedness_end=1.0, window=2, rebalances=3, committed_layers=1)
    text = format_report(run, summary)
    assert "rebalance 0: steps 3 -> step 5 (3 steps), 1 layers switched, 2 slots moved" in text
    assert "balancedness 0.667 before -> 1.000 after" in text
    assert "still running at the end" in text
    assert "2 of 3 rebalances completed" in text and "12 steps on 2 ranks" in text


def _demo_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_demo_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.timeout(180)
def test_run_demo_process_mode_rebalances_and_reports(capsys: pytest.CaptureFixture[str]) -> None:
    args = _demo_args("--steps", "70", "--rebalance-interval", "20", "--drift-interval", "40",
                      "--layers", "2", "--hidden", "32", "--inter", "48", "--tokens", "16",
                      "--quiet", "--timeout", "150")
    assert run_demo(args) == 0
    out = capsys.readouterr().out
    completed = int(re.search(r"(\d+) of \d+ rebalances completed", out).group(1))
    assert completed >= 2
    blocks = re.findall(r"rebalance \d+: steps \d+ -> step \d+ .* (\d+) slots moved", out)
    assert len(blocks) >= 2 and sum(map(int, blocks)) > 0
    assert "balancedness" in out and "during vs" in out
    assert "weights verified against the final maps on all 2 ranks" in out
    assert multiprocessing.active_children() == []


def test_demo_defaults_rebalance_several_times_within_a_drift() -> None:
    args = _demo_args()
    assert args.drift_interval >= 3 * args.rebalance_interval
    assert (args.window or args.rebalance_interval) <= args.rebalance_interval
    assert args.steps // args.rebalance_interval >= 2
