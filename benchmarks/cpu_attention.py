"""Micro-benchmark: decode attention on the CPU over a sequence-major KV cache (t, b, nh, d).

Compares the kernel variants `flexgen_core.runtime.layers.decode_attention` can use, on the FlexGen
OPT-30B decode shape (b sequences x 56 heads x 544 positions x 128). Prints ms and GB/s of K+V read.

    python benchmarks/cpu_attention.py [--batch 24] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch

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
    k32 = torch.randn(t, b, nh, d)
    v32 = torch.randn(t, b, nh, d)
    q32 = torch.randn(b, nh, d)
    valid = torch.ones(b, t, dtype=torch.bool)
    ref = decode_attention(q32.double(), k32.double(), v32.double(), valid)
    rows = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        k, v, q = k32.to(dtype), v32.to(dtype), q32.to(dtype)
        nbytes = 2 * k.numel() * k.element_size()
        chunks = [0] if dtype == torch.float32 else [0, 16, 64, 256]
        for chunk in chunks:
            out = decode_attention(q, k, v, valid, chunk=chunk)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            s = bench(lambda k=k, v=v, q=q, chunk=chunk: decode_attention(q, k, v, valid, chunk=chunk))
            rows.append((str(dtype).replace("torch.", ""), chunk, s * 1e3, nbytes / s / 1e9, err))
    print(f"threads {torch.get_num_threads()}  shape t={t} b={b} nh={nh} d={d}")
    print(f"{'dtype':9s} {'chunk':>5s} {'ms':>9s} {'GB/s':>8s} {'rel err':>9s}")
    for r in rows:
        print(f"{r[0]:9s} {r[1]:5d} {r[2]:9.2f} {r[3]:8.1f} {r[4]:9.1e}")


if __name__ == "__main__":
    main()
