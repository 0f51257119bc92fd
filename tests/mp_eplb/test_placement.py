"""Placement files: round trips, refusals, and starting an EplbState from a saved placement
(the weights loaded in the default layout are moved to it; checked row by row)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from mp_eplb import EplbConfig, EplbState
from mp_eplb.errors import PlacementFileError
from mp_eplb.maps import default_phy2log
from mp_eplb.placement import load_placement, save_placement
from tests.mp_eplb.dist_utils import run_distributed
from tests.mp_eplb.state_utils import encode_rows

pytestmark = pytest.mark.timeout(240)

LAYERS, LOGICAL, REDUNDANT, WORLD = 3, 8, 4, 2


def _target() -> np.ndarray:
    """A placement unlike the default one: shuffled, with different replicated experts."""
    rng = np.random.default_rng(7)
    num_phy = LOGICAL + REDUNDANT
    rows = []
    for _ in range(LAYERS):
        ids = np.concatenate([np.arange(LOGICAL), rng.integers(0, LOGICAL, REDUNDANT)])
        rows.append(rng.permutation(ids))
    target = np.stack(rows).astype(np.int64)
    assert target.shape == (LAYERS, num_phy)
    return target


def _weights(rank: int, phy2log: np.ndarray, device: str = "cpu") -> list[list[torch.Tensor]]:
    local = phy2log.shape[1] // WORLD
    return [[encode_rows(layer, phy2log[layer, rank * local:(rank + 1) * local], dtype,
                         shape).to(device)
             for dtype, shape in ((torch.float32, (5,)), (torch.bfloat16, (2, 3)))]
            for layer in range(LAYERS)]


@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_placement_round_trips_with_and_without_load(tmp_path: Path, suffix: str) -> None:
    target = _target()
    load = np.arange(LAYERS * LOGICAL, dtype=np.int64).reshape(LAYERS, LOGICAL)
    save_placement(tmp_path / f"a{suffix}", target)
    save_placement(tmp_path / f"b{suffix}", torch.as_tensor(target), torch.as_tensor(load),
                   num_logical=LOGICAL)
    plain, with_load = load_placement(tmp_path / f"a{suffix}"), load_placement(tmp_path / f"b{suffix}")
    assert np.array_equal(plain.phy2log, target) and plain.load is None
    assert plain.num_logical == LOGICAL
    assert np.array_equal(with_load.phy2log, target) and np.array_equal(with_load.load, load)


def _write_json(path: Path, **fields) -> Path:
    path.write_text(json.dumps({"format": "mp_eplb.placement", "version": 1, **fields}))
    return path


@pytest.mark.parametrize("fields,message", [
    ({"num_logical": 4, "phy2log": [[0, 1, 2, 9]]}, "is not a logical expert id in [0, 4)"),
    ({"num_logical": 4, "phy2log": [[0, 1, 2, 2]]}, "has no slot for logical expert 3"),
    ({"num_logical": 4, "phy2log": [0, 1, 2, 3]}, "must have shape (any, any), got (4,)"),
    ({"num_logical": 4, "phy2log": [[0, 1], [2]]}, "not a rectangular array"),
    ({"num_logical": 4, "phy2log": [[0.5, 1, 2, 3]]}, "must hold integers"),
    ({"num_logical": 0, "phy2log": [[0]]}, "num_logical must be an integer >= 1"),
    ({"num_logical": 2, "phy2log": [[0, 1]], "load": [[1, 2, 3]]}, "load has shape (1, 3)"),
    ({"num_logical": 2, "phy2log": [[0, 1]], "load": [[1, -2]]}, "negative token counts"),
    ({"num_logical": 2}, "has no phy2log"),
])
def test_invalid_placement_files_name_the_file_and_the_fault(tmp_path: Path, fields: dict,
                                                              message: str) -> None:
    path = _write_json(tmp_path / "bad.json", **fields)
    with pytest.raises(PlacementFileError) as info:
        load_placement(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_wrong_format_suffix_and_garbage_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PlacementFileError, match=r"unknown placement format '\.txt'"):
        save_placement(tmp_path / "p.txt", _target())
    (tmp_path / "g.json").write_text("{not json")
    with pytest.raises(PlacementFileError, match="cannot read it as a .json placement"):
        load_placement(tmp_path / "g.json")
    (tmp_path / "o.json").write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(PlacementFileError, match="expected 'mp_eplb.placement' version 1"):
        load_placement(tmp_path / "o.json")
    with pytest.raises(PlacementFileError, match="has no slot for logical expert"):
        save_placement(tmp_path / "p.json", np.zeros((1, 4), dtype=np.int64), num_logical=2)


def _start_from(rank: int, world: int, mode: str, path: str, saved: str,
                device: str = "cpu") -> dict:
    if device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    config = EplbConfig(mode=mode, window_size=4, step_interval=10_000,
                        num_redundant_experts=REDUNDANT, initial_phy2log=path)
    loaded = default_phy2log(LAYERS, LOGICAL + REDUNDANT, LOGICAL)
    weights = _weights(rank, loaded, device)
    with EplbState(weights, rank=rank, world_size=world, num_logical_experts=LOGICAL,
                   config=config, cpu_group=dist.group.WORLD) as state:
        state.step(torch.zeros(LAYERS, LOGICAL + REDUNDANT, dtype=torch.int64, device=device))
        if rank == 0:
            state.save_placement(saved, include_load=True)
        return {"weights": [[t.float().cpu().numpy().copy() for t in layer]  # no tensors
                            for layer in state.expert_weights],          # over the pipe
                "maps": state.physical_to_logical_map.cpu().numpy().copy()}


def _check_started_from(tmp_path: Path, mode: str, device: str) -> None:
    target = _target()
    path = tmp_path / "start.pt"
    save_placement(path, target)
    saved = tmp_path / "again.json"
    results = run_distributed(_start_from, WORLD, mode, str(path), str(saved), device,
                              timeout_s=200)
    for rank, result in enumerate(results):
        assert np.array_equal(result["maps"], target)
        for expected_layer, got_layer in zip(_weights(rank, target), result["weights"]):
            for expected, got in zip(expected_layer, got_layer):
                assert np.array_equal(got, expected.float().numpy()), \
                    f"rank {rank} weights differ from the placement"
    again = load_placement(saved)
    assert np.array_equal(again.phy2log, target) and again.load.shape == (LAYERS, LOGICAL)


@pytest.mark.parametrize("mode", ["sync", "process"])
def test_starting_from_a_saved_placement_moves_the_weights_to_it(tmp_path: Path,
                                                                 mode: str) -> None:
    _check_started_from(tmp_path, mode, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["sync", "thread", "process"])
def test_starting_from_a_saved_placement_on_gpus(tmp_path: Path, mode: str) -> None:
    if torch.cuda.device_count() < WORLD:
        pytest.skip("needs 2 GPUs")
    _check_started_from(tmp_path, mode, "cuda")


def test_initial_placement_for_another_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "small.json"
    save_placement(path, np.array([[0, 1]]))
    weights = [[torch.zeros(LOGICAL, 2)] for _ in range(LAYERS)]
    with pytest.raises(ValueError, match="is for 2 logical experts, this model has 8"):
        EplbState(weights, rank=0, world_size=1, num_logical_experts=LOGICAL,
                  config=EplbConfig(mode="process", initial_phy2log=path))


def test_start_placement_needs_a_group_and_one_loaded_layout(tmp_path: Path) -> None:
    weights = [[torch.zeros(LOGICAL + REDUNDANT, 2)] for _ in range(LAYERS)]
    kwargs = dict(rank=0, world_size=1, num_logical_experts=LOGICAL)
    config = EplbConfig(mode="process", num_redundant_experts=REDUNDANT,
                        initial_phy2log=_target())
    with pytest.raises(ValueError, match="moving them needs ep_group or cpu_group"):
        EplbState(weights, config=config, **kwargs)
    loaded = default_phy2log(LAYERS, LOGICAL + REDUNDANT, LOGICAL)
    with pytest.raises(ValueError, match="pass the layout the weights are in once"):
        EplbState(weights, config=config.replace(loaded_phy2log=loaded),
                  initial_phy2log=loaded, **kwargs)
    with pytest.raises(ValueError, match=r"EplbConfig.loaded_phy2log must have shape .*got \(1, 12\)"):
        EplbState(weights, config=config.replace(loaded_phy2log=loaded[:1]), **kwargs)
