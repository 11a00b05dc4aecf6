"""GPU kernel micro-benchmarks (one device call): decode attention backends, 4-bit dequantization, step overhead.

- decode attention on the OPT-30B decode shape (b=24, nh=56, d=128), cache length changing every call as in
  real decode (t = 512..543): SDPA default (may pick cuDNN), SDPA restricted to memory-efficient (the engine's
  fp16 path) or math kernels, einsum matmuls, the Triton kernel over fp16, and over a 4-bit cache against
  dequantize + SDPA (the engine's 4-bit path before the kernel); and at OPT-6.7B's small-batch shape;
- the new token's 4-bit K/V quantization: torch against the fused Triton kernel (bit-identical check);
- 4-bit dequantization of an 8192x8192 weight: the torch path and Triton block shapes; GB/s counts bytes
  written (fp16) plus read (packed);
- the engine's host overhead per schedule step on a tiny all-resident model.

    python benchmarks/gpu_kernels.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from flexgen_core.quant import QuantConfig, _quantize_torch, _unpack, dequantize_moved, quantize
from flexgen_core.runtime.kernels import attention_cuda
from flexgen_core.runtime.kernels.dequant_cuda import dequantize4


def timed(fn, reps: int = 20, warmup: int = 32) -> float:  # noqa: ANN001
    for _ in range(warmup):  # every cache length once: no compilation inside the timed loop
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def decode_inputs(t: int, b: int, nh: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (b, nh, d), K and V (t, b, nh, d) fp16 on the GPU, and an all-valid (b, t) mask."""
    k, v = (torch.randn(t, b, nh, d, device="cuda", dtype=torch.float16) for _ in range(2))
    q = torch.randn(b, nh, d, device="cuda", dtype=torch.float16)
    return q, k, v, torch.ones(b, t, dtype=torch.bool, device="cuda")


def attention() -> None:
    b, nh, d, cap = 24, 56, 128, 544
    q, k, v, valid = decode_inputs(cap, b, nh, d)
    state = {"t": 512}

    def step(fn):  # noqa: ANN001, ANN202
        def run() -> None:
            t = state["t"] = 512 + (state["t"] - 511) % 32
            fn(k[:t], v[:t], valid[:, :t])
        return run

    def sdpa(kk, vv, m):  # noqa: ANN001, ANN202
        return F.scaled_dot_product_attention(q[:, :, None], kk.permute(1, 2, 0, 3), vv.permute(1, 2, 0, 3),
                                              attn_mask=m[:, None, None, :])

    def restricted(backend):  # noqa: ANN001, ANN202
        def run(kk, vv, m):  # noqa: ANN001, ANN202
            with sdpa_kernel([backend]):
                return sdpa(kk, vv, m)
        return run

    valid[::3, :7] = False  # some left padding, as in real batches
    pk, pv = quantize(k, 4, 64, dim=-1), quantize(v, 4, 64, dim=-1)

    def old_packed(kk, vv, m):  # noqa: ANN001, ANN202 (the engine's 4-bit path before the fused kernel)
        t = kk.shape[0]
        dk = dequantize_moved(pk.narrow(0, 0, t), torch.float16)
        dv = dequantize_moved(pv.narrow(0, 0, t), torch.float16)
        return restricted(SDPBackend.EFFICIENT_ATTENTION)(dk, dv, m)

    def fused_packed(kk, vv, m):  # noqa: ANN001, ANN202
        t = kk.shape[0]
        return attention_cuda.decode_attention(q, pk.narrow(0, 0, t), pv.narrow(0, 0, t), m)

    variants = {"sdpa default": sdpa, "sdpa efficient": restricted(SDPBackend.EFFICIENT_ATTENTION),
                "sdpa math": restricted(SDPBackend.MATH),
                "einsum matmuls": lambda kk, vv, m: _einsum(q, kk, vv, m),
                "triton fp16": lambda kk, vv, m: attention_cuda.decode_attention(q, kk, vv, m),
                "4-bit dequant+sdpa": old_packed, "triton 4-bit": fused_packed}
    # (positions per iteration, warps, target programs), around the shipped DENSE_TILE / PACKED_TILE
    for tile in ((32, 4, 1024), (64, 4, 1024), (32, 4, 4096), (64, 4, 4096), (16, 4, 8192), (32, 4, 8192),
                 (64, 8, 8192)):
        name = "/".join(map(str, tile))
        variants[f"triton fp16 {name}"] = lambda kk, vv, m, tile=tile: attention_cuda.decode_attention(q, kk, vv, m,
                                                                                                      tile=tile)
        variants[f"triton 4-bit {name}"] = lambda kk, vv, m, tile=tile: attention_cuda.decode_attention(
            q, pk.narrow(0, 0, kk.shape[0]), pv.narrow(0, 0, kk.shape[0]), m, tile=tile)
    dense_bytes = 2 * 528 * b * nh * d * 2
    ref = _einsum(q.float(), k[:520].float(), v[:520].float(), valid[:, :520])
    print(f"decode attention, b={b} nh={nh} d={d}, t changing 512..543 every call (GB/s: fp16 bytes of K and V)")
    for name, fn in variants.items():
        try:
            out = fn(k[:520], v[:520], valid[:, :520])
            out = out[:, :, 0] if out.dim() == 4 else out
            err = ((out.float() - ref).norm() / ref.norm()).item()
            s = timed(step(fn))
            print(f"  {name:26s} {s * 1e6:9.1f} us/call {dense_bytes / s / 1e9:8.1f} GB/s  rel err {err:.1e}")
        except RuntimeError as exc:
            print(f"  {name:26s} failed: {str(exc).splitlines()[0][:100]}")


def _einsum(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    scores = torch.einsum("bhd,tbhd->bht", q.float() / q.shape[-1] ** 0.5, k.float())
    p = torch.softmax(scores.masked_fill(~valid[:, None, :], float("-inf")), dim=-1)
    return torch.einsum("bht,tbhd->bhd", p, v.float()).to(q.dtype)


def quantize_kv() -> None:
    """The new token's K/V quantization: torch (about 36 kernels) against the fused Triton kernel."""
    print("4-bit quantization of one position of K (rows, 56, 128), into a cache buffer")
    for rows in (8, 24, 64):
        x = torch.randn(1, rows, 56, 128, device="cuda", dtype=torch.float16) * 2
        flag = torch.zeros((), dtype=torch.bool, device="cuda")
        ref = quantize(x.cpu(), 4, 64, dim=-1)
        torch_s = timed(lambda x=x, flag=flag: _quantize_torch(x, QuantConfig(4, 64), 3, flag))
        fused = quantize(x, 4, 64, dim=-1, invalid=flag)
        exact = torch.equal(fused.codes.cpu(), ref.codes) and torch.equal(fused.scales.cpu(), ref.scales)
        fused_s = timed(lambda x=x, fused=fused, flag=flag: quantize(x, 4, 64, dim=-1, invalid=flag, out=fused))
        print(f"  rows {rows:3d}: torch {torch_s * 1e6:8.1f} us  triton {fused_s * 1e6:8.1f} us  "
              f"({torch_s / fused_s:.1f}x)  bit-identical={exact}  flag={bool(flag)}")


def dequant() -> None:
    w = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    p = quantize(w, 4, 64, dim=0)
    out = torch.empty(8192, 8192, device="cuda", dtype=torch.float16)
    nbytes = out.numel() * 2 + p.nbytes
    print("4-bit dequantization of 8192x8192 (fp16 out)")

    def torch_path() -> None:
        q = _unpack(p.codes, 4)
        vals = q.float() * p.scales[..., :1].float() + p.scales[..., 1:].float()
        out.copy_(vals.reshape(8192, -1))

    s = timed(torch_path, reps=5)
    print(f"  {'torch':18s} {s * 1e3:9.3f} ms {nbytes / s / 1e9:8.1f} GB/s")
    ref = dequantize_moved(p, torch.float16)
    for block in ((32, 128, 4), (8, 512, 4), (4, 1024, 4), (2, 2048, 8), (1, 4096, 8), (8, 1024, 8)):
        dequantize4(p.codes, p.scales, out, 64, block)
        ok = torch.equal(out, ref)
        s = timed(lambda block=block: dequantize4(p.codes, p.scales, out, 64, block))
        print(f"  triton {str(block):11s} {s * 1e3:9.3f} ms {nbytes / s / 1e9:8.1f} GB/s  exact={ok}")


def overhead() -> None:
    from flexgen_core.planning.probe import _Prober

    prober = _Prober(torch.device("cuda"), __import__("pathlib").Path("/tmp"), quick=False)
    print(f"engine step overhead (tiny all-resident model): {prober.step_overhead_us():.1f} us/step")


def small_batch_attention() -> None:
    """Decode attention at OPT-6.7B's small-batch shape (b=8, nh=32), where the kernel splits positions."""
    b, nh, d, t = 8, 32, 128, 540
    q, k, v, valid = decode_inputs(t, b, nh, d)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        sdpa_s = timed(lambda: F.scaled_dot_product_attention(q[:, :, None], k.permute(1, 2, 0, 3),
                                                              v.permute(1, 2, 0, 3), attn_mask=valid[:, None, None]))
    tri_s = timed(lambda: attention_cuda.decode_attention(q, k, v, valid))
    pk, pv = quantize(k, 4, 64, dim=-1), quantize(v, 4, 64, dim=-1)
    tri4_s = timed(lambda: attention_cuda.decode_attention(q, pk, pv, valid))
    print(f"decode attention b={b} nh={nh} t={t}: sdpa efficient {sdpa_s * 1e6:.1f} us, triton fp16 "
          f"{tri_s * 1e6:.1f} us, triton 4-bit {tri4_s * 1e6:.1f} us")


if __name__ == "__main__":
    attention()
    small_batch_attention()
    quantize_kv()
    dequant()
    overhead()
