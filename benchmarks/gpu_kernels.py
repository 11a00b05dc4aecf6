"""GPU kernel micro-benchmarks (one device call): decode attention backends, 4-bit dequantization, step overhead.

- decode attention on the OPT-30B decode shape (b=24, nh=56, d=128), cache length changing every call as in
  real decode (t = 512..543): einsum batched matmuls (the engine's CUDA path), SDPA default (may pick cuDNN),
  SDPA restricted to memory-efficient or math kernels;
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

from flexgen_core.quant import _unpack, dequantize_moved, quantize
from flexgen_core.runtime.kernels.dequant_cuda import dequantize4
from flexgen_core.runtime.layers import decode_attention


def timed(fn, reps: int = 20) -> float:  # noqa: ANN001
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def attention() -> None:
    b, nh, d, cap = 24, 56, 128, 544
    k = torch.randn(cap, b, nh, d, device="cuda", dtype=torch.float16)
    v = torch.randn(cap, b, nh, d, device="cuda", dtype=torch.float16)
    q = torch.randn(b, nh, d, device="cuda", dtype=torch.float16)
    valid = torch.ones(b, cap, dtype=torch.bool, device="cuda")
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

    variants = {"engine path": lambda kk, vv, m: decode_attention(q, kk, vv, m), "sdpa default": sdpa,
                "sdpa efficient": restricted(SDPBackend.EFFICIENT_ATTENTION), "sdpa math": restricted(SDPBackend.MATH)}
    nbytes = 2 * 528 * b * nh * d * 2
    ref = decode_attention(q, k[:520], v[:520], valid[:, :520]).float()
    print(f"decode attention, b={b} nh={nh} d={d}, t changing 512..543 every call")
    for name, fn in variants.items():
        try:
            out = fn(k[:520], v[:520], valid[:, :520])
            out = out[:, :, 0] if out.dim() == 4 else out
            err = ((out.float() - ref).norm() / ref.norm()).item()
            s = timed(step(fn))
            print(f"  {name:18s} {s * 1e6:9.1f} us/call {nbytes / s / 1e9:8.1f} GB/s  err {err:.1e}")
        except RuntimeError as exc:
            print(f"  {name:18s} failed: {str(exc).splitlines()[0][:100]}")


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


if __name__ == "__main__":
    attention()
    dequant()
    overhead()
