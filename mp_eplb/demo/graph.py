"""The demo's GPU-bound engine (``--engine graph``): fixed shapes, no host sync inside a step,
every MoE layer captured in one CUDA graph and replayed, the way production decoders run.

One step of :class:`GraphMoEModel` on ``T`` tokens per rank, top-``k`` routing, ``W`` ranks,
``S`` local slots, per layer:

1. route (router GEMM + top-k) and pick each pair's physical slot from the balancer's
   ``log2phy`` / ``logcnt``, read *in place* (the graph holds their addresses: the balancer
   must update them in place, as ``EplbState`` does); count the load with ``scatter_add_``;
2. dispatch: each of the ``N = T * k`` pairs gets a row of a capacity-padded buffer
   ``[W, C, hidden]`` for its owner rank (``C = min(N, ceil(capacity_factor * N / W))``,
   pairs past ``C`` are dropped), exchanged by one equal-split ``all_to_all_single`` on the
   engine group (at world size 1: a local copy);
3. experts: received rows go to a ``[S, Ce, hidden]`` buffer by local slot
   (``Ce = min(W * C, ceil(capacity_factor * N / S))``, overflow dropped) and run as two
   batched GEMMs (``bmm``) over the local slots, SiLU-gated like :func:`expert_mlp`;
4. combine: the results travel back by the same exchange and are summed per token with the
   routing weights; then a dense MLP (``hidden -> dense_width -> hidden``), so the step is
   GEMM-bound.

A dropped pair contributes nothing, so outputs equal the dense reference only without drops:
a ``capacity_factor`` of at least ``S`` (slots per rank) guarantees that; ``verify`` names the
drops when they happen. On the CPU, or with ``cuda_graph=False``, the same step runs eagerly.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mp_eplb.demo.engine import DriftingModel
from mp_eplb.demo.model import (ConfigError, ForwardResult, MoEConfig, VerificationError, _randn,
                                _rms_norm, _seed)

__all__ = ["GraphBindingError", "GraphOptions", "GraphMoEModel"]

logger = logging.getLogger(__name__)

_TAG_DENSE = 5
#: Eager runs of the step before capture (on a side stream, as CUDA graph capture requires).
_WARMUP_STEPS = 3


class GraphBindingError(RuntimeError):
    """The maps passed to :meth:`GraphMoEModel.forward` are not the tensors its graph was
    captured on: a balancer must update its maps in place, never re-bind them."""


@dataclass(frozen=True)
class GraphOptions:
    """``capacity_factor``: dispatch and expert capacities as a multiple of the balanced share
    (> 0); ``dense_width``: width of the dense MLP per layer (0: ``4 * hidden``);
    ``cuda_graph``: capture and replay on CUDA (ignored on the CPU, which runs eagerly)."""

    capacity_factor: float = 2.0
    dense_width: int = 0
    cuda_graph: bool = True

    def __post_init__(self) -> None:
        if not self.capacity_factor > 0:
            raise ConfigError(f"--capacity-factor must be > 0, got {self.capacity_factor}")
        if self.dense_width < 0:
            raise ConfigError(f"--dense-width must be >= 0, got {self.dense_width}")


class GraphMoEModel(DriftingModel):
    """:class:`DriftingModel` whose step is fixed-shape and graph-captured (module docstring).

    Owns static buffers that every step overwrites: ``forward`` returns views of them
    (``output``, ``load`` [layers, num_physical] int64, ``received`` [layers] int64, all on
    the device), valid until the next ``forward``. ``dropped`` [layers] int64: pairs dropped
    for capacity in the last step (dispatch and expert stages together).
    """

    launches_async = True

    def __init__(self, cfg: MoEConfig, *, options: GraphOptions, **kwargs: Any) -> None:
        super().__init__(cfg, **kwargs)
        self.options = options
        t, k, w, s = cfg.tokens_per_rank, cfg.top_k, self.world_size, self.slots_per_rank
        pairs = t * k
        self.capacity = min(pairs, math.ceil(options.capacity_factor * pairs / w))
        self.expert_capacity = min(w * self.capacity,
                                   math.ceil(options.capacity_factor * pairs / s))
        width = options.dense_width or 4 * cfg.hidden
        dev, dt, h, layers = self.device, cfg.dtype, cfg.hidden, cfg.num_layers
        self.dense_weights = [
            (_randn((width, h), _seed(cfg.seed, _TAG_DENSE, layer, 0), dev, dt) / math.sqrt(h),
             _randn((h, width), _seed(cfg.seed, _TAG_DENSE, layer, 1), dev, dt) / math.sqrt(width))
            for layer in range(layers)]
        token = torch.arange(t, device=dev).repeat_interleave(k)
        self._pair_token = token  # [N] token of each pair
        self._pair_global = token + self.rank * t  # global token index, picks the replica
        self._ones = torch.ones(pairs, dtype=torch.int64, device=dev)
        self._ranks = torch.arange(w, device=dev)
        self._slots = torch.arange(s, device=dev)
        rows, erows = w * self.capacity, s * self.expert_capacity
        # The last row of each buffer is a trash row (drops land there; zero where read back).
        self._send_x = torch.zeros((rows + 1, h), dtype=dt, device=dev)
        self._send_slot = torch.full((rows + 1,), -1, dtype=torch.int64, device=dev)
        self._recv_x = torch.zeros((rows, h), dtype=dt, device=dev)
        self._recv_slot = torch.zeros(rows, dtype=torch.int64, device=dev)
        self._expert_in = torch.zeros((erows + 1, h), dtype=dt, device=dev)
        self._expert_out = torch.zeros((erows + 1, h), dtype=dt, device=dev)
        self._back = torch.zeros((rows + 1, h), dtype=dt, device=dev)
        self._x = torch.zeros((t, h), dtype=dt, device=dev)
        self._out = torch.zeros_like(self._x)
        self._bias = torch.zeros((layers, cfg.num_experts), dtype=torch.float32, device=dev)
        self._bias_src: list[torch.Tensor | None] = [None] * layers
        #: Per layer, for ``verify``: the layer's input, routing and MoE output.
        self._layer_x = torch.zeros((layers, t, h), dtype=dt, device=dev)
        self._layer_w = torch.zeros((layers, t, k), dtype=torch.float32, device=dev)
        self._layer_e = torch.zeros((layers, t, k), dtype=torch.int64, device=dev)
        self._layer_y = torch.zeros((layers, t, h), dtype=dt, device=dev)
        self.load = torch.zeros((layers, cfg.num_physical), dtype=torch.int64, device=dev)
        self.received = torch.zeros(layers, dtype=torch.int64, device=dev)
        self.dropped = torch.zeros(layers, dtype=torch.int64, device=dev)
        self._maps: tuple[torch.Tensor, torch.Tensor] | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._events = ((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                        if dev.type == "cuda" else None)

    @property
    def graph_captured(self) -> bool:
        return self._graph is not None

    def forward(self, x: torch.Tensor, step: int, log2phy: torch.Tensor, logcnt: torch.Tensor, *,
                verify: bool = False) -> ForwardResult:
        """One step on ``x`` [tokens, hidden], routed by ``log2phy`` / ``logcnt`` (the same
        tensors at every call, updated in place; else :class:`GraphBindingError`). Queues the
        step and returns without waiting for it, unless ``verify`` (which checks every layer
        against the dense reference, agreed over ``cpu_group``: a collective)."""
        self._bind(log2phy, logcnt)
        self._x.copy_(x)
        for layer in range(self.cfg.num_layers):
            bias = self.router_bias(layer, step)
            if bias is not self._bias_src[layer]:
                self._bias[layer].copy_(bias)
                self._bias_src[layer] = bias
        if self._events is not None:
            self._events[0].record()
        if self._graph is not None:
            self._graph.replay()
        else:
            self._step()
        if self._events is not None:
            self._events[1].record()
        if verify:
            self._verify(step)
        return ForwardResult(output=self._out, load=self.load, received=self.received,
                             gpu_events=self._events)

    def layer_errors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Of the last step, per layer: ``(max |diff| / tolerance, max |diff|)`` [layers]
        float64 against :meth:`dense_layer` (see :meth:`reference_error`). Syncs."""
        layers = self.cfg.num_layers
        excess = torch.zeros(layers, dtype=torch.float64)
        max_diff = torch.zeros(layers, dtype=torch.float64)
        for layer in range(layers):
            excess[layer], max_diff[layer] = self.reference_error(
                self._layer_x[layer], layer, self._layer_w[layer], self._layer_e[layer],
                self._layer_y[layer])
        return excess, max_diff

    def _verify(self, step: int) -> None:
        dropped = self.dropped.tolist()
        if any(dropped):
            layer = next(i for i, d in enumerate(dropped) if d)
            raise VerificationError(
                f"layer {layer} at step {step}: {dropped[layer]} token-expert pairs dropped for "
                f"capacity on rank {self.rank}, so the output cannot equal the dense reference; "
                f"raise --capacity-factor (>= {self.slots_per_rank}, the slots per rank, never "
                "drops)", layer=layer, step=step, rank=self.rank)
        self.agree_verified(step, *self.layer_errors())

    def _bind(self, log2phy: torch.Tensor, logcnt: torch.Tensor) -> None:
        if self._maps is None:
            self._maps = (log2phy, logcnt)
            if self.device.type == "cuda" and self.options.cuda_graph:
                self._capture()
            return
        if log2phy is not self._maps[0] or logcnt is not self._maps[1]:
            raise GraphBindingError(
                "forward got maps other than the tensors its step was built on: update "
                "logical_to_physical_map / logical_replica_count in place, never re-bind them")

    def _capture(self) -> None:
        """Warm up on a side stream, then capture one step (a collective on ``ep_group``)."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_STEPS):
                self._step()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self._graph = graph
        logger.info("rank %d: captured the step in a CUDA graph (capacity %d per rank, %d per "
                    "slot)", self.rank, self.capacity, self.expert_capacity)

    def _step(self) -> None:
        """Every layer on the static input; fixed shapes, no host sync (what the graph holds)."""
        cfg = self.cfg
        x = self._x
        for layer in range(cfg.num_layers):
            weights, experts = self.route_with_bias(x, layer, self._bias[layer])
            self._layer_x[layer].copy_(x)
            self._layer_w[layer].copy_(weights)
            self._layer_e[layer].copy_(experts)
            y = self._moe(x, layer, weights, experts)
            self._layer_y[layer].copy_(y)
            x = _rms_norm(x.float() + y.float()).to(cfg.dtype)
            w_in, w_out = self.dense_weights[layer]
            x = _rms_norm(x.float() + (F.silu(x @ w_in.T) @ w_out.T).float()).to(cfg.dtype)
        self._out.copy_(x)

    def _moe(self, x: torch.Tensor, layer: int, weights: torch.Tensor,
             experts: torch.Tensor) -> torch.Tensor:
        """Steps 1-4 of the module docstring for one layer: ``y`` [tokens, hidden]."""
        log2phy, logcnt = self._maps
        s, cap, ecap = self.slots_per_rank, self.capacity, self.expert_capacity
        rows, erows = self.world_size * cap, s * ecap
        flat = experts.reshape(-1)
        physical = log2phy[layer, flat, self._pair_global % logcnt[layer, flat]]
        load = self.load[layer]
        load.zero_()
        load.scatter_add_(0, physical, self._ones)
        owner, slot = physical // s, physical % s
        pos = _bucket_positions(owner, self._ranks)
        kept = pos < cap
        send_row = torch.where(kept, owner * cap + pos, rows)
        self._send_x.index_copy_(0, send_row, x[self._pair_token])
        self._send_slot.fill_(-1)
        self._send_slot.index_copy_(0, send_row, slot)
        self._exchange(self._recv_x, self._send_x[:rows])
        self._exchange(self._recv_slot, self._send_slot[:rows])
        valid = self._recv_slot >= 0
        local = self._recv_slot.clamp(min=0)
        epos = _bucket_positions(local, self._slots)
        computed = valid & (epos < ecap)
        expert_row = torch.where(computed, local * ecap + epos, erows)
        self._expert_in.index_copy_(0, expert_row, self._recv_x)
        gate_up, down = self.expert_weights[layer]
        hidden = torch.bmm(self._expert_in[:erows].view(s, ecap, -1), gate_up.transpose(1, 2))
        gate, up = hidden.chunk(2, dim=-1)
        self._expert_out[:erows].view(s, ecap, -1).copy_(
            torch.bmm(F.silu(gate) * up, down.transpose(1, 2)))
        self._exchange(self._back[:rows], self._expert_out[expert_row])
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        y.index_add_(0, self._pair_token,
                     self._back[send_row].float() * weights.reshape(-1, 1))
        self.received[layer] = computed.sum()
        self.dropped[layer] = (~kept).sum() + (valid & ~computed).sum()
        return y.to(self.cfg.dtype)

    def _exchange(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        """Equal-split all-to-all of ``inp`` into ``out`` (same shape) on ``ep_group``; at world
        size 1, a local copy."""
        if self.world_size == 1:
            out.copy_(inp)
        else:
            dist.all_to_all_single(out, inp, group=self.ep_group)


def _bucket_positions(ids: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
    """For each entry of ``ids`` [n] (values among ``buckets`` = ``arange(b)``), how many equal
    entries precede it: fixed shapes, no host sync."""
    counts = (ids[:, None] == buckets).to(torch.int32).cumsum(dim=0)
    return counts.gather(1, ids[:, None]).squeeze(1) - 1
