"""Placement files: save the expert placement (and optionally a recorded load) and read it back.

Two formats, chosen by the file's suffix: ``.json`` (human-readable) and ``.pt`` (``torch.save``
of plain tensors, read with ``weights_only=True``). Both hold the same fields:

* ``format``: ``"mp_eplb.placement"``, ``version``: 1;
* ``num_logical``: logical experts per layer;
* ``phy2log``: int64 ``[layers, physical slots]``, the logical expert of each slot (-1 empty);
* ``load`` (optional): int64 token counts ``[layers, num_logical]`` (a window's sum) or
  ``[steps, layers, num_logical]``.

Reading validates everything and raises :class:`~mp_eplb.errors.PlacementFileError` naming the
file and what is wrong.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mp_eplb.errors import PlacementFileError
from mp_eplb.maps import validate_phy2log

__all__ = ["Placement", "save_placement", "load_placement", "FORMAT", "VERSION"]

FORMAT = "mp_eplb.placement"
VERSION = 1
_SUFFIXES = (".json", ".pt")


@dataclass(frozen=True)
class Placement:
    """A placement read from a file: ``phy2log`` int64 ``[layers, physical]``, ``num_logical``,
    and the recorded ``load`` (int64, ``[layers, num_logical]`` or ``[steps, layers,
    num_logical]``) or ``None``."""

    phy2log: np.ndarray
    num_logical: int
    load: np.ndarray | None = None


def _suffix(path: Path) -> str:
    if path.suffix not in _SUFFIXES:
        raise PlacementFileError(f"{path}: unknown placement format {path.suffix!r}; name the "
                                 f"file with one of {_SUFFIXES}")
    return path.suffix


def _int_array(path: Path, name: str, value: object) -> np.ndarray:
    try:
        array = np.asarray(value.numpy() if isinstance(value, torch.Tensor) else value)
    except ValueError as err:  # ragged nested lists
        raise PlacementFileError(f"{path}: {name} is not a rectangular array: {err}") from err
    if array.dtype.kind not in "iu":
        raise PlacementFileError(f"{path}: {name} must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64)


def _checked(path: Path, phy2log: object, num_logical: object,
             load: object | None) -> Placement:
    """Validate the fields of a placement; ``PlacementFileError`` names ``path`` and the fault."""
    if not (isinstance(num_logical, int) and not isinstance(num_logical, bool)
            and num_logical >= 1):
        raise PlacementFileError(f"{path}: num_logical must be an integer >= 1, got "
                                 f"{num_logical!r}")
    try:
        p2l = validate_phy2log(_int_array(path, "phy2log", phy2log), num_logical)
    except ValueError as err:
        raise PlacementFileError(f"{path}: {err}") from err
    if load is None:
        return Placement(p2l, num_logical)
    counts = _int_array(path, "load", load)
    if counts.ndim not in (2, 3) or counts.shape[-2:] != (p2l.shape[0], num_logical):
        raise PlacementFileError(
            f"{path}: load has shape {counts.shape}, expected [{p2l.shape[0]}, {num_logical}] "
            f"or [steps, {p2l.shape[0]}, {num_logical}] ([layers, logical experts])")
    if (counts < 0).any():
        raise PlacementFileError(f"{path}: load holds negative token counts")
    return Placement(p2l, num_logical, counts)


def save_placement(path: str | os.PathLike, phy2log: np.ndarray | torch.Tensor,
                   load_window: np.ndarray | torch.Tensor | None = None, *,
                   num_logical: int | None = None) -> None:
    """Write ``phy2log`` (and optionally ``load_window``, token counts per logical expert) to
    ``path`` (``.json`` or ``.pt``). ``num_logical`` defaults to the largest id + 1. The
    contents are validated first, so a file written here always reads back."""
    path = Path(path)
    suffix = _suffix(path)
    p2l = _int_array(path, "phy2log", phy2log)
    logical = int(p2l.max()) + 1 if num_logical is None else num_logical
    placement = _checked(path, p2l, logical, load_window)
    fields = {"format": FORMAT, "version": VERSION, "num_logical": placement.num_logical}
    if suffix == ".json":
        fields["phy2log"] = placement.phy2log.tolist()
        if placement.load is not None:
            fields["load"] = placement.load.tolist()
        path.write_text(json.dumps(fields))
        return
    fields["phy2log"] = torch.from_numpy(placement.phy2log)
    if placement.load is not None:
        fields["load"] = torch.from_numpy(placement.load)
    torch.save(fields, path)


def load_placement(path: str | os.PathLike) -> Placement:
    """Read and validate a placement written by :func:`save_placement`."""
    path = Path(path)
    suffix = _suffix(path)
    try:
        if suffix == ".json":
            fields = json.loads(path.read_text())
        else:
            fields = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, EOFError) as err:  # JSON errors are ValueError
        raise PlacementFileError(f"{path}: cannot read it as a {suffix} placement file: "
                                 f"{err}") from err
    if not isinstance(fields, dict):
        raise PlacementFileError(f"{path}: holds a {type(fields).__name__}, not a placement "
                                 "(a map with format, version, num_logical, phy2log)")
    if fields.get("format") != FORMAT or fields.get("version") != VERSION:
        raise PlacementFileError(
            f"{path}: format {fields.get('format')!r} version {fields.get('version')!r}; "
            f"expected {FORMAT!r} version {VERSION} (write it with save_placement)")
    if "phy2log" not in fields:
        raise PlacementFileError(f"{path}: has no phy2log")
    return _checked(path, fields["phy2log"], fields.get("num_logical"), fields.get("load"))
