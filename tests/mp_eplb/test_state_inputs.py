"""EplbState refuses bad input before touching anything, and runs on a single rank."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from mp_eplb import EplbConfig, EplbState
from tests.mp_eplb.state_utils import encode_rows, skewed_load

pytestmark = pytest.mark.timeout(120)


def _weights(layers: int = 2, slots: int = 6) -> list[list[torch.Tensor]]:
    ids = np.arange(slots) % 4
    return [[encode_rows(layer, ids, torch.float32, (3,)),
             encode_rows(layer, ids, torch.uint8, (2, 2))] for layer in range(layers)]


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
    (dict(initial_phy2log=np.tile(np.arange(6) % 4, (3, 1))), r"expected \(2, 6\)"),
    (dict(config=EplbConfig(num_redundant_experts=2, ranks_per_node=4)),
     "ranks_per_node=4 must divide world_size=1"),
    (dict(config=EplbConfig(mode="sync", num_redundant_experts=2)),
     "mode='sync' moves weights in this process and needs ep_group or cpu_group"),
])
def test_bad_arguments_are_refused(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        _state(**kwargs)


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
    for layer, original in zip(weights, originals):
        for t, o in zip(layer, original):
            assert torch.equal(t, o)


def test_step_refuses_a_load_of_the_wrong_shape() -> None:
    with _state() as state:
        with pytest.raises(ValueError, match=r"expert_load has shape \(6,\), expected \(2, 6\)"):
            state.step(torch.zeros(6, dtype=torch.int64))
        assert state.step_count == 0


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
