"""Placement plan: where every byte lives, computed before anything is allocated, and checked exactly.

`build_plan` places each weight tensor by bytes: a matrix's rows are cut into (gpu, cpu, disk) pieces in
the policy's proportions (whole quantization groups when compressed); vectors (biases, norms) go whole
to the tier with the largest share. The KV cache and the activations are split by sequences. The plan
holds the byte offsets the runtime writes to (weight arenas, the device slot each layer streams into,
staging rings) and the byte total of every allocation per tier, so `Plan.check` compares the same
numbers the runtime allocates against the budgets. Transient compute workspace is the one estimate.
It never touches a tensor (the planner decides, the runtime moves).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flexgen_core.policy import TIERS, Policy, Split, Tier, split_count
from flexgen_core.quant import QuantConfig, packed_nbytes
from flexgen_core.spec import LayerKind, LayerSpec, ModelSpec, TensorSpec, cache_len, stage_layer_specs

ALIGN = 4096  # arena regions (disk reads may bypass the page cache, which needs page alignment)
PIECE_ALIGN = 64
WEIGHT_QUANT = QuantConfig(bits=4, group_size=64)
CACHE_QUANT = QuantConfig(bits=4, group_size=64)
GIB = 1 << 30


def align(n: int, to: int = PIECE_ALIGN) -> int:
    return -(-n // to) * to


class PlanDoesNotFit(RuntimeError):
    """A plan needs more memory on a tier than the budget allows."""

    def __init__(self, tier: str, needed: int, available: int, items: dict[str, int], hint: str):
        self.tier, self.needed, self.available, self.items = tier, needed, available, items
        top = ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in sorted(items.items(), key=lambda kv: -kv[1])[:5]
                        if v)
        super().__init__(
            f"the plan does not fit in {tier} memory: needs {needed / GIB:.2f} GiB ({needed} bytes), "
            f"{available / GIB:.2f} GiB ({available} bytes) available. Largest items: {top}. {hint}")


@dataclass(frozen=True)
class Workload:
    prompt_len: int
    gen_len: int

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.gen_len < 1:
            raise ValueError(f"prompt_len and gen_len must be >= 1, got {self.prompt_len}, {self.gen_len}")

    @property
    def cache_len(self) -> int:
        return cache_len(self.prompt_len, self.gen_len)


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes available per tier. `host_bytes` bounds gpu+cpu together when the compute device is the CPU."""

    gpu_bytes: int
    cpu_bytes: int
    disk_bytes: int
    host_bytes: int | None = None


@dataclass(frozen=True)
class Piece:
    """Rows [row_start, row_stop) of a tensor (elements of a vector) stored on one tier.

    offset: byte offset in that tier's weight arena. slot_offset: where the piece lands in the layer's
    device slot (None when it is used in place). code_bytes: for a packed piece, its code bytes; the
    fp16 [step, min] pairs follow at offset + align(code_bytes).
    """

    tier: Tier
    row_start: int
    row_stop: int
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    packed: bool
    code_bytes: int = 0
    slot_offset: int | None = None


@dataclass(frozen=True)
class TensorPlacement:
    spec: TensorSpec
    pieces: tuple[Piece, ...]
    packed: bool
    slot_offset: int | None  # uncompressed tensor assembled in the slot (None: used in place or packed)
    dequant_offset: int | None  # packed tensor: byte offset of its (in, out) fp buffer region

    @property
    def resident(self) -> bool:
        """All of it on the compute device (used in place, never streamed)."""
        return all(p.tier == Tier.GPU for p in self.pieces)


@dataclass(frozen=True)
class LayerPlacement:
    spec: LayerSpec
    tensors: tuple[TensorPlacement, ...]
    slot_bytes: int
    dequant_bytes: int
    disk_read_bytes: int  # host staging needed to read this layer's disk pieces (page-aligned each)

    def tensor(self, name: str) -> TensorPlacement:
        for t in self.tensors:
            if t.spec.name == name:
                return t
        raise KeyError(name)

    def bytes_on(self, tier: Tier) -> int:
        return sum(p.nbytes for t in self.tensors if t.spec.shared_from is None
                   for p in t.pieces if p.tier == tier)


@dataclass(frozen=True)
class SeqSplit:
    """Sequences of one GPU batch per tier, in order [gpu | cpu | disk]."""

    gpu: int
    cpu: int
    disk: int

    @classmethod
    def of(cls, total: int, split: Split) -> SeqSplit:
        return cls(*split_count(total, split))

    def count(self, tier: Tier) -> int:
        return {Tier.GPU: self.gpu, Tier.CPU: self.cpu, Tier.DISK: self.disk}[tier]

    def segments(self, batch: int | None = None) -> list[tuple[Tier, int, int]]:
        """(tier, start, stop) row ranges, clipped to a batch of `batch` sequences (a partial batch)."""
        out, start = [], 0
        for tier in TIERS:
            n = self.count(tier)
            stop = start + n
            if batch is not None:
                s, e = min(start, batch), min(stop, batch)
            else:
                s, e = start, stop
            if e > s:
                out.append((tier, s, e))
            start = stop
        return out


@dataclass
class Plan:
    spec: ModelSpec
    policy: Policy
    dtype_bytes: int
    device_type: str  # "cuda" or "cpu"
    workload: Workload | None
    layers: list[LayerPlacement]
    weight_arena_bytes: dict[Tier, int]
    weight_staging_bytes: int  # one of two host staging buffers for disk weight reads
    cache_split: SeqSplit
    act_split: SeqSplit
    usage: dict[Tier, dict[str, int]] = field(default_factory=dict)
    layer_start: int = 0  # schedule index of layers[0] (a pipeline stage plans a slice of the layers)

    # ---- the layers this plan holds ------------------------------------------------------------
    def layer(self, index: int) -> LayerPlacement:
        """Placement of schedule layer `index` (a schedule index, not a position in `layers`)."""
        pos = index - self.layer_start
        if not 0 <= pos < len(self.layers):
            raise IndexError(f"schedule layer {index} is not in this plan's layers "
                             f"[{self.layer_start}, {self.layer_start + len(self.layers)})")
        return self.layers[pos]

    @property
    def blocks(self) -> range:
        """Transformer blocks whose attention layer (and so KV cache) this plan holds."""
        attn = [lay.spec.block for lay in self.layers if lay.spec.kind == LayerKind.ATTN]
        return range(attn[0], attn[-1] + 1) if attn else range(0)

    def storage_map(self) -> dict[tuple[int, str], list[int]]:
        """Checkpoint tensor (schedule layer, name) -> the layers of this plan that store it: the layer itself
        when this plan holds it, and a layer holding its own copy of a tensor tied to another stage's layer."""
        out: dict[tuple[int, str], list[int]] = {}
        for lay in self.layers:
            for t in lay.spec.owned:
                origin = lay.spec.index if t.copy_of is None else t.copy_of
                out.setdefault((origin, t.name), []).append(lay.spec.index)
        return out

    # ---- sizes the runtime allocates -------------------------------------------------------
    @property
    def slot_bytes(self) -> int:
        return max((lay.slot_bytes for lay in self.layers), default=0)

    @property
    def weight_slots(self) -> int:
        """Device weight slots: three when a layer step can block the host (CPU-delegated attention, disk reads),
        so the weights two layers ahead load meanwhile; else two (the next layer loads while one computes)."""
        return weight_slots(self.policy)

    @property
    def dequant_bytes(self) -> int:
        return max((lay.dequant_bytes for lay in self.layers), default=0)

    def kv_segment_bytes(self, seqs: int) -> int:
        """Bytes of one K (or V) home for `seqs` sequences of one GPU batch of one layer."""
        assert self.workload is not None
        return kv_bytes(self.spec, seqs, self.workload.cache_len, self.dtype_bytes, self.policy.compress_cache)

    @property
    def cache_slot_bytes(self) -> int:
        """One device slot for the K (or V) prefix of the CPU and disk segments (0 with CPU attention)."""
        if self.policy.cpu_attention:
            return 0
        cs = self.cache_split
        return align(self.kv_segment_bytes(cs.cpu), ALIGN) + align(self.kv_segment_bytes(cs.disk), ALIGN)

    def bytes_per_tier(self) -> dict[Tier, int]:
        return {tier: sum(items.values()) for tier, items in self.usage.items()}

    def realized_weight_fractions(self) -> Split:
        total = {tier: self.weight_arena_bytes_unpadded(tier) for tier in TIERS}
        s = sum(total.values()) or 1
        return (total[Tier.GPU] / s, total[Tier.CPU] / s, total[Tier.DISK] / s)

    def weight_arena_bytes_unpadded(self, tier: Tier) -> int:
        return sum(lay.bytes_on(tier) for lay in self.layers)

    def check(self, budget: MemoryBudget) -> None:
        """Raise PlanDoesNotFit if any tier's allocations exceed its budget."""
        totals = self.bytes_per_tier()
        available = {Tier.GPU: budget.gpu_bytes, Tier.CPU: budget.cpu_bytes, Tier.DISK: budget.disk_bytes}
        for tier in TIERS:
            if totals[tier] > available[tier]:
                raise PlanDoesNotFit(tier.value, totals[tier], available[tier], self.usage[tier], _hint(tier, self))
        if budget.host_bytes is not None:
            host = totals[Tier.GPU] + totals[Tier.CPU]
            if host > budget.host_bytes:
                items = {f"gpu:{k}": v for k, v in self.usage[Tier.GPU].items()}
                items.update({f"cpu:{k}": v for k, v in self.usage[Tier.CPU].items()})
                raise PlanDoesNotFit("host (compute device and CPU share RAM)", host, budget.host_bytes, items,
                                     _hint(Tier.CPU, self))

    def summary(self) -> dict[str, object]:
        return {
            "policy": self.policy.to_dict(),
            "realized_weight_fractions": [round(x, 4) for x in self.realized_weight_fractions()],
            "weight_bytes": {t.value: self.weight_arena_bytes_unpadded(t) for t in TIERS},
            "cache_seqs_per_batch": {t.value: self.cache_split.count(t) for t in TIERS},
            "act_seqs_per_batch": {t.value: self.act_split.count(t) for t in TIERS},
            "bytes_per_tier": {t.value: b for t, b in self.bytes_per_tier().items()},
            "items": {t.value: dict(items) for t, items in self.usage.items()},
        }


def weight_slots(policy: Policy) -> int:
    return 3 if (policy.cpu_attention or policy.weights[2] > 0) else 2


def _hint(tier: Tier, plan: Plan) -> str:
    p = plan.policy
    if tier == Tier.GPU:
        return ("Move weights or cache off the GPU (e.g. --weights 0.2,0.8,0 --cache 0,1,0), lower "
                f"--gpu-batch-size (now {p.gpu_batch_size}), enable --compress-weights, or use --policy auto.")
    if tier == Tier.CPU:
        return (f"Lower the block size (now {p.gpu_batch_size}x{p.num_gpu_batches}), move the cache or weights "
                "to disk (e.g. --cache 0,0.5,0.5), enable compression, or use --policy auto.")
    return "Free disk space in the offload directory, point --offload-dir elsewhere, or keep more in RAM."


# ---------------------------------------------------------------------------------------------


def kv_bytes(spec: ModelSpec, seqs: int, positions: int, dtype_bytes: int, compressed: bool) -> int:
    """Bytes of one K (or V) tensor of shape (positions, seqs, heads, head_dim), packed or not."""
    if seqs == 0:
        return 0
    shape = (positions, seqs, spec.num_heads, spec.head_dim)
    if not compressed:
        return positions * seqs * spec.hidden_size * dtype_bytes
    codes, scales = packed_nbytes(shape, -1, CACHE_QUANT)
    return align(codes) + scales


def _row_bytes(t: TensorSpec, dtype_bytes: int) -> int:
    return (t.numel // t.shape[0]) * dtype_bytes


def _piece_rows(t: TensorSpec, split: Split, packed: bool) -> list[tuple[Tier, int, int]]:
    rows = t.shape[0]
    if not t.is_matrix:
        tier = max(TIERS, key=lambda x: (split[TIERS.index(x)], -TIERS.index(x)))
        return [(tier, 0, rows)]
    unit = WEIGHT_QUANT.group_size if packed else 1
    units = -(-rows // unit)
    g, c, _ = split_count(units, split)
    bounds = [0, min(g * unit, rows), min((g + c) * unit, rows), rows]
    return [(tier, bounds[i], bounds[i + 1]) for i, tier in enumerate(TIERS) if bounds[i + 1] > bounds[i]]


def _piece_size(t: TensorSpec, start: int, stop: int, dtype_bytes: int, packed: bool) -> tuple[int, int, tuple]:
    shape = (stop - start, *t.shape[1:])
    if not packed:
        return (stop - start) * _row_bytes(t, dtype_bytes), 0, shape
    codes, scales = packed_nbytes(shape, 0, WEIGHT_QUANT)
    return align(codes) + scales, codes, shape


def _place_weights(spec: ModelSpec, policy: Policy, dtype_bytes: int, layers: tuple[int, int]
                   ) -> tuple[list[LayerPlacement], dict[Tier, int], int]:
    offsets = {tier: 0 for tier in TIERS}
    placements: list[LayerPlacement] = []
    max_disk_region = 0
    first = layers[0]
    for lspec in stage_layer_specs(spec, *layers):
        tensors: list[TensorPlacement] = []
        slot = 0
        dequant = 0
        disk_read = 0
        for t in lspec.tensors:
            packed = policy.compress_weights and t.is_matrix
            if t.shared_from is not None:
                owner = placements[t.shared_from - first].tensor(t.name)
                pieces_src = owner.pieces
            else:
                pieces_src = None
            pieces: list[Piece] = []
            rows = pieces_src if pieces_src is not None else _piece_rows(t, policy.weights, packed)
            resident = all((p.tier if isinstance(p, Piece) else p[0]) == Tier.GPU for p in rows)
            t_slot = None
            if not packed and not resident:
                t_slot = slot = align(slot)
                slot += t.numel * dtype_bytes
            for entry in rows:
                if isinstance(entry, Piece):
                    tier, start, stop = entry.tier, entry.row_start, entry.row_stop
                    offset, nbytes, code_bytes, shape = entry.offset, entry.nbytes, entry.code_bytes, entry.shape
                else:
                    tier, start, stop = entry
                    nbytes, code_bytes, shape = _piece_size(t, start, stop, dtype_bytes, packed)
                    offset = offsets[tier] = align(offsets[tier], ALIGN if tier == Tier.DISK else PIECE_ALIGN)
                    offsets[tier] += nbytes
                if tier == Tier.DISK:
                    disk_read += align(nbytes, ALIGN)
                if packed:
                    slot_offset = None
                    if tier != Tier.GPU:
                        slot_offset = slot = align(slot)
                        slot += nbytes
                else:
                    slot_offset = None if t_slot is None else t_slot + start * _row_bytes(t, dtype_bytes)
                pieces.append(Piece(tier, start, stop, offset, nbytes, shape, packed, code_bytes, slot_offset))
            dq = None
            if packed:
                dq = dequant = align(dequant)
                dequant += t.numel * dtype_bytes
            tensors.append(TensorPlacement(t, tuple(pieces), packed, t_slot, dq))
        max_disk_region = max(max_disk_region, disk_read)
        placements.append(LayerPlacement(lspec, tuple(tensors), align(slot), align(dequant), disk_read))
    arenas = {tier: align(offsets[tier], ALIGN) for tier in TIERS}
    return placements, arenas, max_disk_region


def workspace_bytes(spec: ModelSpec, batch: int, prompt_len: int, positions: int, dtype_bytes: int,
                    device_type: str) -> int:
    """Estimate of transient compute memory for one GPU batch (the plan's only estimate).

    Prefill: a handful of (b, s, h) tensors, the (b, s, ffn) MLP intermediate, attention scores when
    they are materialized (CPU math path), and fp32 logits of the last position.
    """
    h, f = spec.hidden_size, spec.ffn_dim
    s = prompt_len
    prefill = batch * s * max(7 * h, 3 * h + f) * dtype_bytes
    if device_type == "cpu":
        prefill += 2 * batch * spec.num_heads * s * s * 4
    decode = batch * max(7 * h, 3 * h + f) * dtype_bytes + 3 * batch * spec.num_heads * positions * 4
    logits = 3 * batch * spec.vocab_size * 4
    return max(prefill, decode) + logits


def build_plan(spec: ModelSpec, policy: Policy, workload: Workload | None, dtype_bytes: int,
               device_type: str, layers: tuple[int, int] | None = None) -> Plan:
    """Place weights, cache and activations for `policy`; `workload=None` plans the weights only.

    layers: the schedule layers [start, stop) to plan (a pipeline stage's slice); default all of them.
    """
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device_type must be 'cuda' or 'cpu', got {device_type!r}")
    start, stop = layers if layers is not None else (0, spec.num_schedule_layers)
    if not 0 <= start < stop <= spec.num_schedule_layers:
        raise ValueError(f"layer range [{start}, {stop}) is not within the {spec.num_schedule_layers} schedule layers")
    placed, arenas, max_disk_region = _place_weights(spec, policy, dtype_bytes, (start, stop))
    staging = max_disk_region
    cache_split = SeqSplit.of(policy.gpu_batch_size, policy.cache)
    act_split = SeqSplit.of(policy.gpu_batch_size, policy.acts)
    plan = Plan(spec, policy, dtype_bytes, device_type, workload, placed, arenas, staging, cache_split, act_split,
                layer_start=start)
    slots = plan.weight_slots
    gpu: dict[str, int] = {"weights.home": arenas[Tier.GPU], "weights.slots": slots * plan.slot_bytes}
    if policy.compress_weights:
        gpu["weights.dequant"] = plan.dequant_bytes
    cpu: dict[str, int] = {"weights.home": arenas[Tier.CPU], "weights.staging": slots * staging if staging else 0}
    disk: dict[str, int] = {"weights.home": arenas[Tier.DISK]}
    if workload is not None:
        _plan_cache_and_acts(plan, workload, gpu, cpu, disk)
    plan.usage = {Tier.GPU: gpu, Tier.CPU: cpu, Tier.DISK: disk}
    return plan


def _plan_cache_and_acts(plan: Plan, workload: Workload, gpu: dict[str, int], cpu: dict[str, int],
                         disk: dict[str, int]) -> None:
    spec, policy, db = plan.spec, plan.policy, plan.dtype_bytes
    ngb, gbs = policy.num_gpu_batches, policy.gpu_batch_size
    layers = len(plan.blocks)
    T = workload.cache_len
    cs = plan.cache_split
    seg = plan.kv_segment_bytes
    homes = 2 * layers * ngb  # K and V per (layer, batch)
    gpu["cache.home"] = homes * align(seg(cs.gpu), ALIGN)
    cpu["cache.home"] = homes * align(seg(cs.cpu), ALIGN)
    disk["cache.home"] = homes * align(seg(cs.disk), ALIGN)
    gpu["cache.slots"] = 2 * 2 * plan.cache_slot_bytes  # (current, prefetch) x (K, V)
    # a compressed cache is dequantized into this buffer for attention, except on CUDA where the fused kernel
    # attends over the packed cache in place (top-k attention still dequantizes K)
    if policy.compress_cache and (plan.device_type == "cpu" or policy.attn_topk < 1.0):
        gpu["cache.dequant"] = 2 * kv_bytes(spec, gbs, T, db, False)
    if cs.disk:  # host staging (or CPU-attention workspace) for disk segments, per in-flight batch
        cpu["cache.staging"] = 2 * 2 * align(seg(cs.disk), ALIGN)
    if policy.cpu_attention and (cs.cpu or cs.disk):
        # CPU attention: fp32 scores/probabilities for the delegated sequences (+ dequantized K/V)
        n = cs.cpu + cs.disk
        cpu["cache.cpu_attention"] = 2 * n * spec.num_heads * T * 4
        if policy.compress_cache:
            cpu["cache.cpu_attention"] += 2 * n * T * spec.hidden_size * 4
    a = plan.act_split
    s = workload.prompt_len
    if a.gpu < gbs:
        per_seq = s * spec.hidden_size * db
        gpu["acts.home"] = ngb * a.gpu * per_seq
        cpu["acts.home"] = ngb * align(a.cpu * per_seq)
        disk["acts.home"] = ngb * align(a.disk * per_seq, ALIGN)
        if a.disk:
            cpu["acts.staging"] = 2 * align(a.disk * per_seq, ALIGN)
            # decode-width hidden states of the disk rows stay in host RAM (runtime/activations.py)
            cpu["acts.disk_decode"] = ngb * align(a.disk * spec.hidden_size * db)
    # hidden states of every in-flight batch live on the device during a layer step
    gpu["acts.in_flight"] = (ngb if a.gpu == gbs else 2) * gbs * s * spec.hidden_size * db
    gpu["workspace (estimate)"] = workspace_bytes(spec, gbs, s, T, db, plan.device_type)
