"""EplbState refuses bad input before touching anything, and runs on a single rank."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import mp_eplb.engine.state as state_module
from mp_eplb import EplbConfig, EplbError, EplbState
from mp_eplb.errors import InvalidLoadError, StateClosedError
from mp_eplb.policy import global_policy_reason
from tests.mp_eplb.dist_utils import run_distributed
from tests.mp_eplb.state_utils import encode_rows, skewed_load

pytestmark = pytest.mark.timeout(120)


def _weights(layers: int = 2, slots: int = 6) -> list[list[torch.Tensor]]:
    ids = np.arange(slots) % 4
    return [[encode_rows(layer, ids, torch.float32, (3,)),
             encode_rows(layer, ids, torch.uint8, (2, 2))] for layer in range(layers)]


def _children() -> set[int]:
    """Live child processes of this process (a refused state must not have spawned any)."""
    me, found = str(os.getpid()), set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def _state(weights=None, **kwargs) -> EplbState:
    args = dict(rank=0, world_size=1, num_logical_experts=4,
                config=EplbConfig(mode="process", num_redundant_experts=2))
    args.update(kwargs)
    return EplbState(_weights() if weights is None else weights, **args)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(rank=1), "must satisfy 0 <= rank < world_size"),
    (dict(world_size=2, rank=0), "cpu_group .* is required when world_size > 1"),
    (dict(num_logical_experts=5), r"6 physical slots, but num_logical_experts=5 \+ "
                                  r"EplbConfig.num_redundant_experts=2 = 7"),
    (dict(initial_phy2log=np.zeros((2, 6), dtype=np.int64)), "no slot for logical expert 1"),
    (dict(initial_phy2log=np.tile(np.arange(6) % 4, (3, 1))), r"initial_phy2log must have shape \(2, 6\), got \(3, 6\)"),
    (dict(config=EplbConfig(num_redundant_experts=2, ranks_per_node=4)),
     "ranks_per_node=4 must divide world_size=1"),
    (dict(config=EplbConfig(mode="sync", num_redundant_experts=2)),
     "mode='sync' moves weights in this process and needs ep_group or cpu_group"),
    (dict(num_groups=0), "num_groups must be an integer >= 1, got 0"),
    (dict(num_groups=2.0), "num_groups must be an integer >= 1, got 2.0"),
    (dict(num_logical_experts=0), "num_logical_experts must be an integer >= 1, got 0"),
    (dict(world_size=True), r"rank=0 and world_size=True must satisfy"),
    # Two nodes of one rank each (12 slots = 4 experts + 8 redundant): the workers cannot
    # meet on the 127.0.0.1 port rank 0 would pick.
    (dict(world_size=2, cpu_group=object(),
          config=EplbConfig(num_redundant_experts=8, ranks_per_node=1)),
     r"the ranks span 2 nodes \(EplbConfig.ranks_per_node=1\) but EplbConfig.rendezvous is "
     "None; set it to 'tcp://host:port'"),
    (dict(config=EplbConfig(num_redundant_experts=2, communicator="cuda_ipc")),
     "communicator='cuda_ipc' needs CUDA weights"),
])
def test_bad_arguments_are_refused(kwargs: dict, needle: str) -> None:
    before = _children()
    with pytest.raises(ValueError, match=needle):
        _state(**kwargs)
    assert _children() == before, "a refused state spawned a process"


@pytest.mark.parametrize("config", [{"mode": "sync"}, "process"])
def test_a_config_that_is_not_an_eplb_config_is_a_type_error(config: object) -> None:
    with pytest.raises(TypeError, match=f"config must be an EplbConfig .*got "
                                        f"{type(config).__name__}; pass EplbConfig"):
        _state(config=config)


@pytest.mark.parametrize("groups,experts,nodes,reason", [
    (1, 7, 2, ""),  # one group: the global policy anyway
    (4, 8, 2, ""),
    (3, 8, 1, "num_groups=3 does not divide the 8 logical experts"),
    (2, 8, 4, "num_groups=2 is not a multiple of the 4 nodes"),
])
def test_global_policy_reason(groups: int, experts: int, nodes: int, reason: str) -> None:
    assert global_policy_reason(groups, experts, nodes) == reason


def test_unusable_num_groups_warns_once_and_the_worker_gets_the_global_policy(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mp_eplb.engine.state"):
        with _state(num_groups=3) as state:
            assert (state.num_groups, state.topology.num_groups) == (1, 1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["rank 0: num_groups=3 does not divide the 4 logical experts; the global "
                        "policy is used (num_groups=1)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mp_eplb.engine.state"):
        with _state(num_groups=2) as state:
            assert (state.num_groups, state.topology.num_groups) == (2, 2)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_bad_weights_are_refused_and_left_untouched() -> None:
    weights = _weights()
    originals = [[t.clone() for t in layer] for layer in weights]
    bad = [[weights[0][0], weights[0][1]], [weights[1][0][:, :2], weights[1][1]]]
    with pytest.raises(ValueError, match=r"expert_weights\[1\]\[0\] is \(6, 2\)"):
        _state(bad)
    with pytest.raises(ValueError, match=r"expert_weights\[1\] has 1 tensors"):
        _state([weights[0], weights[1][:1]])
    strided = torch.zeros(3, 6).t()
    with pytest.raises(ValueError, match="not contiguous"):
        _state([[strided], [strided.contiguous()]])
    with pytest.raises(ValueError, match="at least one layer"):
        _state([])
    with pytest.raises(ValueError, match=r"expert_weights\[0\]\[0\] must be a tensor \[local "
                                         r"slots, ...\], got Tensor of shape \(\)"):
        _state([[torch.tensor(1.0)], [torch.tensor(2.0)]])
    for layer, original in zip(weights, originals):
        for t, o in zip(layer, original):
            assert torch.equal(t, o)


def test_step_refuses_a_load_of_the_wrong_shape() -> None:
    with _state() as state:
        with pytest.raises(ValueError, match=r"expert_load has shape \(6,\), expected \(2, 6\)"):
            state.step(torch.zeros(6, dtype=torch.int64))
        assert state.step_count == 0


#: _weights()' initial placement: slots hold logical experts 0, 1, 2, 3, 0, 1.
_SLOT_EXPERT = np.arange(6) % 4


def _per_logical(load: np.ndarray) -> np.ndarray:
    """Tokens per logical expert of a per-slot load under the initial placement."""
    out = np.zeros((load.shape[0], 4), dtype=np.int64)
    for slot, expert in enumerate(_SLOT_EXPERT):
        out[:, expert] += load[:, slot]
    return out


@pytest.mark.parametrize("load,error,needle", [
    (torch.full((2, 6), 1.7), TypeError, "expert_load has dtype torch.float32; pass integer"),
    (torch.ones(2, 6, dtype=torch.bool), TypeError, "expert_load has dtype torch.bool"),
    (np.ones((2, 6)), TypeError, "expert_load has dtype float64; pass integer"),
    (np.ones((2, 6), dtype=bool), TypeError, "expert_load has dtype bool"),
    ([[1] * 6] * 2, TypeError, "expert_load is a list; pass a torch tensor or numpy array"),
    (torch.ones(2, 6, dtype=torch.int64, device="meta"), ValueError,
     r"expert_load is on meta; pass it on the CPU or on the weights' device \(cpu\)"),
    (torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, -3, 3, -1, 5]]), InvalidLoadError,
     r"expert_load\[1, 2\] = -3 is negative \(2 negative entries\); pass token counts >= 0"),
    (np.array([[0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 0, -7]], dtype=np.int16), InvalidLoadError,
     r"expert_load\[1, 5\] = -7 is negative \(1 negative entries\)"),
])
def test_step_refuses_a_bad_load_and_changes_nothing(load: object, error: type,
                                                     needle: str) -> None:
    good = np.arange(12, dtype=np.int64).reshape(2, 6)
    with _state() as state:
        state.step(torch.as_tensor(good))
        window = state.load_window.clone()
        with pytest.raises(error, match=needle):
            state.step(load)
        assert state.step_count == 1 and torch.equal(state.load_window, window)
        assert state.last_error is None
    assert issubclass(InvalidLoadError, EplbError) and issubclass(InvalidLoadError, ValueError)


@pytest.mark.parametrize("make", [
    lambda a: a.astype(np.int32),
    lambda a: a.astype(np.uint8),
    lambda a: np.asfortranarray(a.astype(np.int64)),
    lambda a: torch.as_tensor(a, dtype=torch.int8),
    lambda a: torch.as_tensor(a, dtype=torch.uint8),
    lambda a: torch.as_tensor(a, dtype=torch.int16),
])
def test_step_takes_any_integer_load_from_torch_or_numpy(make) -> None:
    loads = [np.arange(12).reshape(2, 6) % 7, np.full((2, 6), 3)]
    with _state() as state:
        for load in loads:
            state.step(make(load))
        assert state.step_count == 2
        for row, load in enumerate(loads):
            assert state.load_window[row].tolist() == _per_logical(load).tolist()


def test_step_after_shutdown_is_a_closed_state_error() -> None:
    state = _state()
    state.step(torch.zeros(2, 6, dtype=torch.int64))
    state.shutdown()
    state.shutdown()  # idempotent
    with pytest.raises(StateClosedError, match=r"step\(\) called after shutdown\(\); build a new "
                                               "EplbState"):
        state.step(torch.zeros(2, 6, dtype=torch.int64))
    assert state.step_count == 1
    assert issubclass(StateClosedError, EplbError) and issubclass(StateClosedError, ValueError)


def _step_until_second_rebalance_ends(state: EplbState, load: torch.Tensor) -> None:
    """Step with ``load`` (1 ms apart) until the state's second rebalance has ended."""
    for _ in range(5000):
        if len(state.history) >= 2 and state.history[1].end_step is not None:
            return
        state.step(load)
        time.sleep(0.001)
    pytest.fail(f"the next rebalance did not complete: {state.history}")


def test_a_deferred_negative_load_skips_the_rebalance_not_the_worker(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path's check on CPU tensors: the negative count is accepted by step() (no host
    sync), found at the rebalance start, that rebalance is skipped without reaching the worker
    (no restart), and the next one runs on the cleared window."""
    monkeypatch.setattr(state_module, "_sign_checked_later", lambda load: True)
    config = EplbConfig(num_redundant_experts=2, window_size=3, step_interval=4)
    good = torch.as_tensor(np.arange(12).reshape(2, 6) % 5)
    bad = good.clone()
    bad[1, 3] = -5
    with _state(config=config) as state:
        pid = state.worker_pid
        for load in (good, bad, good):
            assert state.step(load) == state_module.StepReport()
        report = state.step(good)  # step 4: the rebalance start
        assert (report.rebalance_started, report.rebalance_finished, report.rebalance_active,
                report.committed_layers) == (True, True, False, [])
        expected = ("expert_load held a negative token count (minimum -5) before the rebalance "
                    "at step 4; that rebalance is skipped on every rank and this rank's load "
                    "window cleared; pass token counts >= 0")
        assert isinstance(state.last_error, InvalidLoadError)
        assert str(state.last_error) == expected
        record = state.history[0]
        assert (record.aborted, record.reason, record.start_step, record.end_step) == (
            True, f"skipped: {expected}", 4, 4)
        assert not state.load_window.any()
        _step_until_second_rebalance_ends(state, good)
        assert state.history[1].start_step == 8 and not state.history[1].aborted
        assert (state.worker_pid, state.worker_restarts) == (pid, 0)


def _negative_on_one_rank(rank: int, world: int) -> dict:
    """Sync mode on two ranks; rank 1 routes a negative count (deferred check) at step 2."""
    state_module._sign_checked_later = lambda load: True
    config = EplbConfig(mode="sync", num_redundant_experts=2, window_size=3, step_interval=4)
    mine = slice(3 * rank, 3 * rank + 3)
    weights = [[encode_rows(layer, _SLOT_EXPERT[mine], torch.float32, (3,))]
               for layer in range(2)]
    state = EplbState(weights, rank=rank, world_size=world, num_logical_experts=4, config=config,
                      cpu_group=dist.group.WORLD)
    good = torch.as_tensor(np.arange(12).reshape(2, 6) % 5)
    for step in range(1, 9):
        load = good.clone()
        if step == 2 and rank == 1:
            load[0, 0] = -1
        state.step(load)
    p2l = state.physical_to_logical_map.numpy()
    matches = all(torch.equal(weights[layer][0], encode_rows(layer, p2l[layer, mine],
                                                             torch.float32, (3,)))
                  for layer in range(2))
    state.shutdown()
    try:
        state.step(good)
        closed = ""
    except StateClosedError as err:
        closed = str(err)
    error = state.last_error
    return {"history": [(r.start_step, r.aborted, r.reason) for r in state.history],
            "error": None if error is None else (type(error).__name__, str(error)),
            "matches": matches, "closed": closed}


def test_a_negative_load_on_one_rank_skips_the_rebalance_on_every_rank() -> None:
    ranks = run_distributed(_negative_on_one_rank, 2, timeout_s=120)
    assert [h[:2] for h in ranks[0]["history"]] == [(4, True), (8, False)]
    assert [h[:2] for h in ranks[1]["history"]] == [(4, True), (8, False)]
    assert ranks[0]["history"][0][2] == ("skipped: a peer rank's expert_load held a negative "
                                         "token count")
    assert ranks[1]["history"][0][2].startswith("skipped: expert_load held a negative token "
                                                 "count (minimum -1) before the rebalance at step 4")
    assert ranks[0]["error"] is None
    assert ranks[1]["error"][0] == "InvalidLoadError"
    assert ranks[1]["error"][1].startswith("expert_load held a negative token count (minimum -1)")
    assert ranks[0]["matches"] and ranks[1]["matches"], "weights do not follow the maps"
    assert all(r["closed"].startswith("EplbState.step() called after shutdown()") for r in ranks)


def test_single_rank_runs_rebalances_without_peers() -> None:
    """One rank: the worker's group has one member; rebalances complete and every row
    always matches the maps (whether the policy moves anything on one rank is its call)."""
    weights = _weights()
    config = EplbConfig(num_redundant_experts=2, window_size=3, step_interval=4)
    with EplbState(weights, rank=0, world_size=1, num_logical_experts=4, config=config) as state:
        step = 0
        while sum(r.end_step is not None for r in state.history) < 3:
            assert step < 5000, f"rebalances did not complete: {state.history}"
            step += 1
            state.step(torch.as_tensor(
                skewed_load(state.physical_to_logical_map.numpy(), step, 0, phase=5)))
            p2l = state.physical_to_logical_map.numpy()
            for layer in range(2):
                assert torch.equal(weights[layer][0],
                                   encode_rows(layer, p2l[layer], torch.float32, (3,)))
                assert torch.equal(weights[layer][1],
                                   encode_rows(layer, p2l[layer], torch.uint8, (2, 2)))
            time.sleep(0.001)
        done = [r for r in state.history if r.end_step is not None and not r.aborted]
    assert len(done) >= 3, f"expected completed rebalances: {state.history}"


@pytest.mark.gpu
def test_a_negative_load_on_the_gpu_is_found_at_the_rebalance_start() -> None:
    """CUDA weights and loads, process mode: the per-step path adds no host sync (sync debug
    mode 'error'), the negative count is found at the rebalance start, the rebalance skipped
    without reaching the worker, and the next one completes with weights matching the maps."""
    device = torch.device("cuda", 0)
    weights = [[t.to(device) for t in layer] for layer in _weights()]
    config = EplbConfig(num_redundant_experts=2, window_size=3, step_interval=4)
    good = torch.as_tensor(np.arange(12).reshape(2, 6) % 5, device=device)
    bad = good.clone()
    bad[1, 3] = -5
    with EplbState(weights, rank=0, world_size=1, num_logical_experts=4, config=config) as state:
        pid = state.worker_pid
        with pytest.raises(InvalidLoadError, match=r"expert_load\[1, 3\] = -5 is negative"):
            state.step(bad.cpu())  # a CPU load is checked at once, also beside CUDA weights
        with pytest.raises(TypeError, match="expert_load has dtype torch.float32"):
            state.step(good.float())
        assert state.step_count == 0
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for load in (good, bad, good):
                assert state.step(load) == state_module.StepReport()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        report = state.step(good)  # step 4: the rebalance start reads the running minimum
        assert (report.rebalance_started, report.rebalance_finished, report.committed_layers) == (
            True, True, [])
        assert isinstance(state.last_error, InvalidLoadError)
        assert str(state.last_error).startswith(
            "expert_load held a negative token count (minimum -5) before the rebalance at step 4")
        assert state.history[0].aborted and state.history[0].reason.startswith("skipped: ")
        assert not state.load_window.any()
        _step_until_second_rebalance_ends(state, good)
        assert not state.history[1].aborted
        assert (state.worker_pid, state.worker_restarts) == (pid, 0)
        torch.cuda.synchronize(device)
        p2l = state.physical_to_logical_map.cpu().numpy()
        for layer in range(2):
            assert torch.equal(weights[layer][0].cpu(),
                               encode_rows(layer, p2l[layer], torch.float32, (3,)))
            assert torch.equal(weights[layer][1].cpu(),
                               encode_rows(layer, p2l[layer], torch.uint8, (2, 2)))
