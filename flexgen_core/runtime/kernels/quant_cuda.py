"""4-bit group quantization of K/V in one Triton pass (min/max, fp16 rounding of minimum and step, codes,
packing), writing straight into the destination (a position of a cache home or slot).

It reproduces `flexgen_core.quant.quantize` bit for bit: the minimum is rounded down and the step up to fp16,
the step is bumped once more when the rounded range would miss the maximum, a constant group gets step 1,
divisions are IEEE-rounded (`div_rn`), codes round half to even, and fused multiply-adds are disabled so
`min + 15 * step` rounds as in torch. The torch version launches about 36 kernels per call; the decode loop
calls it for every attention step.

Input x: (P, R, H, D) with any strides but a contiguous last dimension (positions, sequences, heads, head
dim), grouped along D with a partial last group padded by the row's last value. Output codes
(P, R, H, G, GROUP/2) uint8 and scales (P, R, H, G, 2) fp16 [step, minimum], both contiguous. Non-finite
values or values beyond fp16's range set `flag` (a one-element bool tensor) instead of raising.
"""

from __future__ import annotations

import torch

from flexgen_core.runtime.kernels.triton_support import runs_on

BLOCK_M = 16  # (row, group) tiles per program: 16 rows x 64 values


try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path runs instead
    triton = None

if triton is not None:

    @triton.jit
    def next_half(x, UP: tl.constexpr):
        """fp16 neighbour of fp16 `x` toward +inf (UP) or -inf, as `quant._next_half`."""
        bits = x.to(tl.int16, bitcast=True).to(tl.int32)
        neg = bits < 0
        mag = bits & 0x7FFF
        if UP:
            new = tl.where(neg, tl.where(mag == 0, 1, -(mag - 1)), mag + 1)
        else:
            new = tl.where(neg | (mag == 0), -(mag + 1), mag - 1)
        new_bits = tl.where(new < 0, (-new) | 0x8000, new)
        return new_bits.to(tl.int16).to(tl.float16, bitcast=True)

    @triton.jit
    def round_half_even(y):
        r = tl.floor(y + 0.5)
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        return tl.where((r - y == 0.5) & odd, r - 1.0, r)

    @triton.jit(do_not_specialize=["M"])
    def quantize4(x_ptr, codes_ptr, scales_ptr, flag_ptr, M, D, G, R, H, sx0, sx1, sx2,
                  GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,) row index over (P, R, H)
        g = tl.program_id(1)
        row_ok = m < M
        m64 = m.to(tl.int64)
        base = (m64 // (R * H)) * sx0 + ((m64 // H) % R) * sx1 + (m64 % H) * sx2  # (BM,)
        j = tl.arange(0, GROUP // 2)
        even = tl.minimum(g * GROUP + 2 * j, D - 1)  # the last real value pads a partial group
        odd = tl.minimum(g * GROUP + 2 * j + 1, D - 1)
        xe = tl.load(x_ptr + base[:, None] + even[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        xo = tl.load(x_ptr + base[:, None] + odd[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        lo = tl.minimum(tl.min(xe, axis=1), tl.min(xo, axis=1))  # (BM,)
        hi = tl.maximum(tl.max(xe, axis=1), tl.max(xo, axis=1))
        lo16 = lo.to(tl.float16)
        mn16 = tl.where(lo16.to(tl.float32) > lo, next_half(lo16, False), lo16)
        mn = mn16.to(tl.float32)
        span = hi - mn
        step = tl.math.div_rn(span, 15.0)
        step16 = step.to(tl.float16)
        step16 = tl.where(step16.to(tl.float32) < step, next_half(step16, True), step16)
        short = mn + 15.0 * step16.to(tl.float32) < hi
        step16 = tl.where(short, next_half(step16, True), step16)
        step16 = tl.where(span > 0, step16, 1.0).to(tl.float16)
        st = step16.to(tl.float32)
        nan = tl.sum(((xe != xe) | (xo != xo)).to(tl.int32), axis=1) > 0
        ok = (tl.abs(lo) <= 65504.0) & (tl.abs(hi) <= 65504.0) & (step <= 65504.0) & (nan == 0)
        tl.store(flag_ptr + m * 0, tl.full([BLOCK_M], 1, tl.uint8), mask=row_ok & (ok == 0))
        qe = tl.minimum(tl.maximum(round_half_even(tl.math.div_rn(xe - mn[:, None], st[:, None])), 0.0), 15.0)
        qo = tl.minimum(tl.maximum(round_half_even(tl.math.div_rn(xo - mn[:, None], st[:, None])), 0.0), 15.0)
        byte = (qe.to(tl.int32) * 16 + qo.to(tl.int32)).to(tl.uint8)  # first element in the high nibble
        group = m64 * G + g
        tl.store(codes_ptr + group[:, None] * (GROUP // 2) + j[None, :], byte, mask=row_ok[:, None])
        tl.store(scales_ptr + group * 2, step16, mask=row_ok)
        tl.store(scales_ptr + group * 2 + 1, mn16, mask=row_ok)


def quantize4_into(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, flag: torch.Tensor,
                   group_size: int) -> bool:
    """Quantize x (P, R, H, D) into codes/scales (see module doc); False when the torch path must do it."""
    if x.dim() != 4 or not runs_on(x, codes, scales, flag):
        return False
    if (x.stride(-1) != 1 or not codes.is_contiguous() or not scales.is_contiguous() or flag.numel() != 1
            or x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or group_size % 2):
        return False
    p, r, h, d = x.shape
    groups = -(-d // group_size)
    if codes.numel() != p * r * h * groups * group_size // 2 or scales.numel() != p * r * h * groups * 2:
        return False
    m = p * r * h
    if m == 0:
        return True
    grid = (-(-m // BLOCK_M), groups)
    quantize4[grid](x, codes, scales, flag.view(torch.uint8), m, d, groups, r, h, x.stride(0), x.stride(1),
                    x.stride(2), GROUP=group_size, BLOCK_M=BLOCK_M, num_warps=4, enable_fp_fusion=False)
    return True
