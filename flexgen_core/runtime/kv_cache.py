"""The KV cache of one block: homes per (transformer block, GPU batch), split by sequences across tiers.

Each home holds K (or V) sequence-major, (T, rows, nh, d), so the valid prefix [:t] is one contiguous
range and appending position t is one contiguous write; packed (4-bit, grouped along d) it is codes
(T, rows, nh, G, g/2) followed by fp16 [step, min] pairs (T, rows, nh, G, 2), sliced the same way.

Decode attention runs per segment of sequences, where that segment's cache can be read:
- GPU segment: in place on the device;
- CPU/disk segment, not delegated: its prefix is prefetched into a device slot (two slots alternate,
  so the next GPU batch's cache loads while this one computes) and the new token is stored back;
- CPU/disk segment, delegated (cpu_attention): q and the new K/V go to the host (one copy into a pinned
  buffer) and the attention core runs on the host-attention thread, over the CPU home in place or over a
  per-slot workspace read from disk, so in-flight GPU batches never share a workspace. `begin_decode` returns
  before that thread is done, so the engine can issue the next GPU batch meanwhile (`PendingAttention`).
On CUDA, a 4-bit segment is attended in place by a Triton kernel that reads the codes (no dequantized copy),
and the new token's K/V is quantized by one kernel straight into its position (`runtime/kernels`).
With attn_topk < 1, K is read in full, the top fraction of past positions (plus the current one) is kept
and only those V rows are read, from wherever V lives.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.profiler import record_function

from flexgen_core.plan import ALIGN, CACHE_QUANT, PIECE_ALIGN, Plan, align, kv_bytes
from flexgen_core.policy import TIERS, Tier
from flexgen_core.quant import PackedTensor, codes_shape, dequantize_moved, quantize, scales_shape
from flexgen_core.runtime import layers
from flexgen_core.runtime.kernels import attention_cuda, native_module
from flexgen_core.runtime.memory import DeviceArena, DiskArena, HostArena, OffloadDir, typed
from flexgen_core.runtime.transfer import DONE, Ticket, Transfer

# CUDA decode attention over an fp16/bf16 cache: the Triton kernel for many (sequence, head) rows, memory-efficient
# SDPA for few. H100 (benchmarks/gpu_kernels.py): 1344 rows (OPT-30B, 24 sequences) 189 vs 240 us, 256 rows
# (OPT-6.7B, 8 sequences) 117 vs 81 us. FLEXGEN_DENSE_ATTENTION=triton or =sdpa forces one (benchmarks). A packed
# cache always takes the Triton kernel, which reads the 4-bit codes in place.
DENSE_ATTENTION = os.environ.get("FLEXGEN_DENSE_ATTENTION", "auto")
TRITON_DENSE_MIN_ROWS = 1024


def _fused_dense(rows: int) -> bool:
    return DENSE_ATTENTION == "triton" or (DENSE_ATTENTION == "auto" and rows >= TRITON_DENSE_MIN_ROWS)


def host_attention_threads(cuda: bool) -> int:
    """CPU threads of delegated attention: FLEXGEN_HOST_ATTENTION_THREADS, else, next to a GPU, one fewer than
    torch uses, which leaves a core to the thread that issues the device's work (the kernel splits its rows
    evenly, so one thread sharing a core delays the whole call: 16 threads on the 16-core H100 box decoded
    15-25% slower than 15, visit 10d). Set on that thread, it also becomes torch's default for threads
    started later."""
    configured = os.environ.get("FLEXGEN_HOST_ATTENTION_THREADS")
    if configured:
        return max(1, int(configured))
    threads = torch.get_num_threads()
    return max(1, threads - 1) if cuda else threads


CPU_CHUNK = 64  # positions per chunk of CPU attention over a low-precision cache (benchmarks/cpu_attention.py)


class SegmentLayout:
    """Byte layout of one K (or V) home of `rows` sequences and `capacity` positions."""

    def __init__(self, rows: int, capacity: int, heads: int, head_dim: int, dtype: torch.dtype, packed: bool):
        self.rows, self.capacity, self.packed, self.dtype = rows, capacity, packed, dtype
        self.shape = (capacity, rows, heads, head_dim)
        if packed:
            self.codes_shape = codes_shape(self.shape, -1, CACHE_QUANT)
            self.scales_shape = scales_shape(self.shape, -1, CACHE_QUANT)
            self.code_pos = math.prod(self.codes_shape[1:])
            self.scale_pos = math.prod(self.scales_shape[1:]) * 2
            self.scale_base = align(capacity * self.code_pos, PIECE_ALIGN)
        else:
            self.pos_bytes = rows * heads * head_dim * dtype.itemsize
        self._full: dict[tuple[int, int], torch.Tensor | PackedTensor] = {}  # buffer -> full-capacity view

    def regions(self, start: int, stop: int) -> list[tuple[int, int]]:
        """(byte offset, nbytes) ranges holding positions [start, stop)."""
        if not self.packed:
            return [(start * self.pos_bytes, (stop - start) * self.pos_bytes)]
        return [(start * self.code_pos, (stop - start) * self.code_pos),
                (self.scale_base + start * self.scale_pos, (stop - start) * self.scale_pos)]

    def view(self, raw: torch.Tensor, length: int) -> torch.Tensor | PackedTensor:
        """Positions [:length] of a buffer with this layout (dense tensor or packed view)."""
        key = (raw.data_ptr(), raw.numel())
        full = self._full.get(key)
        if full is None:  # buffers are preallocated, so a buffer's full view is built once
            if not self.packed:
                full = typed(raw, self.dtype, self.shape)
            else:
                full = PackedTensor(typed(raw, torch.uint8, self.codes_shape),
                                    typed(raw[self.scale_base:], torch.float16, self.scales_shape),
                                    self.shape, 3, CACHE_QUANT, self.dtype)
            self._full[key] = full
        return full.narrow(0, 0, length)


OVERFLOW_HINT = ("the activations overflowed: run in bfloat16 or float32 (--dtype), or leave the cache "
                 "uncompressed")


def _check_positions(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Diagnostic: raise naming the positions of (t, rows, nh, d) K/V tensors that hold inf/NaN."""
    for name, x in tensors.items():
        bad = (~torch.isfinite(x)).flatten(1).any(dim=1).nonzero().flatten().tolist()
        if bad:
            raise FloatingPointError(f"inf/NaN in the {name} that decode attention reads, {where}: positions "
                                     f"{bad[:8]}{' ...' if len(bad) > 8 else ''} of {x.shape[0]}")


def _dense(x: torch.Tensor | PackedTensor, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_moved(x, dtype) if isinstance(x, PackedTensor) else x


_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def _disk_rows(path: object, offset: int, dtype: torch.dtype, shape: tuple[int, ...], idx: torch.Tensor
               ) -> torch.Tensor:
    """Gather rows [idx, b, h] of a (t, b, nh, ...) array stored at `offset` of a file, reading only those."""
    mm = np.memmap(path, dtype=_UINT[dtype.itemsize], mode="r", offset=offset, shape=shape)
    b, nh, _ = idx.shape
    picked = mm[idx.numpy(), np.arange(b)[:, None, None], np.arange(nh)[None, :, None]]
    return torch.from_numpy(np.ascontiguousarray(picked)).view(dtype)


@dataclass(eq=False)
class HostAttention:
    """A CPU-delegated segment's attention, running on the host-attention thread into a pinned `output`."""

    key: tuple[int, Tier]  # (GPU batch, tier) of its buffers
    output: torch.Tensor  # (rows, nh, d) host
    ticket: Ticket  # completes when `output` is written


class PendingAttention:
    """Decode attention of one GPU batch: device segments already issued, delegated ones possibly still running."""

    def __init__(self, parts: list[torch.Tensor | HostAttention], cache: KVCache) -> None:
        self.parts, self.cache = parts, cache

    @property
    def on_host(self) -> bool:
        return any(isinstance(p, HostAttention) for p in self.parts)

    def result(self) -> torch.Tensor:
        """(b, nh, d) on the device, segments in row order (waits for the host parts)."""
        outs = []
        for part in self.parts:
            if isinstance(part, HostAttention):
                outs.append(self.cache.collect(part))
            else:
                outs.append(part)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


class KVCache:
    """K/V homes of every (transformer block, GPU batch) for one block of sequences (see module doc)."""

    def __init__(self, plan: Plan, device: torch.device, dtype: torch.dtype, transfer: Transfer,
                 offload: OffloadDir) -> None:
        assert plan.workload is not None
        self.plan, self.device, self.dtype, self.transfer = plan, device, dtype, transfer
        self.spec, self.policy = plan.spec, plan.policy
        self.capacity = plan.workload.cache_len
        cuda = device.type == "cuda"
        split = plan.cache_split
        self.seg_bytes = {tier: align(plan.kv_segment_bytes(split.count(tier)), ALIGN) for tier in TIERS}
        self.first_block = plan.blocks.start  # a pipeline stage holds the cache of its blocks only
        n_homes = 2 * len(plan.blocks) * self.policy.num_gpu_batches
        self.homes: dict[Tier, DeviceArena | HostArena | DiskArena | None] = {
            Tier.GPU: DeviceArena(n_homes * self.seg_bytes[Tier.GPU], device, "cache.gpu") if split.gpu else None,
            Tier.CPU: HostArena(n_homes * self.seg_bytes[Tier.CPU], pin=cuda, name="cache.cpu") if split.cpu else None,
            Tier.DISK: DiskArena(offload, "cache", n_homes * self.seg_bytes[Tier.DISK]) if split.disk else None,
        }
        self.slots = ([[DeviceArena(plan.cache_slot_bytes, device, "cache.slot") for _ in range(2)] for _ in range(2)]
                      if plan.cache_slot_bytes else [])
        self.staging = ([[HostArena(self.seg_bytes[Tier.DISK], pin=cuda, name="cache.staging") for _ in range(2)]
                         for _ in range(2)] if split.disk else [])
        half = kv_bytes(self.spec, self.policy.gpu_batch_size, self.capacity, dtype.itemsize, False)
        self.dequant = (DeviceArena(2 * half, device, "cache.dequant") if "cache.dequant" in plan.usage[Tier.GPU]
                        else None)
        self._slot_free: list[Ticket] = [DONE, DONE]
        self._staging_free: list[Ticket] = [DONE, DONE]
        self._stored: dict[tuple[int, int], list[Ticket]] = {}
        self._prefetched: dict[tuple[int, int], tuple[int, Ticket, list[Ticket]]] = {}
        self._next_slot = 0
        self.rows: list[int] = []
        self._segments: list[list[tuple[Tier, int, int]]] = []
        self._layouts: dict[int, SegmentLayout] = {}
        self._raws: dict[tuple[Tier, int, int, int], torch.Tensor] = {}
        # (local transformer block, GPU batch): K/V that could not be quantized; set on the device without a
        # host sync and checked by `check_values` where the engine syncs anyway
        self.check_finite = False  # diagnostic: raise on inf/NaN in the K/V that decode attention reads
        # CPU-delegated attention: one host thread runs it in order (jobs of a (block, batch) stay ordered);
        # per (GPU batch, tier) pinned buffers for q/k/v in and the result out; seconds go to CallStats
        delegates = self.policy.cpu_attention and (split.cpu or split.disk)
        if delegates:
            native_module()  # build (or load) the CPU kernel now, not inside the first decode step
        self._host_worker = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="flexgen-attention",
                                                initializer=torch.set_num_threads,
                                                initargs=(host_attention_threads(cuda),))
                             if delegates else None)
        self._host_jobs: list[Future] = []
        self._host_buffers: dict[tuple[int, Tier], tuple[torch.Tensor, torch.Tensor]] = {}
        self._returned: dict[tuple[int, Tier], Ticket] = {}
        self._in_flight: set[tuple[int, Tier]] = set()
        self.host_seconds = {"inputs": 0.0, "compute": 0.0, "wait": 0.0}
        self._invalid = (torch.zeros(len(plan.blocks), self.policy.num_gpu_batches, dtype=torch.bool, device=device)
                         if self.policy.compress_cache else None)

    # ---- block lifecycle ------------------------------------------------------------------------
    def begin_block(self, batch_rows: list[int]) -> None:
        self.finish_block()
        self.rows = list(batch_rows)
        self._segments = [self.plan.cache_split.segments(rows) for rows in self.rows]
        if self._invalid is not None:
            self._invalid.zero_()

    def check_values(self, phase: str) -> None:
        """Raise if any K/V written since `begin_block` could not be quantized (one host sync)."""
        if self._invalid is None or not bool(self._invalid.any()):
            return
        block, batch = (int(i) for i in self._invalid.nonzero()[0])
        raise ValueError(f"inf, NaN or values beyond fp16's range in the KV cache of transformer block "
                         f"{block + self.first_block}, GPU batch {batch}, during {phase}: {OVERFLOW_HINT}")

    def _invalid_flag(self, block: int, batch: int, x: torch.Tensor) -> torch.Tensor | None:
        """The deferred-check flag for K/V `x` computed on the device, or None (host data raises at once)."""
        if self._invalid is None or x.device != self._invalid.device:
            return None
        return self._invalid[block - self.first_block, batch]

    @property
    def delegates(self) -> bool:
        """Whether some of the cache is attended on the host (CPU delegation)."""
        return self._host_worker is not None

    def segments(self, batch: int) -> list[tuple[Tier, int, int]]:
        return self._segments[batch]

    def _layout(self, rows: int) -> SegmentLayout:
        layout = self._layouts.get(rows)
        if layout is None:
            layout = self._layouts[rows] = SegmentLayout(rows, self.capacity, self.spec.num_heads,
                                                         self.spec.head_dim, self.dtype, self.policy.compress_cache)
        return layout

    def _delegated(self, tier: Tier) -> bool:
        return tier != Tier.GPU and self.policy.cpu_attention

    def _home_offset(self, tier: Tier, block: int, batch: int, kv: int) -> int:
        local = block - self.first_block
        return ((local * self.policy.num_gpu_batches + batch) * 2 + kv) * self.seg_bytes[tier]

    def _home_raw(self, tier: Tier, block: int, batch: int, kv: int) -> torch.Tensor:
        key = (tier, block, batch, kv)
        raw = self._raws.get(key)
        if raw is None:
            home = self.homes[tier]
            assert isinstance(home, (DeviceArena, HostArena))
            raw = self._raws[key] = home.view(self._home_offset(tier, block, batch, kv), self.seg_bytes[tier])
        return raw

    def _slot_raw(self, slot: int, kv: int, tier: Tier) -> torch.Tensor:
        """Device slot region of a streamed segment: the CPU segment first, then the disk segment."""
        offset = 0 if tier == Tier.CPU else align(self.plan.kv_segment_bytes(self.plan.cache_split.cpu), ALIGN)
        return self.slots[slot][kv].buffer[offset:]

    # ---- writes ---------------------------------------------------------------------------------
    def store(self, block: int, batch: int, start: int, k: torch.Tensor, v: torch.Tensor,
              skip_in_place: bool = False) -> None:
        """Store K/V of positions [start, start+n) into the homes. k, v: (n, b, nh, d) on the device.

        With `skip_in_place`, homes the attention step already wrote (GPU; CPU when delegated) are skipped.
        """
        tickets = self._stored.setdefault((block, batch), [])
        for tier, r0, r1 in self.segments(batch):
            if skip_in_place and (tier == Tier.GPU or (tier == Tier.CPU and self.policy.cpu_attention)):
                continue
            layout = self._layout(r1 - r0)
            regions = layout.regions(start, start + k.shape[0])
            encoded = [self._encode(layout, x[:, r0:r1], block, batch, start) for x in (k, v)]
            # the copies below read what the encoding kernels write: order them after all of it (a mark taken
            # before V was quantized let V's copy read unwritten bytes on CUDA)
            mark = self.transfer.mark() if tier != Tier.GPU else DONE
            for kv, data in enumerate(encoded):
                if tier == Tier.GPU:
                    raw = self._home_raw(tier, block, batch, kv)
                    for (off, n), d in zip(regions, data, strict=True):
                        raw[off:off + n].copy_(d)
                    continue
                if tier == Tier.CPU:
                    raw = self._home_raw(tier, block, batch, kv)
                    pairs = [(raw[off:off + n], d) for (off, n), d in zip(regions, data, strict=True)]
                    tickets.append(self.transfer.copy(pairs, after=[mark], lane="store"))
                else:
                    tickets.append(self._disk_store(block, batch, kv, regions, data, mark))

    def _encode(self, layout: SegmentLayout, x: torch.Tensor, block: int, batch: int, start: int
                ) -> list[torch.Tensor]:
        """Bytes to store for positions [start, start+n) x: (n, rows, nh, d), one tensor per region of `regions`."""
        if not layout.packed:
            return [x.contiguous().view(torch.uint8).reshape(-1)]
        p = self._quantize(x, block, batch, start)
        return [p.codes.reshape(-1), p.scales.contiguous().view(torch.uint8).reshape(-1)]

    def _quantize(self, x: torch.Tensor, block: int, batch: int, start: int, out: PackedTensor | None = None
                  ) -> PackedTensor:
        """4-bit K/V of positions [start, start+n) (into `out` if given); device data is checked later
        (`check_values`)."""
        try:
            return quantize(x, CACHE_QUANT.bits, CACHE_QUANT.group_size, dim=-1,
                            invalid=self._invalid_flag(block, batch, x), out=out)
        except ValueError as exc:  # name the place: non-finite K/V means the model overflowed its dtype
            raise ValueError(f"{exc} in the KV cache of transformer block {block}, GPU batch {batch}, positions "
                             f"{start}..{start + x.shape[0] - 1}; {OVERFLOW_HINT}") from exc

    def _disk_store(self, block: int, batch: int, kv: int, regions: list[tuple[int, int]],
                    data: list[torch.Tensor], mark: Ticket) -> Ticket:
        arena = self.homes[Tier.DISK]
        assert isinstance(arena, DiskArena)
        base = self._home_offset(Tier.DISK, block, batch, kv)
        if self.device.type == "cuda":
            hosts = [torch.empty(d.numel(), dtype=torch.uint8, pin_memory=True) for d in data]
            before = list(zip(hosts, data, strict=True))
        else:
            hosts, before = [d.clone() for d in data], []
        writes = [(arena, base + off, h) for (off, _), h in zip(regions, hosts, strict=True)]
        return self.transfer.disk_write(writes, before=before, after=[mark])

    # ---- decode ---------------------------------------------------------------------------------
    def prefetch(self, block: int, batch: int, length: int) -> None:
        """Start loading positions [:length] of the segments that are not attended in place."""
        key = (block, batch)
        if key in self._prefetched:
            return
        slot = self._next_slot
        self._next_slot ^= 1
        stores = self._stored.pop(key, [])
        after = [self._slot_free[slot], *stores]
        kvs = (0, 1) if self.policy.attn_topk >= 1.0 else (0,)  # top-k reads only the chosen V rows later
        copies, reads, staged = [], [], []
        for tier, r0, r1 in self.segments(batch):
            if tier == Tier.GPU or (tier == Tier.CPU and self.policy.cpu_attention):
                continue
            regions = self._layout(r1 - r0).regions(0, length)
            for kv in kvs:
                if tier == Tier.CPU:
                    dst, raw = self._slot_raw(slot, kv, tier), self._home_raw(tier, block, batch, kv)
                    copies += [(dst[off:off + n], raw[off:off + n]) for off, n in regions]
                    continue
                arena = self.homes[Tier.DISK]
                base = self._home_offset(Tier.DISK, block, batch, kv)
                stage = self.staging[slot][kv].buffer
                reads += [(arena, base + off, stage[off:off + n]) for off, n in regions]
                if not self.policy.cpu_attention:  # the staging buffer is the CPU workspace otherwise
                    dst = self._slot_raw(slot, kv, tier)
                    staged += [(dst[off:off + n], stage[off:off + n]) for off, n in regions]
        tickets = []
        if copies:
            tickets.append(self.transfer.copy(copies, after=after))
        if reads:
            t = self.transfer.disk_read(reads, then=staged, after=[*after, self._staging_free[slot]])
            self._staging_free[slot] = t
            tickets.append(t)
        self._prefetched[key] = (slot, Ticket.all(tickets), stores)

    def decode(self, block: int, batch: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
               valid: torch.Tensor, t: int, valid_host: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of the token at position t. q, k_new, v_new: (b, nh, d); valid: (b, t+1) -> (b, nh, d)."""
        return self.begin_decode(block, batch, q, k_new, v_new, valid, t, valid_host).result()

    def begin_decode(self, block: int, batch: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                     valid: torch.Tensor, t: int, valid_host: torch.Tensor | None = None) -> PendingAttention:
        """Start `decode`: device segments are issued at once, CPU-delegated ones go to the host-attention
        thread. `valid_host`: the same mask on the CPU (saves a device->host copy). The caller may issue the
        next GPU batch's work before collecting the result, so the host attends while the device computes."""
        self.prefetch(block, batch, t)
        slot, ticket, stores = self._prefetched.pop((block, batch))
        if self.policy.attn_topk < 1.0 and not self.policy.cpu_attention:
            for st in stores:  # top-k reads the chosen V rows from the homes on the host
                st.host_wait()
        parts: list[torch.Tensor | HostAttention] = []
        for tier, r0, r1 in self.segments(batch):
            layout = self._layout(r1 - r0)
            args = (q[r0:r1], k_new[r0:r1], v_new[r0:r1], valid[r0:r1], t, (block, batch))
            if tier == Tier.GPU:
                raws = [self._home_raw(tier, block, batch, kv) for kv in (0, 1)]
                parts.append(self._attend_device(layout, raws, *args, v_from=None))
            elif self._delegated(tier):
                home = tier == Tier.CPU
                raws = [self._home_raw(tier, block, batch, kv) if home else self.staging[slot][kv].buffer
                        for kv in (0, 1)]
                mask = valid_host[r0:r1] if valid_host is not None else None
                job = self._attend_host(layout, raws, *args, v_from=(tier, block, batch), tier=tier,
                                        valid_host=mask, waits=[ticket, *stores])
                if not home:  # the staging buffer is this job's workspace until it is done
                    self._staging_free[slot] = Ticket.all([self._staging_free[slot], job.ticket])
                parts.append(job)
            else:
                ticket.wait()
                raws = [self._slot_raw(slot, kv, tier) for kv in (0, 1)]
                v_from = None if self.policy.attn_topk >= 1.0 else (tier, block, batch)
                parts.append(self._attend_device(layout, raws, *args, v_from=v_from))
        self._slot_free[slot] = self.transfer.mark()
        self.store(block, batch, t, k_new[None], v_new[None], skip_in_place=True)
        return PendingAttention(parts, self)

    def _write_position(self, layout: SegmentLayout, pairs: list[tuple[torch.Tensor, torch.Tensor]], t: int,
                        place: tuple[int, int]) -> None:
        """Write one position: pairs of (raw buffer, x (rows, nh, d)), straight into the buffer's view.
        place: (transformer block, GPU batch)."""
        for raw, x in pairs:
            dst = layout.view(raw, t + 1)
            if isinstance(dst, PackedTensor):
                self._quantize(x[None], *place, t, out=dst.narrow(0, t, 1))
            else:
                dst[t].copy_(x)

    def _attend_device(self, layout: SegmentLayout, raws: list[torch.Tensor], q: torch.Tensor, k_new: torch.Tensor,
                       v_new: torch.Tensor, valid: torch.Tensor, t: int, place: tuple[int, int],
                       v_from: tuple[Tier, int, int] | None) -> torch.Tensor:
        """Attention on the device over raws = [K, V] buffers (home or slot); V rows from `v_from` if top-k."""
        pairs = [(raws[0], k_new)] if v_from else [(raws[0], k_new), (raws[1], v_new)]
        self._write_position(layout, pairs, t, place)
        cached_k = layout.view(raws[0], t + 1)
        if self.policy.attn_topk >= 1.0:
            cached_v = layout.view(raws[1], t + 1)
            if not self.check_finite and (layout.packed or _fused_dense(q.shape[0] * q.shape[1])):
                fused = attention_cuda.decode_attention(q, cached_k, cached_v, valid)  # reads the cache in place
                if fused is not None:
                    return fused
            keys, values = self._dequant(cached_k, 0), self._dequant(cached_v, 1)
            if self.check_finite:
                _check_positions({"K": keys, "V": values}, f"transformer block {place[0]}, GPU batch {place[1]}, "
                                 f"a {layout.rows}-row segment read on the device")
            return layers.decode_attention(q, keys, values, valid)
        keys = self._dequant(cached_k, 0)
        if v_from is None:
            return self._topk(q, keys, valid, t, lambda idx: self._gather(layout, raws[1], idx), v_new)
        return self._topk(q, keys, valid, t, lambda idx: self._gather_home(layout, *v_from, idx), v_new)

    def _attend_host(self, layout: SegmentLayout, raws: list[torch.Tensor], q: torch.Tensor, k_new: torch.Tensor,
                     v_new: torch.Tensor, valid: torch.Tensor, t: int, place: tuple[int, int],
                     v_from: tuple[Tier, int, int], tier: Tier, valid_host: torch.Tensor | None,
                     waits: list[Ticket]) -> HostAttention:
        """Attention on the CPU over host buffers (the CPU home in place, or a disk segment's workspace), run
        by the host-attention thread after `waits`. q/k/v go to the host in one copy into a pinned buffer."""
        rows = q.shape[0]
        key = (place[1], tier)
        if key in self._in_flight:
            raise RuntimeError(f"GPU batch {place[1]}'s host attention was started again before its result was "
                               "collected (PendingAttention.result)")
        self._in_flight.add(key)
        buffers = self._host_buffers.get(key)
        if buffers is None or buffers[0].shape[1] != rows:
            shape = (rows, *q.shape[1:])
            pin = self.device.type == "cuda"
            buffers = self._host_buffers[key] = (torch.empty((3, *shape), dtype=q.dtype, pin_memory=pin),
                                                 torch.empty(shape, dtype=q.dtype, pin_memory=pin))
        inputs, output = buffers
        inputs.copy_(torch.stack((q, k_new, v_new)), non_blocking=True)  # one device->host copy
        arrived = self.transfer.mark()
        if valid_host is None:
            valid_host = valid.to("cpu")
        returned = self._returned.get(key, DONE)  # the last result's copy back to the device has read `output`

        def attend() -> None:
            start = time.perf_counter()
            for ticket in (arrived, *waits, returned):
                ticket.host_wait()
            computing = time.perf_counter()
            q_host, k_host, v_host = inputs.unbind(0)
            self._write_position(layout, [(raws[0], k_host), (raws[1], v_host)], t, place)
            host_dtype = torch.float32 if layout.packed else layout.dtype
            keys = _dense(layout.view(raws[0], t + 1), host_dtype)
            if self.policy.attn_topk >= 1.0:
                values = _dense(layout.view(raws[1], t + 1), host_dtype)
                out = layers.host_decode_attention(q_host, keys, values, valid_host, chunk=CPU_CHUNK)
            else:
                out = self._topk(q_host, keys, valid_host, t, lambda idx: self._gather_home(layout, *v_from, idx),
                                 v_host)
            output.copy_(out)
            self.host_seconds["inputs"] += computing - start
            self.host_seconds["compute"] += time.perf_counter() - computing

        assert self._host_worker is not None
        future = self._host_worker.submit(attend)
        self._host_jobs.append(future)
        return HostAttention(key, output, Ticket(future=future))

    def collect(self, job: HostAttention) -> torch.Tensor:
        """A host job's result on the device; its output buffer is free again once the copy has read it."""
        start = time.perf_counter()
        try:
            # a named range for --torch-profile (it sees the main thread only), none without a profiler
            with (record_function("flexgen::host_attention.wait") if torch.autograd.profiler._is_profiler_enabled
                  else contextlib.nullcontext()):
                job.ticket.host_wait()  # re-raises the job's error
        finally:
            self._in_flight.discard(job.key)
        self.host_seconds["wait"] += time.perf_counter() - start
        if self.device.type != "cuda":
            return job.output.clone()
        out = job.output.to(self.device, non_blocking=True)
        self._returned[job.key] = self.transfer.mark()
        return out

    def _topk(self, q: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, t: int,
              gather: Callable[[torch.Tensor], torch.Tensor], v_new: torch.Tensor) -> torch.Tensor:
        keep = min(t, max(1, int(self.policy.attn_topk * t)))
        if keep == 0:  # nothing in the past: attention is the current token's V
            return v_new.to(q.dtype)
        idx, top, current = layers.topk_scores(q, keys, valid, keep)
        v_top = gather(idx).to(q.device)
        return layers.topk_combine(top, current, v_top, v_new.to(q.device))

    def _gather(self, layout: SegmentLayout, raw: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Rows idx (rows, nh, k) of a V buffer with this layout -> (rows, nh, k, d)."""
        view = layout.view(raw, layout.capacity)
        if not isinstance(view, PackedTensor):
            return layers.gather_rows(view, idx)
        codes = layers.gather_rows(view.codes, idx)  # (rows, nh, k, G, g/2)
        scales = layers.gather_rows(view.scales, idx)  # (rows, nh, k, G, 2)
        shape = (*codes.shape[:3], layout.shape[-1])
        return dequantize_moved(PackedTensor(codes, scales, shape, 3, CACHE_QUANT, self.dtype))

    def _gather_home(self, layout: SegmentLayout, tier: Tier, block: int, batch: int, idx: torch.Tensor
                     ) -> torch.Tensor:
        """Read only the selected V rows from a CPU or disk home."""
        idx = idx.to("cpu")
        if tier == Tier.CPU:
            return self._gather(layout, self._home_raw(tier, block, batch, 1), idx)
        arena = self.homes[Tier.DISK]
        assert isinstance(arena, DiskArena)
        base = self._home_offset(Tier.DISK, block, batch, 1)
        if not layout.packed:
            return _disk_rows(arena.path, base, self.dtype, layout.shape, idx)
        codes = _disk_rows(arena.path, base, torch.uint8, layout.codes_shape, idx)
        scales = _disk_rows(arena.path, base + layout.scale_base, torch.float16, layout.scales_shape, idx)
        shape = (*codes.shape[:3], layout.shape[-1])
        return dequantize_moved(PackedTensor(codes, scales, shape, 3, CACHE_QUANT, self.dtype))

    def _dequant(self, x: torch.Tensor | PackedTensor, kv: int) -> torch.Tensor:
        if not isinstance(x, PackedTensor):
            return x
        if self.dequant is None:  # CUDA plans leave no dequantization buffer (the fused kernel needs none)
            return dequantize_moved(x, self.dtype)
        half = self.dequant.nbytes // 2
        out = typed(self.dequant.view(kv * half, math.prod(x.shape) * self.dtype.itemsize), self.dtype, x.shape)
        return dequantize_moved(x, self.dtype, out=out)

    def finish_block(self) -> None:
        """Wait for every outstanding store and host-attention job of the block."""
        for job in self._host_jobs:
            job.exception()  # waits; a failure was raised to the caller by `PendingAttention.result`
        self._host_jobs.clear()
        self._in_flight.clear()
        for tickets in self._stored.values():
            for t in tickets:
                t.host_wait()
        for _, ticket, stores in self._prefetched.values():
            ticket.host_wait()
            for t in stores:
                t.host_wait()
        self._stored.clear()
        self._prefetched.clear()

    def close(self) -> None:
        self.finish_block()
        if self._host_worker is not None:
            self._host_worker.shutdown(wait=True)
        for home in self.homes.values():
            if isinstance(home, (HostArena, DiskArena)):
                home.close()
        for pair in self.staging:
            for buf in pair:
                buf.close()
        self.homes = {}
