"""The demo engine: scheduler bookkeeping, balancedness and summary, the static balancer, the
step loop with a balancer that really moves weights (mp_eplb.transfer) between steps, the
launcher's failure handling, and a whole ``run_demo``."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time

import numpy as np
import pytest
import torch

from mp_eplb.demo.engine import (
    Balancer,
    FakeScheduler,
    RankResult,
    StaticBalancer,
    StepReport,
    balancedness,
    run_engine,
    summarize,
)
from mp_eplb.demo.launch import DemoFailure, RankEnv, add_demo_arguments, run_demo, spawn_ranks
from mp_eplb.demo.model import MoEConfig, MoEModel, VerificationError, routing_maps, verify_weights
from mp_eplb.transfer import rearrange_expert_weights_inplace

CFG = dict(hidden=32, inter=48, num_layers=3, num_experts=8, top_k=2, num_redundant=4,
           tokens_per_rank=16, drift_interval=3)


def test_scheduler_accounts_tokens_and_kv_blocks() -> None:
    sched = FakeScheduler(16, seed=3, rank=1)
    twin = FakeScheduler(16, seed=3, rank=1)
    for step in range(200):
        assert sched.schedule(step) == 16
        twin.schedule(step)
        assert len(sched.requests) <= sched.pool_size
        assert sched.kv_blocks == sum(req["blocks"] for req in sched.requests.values())
    assert sched.finished > 0
    assert sum(sched.tokens_by_priority.values()) == 200 * 16
    assert sched.stats == twin.stats and sched.tokens_by_priority == twin.tokens_by_priority
    states = {k: v for k, v in sched.stats.items() if k.startswith("p")}
    assert sum(states.values()) == len(sched.requests)
    assert sched.stats["context_tokens"] == sum(r["prompt_len"] + r["generated"]
                                                for r in sched.requests.values())


def test_balancedness_is_mean_over_max() -> None:
    even = np.array([[[4, 8]], [[4, 8]]])  # [ranks, steps, layers]
    assert balancedness(even) == 1.0
    skewed = np.array([[[6, 8]], [[2, 0]]])
    assert balancedness(skewed) == pytest.approx(((4 / 6) + (4 / 8)) / 2)
    assert balancedness(np.zeros((2, 1, 1))) == 1.0


def test_summary_of_rank_results() -> None:
    ranks = [RankResult(rank=r, step_latency_s=[0.001 * (s + 1) * (r + 1) for s in range(10)],
                        received=[[6 - 4 * r] if s < 5 else [4] for s in range(10)],
                        rebalance_active=[2 <= s < 4 for s in range(10)],
                        committed=[[3, [0]]], started=[2], finished=[3])
             for r in (1, 0)]
    summary = summarize(ranks)
    assert (summary.ranks, summary.steps, summary.window) == (2, 10, 2)
    assert summary.p50_ms == pytest.approx(np.percentile([2 * (s + 1) for s in range(10)], 50))
    assert summary.balancedness_start == pytest.approx(4 / 6)
    assert summary.balancedness_end == 1.0
    assert (summary.rebalances, summary.committed_layers) == (1, 1)
    assert "10 steps on 2 ranks" in summary.describe()
    assert RankResult.from_dict(ranks[0].to_dict()) == ranks[0]


def test_static_balancer_keeps_initial_maps() -> None:
    model = MoEModel(MoEConfig(**CFG), rank=0, world_size=2, device="cpu")
    balancer = StaticBalancer.for_model(model)
    assert isinstance(balancer, Balancer)
    assert torch.equal(balancer.physical_to_logical_map, model.initial_phy2log)
    assert balancer.logical_to_physical_map[1, 2].tolist() == [2, 10, -1, -1, -1]
    assert balancer.logical_replica_count[1].tolist() == [2, 2, 2, 2, 1, 1, 1, 1]
    report = balancer.step(torch.zeros(3, 12, dtype=torch.int64))
    assert report == StepReport()
    balancer.shutdown()


class _MovingBalancer:
    """Moves every layer to ``new_phy2log`` with rearrange_expert_weights_inplace after the
    forward of ``switch_step``; with ``update_maps`` it also switches the maps (new tensors)."""

    def __init__(self, model: MoEModel, env: RankEnv, new_phy2log: torch.Tensor,
                 switch_step: int, update_maps: bool) -> None:
        static = StaticBalancer.for_model(model)
        self.physical_to_logical_map = static.physical_to_logical_map
        self.logical_to_physical_map = static.logical_to_physical_map
        self.logical_replica_count = static.logical_replica_count
        self._model, self._env, self._new = model, env, new_phy2log
        self._switch_step, self._update_maps = switch_step, update_maps
        self._step = 0
        self.load_sums: list[int] = []

    def step(self, load: torch.Tensor) -> StepReport:
        step, self._step = self._step, self._step + 1
        self.load_sums.append(int(load.sum()))
        if step != self._switch_step:
            return StepReport()
        rearrange_expert_weights_inplace(self.physical_to_logical_map, self._new,
                                         self._model.expert_weights, self._env.ep_group)
        if self._update_maps:
            self.physical_to_logical_map = self._new.clone()
            self.logical_to_physical_map, self.logical_replica_count = routing_maps(
                self._new, self._model.cfg)
        return StepReport(committed_layers=list(range(self._model.cfg.num_layers)),
                          rebalance_started=True, rebalance_finished=True)

    def shutdown(self) -> None:
        """Nothing to release."""


def _new_placement(cfg: MoEConfig) -> torch.Tensor:
    """Per layer a fresh permutation of the experts, then replicas of experts 4..7."""
    gen = torch.Generator().manual_seed(11)
    rows = [torch.cat([torch.randperm(cfg.num_experts, generator=gen),
                       torch.arange(4, 4 + cfg.num_redundant)]) for _ in range(cfg.num_layers)]
    return torch.stack(rows)


def _engine_across_a_move(env: RankEnv, cfg_kwargs: dict) -> dict:
    cfg = MoEConfig(**cfg_kwargs)
    new = _new_placement(cfg)

    def engine(update_maps: bool) -> tuple[MoEModel, _MovingBalancer]:
        model = MoEModel(cfg, rank=env.rank, world_size=env.world_size, device=env.device,
                         ep_group=env.ep_group, cpu_group=env.cpu_group)
        return model, _MovingBalancer(model, env, new, switch_step=2, update_maps=update_maps)

    model, balancer = engine(update_maps=True)
    result = run_engine(model, balancer, steps=5, verify=True, progress_every=2)
    try:
        verify_weights(model.expert_weights, model.initial_phy2log, cfg=cfg, rank=env.rank)
        moved = False
    except VerificationError:
        moved = True
    out = {"result": result.to_dict(), "load_sums": balancer.load_sums, "moved": moved}
    model, balancer = engine(update_maps=False)
    try:
        run_engine(model, balancer, steps=5, verify=True)
    except VerificationError as exc:
        out["stale"] = [exc.layer, exc.step, exc.rank, str(exc)]
    return out


@pytest.mark.timeout(120)
def test_engine_follows_a_rearrangement_between_steps() -> None:
    """Weights moved by mp_eplb.transfer between steps, maps switched: the dense reference
    still matches every step; weights moved but maps kept: every rank fails at that step."""
    cfg = MoEConfig(**CFG)
    results = spawn_ranks(_engine_across_a_move, CFG, world_size=2, timeout_s=90)
    for rank, out in enumerate(results):
        result = RankResult.from_dict(out["result"])
        assert len(result.step_latency_s) == 5 and all(t > 0 for t in result.step_latency_s)
        assert result.committed == [[2, [0, 1, 2]]]
        assert (result.started, result.finished) == ([2], [2])
        assert out["moved"] is True
        assert out["load_sums"] == [cfg.num_layers * cfg.tokens_per_rank * cfg.top_k] * 5
        layer, step, _, message = out["stale"]
        assert step == 2 and "does not hold" in message
    total = np.asarray([RankResult.from_dict(o["result"]).received for o in results]).sum(axis=0)
    assert (total == 2 * cfg.tokens_per_rank * cfg.top_k).all()


def _exit_three(env: RankEnv, arg: object) -> None:
    os._exit(3)


def _hang(env: RankEnv, arg: object) -> None:
    time.sleep(60)


@pytest.mark.timeout(60)
def test_launcher_reports_dead_and_hung_ranks_and_leaves_none() -> None:
    with pytest.raises(DemoFailure, match=r"rank 0: exited \(code 3\) without a result"):
        spawn_ranks(_exit_three, None, world_size=1, timeout_s=30)
    start = time.monotonic()
    with pytest.raises(DemoFailure, match=r"rank 0: gave no result within the timeout \(2 s\)"):
        spawn_ranks(_hang, None, world_size=1, timeout_s=2)
    assert time.monotonic() - start < 20
    assert multiprocessing.active_children() == []


def _demo_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_demo_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.timeout(120)
def test_run_demo_mode_none_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    args = _demo_args("--mode", "none", "--ranks", "2", "--steps", "12", "--verify", "--layers", "2",
                      "--hidden", "32", "--inter", "48", "--tokens", "16", "--timeout", "90")
    assert run_demo(args) == 0
    out = capsys.readouterr().out
    assert "12 steps on 2 ranks" in out and "0 rebalances" in out
    assert multiprocessing.active_children() == []


def test_run_demo_rejects_bad_options_before_starting(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_demo(_demo_args("--ranks", "3")) == 1  # 20 slots over 3 ranks
    assert "must divide evenly over 3 ranks" in capsys.readouterr().err
    assert run_demo(_demo_args("--dtype", "bfloat16")) == 1
    assert "needs --device cuda" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_run_demo_on_two_gpus_with_nccl(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    args = _demo_args("--device", "cuda", "--ranks", "2", "--steps", "20", "--verify",
                      "--dtype", "bfloat16", "--hidden", "256", "--inter", "512", "--timeout", "240")
    assert run_demo(args) == 0
    assert "20 steps on 2 ranks" in capsys.readouterr().out
