"""The graph engine (``--engine graph``): eager on the CPU its outputs equal the dense
reference, it runs through rebalances in process mode on 2 gloo ranks with ``--verify``, and
on a GPU it captures one CUDA graph and replays it."""

from __future__ import annotations

import pytest
import torch

from mp_eplb.cli import build_parser
from mp_eplb.demo.engine import StaticBalancer
from mp_eplb.demo.graph import GraphBindingError, GraphMoEModel, GraphOptions
from mp_eplb.demo.launch import run_ranks
from mp_eplb.demo.model import MoEConfig

SMALL = MoEConfig(hidden=32, inter=48, num_layers=2, num_experts=8, top_k=2, num_redundant=2,
                  tokens_per_rank=16)


def _model(device: str, **options: object) -> GraphMoEModel:
    return GraphMoEModel(SMALL, options=GraphOptions(**options), rank=0, world_size=1,
                         device=device)


def _run_steps(model: GraphMoEModel, balancer: StaticBalancer, steps: range) -> None:
    for step in steps:
        out = model.forward(model.make_tokens(step), step, balancer.logical_to_physical_map,
                            balancer.logical_replica_count)
        excess, _ = model.layer_errors()
        assert (excess <= 1.0).all(), f"step {step}: {excess.tolist()}"
        assert int(model.dropped.sum()) == 0
        assert out.load.sum(dim=1).tolist() == [SMALL.tokens_per_rank * SMALL.top_k] * 2
        assert out.received.tolist() == [SMALL.tokens_per_rank * SMALL.top_k] * 2


def test_eager_step_equals_the_dense_reference_and_refuses_rebound_maps() -> None:
    model = _model("cpu", capacity_factor=float(SMALL.num_physical))
    balancer = StaticBalancer.for_model(model)
    _run_steps(model, balancer, range(3))
    with pytest.raises(GraphBindingError, match="in place"):
        model.forward(model.make_tokens(3), 3, balancer.logical_to_physical_map.clone(),
                      balancer.logical_replica_count)


def test_small_capacity_drops_pairs_and_counts_them() -> None:
    model = _model("cpu", capacity_factor=0.25)
    balancer = StaticBalancer.for_model(model)
    model.forward(model.make_tokens(0), 0, balancer.logical_to_physical_map,
                  balancer.logical_replica_count)
    pairs = SMALL.tokens_per_rank * SMALL.top_k
    assert (model.dropped > 0).all()
    assert (model.received + model.dropped).tolist() == [pairs] * SMALL.num_layers


@pytest.mark.timeout(300)
def test_process_mode_rebalances_with_verified_outputs_on_two_gloo_ranks() -> None:
    args = build_parser().parse_args([
        "demo", "--engine", "graph", "--capacity-factor", "16", "--ranks", "2", "--steps", "70",
        "--rebalance-interval", "20", "--layers", "2", "--experts", "8", "--redundant", "4",
        "--hidden", "32", "--inter", "48", "--tokens", "16", "--drift-interval", "10",
        "--verify", "--quiet"])
    results = run_ranks(args)
    assert len(results) == 2
    committed = [layers for _, layers in results[0].committed]
    assert results[0].finished and committed, "no rebalance switched a layer"
    assert [r.committed for r in results] == [results[0].committed] * 2
    assert all(not r.gpu_time_s for r in results)  # CPU: no CUDA events


@pytest.mark.gpu
def test_cuda_graph_captures_and_replays_through_in_place_map_updates() -> None:
    model = _model("cuda", capacity_factor=float(SMALL.num_physical))
    balancer = StaticBalancer.for_model(model)
    _run_steps(model, balancer, range(2))
    assert model.graph_captured
    # Route expert 0's second replica first: an in-place map update the graph must follow.
    log2phy = balancer.logical_to_physical_map
    log2phy[:, 0, :2] = log2phy[:, 0, :2].flip(-1).clone()
    _run_steps(model, balancer, range(2, 4))
    out = model.forward(model.make_tokens(4), 4, log2phy, balancer.logical_replica_count)
    torch.cuda.synchronize()
    assert out.gpu_events is not None and out.gpu_events[0].elapsed_time(out.gpu_events[1]) > 0
