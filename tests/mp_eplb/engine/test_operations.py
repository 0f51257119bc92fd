"""Operator surface: ``EplbState.metrics()`` checked against a run's history and an independent
recomputation, ``log_balancedness`` output, and ``EplbConfig.from_vllm``."""

from __future__ import annotations

import logging
import os
import signal
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist

from mp_eplb import EplbConfig, EplbState
from mp_eplb.errors import VllmConfigError, WorkerFailedError
from mp_eplb.policy import mean_balancedness
from tests.mp_eplb.dist_utils import run_distributed
from tests.mp_eplb.state_utils import encode_rows, skewed_load

pytestmark = pytest.mark.timeout(300)

LAYERS, LOGICAL, REDUNDANT, WINDOW, INTERVAL = 3, 8, 4, 4, 6


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "balancedness" in record.getMessage():
            self.lines.append(record.getMessage())


def _logical(phy_load: np.ndarray, phy2log: np.ndarray) -> np.ndarray:
    out = np.zeros((LAYERS, LOGICAL), dtype=np.int64)
    for layer in range(LAYERS):
        np.add.at(out[layer], phy2log[layer], phy_load[layer])
    return out


def _run(rank: int, world: int, mode: str, kill_worker: bool) -> dict:
    """Step until three rebalances completed; recompute each one's balancedness and bytes from
    the loads and maps seen here, and return them with the metrics."""
    num_phy = LOGICAL + REDUNDANT
    local = num_phy // world
    p2l = np.tile(np.arange(num_phy) % LOGICAL, (LAYERS, 1))
    weights = [[encode_rows(layer, p2l[layer, rank * local:(rank + 1) * local], torch.float32,
                            (6,))] for layer in range(LAYERS)]
    row_bytes = 6 * 4
    lines = _Lines()
    logging.getLogger("mp_eplb.engine.state").addHandler(lines)
    logging.getLogger("mp_eplb.engine.state").setLevel(logging.INFO)
    config = EplbConfig(mode=mode, window_size=WINDOW, step_interval=INTERVAL,
                        num_redundant_experts=REDUNDANT, log_balancedness=True,
                        log_balancedness_interval=5)
    logical_loads: list[np.ndarray] = []
    expected: dict[int, dict] = {}  # rebalance id -> recomputed figures
    with EplbState(weights, rank=rank, world_size=world, num_logical_experts=LOGICAL,
                   config=config, cpu_group=dist.group.WORLD) as state:
        metrics_before = state.metrics()
        step, killed = 0, False
        while sum(1 for r in state.history if r.end_step and not r.aborted) < 3 \
                or state.rebalance_active:
            assert step < 3000, "rebalances did not complete"
            before = state.physical_to_logical_map.numpy().copy()
            load = skewed_load(before, step, rank)
            logical_loads.append(_logical(load, before))
            report = state.step(torch.as_tensor(load))
            if report.rebalance_started or state.step_count % 5 == 0:
                window = torch.as_tensor(np.sum(logical_loads[-WINDOW:], axis=0))
                dist.all_reduce(window)
            if state.step_count % 5 == 0:  # what log_balancedness logged at this step
                logged = mean_balancedness(window, before, world)
            if report.rebalance_started:
                expected[state.history[-1].rebalance_id] = {"window": window.numpy(),
                                                            "old": before}
            if report.rebalance_finished:
                record = state.history[-1]
                after = state.physical_to_logical_map.numpy().copy()
                mine = slice(rank * local, (rank + 1) * local)
                expected[record.rebalance_id].update(
                    before=mean_balancedness(expected[record.rebalance_id]["window"],
                                             expected[record.rebalance_id]["old"], world),
                    after=mean_balancedness(expected[record.rebalance_id]["window"], after,
                                            world),
                    bytes=int((after[:, mine] != expected[record.rebalance_id]["old"][:, mine]
                               ).sum()) * row_bytes)
            if kill_worker and rank == 0 and not killed and any(
                    r.end_step and not r.aborted for r in state.history) \
                    and not state.rebalance_active:
                os.kill(state.worker_pid, signal.SIGKILL)
                killed = True
            step += 1
            time.sleep(0.002)
        metrics = state.metrics()
        history = [{"id": r.rebalance_id, "aborted": r.aborted, "layers": r.layers_committed,
                    "bytes": r.bytes_staged, "before": r.balancedness_before,
                    "after": r.balancedness_after, "seconds": r.duration_s,
                    "steps": r.end_step - r.start_step} for r in state.history]
        error_before = state.metrics()["mp_eplb_last_error_age_seconds"]
        state.last_error = WorkerFailedError("test")
        time.sleep(0.05)
        error_age = state.metrics()["mp_eplb_last_error_age_seconds"]
        current = state.current_balancedness
    return {"metrics": metrics, "before": metrics_before, "history": history,
            "expected": {k: {n: v for n, v in e.items() if n in ("before", "after", "bytes")}
                         for k, e in expected.items()},
            "error_before": error_before, "error_age": error_age, "lines": lines.lines,
            "steps": step, "current": current, "logged": logged}


@pytest.mark.parametrize("mode,kill_worker", [("sync", False), ("process", False),
                                              ("process", True)])
def test_metrics_match_the_run_history(mode: str, kill_worker: bool) -> None:
    results = run_distributed(_run, 2, mode, kill_worker, timeout_s=280)
    for rank, result in enumerate(results):
        m, history = result["metrics"], result["history"]
        done = [h for h in history if not h["aborted"]]
        assert result["before"]["mp_eplb_rebalances_total"] == 0
        assert result["before"]["mp_eplb_balancedness_after"] == -1.0
        assert result["before"]["mp_eplb_last_rebalance_seconds"] == -1.0
        assert m["mp_eplb_steps_total"] == result["steps"]
        assert m["mp_eplb_rebalances_total"] == len(done) >= 3
        assert m["mp_eplb_rebalance_aborts_total"] == len(history) - len(done)
        assert m["mp_eplb_layers_moved_total"] == sum(len(h["layers"]) for h in history) > 0
        assert m["mp_eplb_bytes_moved_total"] == sum(h["bytes"] or 0 for h in history) > 0
        assert m["mp_eplb_balancedness_before"] == done[-1]["before"]
        assert m["mp_eplb_balancedness_after"] == done[-1]["after"]
        assert m["mp_eplb_last_rebalance_seconds"] == history[-1]["seconds"] > 0
        assert m["mp_eplb_last_rebalance_steps"] == history[-1]["steps"]
        assert m["mp_eplb_rebalance_active"] == 0
        assert m["mp_eplb_worker_restarts_total"] == int(kill_worker)
        for h in done:  # recomputed here from the loads and maps the rank saw
            want = result["expected"][h["id"]]
            assert h["before"] == pytest.approx(want["before"])
            assert h["after"] == pytest.approx(want["after"])
            assert h["after"] >= h["before"]
            assert h["bytes"] == want["bytes"]
        if kill_worker:  # the killer's rank saw it (a peer's worker may, through its group)
            assert rank == 1 or (result["error_before"] >= 0 and m["mp_eplb_errors_total"] >= 1)
        else:
            assert result["error_before"] == -1.0
            assert m["mp_eplb_errors_total"] == 0 and m["mp_eplb_healthy"] == 1
        assert result["error_age"] >= 0.05
        assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in m.values())
        # log_balancedness: rank 0 logs every 5 steps, the gauge holds the last value
        if rank == 0:
            assert len(result["lines"]) == result["steps"] // 5
            assert result["lines"][-1].startswith(f"EPLB after {result['steps'] // 5 * 5} steps: "
                                                  f"balancedness {result['current']:.4f}")
        else:
            assert result["lines"] == []
        assert m["mp_eplb_balancedness_current"] == result["current"]
        assert result["current"] == pytest.approx(result["logged"])


def test_from_vllm_maps_names_and_values() -> None:
    config = EplbConfig.from_vllm({"window_size": 500, "step_interval": 2000,
                                   "num_redundant_experts": 16, "log_balancedness": True,
                                   "log_balancedness_interval": 10, "use_async": True,
                                   "communicator": "torch_nccl", "policy": "default"})
    assert config == EplbConfig(window_size=500, step_interval=2000, num_redundant_experts=16,
                                log_balancedness=True, log_balancedness_interval=10,
                                mode="process", communicator="nccl")
    vllm_like = SimpleNamespace(window_size=100, use_async=False, communicator="torch_gloo",
                                log_balancedness_interval=None)
    assert EplbConfig.from_vllm(vllm_like, ranks_per_node=8) == EplbConfig(
        window_size=100, mode="sync", communicator="gloo", ranks_per_node=8)
    assert EplbConfig.from_vllm(communicator="pynccl").communicator == "nccl"
    assert EplbConfig.from_vllm() == EplbConfig()


@pytest.mark.parametrize("settings,message", [
    ({"policy": "flashlb"}, "policy 'flashlb' is not available"),
    ({"communicator": "nixl"}, "communicator 'nixl' has no mp_eplb equivalent"),
    ({"enable_eplb": True}, "setting 'enable_eplb' has no mp_eplb equivalent"),
    ({"window_size": 0}, "EplbConfig.window_size must be a positive integer"),
    ({"log_balancedness": 1}, "EplbConfig.log_balancedness must be True or False"),
])
def test_from_vllm_refuses_what_differs(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EplbConfig.from_vllm(settings)
    if "policy" in settings or "communicator" in settings or "enable_eplb" in settings:
        with pytest.raises(VllmConfigError):
            EplbConfig.from_vllm(**settings)
