"""Process mode shares the engine's weights where they are (issue #10).

The engine passes views of Parameters (as vLLM's expert-weight accessor does:
``weight.view(local, -1)``), two weights that are slices of one Parameter, and keeps other
views it took before. After real rebalances every one of them must hold the experts the maps
name, element by element: no tensor may be left pointing at memory the transfer no longer
updates. On CUDA no address may change, so a CUDA graph captured *before* the state was
built computes with the new weights. Values encode (layer, expert) (``encode_rows``).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ipc.errors import HandleError
from mp_eplb import EplbConfig, EplbState
from tests.mp_eplb.dist_utils import run_distributed
from tests.mp_eplb.state_utils import encode_rows, skewed_load

pytestmark = pytest.mark.timeout(300)

LAYERS = 2
NUM_LOGICAL = 8
REDUNDANT = 4
MAX_STEPS = 5000


class _Model:
    """One rank's weights as an engine holds them, and the tensors handed to EplbState."""

    def __init__(self, rank: int, world: int, device: torch.device) -> None:
        num_phy = NUM_LOGICAL + REDUNDANT
        self.local = num_phy // world
        self.rank = rank
        initial = np.tile(np.arange(num_phy) % NUM_LOGICAL, (LAYERS, 1))
        self.initial = initial[:, rank * self.local:(rank + 1) * self.local]
        self.params: list[torch.nn.Parameter] = []  # [local, 2, 4] float32
        self.pairs: list[torch.nn.Parameter] = []  # [2 * local, 3] bfloat16: two weights
        for layer in range(LAYERS):
            ids = self.initial[layer]
            self.params.append(torch.nn.Parameter(
                encode_rows(layer, ids, torch.float32, (2, 4)).to(device), requires_grad=False))
            self.pairs.append(torch.nn.Parameter(torch.cat(
                [encode_rows(layer, ids, torch.bfloat16, (3,)),
                 encode_rows(layer, ids, torch.bfloat16, (3,)) + 1]).to(device),
                requires_grad=False))
        # What the state gets: views (not the owning Parameters), two of one storage.
        self.weights = [[p.view(self.local, -1), q[:self.local], q[self.local:]]
                        for p, q in zip(self.params, self.pairs)]
        self.flat_views = [p.view(-1) for p in self.params]  # taken before, never passed

    def expected(self, phy2log: np.ndarray, layer: int) -> dict[str, torch.Tensor]:
        ids = phy2log[layer, self.rank * self.local:(self.rank + 1) * self.local]
        rows = encode_rows(layer, ids, torch.float32, (2, 4))
        second = encode_rows(layer, ids, torch.bfloat16, (3,))
        return {"param": rows, "view": rows.reshape(self.local, -1), "flat": rows.reshape(-1),
                "pair": torch.cat([second, second + 1])}

    def check(self, phy2log: np.ndarray) -> None:
        """Every tensor the engine holds matches the maps, element by element."""
        for layer in range(LAYERS):
            want = self.expected(phy2log, layer)
            got = {"param": self.params[layer], "view": self.weights[layer][0],
                   "flat": self.flat_views[layer], "pair": self.pairs[layer]}
            for name, tensor in got.items():
                if not torch.equal(tensor.cpu(), want[name]):
                    raise AssertionError(f"rank {self.rank} layer {layer}: {name} does not hold "
                                         f"the experts of the maps {phy2log[layer].tolist()}")
            assert torch.equal(self.weights[layer][1].cpu(), want["pair"][:self.local])
            assert torch.equal(self.weights[layer][2].cpu(), want["pair"][self.local:])

    def pointers(self) -> list[int]:
        return [t.data_ptr() for t in [*self.params, *self.pairs, *self.flat_views]
                + [w for layer in self.weights for w in layer]]


def _rebalance_until_moved(state: EplbState, model: _Model, device: torch.device) -> int:
    """Step with drifting skewed loads until a rebalance committed layers and none is in
    flight; check the engine's tensors after every step. Returns the layers committed."""
    committed = step = 0
    while not committed or state.rebalance_active:
        load = skewed_load(state.physical_to_logical_map.cpu().numpy(), step, model.rank)
        committed += len(state.step(torch.as_tensor(load, device=device)).committed_layers)
        model.check(state.physical_to_logical_map.cpu().numpy())
        step += 1
        assert step < MAX_STEPS, f"no rebalance committed a layer within {MAX_STEPS} steps"
        time.sleep(0.002)
    return committed


def _capture(model: _Model) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor]]:
    """A graph reading every passed weight through the view it was given: out = 2 * w."""
    outs = [torch.empty_like(w) for layer in model.weights for w in layer]
    ins = [w for layer in model.weights for w in layer]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch recommends
        for w, out in zip(ins, outs):
            torch.mul(w, 2, out=out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w, out in zip(ins, outs):
            torch.mul(w, 2, out=out)
    torch.cuda.synchronize()
    return graph, outs


def _views_rank(rank: int, world: int, device_name: str, graph: bool) -> dict:
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = _Model(rank, world, device)
    captured = _capture(model) if graph else None
    before = model.pointers()
    communicator = "cuda_ipc" if device.type == "cuda" else "gloo"
    config = EplbConfig(mode="process", communicator=communicator, window_size=4,
                        step_interval=6, num_redundant_experts=REDUNDANT, layer_timeout_s=60,
                        start_timeout_s=120)
    with EplbState(model.weights, rank=rank, world_size=world, num_logical_experts=NUM_LOGICAL,
                   config=config, cpu_group=dist.group.WORLD) as state:
        built = model.pointers()
        committed = _rebalance_until_moved(state, model, device)
        phy2log = state.physical_to_logical_map.cpu().numpy()
        moved = any(not np.array_equal(phy2log[layer, rank * model.local:(rank + 1) * model.local],
                                       model.initial[layer]) for layer in range(LAYERS))
        if captured is not None:
            g, outs = captured
            for out in outs:
                out.zero_()
            g.replay()
            torch.cuda.synchronize()
            eager = [2 * w for layer in model.weights for w in layer]
            want = [2 * w for layer in range(LAYERS)
                    for w in (model.expected(phy2log, layer)["view"],
                              model.expected(phy2log, layer)["pair"][:model.local],
                              model.expected(phy2log, layer)["pair"][model.local:])]
            for out, e, w in zip(outs, eager, want):
                assert torch.equal(out, e), "the graph captured before the state read stale weights"
                assert torch.equal(out.cpu(), w.to(out.dtype))
    return {"committed": committed, "moved": moved, "before": before, "built": built,
            "after": model.pointers(), "follow": [p.data_ptr() == w[0].data_ptr() == f.data_ptr()
                                                  for p, w, f in zip(model.params, model.weights,
                                                                     model.flat_views)]}


def _check(results: list[dict], device_type: str) -> None:
    assert any(r["moved"] for r in results), "no rank's slots changed: the loads should move experts"
    for r in results:
        assert r["committed"] > 0
        assert all(r["follow"]), "a view no longer shares its Parameter's memory"
        assert r["built"] == r["after"]
        if device_type == "cuda":
            assert r["before"] == r["built"], "building the state moved a CUDA weight"


def test_cpu_views_parameters_and_earlier_views_see_every_rebalance() -> None:
    """The issue's repro on CPU: views of Parameters are passed; the Parameters, the views and
    views taken before the state was built all hold the new experts after rebalances."""
    _check(run_distributed(_views_rank, 2, "cpu", False, timeout_s=250), "cpu")


@pytest.mark.gpu
def test_cuda_weights_keep_their_addresses_and_a_graph_captured_before_sees_new_weights() -> None:
    """Two ranks on one GPU, cuda_ipc pulls: every weight keeps its data_ptr, and a CUDA graph
    captured before the state was built replays with the new weights (vs eager and the maps)."""
    _check(run_distributed(_views_rank, 2, "cuda:0", True, timeout_s=250), "cuda")


def _expandable_rank(rank: int, world: int) -> str:
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # before any CUDA allocation
    torch.cuda.memory._set_allocator_settings("expandable_segments:True")  # if already parsed
    torch.cuda.set_device(0)
    model = _Model(rank, world, torch.device("cuda:0"))
    config = EplbConfig(mode="process", communicator="cuda_ipc", num_redundant_experts=REDUNDANT)
    try:
        EplbState(model.weights, rank=rank, world_size=world, num_logical_experts=NUM_LOGICAL,
                  config=config, cpu_group=dist.group.WORLD).shutdown()
    except HandleError as err:
        return str(err)
    return "built"


@pytest.mark.gpu
def test_expandable_segments_are_refused_with_what_to_set() -> None:
    message, = run_distributed(_expandable_rank, 1, timeout_s=120)
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False" in message, message
    assert "before the process allocates the weights" in message
