import subprocess
import sys

import pytest
import torch

from mp_eplb import __version__
from mp_eplb.cli import build_parser


def test_version_flag_prints_version() -> None:
    out = subprocess.run([sys.executable, "-m", "mp_eplb", "--version"],
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == f"mp-eplb {__version__}"


@pytest.mark.parametrize("argv,message", [
    (["demo", "--steps", "0"], "argument --steps: '0' must be a positive integer (>= 1)"),
    (["demo", "--ranks", "0"], "argument --ranks: '0' must be a positive integer (>= 1)"),
    (["demo", "--step-interval", "0"],
     "argument --step-interval/--rebalance-interval: '0' must be a positive integer (>= 1)"),
    (["demo", "--window-size", "-1"],
     "argument --window-size/--window: '-1' must be an integer >= 0"),
    (["demo", "--layers-per-step", "x"], "argument --layers-per-step: 'x' is not an integer"),
    (["demo", "--num-redundant-experts", "-2"],
     "argument --num-redundant-experts/--redundant: '-2' must be an integer >= 0"),
    (["demo", "--timeout", "0"], "argument --timeout: '0' must be a positive number"),
    (["demo", "--collective-timeout", "inf"],
     "argument --collective-timeout: 'inf' must be a positive number"),
    (["bench", "--steps", "-3"], "argument --steps: '-3' must be a positive integer (>= 1)"),
    (["bench", "--rebalance-interval", "0"],
     "argument --step-interval/--rebalance-interval: '0' must be a positive integer (>= 1)"),
    (["bench", "--configs", "sync:-5"],
     "argument --configs: 'sync:-5': STEPS must be a positive integer, got '-5'"),
    (["bench", "--configs", "none,sync:400x"],
     "argument --configs: 'sync:400x': STEPS must be a positive integer, got '400x'"),
    (["bench", "--configs", "sync:0"],
     "argument --configs: 'sync:0': STEPS must be a positive integer, got '0'"),
    (["bench", "--configs", "bogus"],
     "argument --configs: 'bogus' is not a configuration; choose from none, sync, "
     "thread-gloo, process-gloo, process-nccl, process-cuda_ipc"),
    (["faults", "--ranks", "0"], "argument --ranks: '0' must be a positive integer (>= 1)"),
    (["faults", "--detect-bound", "-1"], "argument --detect-bound: '-1' must be a positive number"),
])
def test_bad_options_are_usage_errors_at_parse_time(argv: list[str], message: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"mp-eplb {argv[0]}: error: {message}\n" in err


@pytest.mark.parametrize("command", ["demo", "bench", "faults"])
def test_device_cuda_needs_a_gpu_at_parse_time(command: str, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--device", "cuda"])
    assert (f"mp-eplb {command}: error: argument --device: 'cuda' needs a CUDA GPU, but "
            "torch.cuda.is_available() is False here; use --device cpu") in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert build_parser().parse_args([command, "--device", "cuda"]).device == "cuda"


def test_good_options_parse() -> None:
    args = build_parser().parse_args(["bench", "--configs", "sync:40, process-gloo,", "--steps",
                                      "90", "--window", "0", "--timeout", "2.5"])
    assert (args.configs, args.steps, args.window, args.timeout) == (
        [("sync", 40), ("process-gloo", None)], 90, 0, 2.5)
    assert build_parser().parse_args(["bench"]).configs == []
    demo = build_parser().parse_args(["demo", "--ranks", "3", "--drift-offset", "-2"])
    assert (demo.ranks, demo.drift_offset, demo.device) == (3, -2, "cpu")


def test_demo_flags_use_the_library_names_and_the_old_spellings_still_work() -> None:
    new = build_parser().parse_args(["demo", "--step-interval", "40", "--window-size", "20",
                                     "--num-redundant-experts", "6"])
    old = build_parser().parse_args(["demo", "--rebalance-interval", "40", "--window", "20",
                                     "--redundant", "6"])
    for args in (new, old):
        assert (args.rebalance_interval, args.window, args.redundant) == (40, 20, 6)
