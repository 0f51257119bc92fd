import pytest

from mp_eplb import EplbConfig


def test_defaults_are_valid_and_process_mode() -> None:
    config = EplbConfig()
    assert config.mode == "process"
    assert config.resolved_communicator("cuda") == "cuda_ipc"
    assert config.resolved_communicator("cpu") == "gloo"


@pytest.mark.parametrize("field,value,needle", [
    ("window_size", 0, "window_size must be a positive integer"),
    ("step_interval", 1.5, "step_interval must be a positive integer"),
    ("num_redundant_experts", -1, "num_redundant_experts must be a non-negative integer"),
    ("mode", "async", "mode must be one of"),
    ("communicator", "mpi", "communicator must be one of"),
    ("layers_per_step", 0, "layers_per_step must be a positive integer"),
    ("num_staging_buffers", 0, "num_staging_buffers must be an integer >= 1"),
    ("ranks_per_node", 0, "ranks_per_node must be None or an integer >= 1"),
    ("layer_timeout_s", 0, "layer_timeout_s must be a positive number of seconds"),
    ("heartbeat_timeout_s", True, "heartbeat_timeout_s must be a positive number of seconds"),
    ("rendezvous", "127.0.0.1:29500", "rendezvous must be None or 'tcp://host:port'"),
    ("endpoint", "udp", "endpoint must be 'ipc' or 'tcp'"),
])
def test_bad_values_name_the_field(field: str, value: object, needle: str) -> None:
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        EplbConfig(**{field: value})


def test_replace_validates_again() -> None:
    config = EplbConfig().replace(mode="thread", window_size=10)
    assert (config.mode, config.window_size) == ("thread", 10)
    with pytest.raises(ValueError, match="EplbConfig.window_size"):
        config.replace(window_size=-3)


@pytest.mark.parametrize("communicator", ["nccl", "cuda_ipc"])
def test_thread_mode_moves_weights_with_gloo_only(communicator: str) -> None:
    assert EplbConfig(mode="thread").resolved_communicator("cuda") == "gloo"
    with pytest.raises(ValueError, match="not available in thread mode"):
        EplbConfig(mode="thread", communicator=communicator).resolved_communicator("cuda")


def test_gpu_only_communicators_are_refused_for_cpu_weights() -> None:
    with pytest.raises(ValueError, match="needs CUDA weights"):
        EplbConfig(communicator="cuda_ipc").resolved_communicator("cpu")


def test_auto_picks_nccl_across_nodes_and_cuda_ipc_is_refused_there() -> None:
    config = EplbConfig(ranks_per_node=2)
    assert config.resolved_communicator("cuda", num_nodes=1) == "cuda_ipc"
    assert config.resolved_communicator("cuda", num_nodes=2) == "nccl"
    assert config.resolved_communicator("cpu", num_nodes=2) == "gloo"
    assert config.replace(communicator="nccl").resolved_communicator("cuda", 2) == "nccl"
    assert config.replace(mode="thread").resolved_communicator("cuda", 2) == "gloo"
    with pytest.raises(ValueError, match=r"communicator='cuda_ipc' works within one node, but the "
                                         r"ranks span 2 nodes \(EplbConfig.ranks_per_node=2\); "
                                         r"use 'nccl' \(or 'auto'\)"):
        config.replace(communicator="cuda_ipc").resolved_communicator("cuda", num_nodes=2)
