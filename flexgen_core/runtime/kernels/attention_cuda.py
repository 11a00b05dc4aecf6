"""Decode attention in Triton over a sequence-major KV cache, dense or 4-bit packed, read in place.

One query per (sequence, head) against positions [0, T) of K and V stored (T, B, H, D) (any strides, contiguous
D); a packed cache is codes (T, B, H, G, GROUP/2) and fp16 [step, minimum] scales (T, B, H, G, 2) as
`flexgen_core.quant` lays them out, dequantized in registers, so the cache crosses memory once at 0.28 of
fp16's bytes and no dequantized copy is written. Split-K ("flash decoding"): each program takes one
(sequence, head) and a chunk of positions and keeps an online softmax in fp32; when a (sequence, head) is cut
into several chunks a second small kernel combines them. `valid` (B, T) masks padding; every row must have at
least one valid position (the current token).
"""

from __future__ import annotations

import math

import torch

from flexgen_core.quant import PackedTensor
from flexgen_core.runtime.kernels.triton_support import runs_on

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path runs instead
    triton = None

# (positions per loop iteration, warps, target programs): (sequence, head) rows are split into chunks of positions
# until about `target` programs run. Best of a sweep on the H100 at OPT-30B's decode shape (b=24, nh=56, t~528;
# benchmarks/gpu_kernels.py): dense 189 us vs 240 us for memory-efficient SDPA, 4-bit 192 us vs 946 us for
# dequantize + SDPA.
DENSE_TILE = (64, 4, 4096)
PACKED_TILE = (16, 4, 8192)
MIN_CHUNK = 64  # never cut the positions finer than this

if triton is not None:

    # lengths change every decode step: never specialize on them (a specialization compiles a new kernel)
    @triton.jit(do_not_specialize=["T", "CHUNK", "NSPLIT"])
    def dense_kernel(q_ptr, k_ptr, v_ptr, valid_ptr, out_ptr, part_ptr, ml_ptr,
                     T, H, D, CHUNK, NSPLIT, sq0, sq1, sk0, sk1, sk2, sv0, sv1, sv2, sm0, sm1, so0, so1, scale_log2,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, DIRECT: tl.constexpr):
        """Split-K decode attention over a dense (T, B, H, D) cache; see the module doc."""
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        col = tl.arange(0, BLOCK_D)
        col_ok = col < D
        q = tl.load(q_ptr + b * sq0 + h * sq1 + col, mask=col_ok, other=0.0).to(tl.float32) * scale_log2
        k_base = b * sk1 + h * sk2
        v_base = b * sv1 + h * sv2
        start = split * CHUNK
        stop = tl.minimum(start + CHUNK, T)
        m_i = tl.full([1], float("-inf"), tl.float32)
        l_i = tl.zeros([1], tl.float32)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for t0 in range(start, stop, BLOCK_T):
            t_idx = t0 + tl.arange(0, BLOCK_T)
            t_ok = t_idx < stop
            ok = tl.load(valid_ptr + b * sm0 + t_idx * sm1, mask=t_ok, other=0) != 0
            tile_mask = t_ok[:, None] & col_ok[None, :]
            rows = t_idx.to(tl.int64)[:, None]
            k = tl.load(k_ptr + k_base + rows * sk0 + col[None, :], mask=tile_mask, other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1)  # (BLOCK_T,) log2-scaled scores
            s = tl.where(ok & t_ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe)
            v = tl.load(v_ptr + v_base + rows * sv0 + col[None, :], mask=tile_mask, other=0.0).to(tl.float32)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            m_i = m_new
        if DIRECT:
            out = acc / l_i
            tl.store(out_ptr + b * so0 + h * so1 + col, out.to(out_ptr.dtype.element_ty), mask=col_ok)
        else:
            row = bh.to(tl.int64) * NSPLIT + split
            tl.store(part_ptr + row * BLOCK_D + col, acc)
            one = tl.arange(0, 1)
            tl.store(ml_ptr + row * 2 + one, m_i)
            tl.store(ml_ptr + row * 2 + 1 + one, l_i)

    @triton.jit(do_not_specialize=["T", "CHUNK", "NSPLIT"])
    def packed_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, valid_ptr, out_ptr, part_ptr, ml_ptr,
                      T, H, D, CHUNK, NSPLIT, PART_STRIDE, sq0, sq1, sk0, sk1, sk2, sv0, sv1, sv2,
                      sks0, sks1, sks2, svs0, svs1, svs2, sm0, sm1, so0, so1, scale_log2,
                      GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, DIRECT: tl.constexpr):
        """Split-K decode attention over a 4-bit cache. Tiles are (positions, groups, bytes of a group): a byte
        holds columns 2j (high nibble) and 2j+1, so q and the output are handled as even and odd columns."""
        HALF: tl.constexpr = GROUP // 2
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        g = tl.arange(0, BLOCK_G)[:, None]  # (G, 1)
        j = tl.arange(0, HALF)[None, :]  # (1, HALF)
        col = g * GROUP + 2 * j  # (G, HALF) even columns
        even_ok = col < D
        odd_ok = col + 1 < D
        q_row = q_ptr + b * sq0 + h * sq1
        q_even = tl.load(q_row + col, mask=even_ok, other=0.0).to(tl.float32) * scale_log2
        q_odd = tl.load(q_row + col + 1, mask=odd_ok, other=0.0).to(tl.float32) * scale_log2
        byte_off = (g * HALF + j)[None, :, :]  # (1, G, HALF)
        byte_ok = (g * GROUP < D)[None, :, :]  # groups past D are never read
        k_base = b * sk1 + h * sk2
        v_base = b * sv1 + h * sv2
        ks_base = b * sks1 + h * sks2
        vs_base = b * svs1 + h * svs2
        gs = tl.arange(0, BLOCK_G)[None, :]  # (1, G)
        g_ok = gs * GROUP < D
        start = split * CHUNK
        stop = tl.minimum(start + CHUNK, T)
        m_i = tl.full([1], float("-inf"), tl.float32)
        l_i = tl.zeros([1], tl.float32)
        acc_even = tl.zeros([BLOCK_G, HALF], tl.float32)
        acc_odd = tl.zeros([BLOCK_G, HALF], tl.float32)
        for t0 in range(start, stop, BLOCK_T):
            t_idx = t0 + tl.arange(0, BLOCK_T)
            t_ok = t_idx < stop
            ok = tl.load(valid_ptr + b * sm0 + t_idx * sm1, mask=t_ok, other=0) != 0
            rows = t_idx.to(tl.int64)
            r3 = rows[:, None, None]
            m3 = t_ok[:, None, None] & byte_ok
            r2 = rows[:, None]
            m2 = t_ok[:, None] & g_ok
            byte = tl.load(k_ptr + k_base + r3 * sk0 + byte_off, mask=m3, other=0).to(tl.int32)  # (T, G, HALF)
            step = tl.load(ks_ptr + ks_base + r2 * sks0 + gs * 2, mask=m2, other=0.0).to(tl.float32)[:, :, None]
            low = tl.load(ks_ptr + ks_base + r2 * sks0 + gs * 2 + 1, mask=m2, other=0.0).to(tl.float32)[:, :, None]
            k_even = (byte >> 4).to(tl.float32) * step + low
            k_odd = (byte & 15).to(tl.float32) * step + low
            s = tl.sum(tl.sum(k_even * q_even[None, :, :] + k_odd * q_odd[None, :, :], axis=2), axis=1)  # (T,)
            s = tl.where(ok & t_ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe)
            byte = tl.load(v_ptr + v_base + r3 * sv0 + byte_off, mask=m3, other=0).to(tl.int32)
            step = tl.load(vs_ptr + vs_base + r2 * svs0 + gs * 2, mask=m2, other=0.0).to(tl.float32)[:, :, None]
            low = tl.load(vs_ptr + vs_base + r2 * svs0 + gs * 2 + 1, mask=m2, other=0.0).to(tl.float32)[:, :, None]
            v_even = (byte >> 4).to(tl.float32) * step + low
            v_odd = (byte & 15).to(tl.float32) * step + low
            p3 = p[:, None, None]
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc_even = acc_even * alpha[:, None] + tl.sum(p3 * v_even, axis=0)
            acc_odd = acc_odd * alpha[:, None] + tl.sum(p3 * v_odd, axis=0)
            m_i = m_new
        if DIRECT:
            o_row = out_ptr + b * so0 + h * so1
            l2 = l_i[:, None]
            tl.store(o_row + col, (acc_even / l2).to(out_ptr.dtype.element_ty), mask=even_ok)
            tl.store(o_row + col + 1, (acc_odd / l2).to(out_ptr.dtype.element_ty), mask=odd_ok)
        else:
            row = bh.to(tl.int64) * NSPLIT + split
            tl.store(part_ptr + row * PART_STRIDE + col, acc_even, mask=even_ok)
            tl.store(part_ptr + row * PART_STRIDE + col + 1, acc_odd, mask=odd_ok)
            one = tl.arange(0, 1)
            tl.store(ml_ptr + row * 2 + one, m_i)
            tl.store(ml_ptr + row * 2 + 1 + one, l_i)

    @triton.jit(do_not_specialize=["NSPLIT"])
    def combine_kernel(part_ptr, ml_ptr, out_ptr, H, D, NSPLIT, so0, so1,
                       BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        bh = tl.program_id(0)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        sp = tl.arange(0, BLOCK_S)
        sp_ok = sp < NSPLIT
        col = tl.arange(0, BLOCK_D)
        row = bh.to(tl.int64) * NSPLIT + sp
        m = tl.load(ml_ptr + row * 2, mask=sp_ok, other=float("-inf"))
        l_ = tl.load(ml_ptr + row * 2 + 1, mask=sp_ok, other=0.0)
        m_max = tl.max(m, axis=0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_max))
        acc = tl.load(part_ptr + row[:, None] * BLOCK_D + col[None, :], mask=sp_ok[:, None], other=0.0)
        out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l_, axis=0)
        tl.store(out_ptr + b * so0 + h * so1 + col, out.to(out_ptr.dtype.element_ty), mask=col < D)


def _parts(x: torch.Tensor | PackedTensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(x, PackedTensor):
        return x.codes, x.scales
    return x, None


def splits(rows: int, length: int, target: int) -> int:
    """Chunks per (sequence, head) row: about `target` programs, never below MIN_CHUNK positions."""
    want = -(-target // max(rows, 1))
    return max(1, min(want, length // MIN_CHUNK))


def decode_attention(q: torch.Tensor, k: torch.Tensor | PackedTensor, v: torch.Tensor | PackedTensor,
                     valid: torch.Tensor, tile: tuple[int, int, int] | None = None) -> torch.Tensor | None:
    """q: (B, H, D); k, v: (T, B, H, D) dense or packed; valid: (B, T) bool -> (B, H, D) in q's dtype.

    None when the kernel cannot take these inputs (the caller falls back to dequantize + SDPA). `tile` overrides
    DENSE_TILE / PACKED_TILE (benchmarks).
    """
    (kd, ks), (vd, vs) = _parts(k), _parts(v)
    packed = ks is not None
    if triton is None or (vs is not None) != packed or not runs_on(q, kd, vd, valid):
        return None
    t, b, h, d = k.shape
    if q.shape != (b, h, d) or valid.shape != (b, t) or q.stride(-1) != 1 or t == 0 or b * h == 0:
        return None
    if packed:
        assert isinstance(k, PackedTensor) and isinstance(v, PackedTensor) and ks is not None and vs is not None
        if k.bits != 4 or v.bits != 4 or k.dim != 3 or v.dim != 3 or k.group_size != v.group_size:
            return None
        if any(x.stride(-1) != 1 or x.stride(-2) != x.shape[-1] for x in (kd, vd, ks, vs)):
            return None
        group = k.group_size
    elif kd.stride(-1) != 1 or vd.stride(-1) != 1 or kd.dtype != vd.dtype:
        return None
    block_t, warps, target = tile or (PACKED_TILE if packed else DENSE_TILE)
    block_d = triton.next_power_of_2(d)
    nsplit = splits(b * h, t, target)
    chunk = -(-t // nsplit)
    chunk = -(-chunk // block_t) * block_t
    nsplit = -(-t // chunk)
    out = torch.empty(b, h, d, dtype=q.dtype, device=q.device)
    direct = nsplit == 1
    if direct:
        part = ml = out  # unused
    else:
        part = torch.empty(b * h * nsplit, block_d, dtype=torch.float32, device=q.device)
        ml = torch.empty(b * h * nsplit, 2, dtype=torch.float32, device=q.device)
    mask = valid.view(torch.uint8) if valid.dtype == torch.bool else valid
    scale_log2 = math.log2(math.e) / math.sqrt(d)
    grid = (b * h, nsplit)
    common = (t, h, d, chunk, nsplit)
    if packed:
        packed_kernel[grid](q, kd, vd, ks, vs, mask, out, part, ml, *common, block_d, q.stride(0), q.stride(1),
                            *kd.stride()[:3], *vd.stride()[:3], *ks.stride()[:3], *vs.stride()[:3], mask.stride(0),
                            mask.stride(1), out.stride(0), out.stride(1), scale_log2, GROUP=group,
                            BLOCK_G=triton.next_power_of_2(ks.shape[-2]), BLOCK_T=block_t, DIRECT=direct,
                            num_warps=warps)
    else:
        dense_kernel[grid](q, kd, vd, mask, out, part, ml, *common, q.stride(0), q.stride(1), *kd.stride()[:3],
                           *vd.stride()[:3], mask.stride(0), mask.stride(1), out.stride(0), out.stride(1), scale_log2,
                           BLOCK_T=block_t, BLOCK_D=block_d, DIRECT=direct, num_warps=warps)
    if not direct:
        combine_kernel[(b * h,)](part, ml, out, h, d, nsplit, out.stride(0), out.stride(1),
                                 BLOCK_S=triton.next_power_of_2(nsplit), BLOCK_D=block_d, num_warps=4)
    return out
