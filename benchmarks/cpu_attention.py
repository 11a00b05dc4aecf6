"""Micro-benchmark: CPU decode attention over a sequence-major KV cache (t, b, nh, d) read in place.

Variants: the native kernel (`flexgen_core.runtime.kernels`, what the engine uses when it builds), the torch
path with chunked upcasting (the fallback), and torch SDPA on the strided view; fp32/fp16/bf16 caches, on
the FlexGen OPT-30B decode shape by default. Prints ms and GB/s of K+V read, and the error against fp64.

    python benchmarks/cpu_attention.py [--batch 24] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from flexgen_core.runtime.kernels import cpu_decode_attention, native_module
from flexgen_core.runtime.layers import decode_attention


def bench(fn, reps: int = 5) -> float:  # noqa: ANN001
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--heads", type=int, default=56)
    ap.add_argument("--positions", type=int, default=544)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    b, nh, t, d = args.batch, args.heads, args.positions, args.head_dim
    torch.manual_seed(0)
    k32, v32, q32 = torch.randn(t, b, nh, d), torch.randn(t, b, nh, d), torch.randn(b, nh, d)
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[:, :17] = False
    ref = decode_attention(q32.double(), k32.double(), v32.double(), valid)
    built = native_module() is not None
    rows = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        k, v, q = k32.to(dtype), v32.to(dtype), q32.to(dtype)
        nbytes = 2 * k.numel() * k.element_size()
        variants = {
            "torch chunked": lambda k=k, v=v, q=q: decode_attention(q, k, v, valid, chunk=64),
            "torch sdpa": lambda k=k, v=v, q=q: F.scaled_dot_product_attention(
                q[:, :, None], k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), attn_mask=valid[:, None, None, :]),
        }
        if built:
            variants["native"] = lambda k=k, v=v, q=q: cpu_decode_attention(q, k, v, valid)
        for name, fn in variants.items():
            out = fn()
            out = out[:, :, 0] if out.dim() == 4 else out
            err = ((out.double() - ref).norm() / ref.norm()).item()
            s = bench(fn)
            rows.append((str(dtype).replace("torch.", ""), name, s * 1e3, nbytes / s / 1e9, err))
    print(f"threads {torch.get_num_threads()}  shape t={t} b={b} nh={nh} d={d}  native kernel built: {built}")
    print(f"{'dtype':9s} {'variant':14s} {'ms':>9s} {'GB/s':>8s} {'rel err':>9s}")
    for r in rows:
        print(f"{r[0]:9s} {r[1]:14s} {r[2]:9.2f} {r[3]:8.1f} {r[4]:9.1e}")


if __name__ == "__main__":
    main()
