import numpy as np
import pytest

from ipc.codec import Codec, new_session_key
from mp_eplb.protocol import (LayerReady, Plan, Rebalance, Setup, WorkerTopology, pack_int64,
                              unpack_int64)


def _round_trip(msg: object) -> object:
    key = new_session_key()
    frame = Codec(key, "parent").encode(msg, seq=1)
    return Codec(key, "child").decode(frame).message


def test_int64_arrays_round_trip_and_sizes_are_checked() -> None:
    a = np.arange(-3, 9, dtype=np.int64).reshape(3, 4)
    assert np.array_equal(unpack_int64(pack_int64(a), [3, 4]), a)
    with pytest.raises(ValueError, match=r"shape \(2, 4\) needs 64 bytes, got 96"):
        unpack_int64(pack_int64(a), [2, 4])


def test_rebalance_plan_and_ready_round_trip_through_the_codec() -> None:
    p2l = np.array([[0, 1, 2, 0], [2, 1, 0, 1]])
    rebalance = Rebalance(rebalance_id=3, step=1200, phy2log=pack_int64(p2l), shape=[2, 4])
    assert _round_trip(rebalance) == rebalance
    plan = Plan(rebalance_id=3, layers=[1], phy2log=pack_int64(p2l), shape=[2, 4], policy_s=0.01,
                balancedness_before=0.5, balancedness_after=0.9)
    assert _round_trip(plan) == plan
    ready = LayerReady(rebalance_id=3, index=0, layer=1, slot=1, sent_at=5.5)
    assert _round_trip(ready) == ready


def test_setup_carries_nested_topology_and_plain_handles() -> None:
    topology = WorkerTopology(rank=1, world_size=2, num_logical=8, num_groups=1,
                              num_redundant=4, ranks_per_node=2, max_ops_per_batch=32)
    handle = {"kind": "shm", "name": "x", "shape": [2, 3], "nbytes": 24}
    setup = Setup(topology=topology, communicator="gloo", rendezvous="tcp://127.0.0.1:1",
                  device="cpu", weights=[[handle]], buffers=[[handle]], load_total=handle,
                  events=[], layer_timeout_s=5.0)
    decoded = _round_trip(setup)
    assert decoded == setup and decoded.topology.num_nodes == 1
