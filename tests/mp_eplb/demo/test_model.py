"""The demo MoE model: deterministic weights, skewed drifting routing, EP forward over real gloo
processes against an independent dense reference, and the checks that catch torn layers and
ranks routing by different maps."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mp_eplb.demo.engine import StaticBalancer
from mp_eplb.demo.launch import DemoFailure, RankEnv, spawn_ranks
from mp_eplb.demo.model import (
    ConfigError,
    MoEConfig,
    MoEModel,
    VerificationError,
    expert_mlp,
    initial_phy2log,
    logical_expert_weights,
    routing_maps,
    verify_weights,
)

# 8 experts + 4 replicas = 12 slots: 12, 6 or 3 per rank on 1, 2 or 4 ranks.
CFG = dict(hidden=32, inter=48, num_layers=3, num_experts=8, top_k=2, num_redundant=4,
           tokens_per_rank=16, drift_interval=2)


def _model(cfg: MoEConfig, env: RankEnv | None = None) -> MoEModel:
    if env is None:
        return MoEModel(cfg, rank=0, world_size=1, device="cpu")
    return MoEModel(cfg, rank=env.rank, world_size=env.world_size, device=env.device,
                    ep_group=env.ep_group, cpu_group=env.cpu_group)


# --- in-process ------------------------------------------------------------------------------

def test_logical_experts_are_deterministic_and_distinct() -> None:
    cfg = MoEConfig(**CFG)
    gate_up, down = logical_expert_weights(cfg, 1, 3)
    assert gate_up.shape == (2 * cfg.inter, cfg.hidden) and down.shape == (cfg.hidden, cfg.inter)
    again = logical_expert_weights(cfg, 1, 3)
    assert torch.equal(gate_up, again[0]) and torch.equal(down, again[1])
    for other in (logical_expert_weights(cfg, 1, 4), logical_expert_weights(cfg, 2, 3),
                  logical_expert_weights(dataclasses.replace(cfg, seed=1), 1, 3)):
        assert not torch.equal(gate_up, other[0]) and not torch.equal(down, other[1])


def test_expert_mlp_is_silu_gated() -> None:
    cfg = MoEConfig(**CFG)
    gate_up, down = logical_expert_weights(cfg, 0, 0)
    x = torch.randn(5, cfg.hidden)
    gate, up = x @ gate_up[:cfg.inter].T, x @ gate_up[cfg.inter:].T
    want = (gate / (1 + torch.exp(-gate)) * up) @ down.T
    torch.testing.assert_close(expert_mlp(x, gate_up, down), want, rtol=1e-5, atol=1e-5)


def test_initial_placement_and_maps() -> None:
    cfg = MoEConfig(**CFG)
    phy2log = initial_phy2log(cfg)
    assert phy2log.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]] * cfg.num_layers
    log2phy, logcnt = routing_maps(phy2log, cfg)
    assert log2phy.shape == (cfg.num_layers, cfg.num_experts, cfg.num_redundant + 1)
    assert logcnt[0].tolist() == [2, 2, 2, 2, 1, 1, 1, 1]
    assert log2phy[0, 1].tolist() == [1, 9, -1, -1, -1]
    assert log2phy[0, 6].tolist() == [6, -1, -1, -1, -1]


def test_model_places_initial_experts_in_local_rows() -> None:
    cfg = MoEConfig(**CFG)
    model = MoEModel(cfg, rank=1, world_size=2, device="cpu")  # slots 6..11: experts 6,7,0,1,2,3
    gate_up, down = model.expert_weights[2]
    assert gate_up.shape == (6, 2 * cfg.inter, cfg.hidden) and down.shape == (6, cfg.hidden, cfg.inter)
    for slot, expert in enumerate([6, 7, 0, 1, 2, 3]):
        want = logical_expert_weights(cfg, 2, expert)
        assert torch.equal(gate_up[slot], want[0]) and torch.equal(down[slot], want[1])


def test_verify_weights_names_the_torn_row() -> None:
    cfg = MoEConfig(**CFG)
    model = MoEModel(cfg, rank=1, world_size=2, device="cpu")
    verify_weights(model.expert_weights, model.initial_phy2log, cfg=cfg, rank=1)
    gate_up = model.expert_weights[1][0]
    gate_up[[2, 3]] = gate_up[[3, 2]].clone()  # slots 2, 3 hold experts 0, 1: swap their gate_up
    with pytest.raises(VerificationError, match=r"layer 1, local slot 2 \(physical 8\) on rank 1 "
                                                 r"after step 7 does not hold logical expert 0") as err:
        verify_weights(model.expert_weights, model.initial_phy2log, cfg=cfg, rank=1, step=7)
    assert (err.value.layer, err.value.step, err.value.rank) == (1, 7, 1)
    verify_weights(model.expert_weights, model.initial_phy2log, cfg=cfg, rank=1, layers=[0, 2])


def test_routing_is_skewed_and_drifts() -> None:
    cfg = MoEConfig(**{**CFG, "drift_interval": 10, "tokens_per_rank": 512})
    model = _model(cfg)
    bias = model.router_bias(0, 0)
    assert torch.equal(bias, model.router_bias(0, 9))
    assert not torch.equal(bias, model.router_bias(0, 10))
    assert not torch.equal(bias, model.router_bias(1, 0))
    assert sorted(bias.tolist(), reverse=True) == pytest.approx(
        [-cfg.zipf * torch.log1p(torch.tensor(float(i))).item() for i in range(cfg.num_experts)])
    _, experts = model.route(model.make_tokens(0), 0, 0)
    counts = torch.bincount(experts[:, 0], minlength=cfg.num_experts)
    assert int(counts.argmax()) == int(bias.argmax())  # the hottest expert gets the most tokens
    assert counts.max() > 2 * counts.float().mean()  # and well above an even share


def test_config_errors_name_the_option() -> None:
    with pytest.raises(ConfigError, match="top_k"):
        MoEConfig(num_experts=4, top_k=5)
    with pytest.raises(ConfigError, match="must divide evenly over 5 ranks"):
        MoEConfig(**CFG).slots_per_rank(5)


# --- expert parallelism over real gloo processes ---------------------------------------------

def _reference_layer(cfg: MoEConfig, x: torch.Tensor, layer: int, weights: torch.Tensor,
                     experts: torch.Tensor) -> torch.Tensor:
    """Token by token from the logical experts, written independently of the model."""
    y = torch.zeros(x.shape[0], cfg.hidden)
    for t in range(x.shape[0]):
        for k in range(cfg.top_k):
            gate_up, down = logical_expert_weights(cfg, layer, int(experts[t, k]))
            gate, up = gate_up[:cfg.inter] @ x[t], gate_up[cfg.inter:] @ x[t]
            y[t] += weights[t, k] * (down @ (torch.sigmoid(gate) * gate * up))
    return y


def _forward_vs_reference(env: RankEnv, cfg_kwargs: dict) -> dict:
    cfg = MoEConfig(**cfg_kwargs)
    model = _model(cfg, env)
    balancer = StaticBalancer.for_model(model)
    phy2log = balancer.physical_to_logical_map
    out: dict[str, list] = {"max_err": [], "load_sum": [], "received": [], "replica_load": [],
                            "logical_load_ok": []}
    for step in range(3):  # drift_interval 2: crosses a change of hot set
        x = model.make_tokens(step)
        for layer in range(cfg.num_layers):
            weights, experts = model.route(x, layer, step)
            y, load, received = model.ep_layer(x, layer, weights, experts,
                                               balancer.logical_to_physical_map,
                                               balancer.logical_replica_count)
            ref = _reference_layer(cfg, x, layer, weights, experts)
            per_logical = torch.zeros(cfg.num_experts, dtype=torch.int64).index_add_(
                0, phy2log[layer], load)
            out["max_err"].append((y - ref).abs().max().item())
            out["load_sum"].append(int(load.sum()))
            out["received"].append(int(received))
            out["replica_load"].append(int(load[cfg.num_experts:].sum()))
            out["logical_load_ok"].append(torch.equal(
                per_logical, torch.bincount(experts.reshape(-1), minlength=cfg.num_experts)))
            x = y
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ep_forward_matches_dense_reference(world_size: int) -> None:
    cfg = MoEConfig(**CFG)
    results = spawn_ranks(_forward_vs_reference, CFG, world_size=world_size, timeout_s=90)
    for res in results:
        assert max(res["max_err"]) < 1e-4
        assert res["load_sum"] == [cfg.tokens_per_rank * cfg.top_k] * len(res["load_sum"])
        assert all(res["logical_load_ok"])
        assert sum(res["replica_load"]) > 0  # redundant replicas take part of the load
    total_received = [sum(col) for col in zip(*(res["received"] for res in results))]
    assert total_received == [world_size * cfg.tokens_per_rank * cfg.top_k] * len(total_received)


def _verification_failures(env: RankEnv, cfg_kwargs: dict) -> dict:
    cfg = MoEConfig(**cfg_kwargs)
    model = _model(cfg, env)
    balancer = StaticBalancer.for_model(model)
    log2phy, logcnt = balancer.logical_to_physical_map, balancer.logical_replica_count

    def outcome(step: int, maps: tuple[torch.Tensor, torch.Tensor]) -> list | None:
        try:
            model.forward(model.make_tokens(step), step, *maps, verify=True)
        except VerificationError as exc:
            return [exc.layer, exc.step, exc.rank, str(exc)]
        return None

    found: dict[str, list | None] = {"clean": outcome(0, (log2phy, logcnt))}
    gate_up, down = model.expert_weights[1]
    saved = gate_up.clone(), down.clone()
    if env.rank == 1:  # torn layer 1 on rank 1: local slots 0 and 1 (experts 6, 7) swapped
        gate_up[[0, 1]], down[[0, 1]] = gate_up[[1, 0]].clone(), down[[1, 0]].clone()
    found["torn"] = outcome(1, (log2phy, logcnt))
    try:
        verify_weights(model.expert_weights, balancer.physical_to_logical_map, cfg=cfg,
                       rank=env.rank)
        found["torn_weights"] = None
    except VerificationError as exc:
        found["torn_weights"] = [exc.layer, exc.step, exc.rank, str(exc)]
    gate_up.copy_(saved[0])
    down.copy_(saved[1])
    phy2log = balancer.physical_to_logical_map.clone()
    if env.rank == 1:  # rank 1 alone routes layer 2 by a map with experts 5 and 7 swapped
        phy2log[2, [5, 7]] = phy2log[2, [7, 5]].clone()
    found["other_map"] = outcome(2, routing_maps(phy2log, cfg))
    found["clean_again"] = outcome(3, (log2phy, logcnt))
    return found


@pytest.mark.timeout(120)
def test_verify_catches_torn_layer_and_rank_with_another_map() -> None:
    cfg_kwargs = {**CFG, "zipf": 0.0, "tokens_per_rank": 32}  # every expert gets tokens
    results = spawn_ranks(_verification_failures, cfg_kwargs, world_size=2, timeout_s=90)
    for rank, found in enumerate(results):
        assert found["clean"] is None and found["clean_again"] is None
        layer, step, _, message = found["torn"]  # every rank raises, whichever saw it
        assert (layer, step) == (1, 1)
        assert "layer 1 at step 1" in message and "differs from the dense reference" in message
        layer, step, bad_rank, message = found["other_map"]
        assert (layer, step, bad_rank) == (2, 2, 1)
        assert "layer 2 at step 2: rank 1's expert-parallel output" in message
    assert results[0]["torn_weights"] is None
    layer, step, rank, message = results[1]["torn_weights"]
    assert (layer, step, rank) == (1, None, 1)
    assert "layer 1, local slot 0 (physical 6) on rank 1 does not hold logical expert 6" in message


def _raise_on_rank_one(env: RankEnv, arg: object) -> int:
    if env.rank == 1:
        raise VerificationError("planted", layer=0, step=0, rank=1)
    return env.rank


@pytest.mark.timeout(60)
def test_a_rank_error_reaches_the_launcher_typed() -> None:
    with pytest.raises(DemoFailure, match="rank 1: VerificationError: planted") as err:
        spawn_ranks(_raise_on_rank_one, None, world_size=2, timeout_s=45)
    assert list(err.value.errors) == [1]
