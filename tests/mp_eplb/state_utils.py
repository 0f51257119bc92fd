"""Helpers for EplbState tests: rows that encode their expert, and drifting skewed loads."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["encode_rows", "skewed_load"]


def encode_rows(layer: int, expert_ids: np.ndarray, dtype: torch.dtype,
                row_shape: tuple[int, ...]) -> torch.Tensor:
    """Rows ``[len(expert_ids), *row_shape]`` whose values name (layer, expert) exactly in
    ``dtype`` (small integers are exact in bfloat16 and uint8). Empty slots (-1) hold 255."""
    ids = torch.as_tensor(np.asarray(expert_ids), dtype=torch.int64)
    code = torch.where(ids >= 0, layer * 16 + ids, torch.full_like(ids, 255))
    width = int(np.prod(row_shape)) if row_shape else 1
    if dtype == torch.float32:  # float32 also encodes the column, catching partial copies
        values = code[:, None] * 1000 + torch.arange(width)[None, :]
    else:
        values = code[:, None].expand(-1, width)
    return values.to(dtype).reshape(len(ids), *row_shape).contiguous()


def skewed_load(phy2log: np.ndarray, step: int, rank: int, tokens: int = 64,
                phase: int = 9) -> np.ndarray:
    """This rank's tokens per physical slot ``[layers, physical]`` int64 for ``step``: a
    Zipf-like profile over logical experts whose hot expert moves every ``phase`` steps,
    split evenly over each expert's replicas under ``phy2log``."""
    layers, num_phy = phy2log.shape
    num_logical = int(phy2log.max()) + 1
    load = np.zeros((layers, num_phy), dtype=np.int64)
    for layer in range(layers):
        shift = (step // phase + 3 * layer + rank) % num_logical
        weights = 1.0 / (1 + (np.arange(num_logical) - shift) % num_logical) ** 1.5
        per_expert = np.floor(tokens * weights / weights.sum() * num_logical).astype(np.int64)
        for expert in range(num_logical):
            slots = np.nonzero(phy2log[layer] == expert)[0]
            load[layer, slots] = per_expert[expert] // max(len(slots), 1)
    return load
