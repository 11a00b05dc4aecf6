"""Micro-benchmark: does CPU decode attention overlap with a pinned host->device weight copy on this machine?

The delegated decode of an offloaded model runs CPU attention over the host KV cache while the next layers'
weights stream over PCIe from pinned host memory. Both read host memory. This times, on the OPT-30B decode shape
(GPU batches of `--batch` sequences, 56 heads of 128, `--length` cached positions, fp16 cache in pinned memory):

- attention alone (the engine's native kernel, `--batches` GPU batches one after another),
- the copy alone (`--copy-mib` pinned bytes to the device in `--pieces` copies on a side stream),
- both started together (copy queued first, attention on the calling thread), for several CPU thread counts,

and prints each duration and the combined host-memory read rate. `overlap` = (attention alone + copy alone) / both
together: 2.0 means they ran fully in parallel, 1.0 means one waited for the other.

    python benchmarks/delegated_overlap.py [--batch 32 --batches 3 --length 520 --copy-mib 1000]
"""

from __future__ import annotations

import argparse
import time

import torch

from flexgen_core.runtime.kernels import cpu_decode_attention, native_module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--heads", type=int, default=56)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--length", type=int, default=520)
    ap.add_argument("--copy-mib", type=int, default=1000)
    ap.add_argument("--pieces", type=int, default=8)
    ap.add_argument("--threads", default="16,15,12,8")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available() or native_module() is None:
        raise SystemExit("needs CUDA and the native CPU attention kernel")
    dev = torch.device("cuda")
    shape = (args.length, args.batch, args.heads, args.head_dim)
    caches = [tuple(torch.randn(shape, dtype=torch.float16).pin_memory() for _ in range(2))
              for _ in range(args.batches)]
    q = torch.randn(args.batch, args.heads, args.head_dim, dtype=torch.float16)
    valid = torch.ones(args.batch, args.length, dtype=torch.bool)
    cache_bytes = sum(k.nbytes + v.nbytes for k, v in caches)
    piece = args.copy_mib * (1 << 20) // args.pieces
    host = [torch.empty(piece, dtype=torch.uint8).pin_memory() for _ in range(args.pieces)]
    device = [torch.empty(piece, dtype=torch.uint8, device=dev) for _ in range(args.pieces)]
    stream = torch.cuda.Stream(dev)

    def attend() -> float:
        t0 = time.perf_counter()
        for k, v in caches:
            cpu_decode_attention(q, k, v, valid)
        return time.perf_counter() - t0

    def start_copy() -> tuple[torch.cuda.Event, torch.cuda.Event]:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record(stream)
        with torch.cuda.stream(stream):
            for d, h in zip(device, host, strict=True):
                d.copy_(h, non_blocking=True)
        end.record(stream)
        return begin, end

    def median(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    print(f"cache read per round {cache_bytes / 1e9:.2f} GB ({args.batches} x {args.batch} sequences, t {args.length});"
          f" copy {piece * args.pieces / 1e9:.2f} GB in {args.pieces} pieces")
    print(f"{'threads':>7} {'attn ms':>8} {'GB/s':>6} {'copy ms':>8} {'GB/s':>6} {'both: attn':>11} {'copy':>7} "
          f"{'wall':>7} {'GB/s':>6} {'overlap':>7}")
    for threads in (int(x) for x in args.threads.split(",")):
        torch.set_num_threads(threads)
        attend()
        alone_attn = median([attend() for _ in range(args.reps)])
        copies = []
        for _ in range(args.reps):
            b, e = start_copy()
            e.synchronize()
            copies.append(b.elapsed_time(e) / 1e3)
        alone_copy = median(copies)
        both_attn, both_copy, both_wall = [], [], []
        for _ in range(args.reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            b, e = start_copy()
            both_attn.append(attend())
            e.synchronize()
            both_wall.append(time.perf_counter() - t0)
            both_copy.append(b.elapsed_time(e) / 1e3)
        ba, bc, bw = median(both_attn), median(both_copy), median(both_wall)
        total = cache_bytes + piece * args.pieces
        print(f"{threads:7d} {alone_attn * 1e3:8.2f} {cache_bytes / alone_attn / 1e9:6.1f} {alone_copy * 1e3:8.2f} "
              f"{piece * args.pieces / alone_copy / 1e9:6.1f} {ba * 1e3:11.2f} {bc * 1e3:7.2f} {bw * 1e3:7.2f} "
              f"{total / bw / 1e9:6.1f} {(alone_attn + alone_copy) / bw:7.2f}")


if __name__ == "__main__":
    main()
