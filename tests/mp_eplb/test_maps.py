import numpy as np
import pytest

from mp_eplb.maps import maps_from_phy2log, validate_phy2log


def _slots_of(phy2log_row: np.ndarray, expert: int) -> list[int]:
    return [int(s) for s in np.nonzero(phy2log_row == expert)[0]]


@pytest.mark.parametrize("seed", range(20))
def test_log2phy_and_logcnt_agree_with_phy2log(seed: int) -> None:
    rng = np.random.default_rng(seed)
    layers, experts, slots = 3, 7, 12
    phy2log = np.stack([np.concatenate([rng.permutation(experts),
                                        rng.integers(-1, experts, slots - experts)])
                        for _ in range(layers)])
    maps = maps_from_phy2log(phy2log, experts, max_replicas=slots - experts + 1)
    assert maps.log2phy.shape == (layers, experts, slots - experts + 1)
    for layer in range(layers):
        for expert in range(experts):
            listed = [int(s) for s in maps.log2phy[layer, expert] if s >= 0]
            assert listed == _slots_of(phy2log[layer], expert)
            assert maps.logcnt[layer, expert] == len(listed)
            assert (maps.log2phy[layer, expert, len(listed):] == -1).all()


def test_width_defaults_to_most_replicas_and_is_enforced() -> None:
    phy2log = np.array([[0, 1, 1, 1]])
    assert maps_from_phy2log(phy2log, 2).log2phy.shape == (1, 2, 3)
    with pytest.raises(ValueError, match="an expert has 3 replicas but max_replicas=2"):
        maps_from_phy2log(phy2log, 2, max_replicas=2)


@pytest.mark.parametrize("phy2log,needle", [
    (np.array([0, 1]), r"must have shape \(any, any\), got \(2,\)"),
    (np.array([[0.0, 1.0]]), "must hold integer expert ids"),
    (np.array([[0, 5]]), r"phy2log\[0, 1\] = 5 is not a logical expert id"),
    (np.array([[0, -2]]), r"phy2log\[0, 1\] = -2"),
    (np.array([[0, 0, -1]]), "layer 0 has no slot for logical expert 1"),
])
def test_invalid_maps_are_refused(phy2log: np.ndarray, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        validate_phy2log(phy2log, 2)
