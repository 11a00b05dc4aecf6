"""Latency and peak-memory model of a policy, term by term (FlexGen §4.3, adapted to this runtime).

The zig-zag schedule runs, for every token, the schedule layers embed, (attn, mlp) x l, head; each layer
step processes all GPU batches of the block with that layer's weights. With overlap, a layer step lasts
as long as the slowest of what runs concurrently during it:
- h2d: the next layer's weights (off-GPU part), this layer's streamed KV cache and activations, host->device;
- d2h: this layer's cache stores and activation stores, device->host;
- disk_read / disk_write: the disk parts of the above (disk threads);
- compute: device kernels of every GPU batch, plus CPU-delegated attention, which the host runs between the
  batch's device kernels (so it adds to them), plus the host's per-step overhead.
Without overlap the terms add up. Decode terms are averaged over the generated tokens (the cache grows by
one position per token, so every term is affine in the cache length and the average is exact).

Every term is a `Linear` in the nine placement fractions; `CostModel.memory` gives the peak bytes per tier
the same way, following `plan.build_plan` item by item (conservatively where the plan rounds). `estimate`
evaluates the terms at a policy's realized placement (the exact `Plan`) and reports the plan's exact bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from flexgen_core.plan import (
    ALIGN,
    CACHE_QUANT,
    PIECE_ALIGN,
    WEIGHT_QUANT,
    MemoryBudget,
    Plan,
    Workload,
    build_plan,
    weight_slots,
)
from flexgen_core.planning.hardware import HardwareProfile
from flexgen_core.planning.linear import Linear, policy_point
from flexgen_core.policy import TIERS, Policy, Tier
from flexgen_core.quant import packed_nbytes
from flexgen_core.spec import LayerKind, ModelSpec, layer_specs

KINDS = (LayerKind.EMBED, LayerKind.ATTN, LayerKind.MLP, LayerKind.HEAD)
PHASES = ("prefill", "decode")
TERMS = ("h2d", "d2h", "disk_read", "disk_write", "compute")


@dataclass(frozen=True)
class LayerTerms:
    """One schedule-layer kind in one phase, summed over the block's GPU batches, in seconds."""

    h2d: Linear
    d2h: Linear
    disk_read: Linear
    disk_write: Linear
    device: Linear  # device kernels
    cpu: Linear  # CPU-delegated attention (serial with the device kernels of its batch)
    overhead_s: float  # host-side step overhead, all batches
    serial_host: bool  # the host waits for the device inside a step (CPU device, or delegated attention)
    shared_host: Linear | None = None  # delegated attention on CUDA: CPU attention and the DMA share host RAM
    # paired decode: the device, the issuing thread (`overhead_s`) and the attention thread (`cpu` plus
    # `thread_overhead_s`) work side by side
    pipelined: bool = False
    thread_overhead_s: float = 0.0  # the attention thread's host cost beyond its kernels, all batches
    chain_latency_s: float = 0.0  # from issuing a batch's attention to its host job's start, all batches

    def bounds(self, overlap: bool) -> list[Linear]:
        """Lower bounds on the step's time; the step time is their maximum."""
        if self.pipelined:
            compute = [self.device, Linear(self.overhead_s), self.cpu + self.thread_overhead_s,
                       # a GPU batch's host job starts `latency` after its attention is issued, and its MLP is
                       # issued after the job: each chain spans two batches' issue (runtime.schedule.paired_decode)
                       (self.cpu + self.thread_overhead_s + self.overhead_s + self.chain_latency_s) / 2]
        elif self.serial_host:
            compute = [self.device + self.cpu + self.overhead_s]
        else:  # device kernels run while the host issues the next ones
            compute = [self.device + self.cpu, self.cpu + self.overhead_s]
        if self.shared_host is not None:
            compute.append(self.shared_host if self.pipelined else self.shared_host + self.overhead_s)
        if not overlap:
            io = self.h2d + self.d2h + self.disk_read + self.disk_write
            return [c + io for c in compute]
        return [self.h2d, self.d2h, self.disk_read, self.disk_write, *compute]

    def compute(self) -> list[Linear]:
        return self.bounds(overlap=True)[4:]


class CostModel:
    """Terms of one policy shape (batch sizes and flags; the placement fractions are the variables)."""

    def __init__(self, spec: ModelSpec, policy: Policy, workload: Workload, profile: HardwareProfile,
                 dtype_bytes: int | None = None, cache_segments: int = 1, acts_on_disk: bool = False,
                 cache_off_device: bool = True) -> None:
        self.spec, self.policy, self.workload, self.profile = spec, policy, workload, profile
        # some sequences' cache is off the device, so CPU-delegated attention has work (with all of it on the
        # device the engine runs no host attention and no paired decode). The LP requires it of the placement
        # whenever it models paired decode (`policy_search`); `estimate` passes the plan's answer
        self.cache_off_device = cache_off_device
        # tiers a GPU batch's cache is split over: decode attention runs once per segment, and each segment costs
        # the host about one attention step's overhead again (OPT-6.7B 12x1 with a third of the cache streamed
        # decoded at 49 ms per token against 26 ms for 8x1 all on the GPU: 0.73 ms more per attention step, with
        # the device idle; visits 8b/8c). The LP sees one segment; `estimate` passes the plan's count.
        self.cache_segments = max(1, cache_segments)
        # some sequences' activations on disk: every prefill layer step of every GPU batch waits for a chained disk
        # write and read beyond their bytes (profile's disk_acts_step_us). Decode keeps those rows' states in host
        # RAM since visit 9d, where 1 of 24 sequences' states on disk cost decode 38 ms per layer step instead of
        # 20. Not linear in the fractions, so the LP sees none of it; `estimate` passes the plan's answer
        self.acts_on_disk = acts_on_disk
        self.db = dtype_bytes or profile.default_dtype_bytes
        self.cuda = profile.device_type == "cuda"
        p, s = policy, workload.prompt_len
        self.b, self.k = p.gpu_batch_size, p.num_gpu_batches
        self.h = spec.hidden_size
        # cache positions: prefill writes s; decode step i (1..n-1) reads s+i-1 and attends over s+i
        n = workload.gen_len
        self.read_len = s + (n - 2) / 2 if n > 1 else s
        layers = layer_specs(spec)
        matrices = [t for lay in layers for t in lay.owned if t.is_matrix]
        # packed sizes are exact (a short last group is padded), so tiny models are not under-estimated
        self.weight_ratio = (sum(sum(packed_nbytes(t.shape, 0, WEIGHT_QUANT)) for t in matrices)
                             / sum(t.numel * self.db for t in matrices) if p.compress_weights else 1.0)
        position = (1, 1, spec.num_heads, spec.head_dim)
        self.kv_elem_bytes = (sum(packed_nbytes(position, -1, CACHE_QUANT)) / self.h if p.compress_cache
                              else self.db)
        self.matrix_bytes: dict[LayerKind, int] = {}
        self.matrix_elems: dict[LayerKind, int] = {}
        self.vector_bytes = 0
        self.max_layer_bytes = 0
        self.max_layer_elems = 0
        self.max_row_bytes = 0
        self.pieces = 0
        for kind in KINDS:
            lay = next(x for x in layers if x.kind == kind)
            mats = [t for t in lay.tensors if t.is_matrix]  # the head streams the tied embedding too
            self.matrix_elems[kind] = sum(t.numel for t in mats)
            self.matrix_bytes[kind] = self.matrix_elems[kind] * self.db
            self.max_layer_bytes = max(self.max_layer_bytes, self.matrix_bytes[kind] + sum(
                t.numel * self.db for t in lay.tensors if not t.is_matrix))
            self.max_layer_elems = max(self.max_layer_elems, self.matrix_elems[kind])
        for lay in layers:
            self.vector_bytes += sum(t.numel for t in lay.owned if not t.is_matrix) * self.db
            self.max_row_bytes = max([self.max_row_bytes] + [t.numel // t.shape[0] * self.db for t in lay.owned])
            self.pieces += len(lay.owned)
        self.total_matrix_bytes = sum(t.numel for lay in layers for t in lay.owned if t.is_matrix) * self.db

    # ---- helpers ---------------------------------------------------------------------------------
    def _h2d(self, nbytes: Linear, pinned: bool = True) -> Linear:
        return nbytes / self.profile.h2d_bytes_per_s(pinned)

    def _d2h(self, nbytes: Linear) -> Linear:
        return nbytes / self.profile.d2h_bytes_per_s(True)

    def _weights_moved(self, kind: LayerKind) -> tuple[Linear, Linear]:
        """(host->device bytes, disk-read bytes) to bring `kind`'s weights to the device once."""
        m = self.matrix_bytes[kind] * self.weight_ratio
        return Linear.of("weights", "cpu", "disk", coef=m), Linear.of("weights", "disk", coef=m)

    def _matmul_s(self, elems: int, tokens: int) -> float:
        """Device time of one GPU batch's projections: compute- or weight-read-bound (roofline)."""
        flops = 2 * tokens * elems
        read = elems * self.db
        return max(flops / self.profile.matmul_flops, read / self.profile.device_memory_bytes_per_s)

    def _next_kind(self, kind: LayerKind) -> LayerKind:
        return {LayerKind.EMBED: LayerKind.ATTN, LayerKind.ATTN: LayerKind.MLP, LayerKind.MLP: LayerKind.ATTN,
                LayerKind.HEAD: LayerKind.EMBED}[kind]

    # ---- per-layer terms -------------------------------------------------------------------------
    @property
    def paired_decode(self) -> bool:
        """Decode runs `runtime.schedule.paired_decode` (the engine's `_paired_decode`: CPU-delegated attention
        with overlap and two or more GPU batches on CUDA) and the profile has its per-batch host costs. Each
        (attention, MLP) pair is then one pipeline stage: the attention thread's work overlaps the pair's device
        work, its issue on the main thread and its transfers. Without those costs the serial model stays: it
        under-predicts the pipeline by about 10%, but a pipeline model without them let the search split the
        block into 33 GPU batches of 3, measured at 23.8 tok/s against 56.7 predicted (benchmarks/NOTES.md)."""
        p, prof = self.policy, self.profile
        return (self.cuda and p.cpu_attention and p.overlap and self.k >= 2 and self.cache_off_device
                and prof.delegated_issue_us is not None and prof.delegated_job_us is not None)

    def terms(self, phase: str, kind: LayerKind) -> LayerTerms:
        """Terms of one `kind` step in `phase`, all GPU batches. With `paired_decode`, a decode attention step
        carries its pair's MLP step (measured: decode time is the busiest worker's, visits 10e/10f) and the MLP
        step costs nothing of its own."""
        if phase == "decode" and self.paired_decode and kind in (LayerKind.ATTN, LayerKind.MLP):
            if kind == LayerKind.MLP:
                return LayerTerms(Linear(), Linear(), Linear(), Linear(), Linear(), Linear(), 0.0, False)
            return self._paired_terms(self._terms(phase, LayerKind.ATTN), self._terms(phase, LayerKind.MLP))
        return self._terms(phase, kind)

    def _paired_terms(self, attn: LayerTerms, mlp: LayerTerms) -> LayerTerms:
        """One (attention, MLP) pair of paired decode, all GPU batches: each worker's busy time bounds it."""
        prof, k = self.profile, self.k
        h2d = attn.h2d + mlp.h2d
        disk_read = attn.disk_read + mlp.disk_read
        shared = self._shared_host(attn.cpu, h2d, disk_read)  # the pair's transfers share host RAM with it
        assert prof.delegated_issue_us is not None and prof.delegated_job_us is not None
        issue = k * prof.delegated_issue_us * 1e-6 * self.cache_segments
        job = k * prof.delegated_job_us * 1e-6
        latency = k * (prof.delegated_latency_us or 0.0) * 1e-6
        # disk reads are waited for on the attention thread's side of the pair (see `_terms`)
        return LayerTerms(h2d, attn.d2h + mlp.d2h, disk_read, attn.disk_write + mlp.disk_write,
                          attn.device + mlp.device, attn.cpu + disk_read, issue, serial_host=False,
                          shared_host=shared, pipelined=True, thread_overhead_s=job, chain_latency_s=latency)

    def _terms(self, phase: str, kind: LayerKind) -> LayerTerms:
        p, prof, b, k, h = self.policy, self.profile, self.b, self.k, self.h
        prefill = phase == "prefill"
        width = self.workload.prompt_len if prefill else 1  # positions computed per sequence
        h2d_w, disk_w = self._weights_moved(self._next_kind(kind))
        h2d = self._h2d(h2d_w, pinned=p.pin_weights)
        disk_read = disk_w / prof.disk_read_bytes_per_s
        d2h = Linear()
        disk_write = Linear()
        device = Linear()
        cpu = Linear()
        # activations: every layer but the head stores its output; every layer but the embed loads its input
        act = b * k * width * h * self.db
        # (decode-width states of the disk rows stay in host RAM: runtime/activations.py)
        if kind != LayerKind.HEAD:
            d2h = d2h + self._d2h(Linear.of("acts", "cpu", "disk", coef=act))
            if prefill:
                disk_write = disk_write + Linear.of("acts", "disk", coef=act) / prof.disk_write_bytes_per_s
        if kind != LayerKind.EMBED:
            h2d = h2d + self._h2d(Linear.of("acts", "cpu", "disk", coef=act))
            if prefill:
                disk_read = disk_read + Linear.of("acts", "disk", coef=act) / prof.disk_read_bytes_per_s
        if self.acts_on_disk and prefill:
            disk_read = disk_read + k * prof.disk_acts_step_s
        if p.compress_weights and kind != LayerKind.EMBED:  # dequantized once per layer step, all batches
            device = device + self.matrix_elems[kind] / prof.dequant_elems_per_s
        if prof.device_elementwise_gbps and kind in (LayerKind.ATTN, LayerKind.MLP):
            # around the matmuls: LayerNorm (read, write), residual add (2 reads, a write), and the head
            # reshapes of q, k, v and the output (attention) or ReLU over the ffn activations (MLP, in place)
            per_token = (5 + 8) * h if kind == LayerKind.ATTN else 5 * h + 2 * self.spec.ffn_dim
            device = device + k * b * width * per_token * self.db / (prof.device_elementwise_gbps * 1e9)
        if kind == LayerKind.EMBED:
            device = device + k * 3 * b * width * h * self.db / prof.device_memory_bytes_per_s
        elif kind == LayerKind.MLP:
            device = device + k * self._matmul_s(self.matrix_elems[kind], b * width)
        elif kind == LayerKind.HEAD:  # LM head on the last position only
            device = device + k * self._matmul_s(self.matrix_elems[kind], b)
        else:
            device = device + k * self._matmul_s(self.matrix_elems[kind], b * width)
            a = self._attention(prefill)
            h2d, d2h = h2d + a["h2d"], d2h + a["d2h"]
            disk_read, disk_write = disk_read + a["disk_read"], disk_write + a["disk_write"]
            device, cpu = device + a["device"], cpu + a["cpu"]
        delegated = p.cpu_attention and kind == LayerKind.ATTN and not prefill
        overhead = k * prof.step_overhead_s_of(kind == LayerKind.ATTN)
        if kind == LayerKind.ATTN and not prefill:
            overhead *= self.cache_segments
        shared = None
        if self.cuda and delegated:
            # CPU attention streams the cache from host RAM while the DMA engines read the next weights from it.
            # They contend (measured on the H100 box, visits 4 and 6): their bytes share the fitted host
            # bandwidth, or without one they run in series. (fp16 attention reads about one byte per FLOP.)
            # Disk reads are waited for by the host thread (their ticket's future) that also runs the CPU
            # attention, so they add to that thread's time: measured 28.5 tok/s for OPT-30B 32x3 delegated with
            # 2% of the weights and 3% of the cache on disk, against 47.6 for 24x4 with none (visit 7).
            shared = self._shared_host(cpu, h2d, disk_read)
        return LayerTerms(h2d, d2h, disk_read, disk_write, device, cpu, overhead,
                          serial_host=not self.cuda or delegated, shared_host=shared)

    def _shared_host(self, cpu: Linear, h2d: Linear, disk_read: Linear) -> Linear:
        """Time CPU attention and the host->device DMA take together from host RAM: their bytes over the fitted
        shared bandwidth, or without one in series; disk reads add (the attention thread waits for them)."""
        prof = self.profile
        if not prof.host_memory_shared_gbps:
            return cpu + h2d + disk_read
        host_bytes = cpu * prof.cpu_attention_flops + h2d * prof.h2d_bytes_per_s(True)
        return host_bytes / (prof.host_memory_shared_gbps * 1e9) + disk_read

    def _attention(self, prefill: bool) -> dict[str, Linear]:
        """Attention-core and KV-cache terms of one attention layer, all GPU batches."""
        p, prof, b, k, h = self.policy, self.profile, self.b, self.k, self.h
        s = self.workload.prompt_len
        kvb = 2 * h * self.kv_elem_bytes  # K and V of one position of one sequence, as stored
        off = ("cpu", "disk")
        if prefill:
            stored = b * k * s * kvb
            out = {
                "h2d": Linear(),
                "d2h": self._d2h(Linear.of("cache", *off, coef=stored)),
                "disk_read": Linear(),
                "disk_write": Linear.of("cache", "disk", coef=stored) / prof.disk_write_bytes_per_s,
                "device": Linear(k * 4 * b * s * s * h / prof.bmm_flops),
                "cpu": Linear(),
            }
            if p.compress_cache:
                out["device"] = out["device"] + k * b * s * 2 * h / prof.dequant_elems_per_s
            return out
        t_read, t_att = self.read_len, self.read_len + 1
        topk = p.attn_topk
        read_frac = (1 + topk) / 2  # K in full, V only the kept rows
        seq_pos = b * k * t_read * kvb
        on_device = Linear.of("cache", "gpu") if p.cpu_attention else Linear.of("cache", "gpu", *off)
        if p.compress_cache and self.cuda and topk >= 1.0:
            # the fused kernel reads the packed cache in place (runtime/kernels/attention_cuda.py)
            device = on_device * (b * k * t_att * kvb) / prof.device_memory_bytes_per_s
        else:
            dev_bytes = on_device * (b * k * t_att * 2 * h * self.db * read_frac)
            device = dev_bytes / prof.device_memory_bytes_per_s
            if p.compress_cache:
                device = device + on_device * (b * k * t_att * 2 * h * read_frac / prof.dequant_elems_per_s)
        new_token = b * k * kvb
        if p.cpu_attention:
            cpu = Linear.of("cache", *off, coef=b * k * 4 * t_att * h / prof.cpu_attention_flops)
            if p.compress_cache:
                cpu = cpu + Linear.of("cache", *off, coef=b * k * t_att * 2 * h / prof.cpu_dequant_elems_per_s)
            h2d = Linear()
            d2h = self._d2h(Linear.of("cache", *off, coef=4 * b * k * h * self.db))  # q, new K/V, output
        else:
            cpu = Linear()
            h2d = self._h2d(Linear.of("cache", *off, coef=seq_pos * read_frac))
            d2h = self._d2h(Linear.of("cache", *off, coef=new_token))
        return {
            "h2d": h2d, "d2h": d2h,
            "disk_read": Linear.of("cache", "disk", coef=seq_pos * read_frac) / prof.disk_read_bytes_per_s,
            "disk_write": Linear.of("cache", "disk", coef=new_token) / prof.disk_write_bytes_per_s,
            "device": device, "cpu": cpu,
        }

    # ---- totals ----------------------------------------------------------------------------------
    @property
    def layer_counts(self) -> dict[LayerKind, int]:
        return self.spec.steps_per_token

    @property
    def decode_tokens(self) -> int:
        return self.workload.gen_len - 1

    # ---- memory ----------------------------------------------------------------------------------
    def memory(self, tier: Tier, weights_resident: bool = False) -> Linear:
        """Peak bytes on `tier` as planned by `build_plan` (upper bound; vectors counted on every tier).

        `weights_resident`: every weight is on the device, so the plan allocates no weight slots (only
        valid where the weights' GPU fraction is fixed to 1).
        """
        p, spec, b, k, h, db = self.policy, self.spec, self.b, self.k, self.h, self.db
        s, T = self.workload.prompt_len, self.workload.cache_len
        homes = 2 * spec.num_layers * k
        kv_seq = T * h * self.kv_elem_bytes  # one K (or V) home, per sequence
        pad = ALIGN if tier == Tier.DISK else PIECE_ALIGN
        weights = Linear.of("weights", tier.value, coef=self.total_matrix_bytes * self.weight_ratio)
        # rows are split in whole units (a quantization group of rows when packed): one unit of slack per piece
        unit_rows = WEIGHT_QUANT.group_size if p.compress_weights else 1
        out = weights + self.vector_bytes + self.pieces * (pad + unit_rows * self.max_row_bytes * self.weight_ratio)
        out = out + Linear.of("cache", tier.value, coef=homes * b * kv_seq) + homes * ALIGN
        act_seq = s * h * db
        slots = weight_slots(p)
        if tier == Tier.GPU:
            if p.compress_weights:
                out = out + slots * Linear.of("weights", "cpu", "disk", coef=self.max_layer_bytes * self.weight_ratio)
                out = out + self.max_layer_elems * db
            elif not weights_resident:
                out = out + slots * self.max_layer_bytes  # the weight slots
            if not p.cpu_attention:
                out = out + Linear.of("cache", "cpu", "disk", coef=4 * b * kv_seq) + 8 * ALIGN
            if p.compress_cache and (not self.cuda or p.attn_topk < 1.0):  # dequantized K/V (plan: cache.dequant)
                out = out + 2 * b * T * h * db
            out = out + Linear.of("acts", "gpu", coef=k * b * act_seq) + 2 * b * act_seq
            from flexgen_core.plan import workspace_bytes

            out = out + workspace_bytes(spec, b, s, T, db, self.profile.device_type)
        elif tier == Tier.CPU:
            out = out + slots * Linear.of("weights", "disk", coef=self.max_layer_bytes * self.weight_ratio)
            out = out + slots * self.pieces * ALIGN
            out = out + Linear.of("cache", "disk", coef=4 * b * kv_seq) + 4 * ALIGN
            if p.cpu_attention:
                per_seq = 2 * spec.num_heads * T * 4 + (2 * T * h * 4 if p.compress_cache else 0)
                out = out + Linear.of("cache", "cpu", "disk", coef=b * per_seq)
            out = out + Linear.of("acts", "cpu", coef=k * b * act_seq) + Linear.of("acts", "disk", coef=2 * b * act_seq)
            out = out + Linear.of("acts", "disk", coef=k * b * h * db)  # decode-width states of the disk rows
            out = out + 3 * ALIGN
        else:
            out = out + Linear.of("acts", "disk", coef=k * b * act_seq) + k * ALIGN
        return out


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """Predicted times (seconds, one block) and peak bytes of a policy, with the per-term breakdown."""

    policy: Policy
    prefill_s: float
    decode_s: float
    block_size: int
    gen_len: int
    bound_s: float  # the same model with no host overhead: the I/O-or-compute bound
    breakdown: dict[str, dict[str, dict[str, float]]]  # phase -> layer kind -> term -> seconds per layer
    peak_bytes: dict[str, int]  # exact planned bytes per tier

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def throughput_tok_s(self) -> float:
        return self.block_size * self.gen_len / self.total_s if self.total_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.block_size * (self.gen_len - 1) / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def bound_tok_s(self) -> float:
        return self.block_size * self.gen_len / self.bound_s if self.bound_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy.to_dict(),
            "predicted": {"prefill_s": self.prefill_s, "decode_s": self.decode_s, "total_s": self.total_s,
                          "throughput_tok_s": self.throughput_tok_s, "decode_tok_s": self.decode_tok_s,
                          "bound_tok_s": self.bound_tok_s},
            "breakdown": self.breakdown,
            "peak_bytes": dict(self.peak_bytes),
        }


def realized_point(plan: Plan) -> dict[str, float]:
    """Placement fractions the plan actually realizes (bytes of weights, whole sequences of cache/acts)."""
    point = policy_point(plan.policy)
    for tier, frac in zip(TIERS, plan.realized_weight_fractions(), strict=True):
        point[f"weights.{tier.value}"] = frac
    gbs = plan.policy.gpu_batch_size
    for tier in TIERS:
        point[f"cache.{tier.value}"] = plan.cache_split.count(tier) / gbs
        point[f"acts.{tier.value}"] = plan.act_split.count(tier) / gbs
    return point


def phase_times(model: CostModel, point: dict[str, float], with_overhead: bool = True
                ) -> tuple[float, float, dict[str, dict[str, dict[str, float]]]]:
    """(prefill seconds, decode seconds, breakdown) of one block at a placement."""
    overlap = model.policy.overlap
    breakdown: dict[str, dict[str, dict[str, float]]] = {}
    totals = {}
    for phase in PHASES:
        per_kind: dict[str, dict[str, float]] = {}
        phase_s = 0.0
        for kind in KINDS:
            terms = model.terms(phase, kind)
            if not with_overhead:
                terms = replace(terms, overhead_s=0.0, thread_overhead_s=0.0, chain_latency_s=0.0)
            step = max(b.value(point) for b in terms.bounds(overlap))
            per_kind[kind.value] = {
                "h2d": terms.h2d.value(point), "d2h": terms.d2h.value(point),
                "disk_read": terms.disk_read.value(point), "disk_write": terms.disk_write.value(point),
                "device": terms.device.value(point),
                "cpu_attention": terms.cpu.value(point) + terms.thread_overhead_s,  # the attention thread's time
                "overhead": terms.overhead_s, "step": step,
            }
            phase_s += step * model.layer_counts[kind]
        breakdown[phase] = per_kind
        totals[phase] = phase_s
    return totals["prefill"], totals["decode"] * model.decode_tokens, breakdown


def estimate(spec: ModelSpec, policy: Policy, workload: Workload, profile: HardwareProfile,
             dtype_bytes: int | None = None) -> Estimate:
    """Predict one block of `policy` on `profile`, at the placement the exact plan realizes."""
    db = dtype_bytes or profile.default_dtype_bytes
    plan = build_plan(spec, policy, workload, db, profile.device_type)
    model = CostModel(spec, policy, workload, profile, db, cache_segments=len(plan.cache_split.segments()),
                      acts_on_disk=plan.act_split.disk > 0,
                      cache_off_device=plan.cache_split.count(Tier.GPU) < policy.gpu_batch_size)
    point = realized_point(plan)
    prefill_s, decode_s, breakdown = phase_times(model, point)
    bound_pre, bound_dec, _ = phase_times(model, point, with_overhead=False)
    return Estimate(policy, prefill_s, decode_s, policy.block_size, workload.gen_len, bound_pre + bound_dec,
                    breakdown, {t.value: b for t, b in plan.bytes_per_tier().items()})


def budget_of(profile: HardwareProfile, margin: float = 0.0) -> MemoryBudget:
    """Memory budget of a profile's machine, minus a safety margin (a fraction of each tier)."""
    from flexgen_core.planning.hardware import GIB

    keep = 1.0 - margin
    gpu = int(profile.gpu_memory_gib * GIB * keep)
    cpu = int(profile.cpu_memory_gib * GIB * keep)
    disk = int(profile.disk_gib * GIB * keep)
    return MemoryBudget(gpu, cpu, disk, host_bytes=cpu if profile.device_type == "cpu" else None)

