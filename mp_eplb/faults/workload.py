"""The synthetic engine every scenario runs: rows that encode (layer, expert), a load that
makes every rebalance move every layer, and :class:`Driver`, which steps a rank's
:class:`~mp_eplb.engine.state.EplbState` in lockstep with the other ranks and checks every step."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mp_eplb.config import EplbConfig
from mp_eplb.faults.launch import RankContext
from mp_eplb.faults.scenarios import FaultOptions
from mp_eplb.engine.state import EplbState

__all__ = ["Driver", "NUM_LAYERS", "NUM_LOGICAL", "eplb_config", "expected_rows",
           "initial_weights", "new_state", "num_physical", "record_row", "synthetic_load"]

NUM_LAYERS = 3
NUM_LOGICAL = 8
#: Seconds between steps of the scenario loop (an engine's step, shortened).
STEP_SLEEP_S = 0.002


def num_physical(world_size: int) -> int:
    """Physical slots per layer: the experts plus 4 spares, rounded up to a multiple of the
    ranks."""
    return world_size * -(-(NUM_LOGICAL + 4) // world_size)


def expected_rows(layer: int, ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """What slots holding experts ``ids`` of ``layer`` contain: code = layer * 64 + expert
    (-1 for an empty slot); float32 rows add the column index, so a partial copy shows."""
    code = torch.where(ids >= 0, layer * 64 + ids, torch.full_like(ids, -1))
    width = like[0].numel()
    values = code[:, None].expand(-1, width)
    if like.dtype == torch.float32:
        values = values * 8 + torch.arange(width)[None, :]
    return values.to(like.dtype).reshape(like.shape)


def initial_weights(rank: int, world_size: int, device: torch.device) -> list[list[torch.Tensor]]:
    """This rank's expert weights (a float32 and a bfloat16 tensor per layer) under the
    initial placement (slot i holds expert i mod the experts)."""
    num_phy = num_physical(world_size)
    local = num_phy // world_size
    ids = torch.arange(rank * local, (rank + 1) * local) % NUM_LOGICAL
    shapes = ((torch.float32, (local, 6)), (torch.bfloat16, (local, 2, 2)))
    return [[expected_rows(layer, ids, torch.empty(shape, dtype=dtype)).to(device)
             for dtype, shape in shapes] for layer in range(NUM_LAYERS)]


def synthetic_load(phy2log: np.ndarray, world_size: int) -> np.ndarray:
    """Tokens per physical slot ``[layers, physical]`` (the same on every rank): experts
    with a slot on rank 0 are 16x hotter than the rest. A function of the placement alone,
    so a load window that spans a commit still asks for the same thing; rank 0 is then
    overloaded under any placement and every rebalance moves experts in every layer."""
    layers, num_phy = phy2log.shape
    local = num_phy // world_size
    ids = np.clip(phy2log, 0, None)
    experts = np.arange(NUM_LOGICAL)
    hot = np.stack([np.isin(experts, row[:local]) for row in ids])
    tilt = 1 + (experts[None, :] + np.arange(layers)[:, None]) % 3
    per_expert = np.where(hot, 4096, 256) * tilt
    replicas = np.stack([np.bincount(row, minlength=NUM_LOGICAL) for row in ids])
    rows = np.arange(layers)[:, None]
    return per_expert[rows, ids] // np.maximum(replicas[rows, ids], 1) * (phy2log >= 0)


class Driver:
    """Steps a rank's EplbState in lockstep with the other ranks and checks every step."""

    def __init__(self, ctx: RankContext, state: EplbState) -> None:
        self.ctx, self.state = ctx, state
        self.violations: list[str] = []

    def step(self) -> Any:
        """One engine step under :func:`synthetic_load`, then the row check; its report."""
        state = self.state
        load = synthetic_load(state.physical_to_logical_map.cpu().numpy(), self.ctx.world_size)
        report = state.step(torch.as_tensor(load, device=state.device))
        self._check_rows()
        time.sleep(STEP_SLEEP_S)
        return report

    def _check_rows(self) -> None:
        state = self.state
        p2l = state.physical_to_logical_map.cpu()
        local = state.num_local
        for layer, tensors in enumerate(state.expert_weights):
            ids = p2l[layer, state.rank * local:(state.rank + 1) * local]
            for t in tensors:
                if not torch.equal(t.cpu(), expected_rows(layer, ids, t.cpu())):
                    self.violations.append(f"rank {state.rank} step {state.step_count}: layer "
                                           f"{layer} rows do not hold experts {ids.tolist()}")
                    return

    def agree(self, done: bool, give_up: bool) -> tuple[bool, bool]:
        """All ranks: (every rank done, some rank gave up); also checks the maps are equal."""
        p2l = self.state.physical_to_logical_map.cpu().reshape(-1)
        mine = torch.cat([torch.tensor([int(done), int(give_up)]), p2l.to(torch.int64)])
        gathered = [torch.zeros_like(mine) for _ in range(self.ctx.world_size)]
        dist.all_gather(gathered, mine, group=self.ctx.cpu_group)
        if any(not torch.equal(g[2:], mine[2:]) for g in gathered):
            self.violations.append(f"step {self.state.step_count}: ranks hold different maps")
        return all(bool(g[0]) for g in gathered), any(bool(g[1]) for g in gathered)

    def run_until(self, done: Callable[[], bool], limit_s: float,
                  each: Callable[[Any], None] = lambda report: None) -> bool:
        """Step until ``done()`` holds on every rank; False if some rank passed ``limit_s``."""
        deadline = time.monotonic() + limit_s
        while True:
            each(self.step())
            all_done, gave_up = self.agree(done(), time.monotonic() > deadline)
            if all_done:
                return True
            if gave_up:
                return False


def eplb_config(options: FaultOptions, world_size: int) -> EplbConfig:
    """The runs' EplbConfig: process mode, a rebalance every 2 steps, ``options``' timeouts."""
    return EplbConfig(mode="process", communicator=options.communicator, window_size=2,
                      step_interval=2,
                      num_redundant_experts=num_physical(world_size) - NUM_LOGICAL,
                      heartbeat_timeout_s=options.heartbeat_timeout_s,
                      layer_timeout_s=options.layer_timeout_s,
                      start_timeout_s=options.start_timeout_s)


def new_state(ctx: RankContext) -> EplbState:
    """This rank's EplbState over :func:`initial_weights`, configured by :func:`eplb_config`."""
    return EplbState(initial_weights(ctx.rank, ctx.world_size, ctx.device), rank=ctx.rank,
                     world_size=ctx.world_size, num_logical_experts=NUM_LOGICAL, num_groups=2,
                     config=eplb_config(ctx.spec.options, ctx.world_size),
                     cpu_group=ctx.cpu_group, ep_group=ctx.ep_group)


def record_row(record: Any) -> list:
    """A rebalance record as plain data: id, aborted, end step, layers and steps of the
    commits, reason."""
    return [record.rebalance_id, record.aborted, record.end_step, list(record.layers_committed),
            list(record.commit_steps), record.reason]
