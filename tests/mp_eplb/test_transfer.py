"""Transfer planning and execution: single-process planning/metadata tests, and real
multi-process gloo runs (one spawn per world size running every case).

Expectation is independent of the planner: each row's values encode (layer, weight
index, logical expert), so after a rearrangement row r of rank k must equal
encode(new_map[layer, k * L + r]) (or keep its old contents where the new slot is empty).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import msgpack
import numpy as np
import pytest
import torch
import torch.distributed as dist

from mp_eplb.communicator import GlooCommunicator, RowRef, make_communicator
from mp_eplb.transfer import (
    TransferMetadata,
    _map_new_expert_indices_with_rank_mapping,
    _map_old_expert_indices_with_rank_mapping,
    get_ep_ranks_with_experts_batch,
    move_from_buffer,
    move_to_buffer,
    plan_layer_transfers,
    rearrange_expert_weights_inplace,
    transfer_layer,
)
from tests.mp_eplb.dist_utils import run_distributed

SENTINEL = 252  # value of rows that never held an expert; encode() stays below 251
SPECS = ((torch.float32, (4,)), (torch.bfloat16, (3, 2)), (torch.uint8, (5,)))  # uint8: fp8 storage


# --------------------------------------------------------------------------- helpers


def encode(layer: int, weight_index: int, expert: int, shape: tuple[int, ...],
           dtype: torch.dtype) -> torch.Tensor:
    """Row contents naming (layer, weight, expert); small integers, exact in bf16/uint8."""
    if expert == -1:
        return torch.full(shape, SENTINEL, dtype=dtype)
    base = (expert * 7 + layer * 3 + weight_index * 5) % 251
    numel = int(np.prod(shape))
    return ((base + torch.arange(numel)) % 251).reshape(shape).to(dtype)


def make_weights(rank: int, num_local: int, old_map: np.ndarray,
                 device: torch.device | str = "cpu") -> list[list[torch.Tensor]]:
    """Weights of ``rank`` holding the experts of ``old_map`` (layers, slots)."""
    return [[torch.stack([encode(layer, i, int(old_map[layer, rank * num_local + r]), shape, dtype)
                          for r in range(num_local)]).to(device)
             for i, (dtype, shape) in enumerate(SPECS)]
            for layer in range(old_map.shape[0])]


def check_weights(weights: list[list[torch.Tensor]], rank: int, num_local: int,
                  old_map: np.ndarray, new_map: np.ndarray) -> None:
    """Every row equals encode(new id), or its old contents where the new slot is empty."""
    for layer, tensors in enumerate(weights):
        for i, (t, (dtype, shape)) in enumerate(zip(tensors, SPECS)):
            for r in range(num_local):
                slot = rank * num_local + r
                expert = int(new_map[layer, slot])
                if expert == -1:
                    expert = int(old_map[layer, slot])
                want = encode(layer, i, expert, shape, dtype)
                assert torch.equal(t[r].cpu(), want), (
                    f"rank {rank} layer {layer} weight {i} row {r}: want expert {expert}, "
                    f"got {t[r].tolist()}")


def random_map(rng: np.random.Generator, world: int, num_local: int, num_experts: int,
               empties: int) -> np.ndarray:
    """One layer: every expert at least once, ``empties`` empty slots, rest replicas."""
    slots = world * num_local
    extra = rng.integers(0, num_experts, size=slots - num_experts - empties)
    layer = np.concatenate([np.arange(num_experts), extra, np.full(empties, -1)])
    return rng.permutation(layer).astype(np.int64)


def random_maps(seed: int, layers: int, world: int, num_local: int,
                num_experts: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    slots = world * num_local
    num_experts = num_experts or max(1, slots - 2)
    empties = min(1, slots - num_experts)
    old = np.stack([random_map(rng, world, num_local, num_experts, empties) for _ in range(layers)])
    new = np.stack([random_map(rng, world, num_local, num_experts, empties) for _ in range(layers)])
    return old, new


def needed_remote(old_map: np.ndarray, new_map: np.ndarray, world: int, num_local: int) -> int:
    """Independent count of (rank, expert) pairs a rank must receive from another rank."""
    total = 0
    for layer in range(old_map.shape[0]):
        for rank in range(world):
            part = slice(rank * num_local, (rank + 1) * num_local)
            wanted = set(new_map[layer, part].tolist()) - {-1}
            total += len(wanted - set(old_map[layer, part].tolist()))
    return total


class FakeGroup:
    """Only what argument validation reads from a process group."""

    def __init__(self, rank: int, size: int) -> None:
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


# --------------------------------------------------------------------- planning (1 proc)


def test_get_ep_ranks_with_experts_batch_follows_vllm() -> None:
    # 3 ranks x 2 local slots
    old = np.array([0, 1, 1, 2, 0, -1])
    new = np.array([1, 2, 0, 0, 2, 1])
    send, recv = get_ep_ranks_with_experts_batch(np.array([2, 0, 1, 7]), 2, old, new)
    assert send == {0: [0, 2], 1: [0, 1], 2: [1], 7: []}
    # receivers exclude ranks that already hold the expert
    assert recv == {0: [1], 1: [2], 2: [0, 2], 7: []}


def _check_plan(old: np.ndarray, new: np.ndarray, world: int, num_local: int,
                ranks_per_node: int | None) -> None:
    plan = plan_layer_transfers(old, new, num_local, ranks_per_node=ranks_per_node)
    got = [(t.dst_rank, t.expert) for t in plan]
    assert len(got) == len(set(got)), "an expert was received twice by one rank"
    want = set()
    for rank in range(world):
        part = slice(rank * num_local, (rank + 1) * num_local)
        for expert in set(new[part].tolist()) - {-1} - set(old[part].tolist()):
            want.add((rank, expert))
    assert set(got) == want
    for t in plan:
        assert old[t.src_rank * num_local + t.src_row] == t.expert
        dst_rows = np.nonzero(new[t.dst_rank * num_local:(t.dst_rank + 1) * num_local] == t.expert)[0]
        assert t.dst_row == dst_rows[0]
    assert plan == sorted(plan, key=lambda t: (t.expert, t.dst_rank))
    assert plan == plan_layer_transfers(old.copy(), new.copy(), num_local,
                                        ranks_per_node=ranks_per_node)


@pytest.mark.parametrize("seed", range(20))
def test_plan_receives_each_remote_expert_once_per_rank(seed: int) -> None:
    world, num_local = 2 + seed % 5, 1 + seed % 4
    old, new = random_maps(seed, 1, world, num_local)
    _check_plan(old[0], new[0], world, num_local, ranks_per_node=None if seed % 2 else 2)


def test_plan_spreads_senders_over_replicas() -> None:
    # expert 0 held by ranks 0 and 1; ranks 2 and 3 want it; one slot each
    old = np.array([0, 0, 1, 2])
    new = np.array([0, 1, 0, 0])
    plan = plan_layer_transfers(old, new, 1)
    senders = sorted(t.src_rank for t in plan if t.expert == 0)
    assert senders == [0, 1]


def test_plan_prefers_a_sender_on_the_same_node() -> None:
    # 4 ranks, 2 per node: expert 5 held on rank 0 (node 0) and rank 2 (node 1)
    old = np.array([5, 1, 5, 3])
    new = np.array([5, 5, 5, 5])
    by_dst = {t.dst_rank: t.src_rank for t in plan_layer_transfers(old, new, 1, ranks_per_node=2)}
    assert by_dst == {1: 0, 3: 2}
    # one node: load balancing alone spreads them, deterministically
    flat = plan_layer_transfers(old, new, 1)
    assert sorted(t.src_rank for t in flat) == [0, 2]
    assert flat == plan_layer_transfers(old, new, 1)


def test_plan_rejects_expert_nobody_holds() -> None:
    with pytest.raises(ValueError, match=r"expert 9 is in the new map but in no slot"):
        plan_layer_transfers(np.array([0, 1]), np.array([9, 1]), 1)


def test_rank_mapping_helpers_follow_vllm() -> None:
    old = torch.tensor([[0, 1, 2, 3]])  # 2 old ranks x 2
    up = _map_old_expert_indices_with_rank_mapping(old, {0: 0, 1: 2}, 3)
    assert up.tolist() == [[0, 1, -1, -1, 2, 3]]
    new = torch.tensor([[4, 5, 6, 7]])  # 2 kept ranks x 2, old group had 3
    down = _map_new_expert_indices_with_rank_mapping(new, {0: 1, 1: -1, 2: 0})
    assert down.tolist() == [[6, 7, -1, -1, 4, 5]]
    with pytest.raises(ValueError, match="rank_mapping values must be distinct"):
        _map_old_expert_indices_with_rank_mapping(old, {0: 0, 1: 0}, 3)


# ------------------------------------------------------------ metadata wire (1 proc)


def sample_metadata() -> TransferMetadata:
    # 4 local rows: row 0 unchanged, row 1 local copy, rows 2 and 3 receive expert 9 (2 primary)
    return TransferMetadata(
        is_unchanged=np.array([True, False, False, False]),
        is_received_locally=np.array([True, True, False, False]),
        recv_primary_mask=np.array([False, False, True, False]),
        recv_count=1,
        recv_expert_ids=np.array([9, -1, -1, -1], dtype=np.int64),
        recv_dst_rows=np.array([2, -1, -1, -1], dtype=np.int32),
    )


def test_metadata_wire_round_trip_through_msgpack() -> None:
    metadata = sample_metadata()
    wire = msgpack.unpackb(msgpack.packb(metadata.to_wire()), raw=False)
    back = TransferMetadata.from_wire(wire)
    for key in ("is_unchanged", "is_received_locally", "recv_primary_mask",
                "recv_expert_ids", "recv_dst_rows"):
        assert np.array_equal(getattr(back, key), getattr(metadata, key))
        assert getattr(back, key).dtype == getattr(metadata, key).dtype
    assert back.recv_count == 1


def _bad_wire(change: Callable[[dict], None]) -> dict:
    wire = sample_metadata().to_wire()
    change(wire)
    return wire


BAD_WIRES = {
    "missing key": (lambda w: w.pop("recv_count"), "must have keys"),
    "extra key": (lambda w: w.update(evil=b""), "must have keys"),
    "count not int": (lambda w: w.update(recv_count="1"), "'recv_count' must be an int"),
    "count is bool": (lambda w: w.update(recv_count=True), "'recv_count' must be an int"),
    "count too big": (lambda w: w.update(recv_count=5), "'recv_count' must be an int in"),
    "zero experts": (lambda w: w.update(num_local_experts=0), "'num_local_experts' must be"),
    "mask short": (lambda w: w.update(is_unchanged=b"\x01"), "'is_unchanged' must be 4 bytes"),
    "mask not bytes": (lambda w: w.update(is_unchanged=[1, 0, 0, 0]), "must be 4 bytes"),
    "mask not 0/1": (lambda w: w.update(is_unchanged=b"\x01\x00\x02\x00"), "only 0/1"),
    "row out of range": (lambda w: w.update(
        recv_dst_rows=np.array([7, -1, -1, -1], "<i4").tobytes()), "recv_dst_rows must be in"),
    "bad padding": (lambda w: w.update(
        recv_expert_ids=np.array([9, 3, -1, -1], "<i8").tobytes()), "-1 after them"),
    "primary mismatch": (lambda w: w.update(recv_primary_mask=b"\x00\x00\x00\x01"),
                         "must mark exactly"),
    "local and primary": (lambda w: w.update(is_received_locally=b"\x01\x01\x01\x00"),
                          "both received locally and a remote"),
}


@pytest.mark.parametrize("name", sorted(BAD_WIRES))
def test_metadata_from_wire_rejects_malformed(name: str) -> None:
    change, message = BAD_WIRES[name]
    with pytest.raises(ValueError, match=message):
        TransferMetadata.from_wire(_bad_wire(change))


def test_metadata_from_wire_rejects_non_dict() -> None:
    with pytest.raises(ValueError, match="must have keys"):
        TransferMetadata.from_wire([1, 2])


# ------------------------------------------------------- argument validation (1 proc)


def _layer(num_local: int = 2) -> list[torch.Tensor]:
    return [torch.zeros((num_local, *shape), dtype=dtype) for dtype, shape in SPECS]


BAD_ARGS = {
    "buffer shape": (dict(buffers=[torch.zeros(2, 5), *_layer()[1:]]), r"expert_weights_buffers\[0\] is"),
    "buffer count": (dict(buffers=_layer()[:2]), "has 2 tensors, expected 3"),
    "buffer dtype": (dict(buffers=[_layer()[0].double(), *_layer()[1:]]), "torch.float64"),
    "weights rows differ": (dict(weights=[torch.zeros(2, 4), torch.zeros(3, 4)]),
                            "same first dimension"),
    "map shape": (dict(old=np.zeros(5, np.int64)), r"old_indices must have shape \(4,\)"),
    "map 2-D": (dict(new=np.zeros((2, 2), np.int64)), r"new_indices must have shape \(4,\)"),
    "id below -1": (dict(old=np.array([0, 1, -2, 3])), "holds id -2"),
    "float ids": (dict(new=np.zeros(4)), "must hold integer expert ids"),
    "unheld expert": (dict(new=np.array([0, 1, 2, 17])), r"experts \[17\] are in the new map"),
    "num_local mismatch": (dict(num_local=3), "num_local_experts is 3"),
}


@pytest.mark.parametrize("name", sorted(BAD_ARGS))
def test_move_to_buffer_rejects_bad_arguments_before_touching(name: str) -> None:
    overrides, message = BAD_ARGS[name]
    args = dict(num_local=2, old=np.array([0, 1, 2, 3]), new=np.array([3, 2, 1, 0]),
                weights=_layer(), buffers=_layer())
    args.update(overrides)
    for t in args["buffers"]:
        t.fill_(SENTINEL)
    with pytest.raises(ValueError, match=message):
        move_to_buffer(args["num_local"], args["old"], args["new"], args["weights"],
                       args["buffers"], None, FakeGroup(0, 2))
    assert all(bool((t == SENTINEL).all()) for t in args["buffers"])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_local_moves_round_trip_through_the_buffer_in_one_batched_copy(device: str) -> None:
    """World size 1: ``move_to_buffer`` stages the rows locally, ``move_from_buffer`` (one
    batched copy per layer) applies them; element by element, on the CPU and on a GPU."""
    old = np.array([[0, 1, 2, 3, 0, 1, 2, 3]])
    new = np.array([[3, 1, 0, 0, 2, 1, 3, 2]])  # runs, a kept row, duplicates
    weights = make_weights(0, 8, old, device)
    buffers = [torch.full_like(t, SENTINEL) for t in weights[0]]
    metadata = move_to_buffer(8, old[0], new[0], weights[0], buffers, None, FakeGroup(0, 1))
    if device == "cuda":
        torch.cuda.synchronize()
    move_from_buffer(weights[0], buffers, metadata, new[0], 0)
    check_weights(weights, 0, 8, old, new)


def test_move_from_buffer_rejects_metadata_that_does_not_fit() -> None:
    weights, buffers = _layer(4), _layer(4)
    new = np.array([5, 6, 9, 9])  # rank 0 of 1; sample metadata received expert 9 at row 2
    move_from_buffer(weights, buffers, sample_metadata(), new, 0)  # fits
    with pytest.raises(ValueError, match="do not match new_indices"):
        move_from_buffer(weights, buffers, sample_metadata(), np.array([5, 6, 8, 9]), 0)
    with pytest.raises(ValueError, match="do not fit metadata of 4 local experts"):
        move_from_buffer(weights, buffers, sample_metadata(), new, 1)
    with pytest.raises(ValueError, match="expected 3"):
        move_from_buffer(weights, buffers[:1], sample_metadata(), new, 0)


# ------------------------------------------------------------------ multi-process


@dataclass(frozen=True)
class Case:
    name: str
    seed: int
    num_local: int
    layers: int = 3
    max_ops: int | None = 32  # None: default communicator built by the function
    ranks_per_node: int | None = None


def _cases(world: int) -> list[Case]:
    cases = [Case(f"random-L{n}-ops{ops}-rpn{rpn}", seed, n, max_ops=ops, ranks_per_node=rpn)
             for seed, (n, ops, rpn) in enumerate(itertools.product(
                 (1, 3), (1, 2, None), (None, 2)))]
    cases.append(Case("many-experts", 99, 4, layers=2, max_ops=5))
    return cases


def _run_case(case: Case, rank: int, world: int, group: dist.ProcessGroup) -> None:
    old, new = random_maps(case.seed * 31 + world, case.layers, world, case.num_local)
    new[1] = old[1]  # one unchanged layer among changed ones
    weights = make_weights(rank, case.num_local, old)
    comm = None if case.max_ops is None else GlooCommunicator(group, max_ops_per_batch=case.max_ops)
    rearrange_expert_weights_inplace(torch.from_numpy(old), torch.from_numpy(new), weights, group,
                                     communicator=comm, ranks_per_node=case.ranks_per_node)
    check_weights(weights, rank, case.num_local, old, new)
    if comm is not None:
        total = torch.tensor([comm.ops_executed])
        dist.all_reduce(total, group=group)
        # each needed (rank, expert) pair is one send and one recv per weight tensor
        assert total.item() == 2 * len(SPECS) * needed_remote(old, new, world, case.num_local)
        assert comm.batches_executed >= -(-comm.ops_executed // case.max_ops)


def _check_no_change(rank: int, world: int, group: dist.ProcessGroup) -> None:
    old, _ = random_maps(7, 2, world, 2)
    weights = make_weights(rank, 2, old)
    before = [[t.clone() for t in layer] for layer in weights]
    comm = GlooCommunicator(group)
    rearrange_expert_weights_inplace(torch.from_numpy(old), torch.from_numpy(old.copy()),
                                     weights, group, communicator=comm)
    assert comm.ops_executed == 0 and comm.batches_executed == 0
    for got, want in zip(itertools.chain(*weights), itertools.chain(*before)):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def _check_profile(rank: int, world: int, group: dist.ProcessGroup) -> None:
    old, new = random_maps(8, 2, world, 2)
    weights = make_weights(rank, 2, old)
    comm = GlooCommunicator(group)
    rearrange_expert_weights_inplace(torch.from_numpy(old), torch.from_numpy(new), weights, group,
                                     is_profile=True, communicator=comm)
    assert comm.ops_executed == 0
    check_weights(weights, rank, 2, old, old)
    buffers = [torch.full_like(t, SENTINEL) for t in weights[0]]
    metadata = asyncio.run(transfer_layer(torch.from_numpy(old), torch.from_numpy(new), weights,
                                          buffers, group, is_profile=True, communicator=comm))
    assert metadata.is_unchanged.all() and comm.ops_executed == 0
    assert all(bool((b == SENTINEL).all()) for b in buffers)


def _check_rank_mapping(rank: int, world: int, group: dist.ProcessGroup, up: bool) -> None:
    num_local, layers = 2, 2
    if up:  # ranks 0 and 2 of the new group were old ranks 0 and 1; others are new
        rank_mapping = {0: 0, 1: 2}
        old_small, new = random_maps(11 + world, layers, 2, num_local, num_experts=3)
        rng = np.random.default_rng(world)
        new = np.stack([random_map(rng, world, num_local, 3, 1) for _ in range(layers)])
        old_eff = _map_old_expert_indices_with_rank_mapping(
            torch.from_numpy(old_small), rank_mapping, world).numpy()
        old_arg, new_arg, new_eff = old_small, new, new
    else:  # old rank 1 leaves; the others are renumbered
        rank_mapping = {r: (-1 if r == 1 else r - (r > 1)) for r in range(world)}
        old, new_small = random_maps(13 + world, layers, world, num_local, num_experts=3)
        rng = np.random.default_rng(world)
        new_small = np.stack([random_map(rng, world - 1, num_local, 3, 1) for _ in range(layers)])
        new_eff = _map_new_expert_indices_with_rank_mapping(
            torch.from_numpy(new_small), rank_mapping).numpy()
        old_arg, new_arg, old_eff = old, new_small, old
    weights = make_weights(rank, num_local, old_eff)
    rearrange_expert_weights_inplace(torch.from_numpy(old_arg), torch.from_numpy(new_arg), weights,
                                     group, rank_mapping=rank_mapping,
                                     communicator=GlooCommunicator(group, max_ops_per_batch=1))
    check_weights(weights, rank, num_local, old_eff, new_eff)


def _check_layer_api(rank: int, world: int, group: dist.ProcessGroup) -> None:
    """transfer_layer, metadata through msgpack, move_from_buffer that reads only buffers."""
    old, new = random_maps(21 + world, 2, world, 3)
    new[0] = old[0]
    weights = make_weights(rank, 3, old)
    buffers = [torch.full_like(t, SENTINEL) for t in weights[0]]
    comm = GlooCommunicator(group, max_ops_per_batch=2)
    unchanged = asyncio.run(transfer_layer(torch.from_numpy(old), torch.from_numpy(new), weights,
                                           buffers, group, layer=0, communicator=comm))
    assert unchanged.is_unchanged.all() and comm.ops_executed == 0
    assert all(bool((b == SENTINEL).all()) for b in buffers), "unchanged layer wrote the buffer"
    metadata = asyncio.run(transfer_layer(torch.from_numpy(old), torch.from_numpy(new), weights,
                                          buffers, group, layer=1, communicator=comm))
    wire = msgpack.unpackb(msgpack.packb(metadata.to_wire()), raw=False)
    metadata = TransferMetadata.from_wire(wire)
    # apply onto blank weights: every changed row must come from the buffer alone
    blank = [torch.zeros_like(t) for t in weights[1]]
    move_from_buffer(blank, buffers, metadata, new[1], rank)
    for i, (t, (dtype, shape)) in enumerate(zip(blank, SPECS)):
        for r in range(3):
            slot = rank * 3 + r
            changed = old[1, slot] != new[1, slot] and new[1, slot] != -1
            want = (encode(1, i, int(new[1, slot]), shape, dtype) if changed
                    else torch.zeros(shape, dtype=dtype))
            assert torch.equal(t[r], want), f"row {r} weight {i}"


def _check_errors(rank: int, world: int, group: dist.ProcessGroup) -> None:
    """A bad argument on one rank makes every rank raise ValueError; nothing is touched."""
    old, new = random_maps(5, 2, world, 2)
    weights = make_weights(rank, 2, old)
    before = [[t.clone() for t in layer] for layer in weights]
    bad_new = new.copy()
    if rank == 0:
        bad_new[0, 0] = -5
    expectations = [
        (dict(new=bad_new), "holds id -5" if rank == 0 else r"ranks \[0\] rejected"),
        (dict(weights=weights[:1]), "expert_weights has 1 layers but the maps have 2"),
        (dict(new=new[:, :-1]), "old map .* and new map .* must have the same"),
        (dict(old=np.zeros((2, 2 * world + 1), np.int64), new=np.zeros((2, 2 * world + 1),
              np.int64)), "not divisible by the world size" if world > 1 else "must have shape"),
    ]
    if world > 1:
        other = new.copy()
        other[1] = new[1] if rank else old[1]  # ranks disagree on the new map
        expectations.append((dict(new=other), "disagree with rank 0"))
    for overrides, message in expectations:
        args = dict(old=old, new=new, weights=weights)
        args.update(overrides)
        with pytest.raises(ValueError, match=message):
            rearrange_expert_weights_inplace(torch.as_tensor(args["old"]),
                                             torch.as_tensor(args["new"]), args["weights"], group)
    for got, want in zip(itertools.chain(*weights), itertools.chain(*before)):
        assert torch.equal(got, want)


def _worker(rank: int, world: int) -> dict[str, str | None]:
    """Run every case; return case name -> None or the failure text."""
    group = dist.group.WORLD
    checks: dict[str, Callable[[], None]] = {
        case.name: (lambda case=case: _run_case(case, rank, world, group)) for case in _cases(world)}
    checks["no-change"] = lambda: _check_no_change(rank, world, group)
    checks["profile"] = lambda: _check_profile(rank, world, group)
    checks["layer-api"] = lambda: _check_layer_api(rank, world, group)
    checks["errors"] = lambda: _check_errors(rank, world, group)
    if world >= 3:
        checks["rank-mapping-up"] = lambda: _check_rank_mapping(rank, world, group, up=True)
        checks["rank-mapping-down"] = lambda: _check_rank_mapping(rank, world, group, up=False)
    outcome: dict[str, str | None] = {}
    for name, check in checks.items():
        try:
            check()
            outcome[name] = None
        except (Exception, pytest.fail.Exception) as exc:  # keep going: later cases still run
            outcome[name] = f"{type(exc).__name__}: {exc}"
    return outcome


@pytest.mark.timeout(150)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_rearrange_multiprocess(world_size: int) -> None:
    results = run_distributed(_worker, world_size, timeout_s=120)
    failures = {f"rank {rank} {name}": msg for rank, outcome in enumerate(results)
                for name, msg in outcome.items() if msg is not None}
    assert not failures, failures
    assert "errors" in results[0] and ("rank-mapping-up" in results[0]) == (world_size >= 3)


def test_row_ref_is_frozen() -> None:
    ref = RowRef(layer=1, weight_index=0, row=2)
    with pytest.raises(AttributeError):
        ref.row = 3  # type: ignore[misc]


# ------------------------------------------------------------------------ GPU (2 GPUs)


def _gpu_worker(rank: int, world: int, name: str) -> None:
    """Rearrange CUDA weights with the ``name`` communicator (and the default one), then
    stage a layer on a side stream and apply it on the current stream."""
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    group = dist.group.WORLD
    for seed, max_ops in ((1, 1), (2, 32), (3, None)):
        old, new = random_maps(seed, 3, world, 4)
        weights = make_weights(rank, 4, old, device)
        comm = None if max_ops is None else make_communicator(name, group, max_ops_per_batch=max_ops)
        rearrange_expert_weights_inplace(torch.from_numpy(old), torch.from_numpy(new), weights,
                                         group, communicator=comm)
        torch.cuda.synchronize()
        check_weights(weights, rank, 4, old, new)
    old, new = random_maps(4, 2, world, 4)
    weights = make_weights(rank, 4, old, device)
    buffers = [torch.empty_like(w) for w in weights[0]]
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream())  # the weights were written on this one
    comm = make_communicator(name, group, max_ops_per_batch=4)
    for layer in range(2):
        metadata = asyncio.run(transfer_layer(torch.from_numpy(old), torch.from_numpy(new), weights,
                                              buffers, group, layer=layer, cuda_stream=stream,
                                              communicator=comm))
        torch.cuda.current_stream().wait_stream(stream)
        move_from_buffer(weights[layer], buffers, metadata, new[layer], rank)
        stream.wait_stream(torch.cuda.current_stream())  # buffer reused by the next layer
    torch.cuda.synchronize()
    check_weights(weights, rank, 4, old, new)


@pytest.mark.gpu
@pytest.mark.timeout(300)
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs 2 GPUs")
@pytest.mark.parametrize("name", ["nccl", "gloo"])
def test_rearrange_cuda_two_gpus(name: str) -> None:
    """nccl: NCCL P2P between GPUs; gloo: CUDA tensors staged through pinned host memory."""
    run_distributed(_gpu_worker, 2, name, backend=name, timeout_s=240)
