"""4-bit group dequantization on CUDA in one fused Triton pass (unpack, scale, store into the reused buffer).

Layout (see `flexgen_core.quant`): codes (M, G * group/2) uint8, two codes per byte with the first element
in the high nibble; scales (M, G, 2) fp16 as [step, minimum]; output (M, n) with n <= G * group, any row
stride (a weight piece dequantizes into a column slice of the layer buffer). Values are computed in fp32
and rounded once to the output dtype, exactly as the torch path does, so both paths agree bit for bit.
"""

from __future__ import annotations

import functools

import torch

from flexgen_core.runtime.kernels.triton_support import available


@functools.cache
def _kernel():  # noqa: ANN202 (a triton.JITFunction)
    import triton
    import triton.language as tl

    @triton.jit
    def dequant4(codes_ptr, scales_ptr, out_ptr, M, N, G, out_stride,
                 GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]  # (BLOCK_M, 1)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]  # (1, BLOCK_N)
        mask = (rows < M) & (cols < N)
        rows64 = rows.to(tl.int64)
        byte = tl.load(codes_ptr + rows64 * (G * (GROUP // 2)) + cols // 2, mask=mask, other=0).to(tl.int32)
        code = (byte >> ((1 - cols % 2) * 4)) & 15
        group = rows64 * G + cols // GROUP
        step = tl.load(scales_ptr + group * 2, mask=mask, other=0.0).to(tl.float32)
        low = tl.load(scales_ptr + group * 2 + 1, mask=mask, other=0.0).to(tl.float32)
        value = code.to(tl.float32) * step + low
        tl.store(out_ptr + rows64 * out_stride + cols, value.to(out_ptr.dtype.element_ty), mask=mask)

    return dequant4


BLOCK = (8, 512, 4)  # rows, columns, warps per program: 760 GB/s on the H100 vs 207 for (32, 128) (gpu_kernels.py)


def dequantize4(codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, group_size: int,
                block: tuple[int, int, int] | None = None) -> bool:
    """Dequantize into `out` (viewed as (M, n)); False when these tensors need the torch path instead."""
    if not (available() and codes.is_cuda and codes.is_contiguous() and scales.is_contiguous()
            and out.stride(-1) == 1 and out.dtype in (torch.float16, torch.bfloat16, torch.float32)):
        return False
    n = out.shape[-1]
    m = out.numel() // n if n else 0
    if m == 0 or n == 0:
        return True
    groups = scales.shape[-2]
    # rows of `out` must be equally spaced (a plain matrix or a column slice of one)
    out2 = out.reshape(m, n) if out.is_contiguous() else out
    if out2.dim() != 2:
        return False
    block_m, block_n, warps = block or BLOCK
    grid = (-(-m // block_m), -(-n // block_n))
    _kernel()[grid](codes, scales, out2, m, n, groups, out2.stride(0), GROUP=group_size, BLOCK_M=block_m,
                    BLOCK_N=block_n, num_warps=warps)
    return True
