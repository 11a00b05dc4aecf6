"""Summarize a `flexgen bench --torch-profile` timeline: where the device was busy during decode.

    python benchmarks/trace_summary.py OUT/visit8c_12x1.trace.json.gz [--top 12]

The decode window runs from the end of the first device-wide synchronize of the measured call (the engine
syncs after prefill) to the start of the last one (the end of the block). For that window it prints the busy
time of every CUDA stream (union of its kernels and copies), the time no stream was busy, and the kernels
and copies that took the most device time.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from pathlib import Path


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", type=Path)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    opener = gzip.open if args.trace.suffix == ".gz" else open
    with opener(args.trace, "rt") as fh:
        events = json.load(fh)["traceEvents"]
    syncs = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                   if e.get("name") == "cudaDeviceSynchronize" and e.get("ph") == "X")
    if len(syncs) < 2:
        raise SystemExit("no prefill/decode synchronizations in the trace")
    lo, hi = syncs[0][1], syncs[-1][0]
    device = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
              and lo <= e["ts"] < hi]
    per_stream: dict[object, list[tuple[float, float]]] = defaultdict(list)
    per_name: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for e in device:
        per_stream[e.get("tid")].append((e["ts"], e["ts"] + e["dur"]))
        name = e["name"][:90]
        per_name[name] += e["dur"]
        counts[name] += 1
    window = hi - lo
    print(f"decode window {window / 1e3:.1f} ms")
    for tid, iv in sorted(per_stream.items(), key=lambda kv: -_union(kv[1])):
        busy = _union(iv)
        print(f"  stream {tid}: busy {busy / 1e3:9.1f} ms ({100 * busy / window:5.1f}%), {len(iv)} ops")
    idle = window - _union([i for iv in per_stream.values() for i in iv])
    print(f"  no stream busy: {idle / 1e3:.1f} ms ({100 * idle / window:.1f}%)")
    print("busiest device operations in the window:")
    for name, dur in sorted(per_name.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {dur / 1e3:9.1f} ms  {counts[name]:6d}x  {name}")


if __name__ == "__main__":
    main()
