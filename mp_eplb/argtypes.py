"""argparse ``type=`` functions of the command line: a bad option value is a usage error at
parse time (``mp-eplb demo: error: argument --steps: ...``), before any rank starts."""

from __future__ import annotations

import argparse
import math

import torch

__all__ = ["device", "non_negative_int", "positive_float", "positive_int"]


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer (>= 1)")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= 0")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def device(text: str) -> str:
    """``cpu`` or ``cuda`` (the latter only where torch sees a GPU); use with ``choices``."""
    if text == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("'cuda' needs a CUDA GPU, but torch.cuda.is_available() "
                                         "is False here; use --device cpu")
    return text
