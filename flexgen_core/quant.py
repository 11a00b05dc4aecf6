"""Group-wise asymmetric min/max quantization (FlexGen §5) with real bit packing.

A tensor is cut into groups of `group_size` consecutive values along one dimension (`dim`); each group
stores its minimum and step (fp16) and `bits`-bit codes, packed `8 // bits` to a byte. For 4 bits and
groups of 64 that is 32 bytes of codes + 4 bytes of step and minimum per 64 values: 36/128 = 0.28125
of fp16. Layout: the group dimension is moved last, so a tensor of shape (*rest, n) grouped on its last
dimension is stored as codes (*rest, G, group_size * bits / 8) uint8 and step/min (*rest, G, 2) fp16,
with G = ceil(n / group_size); a partial last group is padded. Slicing along any other dimension (the
KV cache's sequence axis, a weight's rows) slices codes and scales alike, so appending never touches
old groups.

Every element round-trips within half a step of its group: the stored minimum is rounded down and the
stored step up to fp16, so the whole group range stays representable. A constant group gets a zero
range and decodes exactly, never inf or NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexgen_core.runtime.kernels.triton_support import runs_on

SUPPORTED_BITS = (2, 4, 8)
FP16_MAX = 65504.0


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 4
    group_size: int = 64

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        per_byte = 8 // self.bits
        if self.group_size < per_byte or self.group_size % per_byte:
            raise ValueError(f"group_size must be a positive multiple of {per_byte} for {self.bits}-bit codes")


def _moved_shape(shape: tuple[int, ...], dim: int) -> tuple[int, ...]:
    return tuple(s for i, s in enumerate(shape) if i != dim)


def num_groups(n: int, group_size: int) -> int:
    return -(-n // group_size)


def codes_shape(shape: tuple[int, ...], dim: int, cfg: QuantConfig) -> tuple[int, ...]:
    dim = dim % len(shape)
    return (*_moved_shape(shape, dim), num_groups(shape[dim], cfg.group_size), cfg.group_size * cfg.bits // 8)


def scales_shape(shape: tuple[int, ...], dim: int, cfg: QuantConfig) -> tuple[int, ...]:
    dim = dim % len(shape)
    return (*_moved_shape(shape, dim), num_groups(shape[dim], cfg.group_size), 2)


def packed_nbytes(shape: tuple[int, ...], dim: int, cfg: QuantConfig) -> tuple[int, int]:
    """(code bytes, step/min bytes) of a tensor of `shape` grouped along `dim`."""
    c = 1
    for s in codes_shape(shape, dim, cfg):
        c *= s
    s_ = 1
    for s in scales_shape(shape, dim, cfg):
        s_ *= s
    return c, 2 * s_


@dataclass
class PackedTensor:
    """Quantized tensor: `codes` (*rest, G, g*bits/8) uint8 and `scales` (*rest, G, 2) fp16 [step, min].

    `shape` is the original shape, `dim` the grouping dimension in it, `dtype` the original dtype.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, ...]
    dim: int
    config: QuantConfig
    dtype: torch.dtype

    @property
    def bits(self) -> int:
        return self.config.bits

    @property
    def group_size(self) -> int:
        return self.config.group_size

    @property
    def step(self) -> torch.Tensor:
        return self.scales[..., 0]

    @property
    def minimum(self) -> torch.Tensor:
        return self.scales[..., 1]

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * 2

    def _moved_dim(self, d: int) -> int:
        d = d % len(self.shape)
        if d == self.dim:
            raise ValueError("cannot slice a packed tensor along its grouping dimension")
        return d if d < self.dim else d - 1

    def narrow(self, d: int, start: int, length: int) -> PackedTensor:
        """Slice along a non-group dimension (a view; no data is unpacked)."""
        m = self._moved_dim(d)
        shape = list(self.shape)
        shape[d % len(shape)] = length
        return PackedTensor(self.codes.narrow(m, start, length), self.scales.narrow(m, start, length),
                            tuple(shape), self.dim, self.config, self.dtype)

    def index_select(self, d: int, index: torch.Tensor) -> PackedTensor:
        m = self._moved_dim(d)
        shape = list(self.shape)
        shape[d % len(shape)] = int(index.numel())
        return PackedTensor(self.codes.index_select(m, index), self.scales.index_select(m, index),
                            tuple(shape), self.dim, self.config, self.dtype)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedTensor:
        return PackedTensor(self.codes.to(device, non_blocking=non_blocking),
                            self.scales.to(device, non_blocking=non_blocking),
                            self.shape, self.dim, self.config, self.dtype)


def _next_half(x: torch.Tensor, up: bool) -> torch.Tensor:
    """The fp16 neighbour of each fp16 value `x` toward +inf (up) or -inf."""
    bits = x.view(torch.int16).to(torch.int32)
    neg = bits < 0
    mag = bits & 0x7FFF
    if up:
        # positive (or +0): magnitude + 1; negative: magnitude - 1 (toward zero); -0 -> smallest positive
        new = torch.where(neg, torch.where(mag == 0, torch.ones_like(mag), -(mag - 1)), mag + 1)
    else:
        new = torch.where(neg | (mag == 0), -(mag + 1), mag - 1)
    new_bits = torch.where(new < 0, (-new) | 0x8000, new)
    return new_bits.to(torch.int16).view(torch.float16)  # int32 -> int16 wraps 0x8000.. as intended


def _half_floor(x: torch.Tensor) -> torch.Tensor:
    """Largest fp16 value <= x (x fp32)."""
    h = x.to(torch.float16)
    return torch.where(h.float() > x, _next_half(h, up=False), h)


def _half_ceil(x: torch.Tensor) -> torch.Tensor:
    h = x.to(torch.float16)
    return torch.where(h.float() < x, _next_half(h, up=True), h)


def quantize(x: torch.Tensor, bits: int = 4, group_size: int = 64, dim: int = -1,
             invalid: torch.Tensor | None = None, out: PackedTensor | None = None) -> PackedTensor:
    """Quantize `x` (fp16, bf16 or fp32) in groups of `group_size` along `dim`.

    Values that cannot be quantized (inf, NaN, beyond fp16's range) raise ValueError, which costs the caller
    host syncs. With `invalid` (a one-element bool tensor on x's device) they set it instead, with no sync; the
    caller checks it later, and the codes of such groups are meaningless. With `out` (a packed tensor of x's
    shape and grouping, e.g. one position of a cache buffer) the result is written there and returned.
    On CUDA, 4-bit codes grouped along the last dimension with `invalid` given take one fused Triton kernel
    (`runtime.kernels.quant_cuda`), bit-identical to this function.
    """
    cfg = QuantConfig(bits, group_size)
    if not x.is_floating_point():
        raise TypeError(f"quantize needs a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError("quantize needs a non-empty tensor with at least one dimension")
    dim = dim % x.dim()
    shape = tuple(x.shape)
    if out is not None and (out.shape != shape or out.dim != dim or out.config != cfg):
        raise ValueError(f"quantize: out holds shape {out.shape} grouped along {out.dim} with {out.config}, "
                         f"not {shape} along {dim} with {cfg}")
    if invalid is not None and bits == 4 and dim == x.dim() - 1 and x.dim() <= 4 and runs_on(x):
        from flexgen_core.runtime.kernels.quant_cuda import quantize4_into

        target = out or PackedTensor(
            torch.empty(codes_shape(shape, dim, cfg), dtype=torch.uint8, device=x.device),
            torch.empty(scales_shape(shape, dim, cfg), dtype=torch.float16, device=x.device), shape, dim, cfg, x.dtype)
        x4 = x.reshape((1,) * (4 - x.dim()) + shape) if x.dim() < 4 else x
        if quantize4_into(x4, target.codes, target.scales, invalid, group_size):
            return target
    packed = _quantize_torch(x, cfg, dim, invalid)
    if out is None:
        return packed
    out.codes.copy_(packed.codes)
    out.scales.copy_(packed.scales)
    return out


def _quantize_torch(x: torch.Tensor, cfg: QuantConfig, dim: int, invalid: torch.Tensor | None) -> PackedTensor:
    shape = tuple(x.shape)
    n = shape[dim]
    g = cfg.group_size
    groups = num_groups(n, g)
    moved = x.movedim(dim, -1).float()  # (*rest, n)
    if invalid is None and not torch.isfinite(moved).all():
        raise ValueError("quantize got inf or NaN values")
    pad = groups * g - n
    if pad:
        # pad with the last real value so padding never widens a group's range
        moved = torch.cat([moved, moved[..., -1:].expand(*moved.shape[:-1], pad)], dim=-1)
    grouped = moved.reshape(*moved.shape[:-1], groups, g)  # (*rest, G, g)
    lo = grouped.amin(dim=-1)
    hi = grouped.amax(dim=-1)
    if invalid is None and (lo.abs().max() > FP16_MAX or hi.abs().max() > FP16_MAX):
        raise ValueError(f"values beyond +-{FP16_MAX:g} cannot be quantized with fp16 group scales")
    levels = (1 << cfg.bits) - 1
    mn16 = _half_floor(lo)
    span = hi - mn16.float()
    step = span / levels
    if invalid is None and (step > FP16_MAX).any():
        raise ValueError("a group's range is too wide for an fp16 step; rescale the tensor")
    if invalid is not None:  # NaN fails every comparison, so test for the valid case
        ok = (lo.abs() <= FP16_MAX) & (hi.abs() <= FP16_MAX) & (step <= FP16_MAX)
        invalid.logical_or_(~ok.all())
    step16 = _half_ceil(step)
    # make sure mn + levels*step covers the max after fp16 rounding
    short = mn16.float() + levels * step16.float() < hi
    step16 = torch.where(short, _next_half(step16, up=True), step16)
    step16 = torch.where(span > 0, step16, torch.ones_like(step16))  # constant group: any step, codes 0
    q = torch.round((grouped - mn16.float().unsqueeze(-1)) / step16.float().unsqueeze(-1))
    q = q.clamp_(0, levels).to(torch.uint8)  # (*rest, G, g)
    codes = _pack(q, cfg.bits)
    scales = torch.stack([step16, mn16], dim=-1)  # (*rest, G, 2)
    return PackedTensor(codes, scales, shape, dim, cfg, x.dtype)


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    if per_byte == 1:
        return q.contiguous()
    q = q.reshape(*q.shape[:-1], q.shape[-1] // per_byte, per_byte)
    out = torch.zeros(q.shape[:-1], dtype=torch.uint8, device=q.device)
    for i in range(per_byte):  # element 0 in the high bits
        out |= q[..., i] << (bits * (per_byte - 1 - i))
    return out


def _unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    if per_byte == 1:
        return codes
    mask = (1 << bits) - 1
    parts = [(codes >> (bits * (per_byte - 1 - i))) & mask for i in range(per_byte)]
    return torch.stack(parts, dim=-1).reshape(*codes.shape[:-1], codes.shape[-1] * per_byte)


def dequantize_moved(p: PackedTensor, dtype: torch.dtype | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize to the stored layout (*rest, n): the grouping dimension last.

    For a weight (out, in) grouped along dim 0 this is W^T of shape (in, out), ready for ``x @ W^T``.
    With `out` given, the result is written there (a reused buffer) and returned.
    """
    dtype = dtype or p.dtype
    n = p.shape[p.dim]
    if p.codes.is_cuda and p.bits == 4:
        from flexgen_core.runtime.kernels.dequant_cuda import dequantize4

        target = out if out is not None else torch.empty(
            (*p.codes.shape[:-2], n), dtype=dtype, device=p.codes.device)
        if dequantize4(p.codes, p.scales, target, p.group_size):
            return target
    q = _unpack(p.codes, p.bits)  # (*rest, G, g)
    # fp32 arithmetic, one rounding to the output dtype (the fused CUDA kernel does the same)
    vals = q.float() * p.scales[..., :1].float() + p.scales[..., 1:].float()
    vals = vals.reshape(*vals.shape[:-2], -1)[..., :n]
    if out is None:
        return vals.to(dtype)
    out.copy_(vals)
    return out


def dequantize(p: PackedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize to the original shape (and dtype unless `dtype` is given)."""
    return dequantize_moved(p, dtype).movedim(-1, p.dim)
