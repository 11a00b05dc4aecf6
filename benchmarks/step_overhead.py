"""Re-measure only the host-side step costs of a profile (the probe's tiny model, each layer kind timed).

    python3 benchmarks/step_overhead.py --base profiles/h100.yaml --out OUT/h100.yaml

Prints the per-kind decode step times and writes `--base` with `step_overhead_us` (mean of the non-attention
kinds), `attn_step_overhead_us` and `disk_acts_step_us` (what activations on disk add to a step, measured in
the system temp directory, where the engine's offload files go by default) replaced: the rest of a full
`flexgen profile` is left as it was. On CUDA it also prints the per-GPU-batch host costs of CPU-delegated decode
(`_Prober.delegated_batch_costs_us`) and writes them as `delegated_issue_us`, `delegated_job_us` and
`delegated_latency_us` where `--base` has none: fitted values (profiles/h100.yaml's, from measured OPT-30B runs)
are kept.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from flexgen_core.planning.hardware import HardwareProfile
from flexgen_core.planning.probe import measure_delegated_batch_costs, measure_disk_acts_step, measure_step_overheads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="profile to start from")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=3, help="probe runs; the median of each kind is kept")
    args = ap.parse_args()
    base = HardwareProfile.load(args.base)
    device = torch.device(base.device_type)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{args.base} describes a CUDA machine but this one has no GPU: run it on that machine")
    with tempfile.TemporaryDirectory(prefix="flexgen-overhead-") as tmp:
        runs = [measure_step_overheads(device, tmp) for _ in range(args.repeats)]
        disk_acts = measure_disk_acts_step(device, tmp)
        delegated = measure_delegated_batch_costs(device, tmp) if device.type == "cuda" else None
    median = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}
    for r in runs:
        print("  ".join(f"{k} {v:8.1f} us" for k, v in r.items()))
    notes = (f"{base.notes} | step overheads re-measured per layer kind by benchmarks/step_overhead.py on "
             f"{time.strftime('%Y-%m-%d')} (median of {args.repeats}): " +
             ", ".join(f"{k} {v:.1f} us" for k, v in median.items()) + f"; disk_acts_step_us {disk_acts:.1f}")
    changes = {"step_overhead_us": round(median["other"], 3), "attn_step_overhead_us": round(median["attn"], 3),
               "disk_acts_step_us": round(disk_acts, 3)}
    if delegated is not None:
        print(f"delegated decode, per GPU batch: issuing thread {delegated['issue']:.1f} us per (attention, MLP) "
              f"pair, attention thread {delegated['job']:.1f} us per job, chain latency {delegated['latency']:.1f} us "
              f"(the profile has {base.delegated_issue_us}, {base.delegated_job_us}, {base.delegated_latency_us})")
        notes += (f"; delegated decode probe: issue {delegated['issue']:.1f} us, job {delegated['job']:.1f} us, "
                  f"latency {delegated['latency']:.1f} us")
        for field, key in (("delegated_issue_us", "issue"), ("delegated_job_us", "job"),
                           ("delegated_latency_us", "latency")):
            if getattr(base, field) is None:
                changes[field] = round(delegated[key], 3)
    out = base.with_(notes=notes, **changes)
    out.save(args.out)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {getattr(out, k)} (was {getattr(base, k)})" for k in changes))


if __name__ == "__main__":
    main()
