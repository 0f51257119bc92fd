"""Communicators: factory and argument errors (1 process) and real gloo exchanges."""

from __future__ import annotations

import itertools
import multiprocessing
import time

import pytest
import torch
import torch.distributed as dist

from mp_eplb.transfer.communicators import (
    GlooCommunicator,
    NcclCommunicator,
    RowRef,
    default_communicator,
    make_communicator,
)
from mp_eplb.transfer.cuda_ipc import all_gather_bytes
from mp_eplb.ranks import RankFailure
from tests.mp_eplb.dist_utils import run_distributed

DTYPES = (torch.float32, torch.bfloat16, torch.uint8)


def test_make_communicator_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"unknown communicator 'mpi': choose one of gloo, nccl"):
        make_communicator("mpi", None)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1, True, 2.0])
def test_max_ops_per_batch_must_be_positive_int(bad: object) -> None:
    with pytest.raises(ValueError, match="max_ops_per_batch must be"):
        GlooCommunicator(None, max_ops_per_batch=bad)  # type: ignore[arg-type]


def payload(src: int, dst: int, index: int) -> torch.Tensor:
    """Distinct small-integer contents per (src, dst, index), exact in every dtype."""
    dtype = DTYPES[index % len(DTYPES)]
    base = (src * 31 + dst * 7 + index * 3) % 200
    return (base + torch.arange(6 + index) % 50).to(dtype)


def _exchange_worker(rank: int, world: int) -> list[tuple[int, int, int]]:
    """All-to-all of 3 tensors per ordered pair, posted in one global order, for several
    batch sizes; returns (max_ops, ops_executed, batches_executed) per run."""
    group = dist.group.WORLD
    transfers = [(s, d, i) for s, d in itertools.permutations(range(world), 2) for i in range(3)]
    stats = []
    for max_ops in (1, 2, 5, 32):
        comm = make_communicator("gloo", group, max_ops_per_batch=max_ops)
        received = {}
        for src, dst, index in transfers:
            if src == rank:
                comm.add_send(payload(src, dst, index), dst)
            elif dst == rank:
                received[(src, index)] = torch.zeros_like(payload(src, dst, index))
                comm.add_recv(received[(src, index)], src, source=RowRef(0, index, 0))
        comm.execute()
        for (src, index), got in received.items():
            assert torch.equal(got, payload(src, rank, index)), (src, index, got)
        comm.execute()  # nothing queued: nothing posted
        stats.append((max_ops, comm.ops_executed, comm.batches_executed))

    comm = GlooCommunicator(group)
    assert isinstance(default_communicator(group, torch.device("cpu")), GlooCommunicator)
    assert isinstance(default_communicator(group, torch.device("cuda", 0)), GlooCommunicator)
    for peer, message in ((rank, "invalid for rank"), (world, "invalid for rank"), (-1, "invalid")):
        with pytest.raises(ValueError, match=message):
            comm.add_send(torch.zeros(2), peer)
    with pytest.raises(ValueError, match="must be contiguous"):
        comm.add_recv(torch.zeros(4, 4).t(), (rank + 1) % world)
    with pytest.raises(ValueError, match="CUDA tensors only"):
        NcclCommunicator(group).add_send(torch.zeros(2), (rank + 1) % world)
    return stats


@pytest.mark.timeout(90)
def test_gloo_exchange_in_bounded_batches() -> None:
    world = 3
    ops = 2 * (world - 1) * 3  # each rank sends and receives 3 tensors per peer
    for stats in run_distributed(_exchange_worker, world, timeout_s=60):
        assert stats == [(m, ops, -(-ops // m)) for m in (1, 2, 5, 32)]


def _raise_on_rank_one(rank: int, world: int) -> int:
    if rank == 1:
        raise KeyError("boom on rank one")
    return rank


@pytest.mark.timeout(60)
def test_run_distributed_reports_rank_failures() -> None:
    with pytest.raises(RankFailure, match="rank 1: KeyError: 'boom on rank one'") as info:
        run_distributed(_raise_on_rank_one, 2, timeout_s=45)
    assert set(info.value.errors) == {1}
    assert "in _raise_on_rank_one" in info.value.tracebacks[1]


def _hang_on_rank_zero(rank: int, world: int) -> int:
    if rank == 0:
        time.sleep(600)
    return rank


@pytest.mark.timeout(90)
def test_run_distributed_kills_ranks_past_the_timeout() -> None:
    with pytest.raises(RankFailure,
                       match=r"rank 0: gave no result within the timeout \(12 s\)") as info:
        run_distributed(_hang_on_rank_zero, 2, timeout_s=12)
    assert set(info.value.errors) == {0}
    assert multiprocessing.active_children() == []


def _gather_bytes(rank: int, world: int) -> list[bytes]:
    return all_gather_bytes(b"" if rank == 1 else bytes(range(rank + 3)), dist.group.WORLD)


def test_all_gather_bytes_carries_empty_and_unequal_payloads() -> None:
    expected = [bytes(range(3)), b"", bytes(range(5))]
    assert run_distributed(_gather_bytes, 3, timeout_s=60) == [expected] * 3
