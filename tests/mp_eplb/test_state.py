"""EplbState end to end: real rank processes, each with its transfer worker, gloo on CPU.

After every step, on every rank, every row of every layer must hold the weights of the
logical expert the maps name (values encode (layer, expert)), and all ranks' maps must be
identical. Loads are skewed and drift, so rebalances really move experts.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from ipc import handles
from mp_eplb import EplbConfig, EplbState
from tests.mp_eplb.dist_utils import run_distributed
from tests.mp_eplb.state_utils import encode_rows, skewed_load


pytestmark = pytest.mark.timeout(240)

NUM_LAYERS = 3
NUM_LOGICAL = 8
MAX_STEPS = 5000


def _completed(state: EplbState) -> int:
    return sum(1 for r in state.history if r.end_step is not None and not r.aborted)


def _make_weights(rank: int, world: int, phy2log: np.ndarray,
                  device: str = "cpu") -> list[list[torch.Tensor]]:
    local = phy2log.shape[1] // world
    layers = []
    for layer in range(NUM_LAYERS):
        ids = phy2log[layer, rank * local:(rank + 1) * local]
        layers.append([encode_rows(layer, ids, torch.float32, (5,)).to(device),
                       encode_rows(layer, ids, torch.bfloat16, (3, 2)).to(device),
                       encode_rows(layer, ids, torch.uint8, (4,)).to(device)])
    return layers


def _check_rank(state: EplbState, world: int) -> None:
    """Rows match the maps here, and every rank holds the same maps."""
    p2l = state.physical_to_logical_map.cpu().numpy()
    local = state.num_local
    for layer in range(NUM_LAYERS):
        ids = p2l[layer, state.rank * local:(state.rank + 1) * local]
        for t in state.expert_weights[layer]:
            expected = encode_rows(layer, ids, t.dtype, tuple(t.shape[1:])).to(t.device)
            if not torch.equal(t, expected):
                bad = [r for r in range(local) if not torch.equal(t[r], expected[r])]
                raise AssertionError(f"rank {state.rank} layer {layer} rows {bad} do not hold "
                                     f"experts {ids[bad].tolist()} (step {state.step_count})")
    mine = state.physical_to_logical_map.cpu()
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    for other in gathered:
        assert torch.equal(other, mine), "ranks' maps differ"


def _run_rebalances(rank: int, world: int, mode: str, redundant: int, steps: int,
                    device: str = "cpu", communicator: str = "auto") -> dict:
    counts = _count_transfer_calls()
    agreements = _count_async_all_reduces()
    if device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    num_phy = NUM_LOGICAL + redundant
    initial = np.tile(np.arange(num_phy) % NUM_LOGICAL, (NUM_LAYERS, 1))
    weights = _make_weights(rank, world, initial, device)
    config = EplbConfig(mode=mode, communicator=communicator, window_size=4, step_interval=6,
                        num_redundant_experts=redundant, layer_timeout_s=60,
                        start_timeout_s=120)
    groups_before = _process_groups()
    with EplbState(weights, rank=rank, world_size=world, num_logical_experts=NUM_LOGICAL,
                   num_groups=2, config=config, cpu_group=dist.group.WORLD) as state:
        # At least `steps` steps, then on until two rebalances completed and none is in
        # flight (bounded: the first NCCL rebalance pays communicator set-up).
        step = 0
        while step < steps or _completed(state) < 2 or state.rebalance_active:
            load = skewed_load(state.physical_to_logical_map.cpu().numpy(), step, rank)
            state.step(torch.as_tensor(load, device=device))
            _check_rank(state, world)
            step += 1
            assert step < MAX_STEPS, f"rebalances did not complete within {MAX_STEPS} steps"
            time.sleep(0.002)
        history = [(r.rebalance_id, r.aborted, r.layers_committed, r.commit_steps)
                   for r in state.history]
        created_groups = _process_groups() - groups_before
    return {"history": history, "p2p_calls": dict(counts), "new_groups": len(created_groups),
            "async_agreements": agreements["async"]}


def _count_async_all_reduces() -> dict:
    """Count this process's all-reduces issued with ``async_op=True`` (the pipelined commit
    agreement; the rebalance-start agreement blocks)."""
    counts = {"async": 0}
    original = dist.all_reduce

    def wrapper(*args, **kwargs):
        counts["async"] += bool(kwargs.get("async_op"))
        return original(*args, **kwargs)

    dist.all_reduce = wrapper
    return counts


def _process_groups() -> set:
    return set(dist.distributed_c10d._world.pg_map)


def _count_transfer_calls() -> dict:
    """Count P2P calls made by this process (the engine), wrapping torch.distributed's
    functions in both namespaces (P2POp checks its op against the c10d module's globals)."""
    counts = {"isend": 0, "irecv": 0, "batch_isend_irecv": 0, "send": 0, "recv": 0}
    for name in counts:
        original = getattr(c10d, name)

        def wrapper(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)
        setattr(c10d, name, wrapper)
        setattr(dist, name, wrapper)
    return counts


@pytest.mark.parametrize("world,redundant", [(2, 4), (4, 4)])
@pytest.mark.parametrize("mode", ["process", "thread", "sync"])
def test_rebalances_keep_every_layer_consistent(world: int, redundant: int, mode: str) -> None:
    results = run_distributed(_run_rebalances, world, mode, redundant, 40, timeout_s=200)
    _check_results(results, mode)


@pytest.mark.gpu
@pytest.mark.parametrize("mode,communicator", [("process", "cuda_ipc"), ("process", "nccl"),
                                               ("process", "gloo"), ("thread", "gloo"),
                                               ("sync", "auto")])
def test_rebalances_on_gpus(mode: str, communicator: str) -> None:
    world = torch.cuda.device_count()
    if world < 2:
        pytest.skip("needs 2 GPUs")
    results = run_distributed(_run_rebalances, 2, mode, 4, 40, "cuda", communicator,
                              timeout_s=200)
    _check_results(results, mode)


def _check_results(results: list[dict], mode: str) -> None:
    histories = [r["history"] for r in results]
    assert all(h == histories[0] for h in histories), "ranks disagree on what was committed when"
    done = [h for h in histories[0] if not h[1]]
    assert len(done) >= 2, f"expected several completed rebalances, got {histories[0]}"
    assert any(h[2] for h in done), "no rebalance moved anything; the loads should force moves"
    for result in results:
        pipelined = result["async_agreements"]
        assert pipelined > 0 if mode != "sync" else pipelined == 0, (mode, pipelined)
        moved = sum(result["p2p_calls"].values())
        if mode == "process":
            assert moved == 0, f"engine process issued P2P operations: {result['p2p_calls']}"
            assert result["new_groups"] == 0, "engine process created a transfer process group"
        elif mode == "thread":
            assert result["new_groups"] == 1, "thread mode should use a group of its own"


def _shutdown_mid_rebalance(rank: int, world: int) -> dict:
    num_phy = NUM_LOGICAL + 4
    initial = np.tile(np.arange(num_phy) % NUM_LOGICAL, (NUM_LAYERS, 1))
    weights = _make_weights(rank, world, initial)
    config = EplbConfig(mode="process", window_size=2, step_interval=2,
                        num_redundant_experts=4, layer_timeout_s=60)
    state = EplbState(weights, rank=rank, world_size=world, num_logical_experts=NUM_LOGICAL,
                      config=config, cpu_group=dist.group.WORLD)
    proc = state._backend.proc
    endpoint = state._backend.channel.endpoint
    committed = []
    step = 0
    while not committed and step < 5000:
        report = state.step(torch.as_tensor(skewed_load(
            state.physical_to_logical_map.cpu().numpy(), 100 + step, rank)))
        committed += report.committed_layers
        step += 1
        time.sleep(0.001)
    active = state.rebalance_active
    state.shutdown(wait=True)
    _check_rank(state, world)
    return {"committed": committed, "active": active, "exit": proc.poll(),
            "endpoint": endpoint, "owned": handles.live_segments()}


def test_shutdown_mid_rebalance_leaves_consistent_layers_and_nothing_behind() -> None:
    results = run_distributed(_shutdown_mid_rebalance, 2, timeout_s=200)
    for result in results:
        assert result["committed"], "no layer was committed before the shutdown"
        assert result["exit"] is not None, "transfer worker still running after shutdown"
        path = result["endpoint"].removeprefix("ipc://")
        assert not os.path.exists(path), f"socket file {path} left behind"
        assert result["owned"] == [], f"shared-memory segments still owned: {result['owned']}"
