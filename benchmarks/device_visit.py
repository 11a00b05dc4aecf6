"""One visit to the GPU machine: run the stages given, in order, within a time budget, logging under --out.

    python3 benchmarks/device_visit.py --out $OUT --stages env,tests,profile,suite:visit1 --budget-s 560

Stages: `env` (GPU, driver, torch, memory, disk), `tests` (the CUDA tests: pytest -m gpu), `cpuattn` (CPU
decode-attention kernels, benchmarks/cpu_attention.py), `overlap` (CPU attention against a concurrent
weight copy, benchmarks/delegated_overlap.py), `profile` (our
prober -> OUT/h100.yaml), `overhead` (only the step overheads, benchmarks/step_overhead.py, on top of
OUT/h100.yaml or profiles/h100.yaml -> OUT/h100.yaml), `suite:NAME` (benchmarks/suite.py; cases may use
{profile}, the profile just measured or profiles/h100.yaml, and {out}, the output folder).
Each stage's output goes to OUT/<stage>.log and a summary to stdout.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: str, log: Path, timeout: float) -> int:
    print(f"$ {cmd}", flush=True)
    start = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"$ {cmd}\n")
        fh.flush()
        try:
            proc = subprocess.run(cmd, shell=True, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = 124
            fh.write("TIMEOUT\n")
    print(f"  -> exit {code} in {time.perf_counter() - start:.1f} s (log {log.name})", flush=True)
    return code


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--stages", default="env,tests,profile")
    ap.add_argument("--budget-s", type=float, default=560)
    ap.add_argument("--suite-args", default="", help="extra arguments for benchmarks/suite.py")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    profile = args.out / "h100.yaml"
    py = shlex.quote(sys.executable)
    for stage in args.stages.split(","):
        left = args.budget_s - (time.perf_counter() - start)
        if left < 20:
            print(f"skipping {stage}: time budget spent", flush=True)
            continue
        log = args.out / f"{stage.replace(':', '_')}.log"
        if stage == "env":
            run("nvidia-smi; free -g; df -h /tmp .; nproc; lscpu | grep -E 'Model name|Flags'; which g++ ninja; "
                f"{py} -c 'import torch, transformers; print(torch.__version__, transformers.__version__, "
                "torch.cuda.get_device_name(), torch.cuda.mem_get_info())'", log, 60)
        elif stage == "tests":
            run(f"{py} -m pytest -q -x -p no:cacheprovider -m 'gpu or not gpu' tests/test_cuda.py "
                "tests/test_triton_kernels.py",
                log, min(left, 300))
            os.system(f"tail -5 {log}")
        elif stage == "kernels":
            run(f"{py} benchmarks/gpu_kernels.py", log, min(left, 180))
            os.system(f"cat {log}")
        elif stage == "cpuattn":
            run(f"{py} benchmarks/cpu_attention.py", log, min(left, 120))
            os.system(f"tail -12 {log}")
        elif stage == "overlap":
            run(f"{py} benchmarks/delegated_overlap.py", log, min(left, 120))
            os.system(f"cat {log}")
        elif stage == "overhead":  # step overheads only, on top of the measured or the shipped profile
            base = profile if profile.is_file() else ROOT / "profiles" / "h100.yaml"
            run(f"{py} benchmarks/step_overhead.py --base {base} --out {profile}", log, min(left, 120))
            os.system(f"cat {log}")
        elif stage == "profile":
            run(f"{py} -m flexgen_core.cli profile --name h100 --out {profile}", log, min(left, 150))
            os.system(f"cat {log} | tail -25")
        elif stage.startswith("suite:"):
            prof = profile if profile.is_file() else ROOT / "profiles" / "h100.yaml"
            run(f"{py} benchmarks/suite.py --suite {stage[6:]} --csv {args.out}/{stage[6:]}.csv "
                f"--budget-s {left - 10:.0f} --profile {prof} {args.suite_args}", log, left)
            os.system(f"grep -A40 '^model ' {log} | tail -40")
        else:
            raise SystemExit(f"unknown stage {stage}")
    print(f"visit done in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
