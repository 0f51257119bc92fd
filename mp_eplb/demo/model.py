"""A small but real expert-parallel MoE model for the demo engine.

Every weight is generated deterministically from ``(seed, layer, expert)`` on the rank's
device, so any rank can regenerate any logical expert: for initial placement, for the dense
reference of ``--verify``, and for :func:`verify_weights` after a rebalance.

Layout of one rank's expert weights (``MoEModel.expert_weights[layer] = [gate_up, down]``):

- ``gate_up`` [slots_per_rank, 2 * inter, hidden]: rows ``[:inter]`` gate, ``[inter:]`` up.
- ``down``    [slots_per_rank, hidden, inter].

Local slot ``s`` of rank ``r`` is physical slot ``r * slots_per_rank + s``. The model owns
these tensors; a balancer may rewrite their rows in place (or move their storage to shared
memory with ``share_memory_()``) between steps: ``forward`` reads them fresh every call.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mp_eplb.maps import maps_from_phy2log

__all__ = [
    "ConfigError",
    "ForwardResult",
    "MoEConfig",
    "MoEModel",
    "ReferenceExperts",
    "VerificationError",
    "expert_mlp",
    "initial_phy2log",
    "logical_expert_weights",
    "routing_maps",
    "verify_weights",
]

# Tags that keep the random streams of different kinds of tensors apart.
_TAG_EXPERT, _TAG_ROUTER, _TAG_HOTSET, _TAG_TOKENS = 1, 2, 3, 4

#: (atol, rtol) of the EP output against the dense reference, per compute dtype.
_TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float64: (1e-9, 1e-9),
              torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}


class ConfigError(ValueError):
    """A model option is out of range; the message names the option to change."""


class VerificationError(RuntimeError):
    """Computed outputs or held weights disagree with the logical experts.

    ``layer``, ``step`` (``None`` for a weight check outside the step loop) and ``rank``
    name where it was seen.
    """

    def __init__(self, message: str, *, layer: int, step: int | None, rank: int) -> None:
        super().__init__(message)
        self.layer = layer
        self.step = step
        self.rank = rank


@dataclass(frozen=True)
class MoEConfig:
    """Shape and randomness of the demo model. Sizes are element counts; steps are engine steps."""

    hidden: int = 128
    inter: int = 256
    num_layers: int = 4
    num_experts: int = 16
    top_k: int = 2
    num_redundant: int = 4
    tokens_per_rank: int = 32
    seed: int = 0
    #: Router bias of the expert with popularity rank ``i`` is ``-zipf * log(1 + i)``.
    zipf: float = 1.2
    #: The hot set of each layer is redrawn every ``drift_interval`` steps.
    drift_interval: int = 100
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        for name in ("hidden", "inter", "num_layers", "num_experts", "top_k", "tokens_per_rank",
                     "drift_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_redundant < 0:
            raise ConfigError(f"num_redundant must be >= 0, got {self.num_redundant}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.dtype not in _TOLERANCE:
            raise ConfigError(f"dtype must be one of {sorted(map(str, _TOLERANCE))}, got {self.dtype}")

    @property
    def num_physical(self) -> int:
        """Physical expert slots per layer over all ranks."""
        return self.num_experts + self.num_redundant

    @property
    def max_replicas(self) -> int:
        """Width of ``log2phy``'s last dimension (``num_redundant + 1``)."""
        return self.num_redundant + 1

    def slots_per_rank(self, world_size: int) -> int:
        """Local physical slots per rank; ``ConfigError`` unless slots divide evenly."""
        if world_size < 1 or self.num_physical % world_size:
            raise ConfigError(f"experts + redundant = {self.num_physical} physical slots must divide "
                              f"evenly over {world_size} ranks; change --experts or --redundant")
        return self.num_physical // world_size

    def expert_bytes(self) -> int:
        """Bytes of one expert's weights (gate_up plus down)."""
        return 3 * self.inter * self.hidden * torch.empty((), dtype=self.dtype).element_size()


def _seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers, identical in every process."""
    digest = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *parts), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _randn(shape: Sequence[int], seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.randn(tuple(shape), generator=gen, device=device, dtype=torch.float32).to(dtype)


def logical_expert_weights(cfg: MoEConfig, layer: int, expert: int,
                           device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Regenerate logical ``expert`` of ``layer``: ``(gate_up [2*inter, hidden], down [hidden, inter])``.

    Same values on every rank with the same device type; new tensors owned by the caller.
    """
    device = torch.device(device)
    seed = _seed(cfg.seed, _TAG_EXPERT, layer, expert)
    gate_up = _randn((2 * cfg.inter, cfg.hidden), seed, device, torch.float32) / math.sqrt(cfg.hidden)
    down = _randn((cfg.hidden, cfg.inter), seed + 1, device, torch.float32) / math.sqrt(cfg.inter)
    return gate_up.to(cfg.dtype), down.to(cfg.dtype)


def expert_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """SiLU-gated MLP of one expert: ``x`` [n, hidden] -> [n, hidden]."""
    gate, up = (x @ gate_up.T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down.T


def initial_phy2log(cfg: MoEConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """Initial placement [layers, num_physical] int64: experts 0..E-1 in order, then replicas
    of experts 0..R-1 (slot ``p`` holds expert ``p % E``), the same for every layer."""
    row = torch.arange(cfg.num_physical, dtype=torch.int64, device=device) % cfg.num_experts
    return row.expand(cfg.num_layers, -1).contiguous()


def routing_maps(phy2log: torch.Tensor, cfg: MoEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log2phy [layers, E, max_replicas], logcnt [layers, E])`` int64 on ``phy2log``'s device."""
    maps = maps_from_phy2log(phy2log.cpu().numpy(), cfg.num_experts, cfg.max_replicas)
    return (torch.from_numpy(maps.log2phy).to(phy2log.device),
            torch.from_numpy(maps.logcnt).to(phy2log.device))


class ReferenceExperts:
    """Regenerated logical experts, cached per ``(layer, expert)`` on ``device``.

    Holds a full copy of every logical expert it is asked for: size the model small when
    verifying (``cfg.expert_bytes() * num_experts * num_layers`` per rank at most).
    """

    def __init__(self, cfg: MoEConfig, device: torch.device | str) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self._cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (layer, expert)
        if key not in self._cache:
            self._cache[key] = logical_expert_weights(self.cfg, layer, expert, self.device)
        return self._cache[key]


@dataclass
class ForwardResult:
    """What one decode step of the MoE layers produced on this rank.

    ``output`` [tokens, hidden] final hidden states; ``load`` [layers, num_physical] int64 on the
    weights' device: this rank's tokens routed to each physical slot; ``received`` [layers]
    int64 (CPU or the device): token-expert pairs this rank's experts computed (its share of the
    work). A model may return buffers it overwrites at its next step.
    """

    output: torch.Tensor
    load: torch.Tensor
    received: torch.Tensor
    #: CUDA events recorded around the step's GPU work (``None``: not timed on the GPU); read
    #: once the device is synchronised.
    gpu_events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None


class MoEModel:
    """One rank's shard of the demo MoE model, expert-parallel over ``ep_group``.

    ``ep_group`` carries the token all-to-all (gloo on CPU, NCCL on CUDA); ``cpu_group`` (gloo)
    carries the ``verify`` agreement. Both must contain the same ``world_size`` ranks.
    ``launches_async``: ``forward`` returns once the step's GPU work is queued, before it ran
    (the engine then overlaps its own host work with it); this model syncs inside the step.
    """

    launches_async = False

    def __init__(self, cfg: MoEConfig, *, rank: int, world_size: int, device: torch.device | str,
                 ep_group: dist.ProcessGroup | None = None,
                 cpu_group: dist.ProcessGroup | None = None) -> None:
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.slots_per_rank = cfg.slots_per_rank(world_size)
        self.ep_group = ep_group
        self.cpu_group = cpu_group
        self.router_weights = [
            _randn((cfg.num_experts, cfg.hidden), _seed(cfg.seed, _TAG_ROUTER, layer), self.device,
                   torch.float32) / math.sqrt(cfg.hidden)
            for layer in range(cfg.num_layers)]
        self.initial_phy2log = initial_phy2log(cfg, self.device)
        self.expert_weights = self._place(self.initial_phy2log)
        self.reference = ReferenceExperts(cfg, self.device)
        self._bias_epoch = -1
        self._bias: dict[int, torch.Tensor] = {}

    def _place(self, phy2log: torch.Tensor) -> list[list[torch.Tensor]]:
        cfg, s = self.cfg, self.slots_per_rank
        local = phy2log[:, self.rank * s:(self.rank + 1) * s].tolist()
        weights = []
        for layer, experts in enumerate(local):
            gate_up = torch.empty((s, 2 * cfg.inter, cfg.hidden), dtype=cfg.dtype, device=self.device)
            down = torch.empty((s, cfg.hidden, cfg.inter), dtype=cfg.dtype, device=self.device)
            for slot, expert in enumerate(experts):
                gate_up[slot], down[slot] = logical_expert_weights(cfg, layer, expert, self.device)
            weights.append([gate_up, down])
        return weights

    def make_tokens(self, step: int) -> torch.Tensor:
        """This rank's decode batch at ``step``: [tokens_per_rank, hidden], unit RMS per token."""
        cfg = self.cfg
        x = _randn((cfg.tokens_per_rank, cfg.hidden), _seed(cfg.seed, _TAG_TOKENS, step, self.rank),
                   self.device, torch.float32)
        return _rms_norm(x).to(cfg.dtype)

    def router_bias(self, layer: int, step: int) -> torch.Tensor:
        """Zipf bias [num_experts] float32: its hot set is redrawn every ``drift_interval`` steps.

        Cached for the current drift epoch (a new epoch replaces the cache).
        """
        cfg = self.cfg
        epoch = step // cfg.drift_interval
        if self._bias_epoch != epoch:
            self._bias_epoch, self._bias = epoch, {}
        if layer not in self._bias:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(_seed(cfg.seed, _TAG_HOTSET, layer, epoch))
            popularity = torch.randperm(cfg.num_experts, generator=gen)  # expert -> rank
            self._bias[layer] = (-cfg.zipf * torch.log1p(popularity.to(torch.float32))).to(self.device)
        return self._bias[layer]

    def route(self, x: torch.Tensor, layer: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k routing of ``x`` [T, hidden]: ``(weights [T, k] float32, logical ids [T, k] int64)``."""
        return self.route_with_bias(x, layer, self.router_bias(layer, step))

    def route_with_bias(self, x: torch.Tensor, layer: int,
                        bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`route` with the router ``bias`` [num_experts] given (no host work: fixed
        shapes, capturable in a CUDA graph)."""
        logits = x.float() @ self.router_weights[layer].T + bias
        weights, experts = torch.softmax(logits, dim=-1).topk(self.cfg.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), experts

    def forward(self, x: torch.Tensor, step: int, log2phy: torch.Tensor, logcnt: torch.Tensor, *,
                verify: bool = False) -> ForwardResult:
        """Run every MoE layer on ``x`` [tokens, hidden] routing through the given maps.

        A collective over ``ep_group`` (all ranks must call it at the same step). With ``verify``,
        each layer's output is compared with :meth:`dense_layer` and all ranks agree over
        ``cpu_group``; any mismatch raises :class:`VerificationError` on every rank.
        """
        cfg = self.cfg
        load = torch.zeros((cfg.num_layers, cfg.num_physical), dtype=torch.int64, device=self.device)
        received = torch.zeros(cfg.num_layers, dtype=torch.int64)
        excess = torch.zeros(cfg.num_layers, dtype=torch.float64)
        max_diff = torch.zeros(cfg.num_layers, dtype=torch.float64)
        for layer in range(cfg.num_layers):
            weights, experts = self.route(x, layer, step)
            y, load[layer], received[layer] = self.ep_layer(x, layer, weights, experts, log2phy, logcnt)
            if verify:
                excess[layer], max_diff[layer] = self.reference_error(x, layer, weights, experts, y)
            x = _rms_norm(x.float() + y.float()).to(cfg.dtype)
        if verify:
            self.agree_verified(step, excess, max_diff)
        return ForwardResult(output=x, load=load, received=received)

    def reference_error(self, x: torch.Tensor, layer: int, weights: torch.Tensor,
                        experts: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """How far ``y`` (the EP output of ``layer`` on ``x`` routed as ``weights``/``experts``)
        is from :meth:`dense_layer`: ``(max of |diff| / tolerance, max |diff|)``; the first is
        above 1.0 on a mismatch. Syncs with the host."""
        ref = self.dense_layer(x, layer, weights, experts).float()
        atol, rtol = _TOLERANCE[self.cfg.dtype]
        diff = (y.float() - ref).abs()
        return (diff / (atol + rtol * ref.abs())).max().item(), diff.max().item()

    def ep_layer(self, x: torch.Tensor, layer: int, weights: torch.Tensor, experts: torch.Tensor,
                 log2phy: torch.Tensor, logcnt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One MoE layer, expert-parallel: ``(y [T, hidden], load [num_physical], received)``.

        Sends each token-expert pair (``weights`` [T, k], logical ``experts`` [T, k] from
        :meth:`route`) to the rank owning the physical slot ``log2phy`` picks (replica: global
        token index modulo ``logcnt``), runs the expert there and combines the results with
        ``weights``. ``load``: this rank's pairs per physical slot; ``received``: pairs this
        rank's experts computed. A collective over ``ep_group``.
        """
        cfg, s = self.cfg, self.slots_per_rank
        tokens = x.shape[0]
        # Replica choice: global token index modulo the expert's replica count.
        token_idx = torch.arange(tokens, device=x.device).repeat_interleave(cfg.top_k)
        flat_experts = experts.reshape(-1)
        replica = (token_idx + self.rank * tokens) % logcnt[layer, flat_experts]
        physical = log2phy[layer, flat_experts, replica]
        load = torch.bincount(physical, minlength=cfg.num_physical)
        order = torch.argsort(physical, stable=True)  # sorted by slot, hence by owner rank
        # Layout exchange: rows for each of my slots from each rank; rows arrive rank-major,
        # slot-minor, which gives every received row its local slot.
        recv_slot_counts = torch.empty_like(load)
        dist.all_to_all_single(recv_slot_counts, load, group=self.ep_group)
        send_splits = load.view(self.world_size, s).sum(dim=1).tolist()
        recv_splits = recv_slot_counts.view(self.world_size, s).sum(dim=1).tolist()
        recv_slot = torch.arange(s, device=x.device).repeat(self.world_size).repeat_interleave(
            recv_slot_counts)
        recv_x = x.new_empty((recv_slot.numel(), cfg.hidden))
        dist.all_to_all_single(recv_x, x[token_idx[order]].contiguous(), recv_splits, send_splits,
                               group=self.ep_group)
        computed = self._local_experts(layer, recv_x, recv_slot)
        back = x.new_empty((physical.numel(), cfg.hidden))
        dist.all_to_all_single(back, computed, send_splits, recv_splits, group=self.ep_group)
        y = torch.zeros((tokens, cfg.hidden), dtype=torch.float32, device=x.device)
        y.index_add_(0, token_idx[order], back.float() * weights.reshape(-1)[order, None])
        return y.to(cfg.dtype), load, recv_slot.numel()

    def _local_experts(self, layer: int, xs: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Apply local slot ``slots[i]``'s expert to row ``xs[i]``; output in ``xs``' row order."""
        gate_up, down = self.expert_weights[layer]
        out = torch.empty_like(xs)
        order = torch.argsort(slots, stable=True)
        start = 0
        for slot, count in enumerate(torch.bincount(slots, minlength=self.slots_per_rank).tolist()):
            if count:
                rows = order[start:start + count]
                out[rows] = expert_mlp(xs[rows], gate_up[slot], down[slot])
                start += count
        return out

    def dense_layer(self, x: torch.Tensor, layer: int, weights: torch.Tensor,
                    experts: torch.Tensor) -> torch.Tensor:
        """Reference MoE output of ``layer`` from the regenerated logical experts, no EP."""
        y = torch.zeros((x.shape[0], self.cfg.hidden), dtype=torch.float32, device=x.device)
        for expert in torch.unique(experts).tolist():
            tok, k = torch.nonzero(experts == expert, as_tuple=True)
            out = expert_mlp(x[tok], *self.reference.get(layer, expert))
            y.index_add_(0, tok, out.float() * weights[tok, k, None])
        return y.to(self.cfg.dtype)

    def check_weights(self, phy2log: torch.Tensor, *, layers: Iterable[int] | None = None,
                      step: int | None = None) -> None:
        """:func:`verify_weights` on every rank, agreed over ``cpu_group`` (a collective).

        If any rank's rows differ from ``phy2log``, every rank raises
        :class:`VerificationError`: the failing rank its own, the others one naming it.
        """
        local: VerificationError | None = None
        try:
            verify_weights(self.expert_weights, phy2log, cfg=self.cfg, rank=self.rank,
                           layers=layers, step=step)
        except VerificationError as exc:
            local = exc
        failed_layer = torch.zeros(self.world_size, dtype=torch.int64)  # layer + 1, 0 if fine
        if local is not None:
            failed_layer[self.rank] = local.layer + 1
        dist.all_reduce(failed_layer, group=self.cpu_group)
        if local is not None:
            raise local
        failed = torch.nonzero(failed_layer).flatten().tolist()
        if failed:
            rank, layer = failed[0], int(failed_layer[failed[0]]) - 1
            raise VerificationError(
                f"layer {layer} on rank {rank}{'' if step is None else f' after step {step}'} "
                "does not hold the experts phy2log names (see that rank's error)",
                layer=layer, step=step, rank=rank)

    def agree_verified(self, step: int, excess: torch.Tensor, max_diff: torch.Tensor) -> None:
        """Agree over ``cpu_group`` on every rank's per-layer ``excess`` / ``max_diff``
        [layers] float64 (:meth:`reference_error`); any excess above 1.0 raises
        :class:`VerificationError` on every rank."""
        table = torch.zeros((self.world_size, 2, self.cfg.num_layers), dtype=torch.float64)
        table[self.rank, 0], table[self.rank, 1] = excess, max_diff
        dist.all_reduce(table, group=self.cpu_group)
        bad = torch.nonzero(table[:, 0] > 1.0)
        if bad.numel():
            rank, layer = (int(v) for v in bad[0])
            atol, rtol = _TOLERANCE[self.cfg.dtype]
            raise VerificationError(
                f"layer {layer} at step {step}: rank {rank}'s expert-parallel output differs from the "
                f"dense reference (max |diff| {table[rank, 1, layer].item():.3g}, atol={atol}, "
                f"rtol={rtol}); that rank routed by maps that do not match the weights the ranks "
                "hold, or the layer is torn: every rank must switch a layer's maps and weights at "
                "the same step", layer=layer, step=step, rank=rank)


def _rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def verify_weights(expert_weights: Sequence[Sequence[torch.Tensor]], phy2log: torch.Tensor, *,
                   cfg: MoEConfig, rank: int, layers: Iterable[int] | None = None,
                   step: int | None = None) -> None:
    """Check that every local row holds exactly the logical expert ``phy2log`` names.

    ``expert_weights[layer] = [gate_up, down]`` of ``rank`` (slots_per_rank rows each);
    ``phy2log`` [layers, num_physical]. Checks ``layers`` (default all). Raises
    :class:`VerificationError` naming the first layer and slot that differs.
    """
    slots = expert_weights[0][0].shape[0]
    local = phy2log[:, rank * slots:(rank + 1) * slots].tolist()
    for layer in range(len(expert_weights)) if layers is None else layers:
        gate_up, down = expert_weights[layer]
        for slot, expert in enumerate(local[layer]):
            want_gate_up, want_down = logical_expert_weights(cfg, layer, expert, gate_up.device)
            if not (torch.equal(gate_up[slot], want_gate_up) and torch.equal(down[slot], want_down)):
                raise VerificationError(
                    f"layer {layer}, local slot {slot} (physical {rank * slots + slot}) on rank {rank}"
                    f"{'' if step is None else f' after step {step}'} does not hold logical expert "
                    f"{expert} that phy2log names: the weights and the map of this layer disagree "
                    "(a torn or missed transfer)", layer=layer, step=step, rank=rank)
