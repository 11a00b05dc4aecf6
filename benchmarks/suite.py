"""Run several `flexgen bench` cases in one go (one subprocess each) and print one table.

Each case is an exact `flexgen bench` command line (or, prefixed `hf:`, a `benchmarks/hf_accelerate.py` one: the
Hugging Face Accelerate baseline, measured in the same run), run in its own process so that its peak memory and
pinned allocations are its own; the table and a CSV (`--csv`) give prefill/decode/total throughput and
peak memory per case, with the command that produced each row.

    python benchmarks/suite.py --suite t4_like --csv $OUT/results.csv --budget-s 540
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

GIB = 1 << 30
W = "--prompt-len 512 --gen-len 32"

T4_LIKE = "--gpu-mem-gib 16"
CPU_W = "--device cpu --prompt-len 128 --gen-len 16"
# the 4-bit OPT-30B policy the LP chose for the T4-like budget with 80 GiB of host RAM (visit 6)
CW_64X4 = ("--cpu-mem-gib 80 --gpu-batch-size 64 --num-gpu-batches 4 --weights 0.0052,0.9948,0 --compress-weights "
           "--compress-cache")
AB_32X3 = (f"--model opt-30b --dummy --prompt-len 512 --gen-len 8 {T4_LIKE} --gpu-batch-size 32 --num-gpu-batches 3 "
           "--weights 0.1906,0.8094,0 --cache 0,1,0 --acts 0.34375,0.65625,0 --cpu-attention --profile {profile}")
BISECT_32X2 = ("--cpu-mem-gib 80 --gpu-batch-size 32 --num-gpu-batches 2 --weights 0.0052,0.9948,0 "
               "--cache 0.15625,0.84375,0 --acts 0,1,0")
# issue 7 target 2 (4-bit, 16 GiB): visit 6's policy by hand, and auto with 80 GiB of host RAM
TARGET2 = [
    f"--model opt-30b --dummy {W} {T4_LIKE} {CW_64X4} --cache 0.15625,0.84375,0 --acts 0,1,0 --profile {{profile}}",
    f"--model opt-30b --dummy {W} {T4_LIKE} --cpu-mem-gib 80 --policy auto --compress-weights --compress-cache "
    "--profile {profile}",
]
SUITES: dict[str, list[str]] = {
    "visit6": [  # 4-bit with a host budget that leaves the 126 GiB box room (111 GiB chosen without one)
        f"--model opt-30b --dummy {W} {T4_LIKE} --cpu-mem-gib 80 --policy auto --compress-weights --compress-cache "
        "--profile {profile}",
        f"--model opt-30b --dummy {W} {T4_LIKE} --policy auto --profile {{profile}}",
    ],
    "visit6c": [  # bisect the 4-bit run's inf/NaN: no overlap; no GPU cache segment; activations on the GPU
        f"--model opt-30b --dummy {W} {T4_LIKE} {CW_64X4} --cache 0.15625,0.84375,0 --acts 0,1,0 --no-overlap",
        f"--model opt-30b --dummy {W} {T4_LIKE} {CW_64X4} --cache 0,1,0 --acts 0,1,0",
        f"--model opt-30b --dummy {W} --gpu-mem-gib 20 {CW_64X4} --cache 0.15625,0.84375,0 --acts 1,0,0",
    ],
    # issue 4's CPU-box validation: `python benchmarks/suite.py --suite cpu_box --profile profiles/cpu-2core.yaml`
    # on the 2-core dev box (nothing else running); prediction vs measurement per policy
    "cpu_box": [
        f"--model opt-125m --dummy {CPU_W} --policy auto --profile {{profile}}",
        f"--model opt-125m --dummy {CPU_W} --gpu-batch-size 8 --num-gpu-batches 2 --profile {{profile}}",
        f"--model opt-125m --dummy {CPU_W} --gpu-batch-size 8 --num-gpu-batches 2 --weights 0,1,0 "
        "--profile {profile}",
        f"--model opt-125m --dummy {CPU_W} --gpu-batch-size 8 --num-gpu-batches 2 --cache 0,1,0 --acts 0,1,0 "
        "--profile {profile}",
        f"--model opt-125m --dummy {CPU_W} --gpu-batch-size 8 --num-gpu-batches 2 --weights 0.5,0,0.5 "
        "--profile {profile}",
        f"--model flexgen_core/assets/tiny-opt {CPU_W} --policy auto --profile {{profile}}",
        f"--model flexgen_core/assets/tiny-opt {CPU_W} --gpu-batch-size 16 --num-gpu-batches 1 --profile {{profile}}",
    ],
    # visit 7: issue 3 (4-bit OPT-30B on the whole GPU), issue 4 (OPT-6.7B at 16 GiB: auto and three hand
    # policies; OPT-30B 24x4 delegated re-measured with three weight slots; auto with the probed shared term)
    # visit 8a: the auto policies after the per-kind step overheads, the denser batch-size search and the smaller
    # host reserve; where the offloaded 4-bit run spends its decode (step timing, then torch.profiler)
    "visit8a": [
        f"--model opt-6.7b --dummy {W} {T4_LIKE} --policy auto --profile {{profile}}",
        f"--model opt-30b --dummy {W} {T4_LIKE} --policy auto --profile {{profile}}",
        f"--model opt-30b --dummy --prompt-len 512 --gen-len 4 {T4_LIKE} --policy auto --compress-weights "
        "--compress-cache --step-timing --profile {profile}",
        f"--model opt-30b --dummy --prompt-len 512 --gen-len 3 {T4_LIKE} --policy auto --compress-weights "
        "--compress-cache --torch-profile {out}/visit8a_4bit_torch_profile.txt --profile {profile}",
    ],
    # visit 8b: with the next attention layer's cache requested right after this attention layer (a change that
    # made no difference and was removed; 6.7B auto streams a third of its cache at 12x1); the 8x1 control;
    # operator profiles of the offloaded 4-bit run and of the whole-GPU 24x1
    "visit8b": [
        f"--model opt-6.7b --dummy {W} {T4_LIKE} --policy auto --profile {{profile}}",
        f"--model opt-6.7b --dummy {W} {T4_LIKE} --gpu-batch-size 8 --num-gpu-batches 1 --profile {{profile}}",
        f"--model opt-30b --dummy --prompt-len 512 --gen-len 3 {T4_LIKE} --policy auto --compress-weights "
        "--compress-cache --torch-profile {out}/visit8b_4bit_torch_profile.txt --profile {profile}",
        "--model opt-30b --dummy --prompt-len 512 --gen-len 8 --gpu-batch-size 24 --num-gpu-batches 1 "
        "--torch-profile {out}/visit8b_24x1_torch_profile.txt --profile {profile}",
    ],
    # visit 8c: timelines of the slow small-batch streamed-cache decode (6.7B 12x1, a third of the cache on the
    # CPU) against the all-GPU 8x1, and of the offloaded 4-bit run with visit 6's smaller block
    "visit8c": [
        f"--model opt-6.7b --dummy --prompt-len 512 --gen-len 6 {T4_LIKE} --gpu-batch-size 12 --num-gpu-batches 1 "
        "--cache 0.666667,0.333333,0 --torch-profile {out}/visit8c_12x1.txt --profile {profile}",
        f"--model opt-6.7b --dummy --prompt-len 512 --gen-len 6 {T4_LIKE} --gpu-batch-size 8 --num-gpu-batches 1 "
        "--torch-profile {out}/visit8c_8x1.txt --profile {profile}",
        f"--model opt-30b --dummy --prompt-len 512 --gen-len 3 {T4_LIKE} {CW_64X4} --cache 0.16,0.84,0 --acts 0,1,0 "
        "--torch-profile {out}/visit8c_4bit_64x4.txt --profile {profile}",
    ],
    # visit 8d: issue 4's GPU validation (per-kind overheads, cache segments; the engine still had the
    # next-attention prefetch, since removed): both auto policies at 16 GiB, OPT-6.7B's three hand policies,
    # OPT-30B's best hand policy
    # issue 7 with the fused 4-bit quantize and decode-attention kernels: target 2 (the visit 6 policy and auto)
    # and target 3 (whole GPU: fp16 with either attention kernel, and a 4-bit cache)
    "visit9a": TARGET2,
    "visit9b": [
        f"--model opt-30b --dummy {W} --policy auto --compress-cache --profile {{profile}}",
        f"--model opt-30b --dummy {W} --gpu-batch-size 24 --num-gpu-batches 1 --weights 1,0,0 --cache 1,0,0 "
        "--acts 1,0,0 --profile {profile}",
        f"env:FLEXGEN_DENSE_ATTENTION=triton --model opt-30b --dummy {W} --gpu-batch-size 24 --num-gpu-batches 1 "
        "--weights 1,0,0 --cache 1,0,0 --acts 1,0,0 --profile {profile}",
    ],
    # target 4 with the fused kernels, and whole-GPU fp16 with the Triton/SDPA rule (auto picks 24x1)
    "visit9c": [
        f"--model opt-30b --dummy {W} --policy auto --profile {{profile}}",
        f"--model opt-175b --dummy {W} --policy auto --compress-weights --compress-cache --profile {{profile}}",
    ],
    # target 1 re-checked on the final code of visit 9 (the dense-attention rule changed device attention)
    "visit9d": [
        f"--model opt-30b --dummy {W} {T4_LIKE} --policy auto --profile {{profile}}",
    ],
    # A/B against the code before visit 9 (ab_old/: `git archive 9443fee flexgen_core | tar -x -C ab_old`):
    # the delegated 16 GiB policy of visit 8a, alternating old and new code
    # hidden-state loads on their own stream (not behind the weights of the layer two ahead): A/B against
    # b59a36c's engine in ab_old/, alternated
    "visit10a": [
        *[f"env:PYTHONSAFEPATH=1 env:PYTHONPATH=/tmp/site:ab_old {AB_32X3}", AB_32X3] * 2,
    ],
    # the same policy, new code, with the host-attention split (wait / compute / return) in its JSON
    "visit10b": [AB_32X3],
    # CPU-delegated attention on its own thread, finished after the next GPU batch's attention is issued; A/B
    # against b59a36c's engine in ab_old/
    "visit10c": [
        *[AB_32X3, f"env:PYTHONSAFEPATH=1 env:PYTHONPATH=/tmp/site:ab_old {AB_32X3}"] * 2,
    ],
    # host-attention threads (15 is the default next to a GPU on the 16-core box), huge pages for the host
    # arenas (PyTorch's THP_MEM_ALLOC_ENABLE), and the old code with huge pages
    "visit10d": [
        f"env:FLEXGEN_HOST_ATTENTION_THREADS=15 {AB_32X3}",
        f"env:FLEXGEN_HOST_ATTENTION_THREADS=16 {AB_32X3}",
        f"env:THP_MEM_ALLOC_ENABLE=1 {AB_32X3}",
        f"env:THP_MEM_ALLOC_ENABLE=1 env:PYTHONSAFEPATH=1 env:PYTHONPATH=/tmp/site:ab_old {AB_32X3}",
        f"env:FLEXGEN_HOST_ATTENTION_THREADS=12 {AB_32X3}",
    ],
    # paired_decode (the next attention layer's first batch issued before this one's last host result), A/B
    # against b59a36c's engine in ab_old/, then target 1's auto run
    "visit10e": [
        AB_32X3,
        f"env:PYTHONSAFEPATH=1 env:PYTHONPATH=/tmp/site:ab_old {AB_32X3}",
        AB_32X3,
        f"--model opt-30b --dummy {W} {T4_LIKE} --policy auto --profile {{profile}}",
    ],
    # target 1 again with paired_decode: the auto policy, and visit 8a's 32x3 delegated policy at 32 new tokens
    "visit10f": [
        f"--model opt-30b --dummy {W} {T4_LIKE} --policy auto --profile {{profile}}",
        AB_32X3.replace("--gen-len 8", "--gen-len 32"),
    ],
    # a cost model with paired decode (host_memory_shared_gbps 72, code of 45fd317, reverted after this visit)
    # preferred many small GPU batches: what auto picked on the box (3x33), and the 8x10 it picked with 105 GiB
    # of host RAM (refused: the weight fractions sum to 0.9998)
    "visit10g": [
        f"--model opt-30b --dummy {W} {T4_LIKE} --policy auto --profile {{profile}}",
        f"--model opt-30b --dummy {W} {T4_LIKE} --gpu-batch-size 8 --num-gpu-batches 10 --weights 0.2176,0.7822,0 "
        "--cache 0,1,0 --acts 0.375,0.625,0 --cpu-attention --profile {profile}",
    ],
    # target 2 on this session's engine (hidden-state loads on their own stream; the schedule's release fields)
    "visit10h": TARGET2,
    # the paired-decode cost model with the probed per-GPU-batch host costs (delegated_issue_us/_job_us): target 1's
    # auto run, the LP's 24x4 beside it, and OPT-6.7B 64x2 delegated (180.7 tok/s on the serial engine, visit 7)
    "visit11a": [
        f"--model opt-30b --dummy {W} {T4_LIKE} --policy auto --profile {{profile}}",
        f"--model opt-30b --dummy {W} {T4_LIKE} --gpu-batch-size 24 --num-gpu-batches 4 --weights 0.1996,0.8004,0 "
        "--cache 0,1,0 --acts 0.333333,0.666667,0 --cpu-attention --profile {profile}",
        f"--model opt-6.7b --dummy {W} {T4_LIKE} --gpu-batch-size 64 --num-gpu-batches 2 --weights 0.5,0.5,0 "
        "--cache 0,1,0 --acts 0,1,0 --cpu-attention --profile {profile}",
    ],
    # the fitted per-batch costs (issue 2680, job 830, chain latency 2800 us) and the search's margin on them:
    # target 1's auto run (24x4 expected), and the middle of the near-equal family (16x6, nominally ahead)
    # the search's disk margin: target 2's auto run (64x4 without disk expected; 64x5 with 3% of the cache on disk
    # before), and target 4's auto run (OPT-175B, 4-bit)
    "visit11c": [
        TARGET2[1],
        f"--model opt-175b --dummy {W} --policy auto --compress-weights --compress-cache --profile {{profile}}",
    ],
    # target 3 on this session's engine (whole GPU: 4-bit cache auto, fp16 24x1), and the host-bound small-batch
    # decode (OPT-6.7B 8x1) now that the engine opens no profiler range per step without a profiler
    "visit11d": [
        f"--model opt-30b --dummy {W} --policy auto --compress-cache --profile {{profile}}",
        f"--model opt-30b --dummy {W} --gpu-batch-size 24 --num-gpu-batches 1 --weights 1,0,0 --cache 1,0,0 "
        "--acts 1,0,0 --profile {profile}",
        f"--model opt-6.7b --dummy {W} {T4_LIKE} --policy auto --profile {{profile}}",
    ],
    "visit11b": [
        f"--model opt-30b --dummy {W} {T4_LIKE} --policy auto --profile {{profile}}",
        f"--model opt-30b --dummy {W} {T4_LIKE} --gpu-batch-size 16 --num-gpu-batches 6 --weights 0.2087,0.7913,0 "
        "--cache 0,1,0 --acts 0.3125,0.6875,0 --cpu-attention --profile {profile}",
    ],
    "visit9e": [
        *[f"env:PYTHONSAFEPATH=1 env:PYTHONPATH=/tmp/site:ab_old {AB_32X3}", AB_32X3] * 2,
    ],
    # what the search now picks where it picked 24x4 with 4% of activations on disk (visit 9d run 2, 25.1 tok/s)
    "visit9f": [
        f"--model opt-30b --dummy {W} {T4_LIKE} --gpu-batch-size 16 --num-gpu-batches 6 --weights 0.2087,0.7913,0 "
        "--cache 0,1,0 --acts 0.3125,0.6875,0 --cpu-attention --profile {profile}",
    ],
    # visit 9d run 2's policy (24x4 delegated, 1 of 24 sequences' activations on disk: 25.1 tok/s) once decode
    # keeps the disk rows' states in host RAM
    "visit9g": [
        f"--model opt-30b --dummy {W} {T4_LIKE} --gpu-batch-size 24 --num-gpu-batches 4 --weights 0.1996,0.8002,0.0002 "
        "--cache 0,1,0 --acts 0.333333,0.625,0.041667 --cpu-attention --profile {profile}",
    ],
    "visit8d": [
        f"--model opt-6.7b --dummy {W} {T4_LIKE} --policy auto --profile {{profile}}",
        f"--model opt-6.7b --dummy {W} {T4_LIKE} --gpu-batch-size 32 --num-gpu-batches 4 --cache 0,1,0 "
        "--acts 0,1,0 --profile {profile}",
        f"--model opt-6.7b --dummy {W} {T4_LIKE} --gpu-batch-size 64 --num-gpu-batches 2 --weights 0.5,0.5,0 "
        "--cache 0,1,0 --acts 0,1,0 --cpu-attention --profile {profile}",
        f"--model opt-6.7b --dummy {W} {T4_LIKE} --gpu-batch-size 32 --num-gpu-batches 2 --weights 0.8,0.2,0 "
        "--cache 0,1,0 --acts 0,1,0 --profile {profile}",
    ],
    "visit8e": [
        f"--model opt-30b --dummy {W} {T4_LIKE} --policy auto --profile {{profile}}",
        f"--model opt-30b --dummy {W} {T4_LIKE} --gpu-batch-size 24 --num-gpu-batches 4 --weights 0.2,0.8,0 "
        "--cache 0,1,0 --acts 0,1,0 --cpu-attention --profile {profile}",
    ],
    "visit7a": [
        f"--model opt-30b --dummy {W} --policy auto --compress-weights --compress-cache --profile {{profile}}",
        f"--model opt-6.7b --dummy {W} {T4_LIKE} --policy auto --profile {{profile}}",
        f"--model opt-6.7b --dummy {W} {T4_LIKE} --gpu-batch-size 32 --num-gpu-batches 4 --cache 0,1,0 "
        "--acts 0,1,0 --profile {profile}",
        f"--model opt-6.7b --dummy {W} {T4_LIKE} --gpu-batch-size 64 --num-gpu-batches 2 --weights 0.5,0.5,0 "
        "--cache 0,1,0 --acts 0,1,0 --cpu-attention --profile {profile}",
        f"--model opt-6.7b --dummy {W} {T4_LIKE} --gpu-batch-size 16 --num-gpu-batches 2 --weights 0.7,0.3,0 "
        "--profile {profile}",
        f"--model opt-30b --dummy {W} {T4_LIKE} --gpu-batch-size 24 --num-gpu-batches 4 --weights 0.2,0.8,0 "
        "--cache 0,1,0 --acts 0,1,0 --cpu-attention --profile {profile}",
        f"--model opt-30b --dummy {W} {T4_LIKE} --policy auto --profile {{profile}}",
    ],
    # visit 7b: auto at 16 GiB with the refitted shared term (66 GB/s); issue 7's baselines side by side: HF
    # generate on the whole GPU, our engine at the original's all-GPU block (24x1); 4-bit OPT-30B all on the GPU
    "visit7b": [
        f"--model opt-30b --dummy {W} {T4_LIKE} --policy auto --profile {{profile}}",
        f"--model opt-30b --dummy {W} --gpu-batch-size 24 --num-gpu-batches 1 --profile {{profile}}",
        f"hf:--model opt-30b {W} --batch-size 16",
        f"hf:--model opt-30b {W} --batch-size 24",
        f"--model opt-30b --dummy {W} --gpu-batch-size 128 --num-gpu-batches 1 --weights 1,0,0 --cache 1,0,0 "
        "--acts 1,0,0 --compress-weights --compress-cache --profile {profile}",
        f"--model opt-6.7b --dummy {W} {T4_LIKE} --gpu-batch-size 32 --num-gpu-batches 2 --weights 0.8,0.2,0 "
        "--cache 0,1,0 --acts 0,1,0 --profile {profile}",
    ],
    "visit7c": [  # auto at 16 GiB once disk reads count on the delegated host thread (cost model, visit 7)
        f"--model opt-30b --dummy {W} {T4_LIKE} --policy auto --profile {{profile}}",
    ],
    "visit7d": [  # where delegated decode and small-batch decode spend their time (syncs after every step)
        f"--model opt-30b --dummy --prompt-len 512 --gen-len 4 {T4_LIKE} --gpu-batch-size 24 --num-gpu-batches 4 "
        "--weights 0.2,0.8,0 --cache 0,1,0 --acts 0,1,0 --cpu-attention --step-timing --profile {profile}",
        f"--model opt-6.7b --dummy --prompt-len 512 --gen-len 8 {T4_LIKE} --gpu-batch-size 8 --num-gpu-batches 1 "
        "--step-timing --profile {profile}",
        f"--model opt-6.7b --dummy --prompt-len 512 --gen-len 8 {T4_LIKE} --gpu-batch-size 8 --num-gpu-batches 1 "
        "--profile {profile}",
    ],
    "visit6g": [  # auto at 16 GiB with the shared host-memory term (h100.yaml host_memory_shared_gbps)
        f"--model opt-30b --dummy {W} {T4_LIKE} --policy auto --profile {{profile}}",
    ],
    "visit6f": [  # 175B 4-bit again: the cache's quantize no longer syncs the host three times per call
        f"--model opt-175b --dummy {W} --policy auto --compress-weights --compress-cache --profile {{profile}}",
    ],
    "visit6e": [  # after the KV store ordering fix: the 4-bit run of visit6, then its 32x2 control
        f"--model opt-30b --dummy {W} {T4_LIKE} --cpu-mem-gib 80 --policy auto --compress-weights --compress-cache "
        "--profile {profile}",
        f"--model opt-30b --dummy {W} {T4_LIKE} {BISECT_32X2} --compress-weights --compress-cache",
    ],
    "visit6d": [  # at 32x2: both compressed (control), weights only, cache only; inf/NaN shows in the logprobs
        f"--model opt-30b --dummy {W} {T4_LIKE} {BISECT_32X2} --compress-weights --compress-cache",
        f"--model opt-30b --dummy {W} {T4_LIKE} {BISECT_32X2} --compress-weights",
        f"--model opt-30b --dummy {W} {T4_LIKE} {BISECT_32X2.replace('0.0052,0.9948,0', '0.05,0.95,0')} "
        "--compress-cache",
    ],
    "visit6b": [  # where the 4-bit run's inf/NaN first appears, with and without overlap; then the whole GPU
        f"--model opt-30b --dummy --prompt-len 512 --gen-len 3 {T4_LIKE} --cpu-mem-gib 80 --policy auto "
        "--compress-weights --compress-cache --check-finite --profile {profile}",
        f"--model opt-30b --dummy --prompt-len 512 --gen-len 3 {T4_LIKE} --cpu-mem-gib 80 --policy auto "
        "--compress-weights --compress-cache --check-finite --no-overlap --profile {profile}",
        f"--model opt-30b --dummy {W} --policy auto --profile {{profile}}",
    ],
    "final": [
        f"--model opt-30b --dummy {W} {T4_LIKE} --policy auto --profile {{profile}}",
        f"--model opt-175b --dummy {W} --policy auto --compress-weights --compress-cache --profile {{profile}}",
        f"--model opt-30b --dummy {W} --policy auto --profile {{profile}}",
        f"--model opt-30b --dummy {W} {T4_LIKE} --policy auto --compress-weights --compress-cache "
        "--profile {profile}",
    ],
    "visit2": [
        f"--model opt-30b --dummy {W} {T4_LIKE} --policy auto --profile {{profile}}",
        f"--model opt-30b --dummy {W} {T4_LIKE} --gpu-batch-size 24 --num-gpu-batches 4 --weights 0.2,0.8,0 "
        "--cache 0,1,0 --acts 0,1,0 --cpu-attention --profile {profile}",
        f"--model opt-30b --dummy {W} {T4_LIKE} --policy auto --compress-weights --compress-cache "
        "--profile {profile}",
        f"--model opt-30b --dummy {W} --gpu-batch-size 32 --num-gpu-batches 1 --profile {{profile}}",
        f"--model opt-6.7b --dummy {W} --gpu-batch-size 32 --num-gpu-batches 2 --profile {{profile}}",
    ],
    "visit1": [
        f"--model opt-6.7b --dummy {W} --gpu-batch-size 32 --num-gpu-batches 2 --profile {{profile}}",
        f"--model opt-30b --dummy {W} {T4_LIKE} --policy auto --profile {{profile}}",
        f"--model opt-30b --dummy {W} {T4_LIKE} --gpu-batch-size 24 --num-gpu-batches 2 --weights 0.2,0.8,0 "
        "--cache 0,1,0 --acts 0,1,0 --profile {profile}",
        f"--model opt-30b --dummy --prompt-len 512 --gen-len 4 {T4_LIKE} --gpu-batch-size 24 --num-gpu-batches 2 "
        "--weights 0.2,0.8,0 --cache 0,1,0 --acts 0,1,0 --cpu-attention --step-timing --profile {profile}",
    ],
    "smoke": [
        "--model opt-125m --dummy --prompt-len 64 --gen-len 8 --gpu-batch-size 8 --num-gpu-batches 2",
        "--model opt-125m --dummy --prompt-len 64 --gen-len 8 --gpu-batch-size 8 --num-gpu-batches 2 "
        "--weights 0.2,0.8,0 --cache 0,1,0 --acts 0,1,0 --cpu-attention",
    ],
    "first_gpu": [
        f"--model opt-6.7b --dummy {W} --gpu-batch-size 32 --num-gpu-batches 1",
        f"--model opt-30b --dummy {W} --gpu-batch-size 48 --num-gpu-batches 2 --weights 0.2,0.8,0 --cache 0,1,0 "
        "--acts 0,1,0 --cpu-attention --gpu-mem-gib 16",
        f"--model opt-30b --dummy {W} --gpu-batch-size 24 --num-gpu-batches 2 --weights 0.2,0.8,0 --cache 0,1,0 "
        "--acts 0,1,0 --gpu-mem-gib 16",
    ],
}


def run_case(args: str, timeout: float, rss_limit: int) -> dict:
    """Run one case in its own process; kill it if its resident memory passes `rss_limit` (an overcommitted
    pinned host allocation hangs a machine rather than failing) or it runs past `timeout`."""
    import psutil

    env, settings = os.environ.copy(), []
    while args.startswith("env:"):  # "env:NAME=VALUE <arguments>": the case runs with that environment variable
        setting, args = args[4:].split(" ", 1)
        name, value = setting.split("=", 1)
        env[name] = value
        settings.append(setting)
    setting = " ".join(settings)
    if args.startswith("hf:"):  # the Hugging Face Accelerate baseline (benchmarks/hf_accelerate.py)
        label, cmd = "hf_accelerate.py " + args[3:], [sys.executable, str(Path(__file__).with_name(
            "hf_accelerate.py")), *shlex.split(args[3:]), "--json"]
    else:
        label, cmd = "flexgen bench " + args, [sys.executable, "-m", "flexgen_core.cli", "bench", *shlex.split(args),
                                               "--json"]
    label = f"{setting} {label}" if setting else label
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak, killed = 0, ""
    while proc.poll() is None:
        try:
            peak = max(peak, psutil.Process(proc.pid).memory_info().rss)
        except psutil.NoSuchProcess:
            break
        if peak > rss_limit:
            killed = f"killed: resident memory {peak / GIB:.1f} GiB passed the {rss_limit / GIB:.1f} GiB limit"
        elif time.perf_counter() - start > timeout:
            killed = "timeout"
        if killed:
            proc.kill()
            break
        time.sleep(0.5)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    if killed or proc.returncode != 0:
        return {"command": label, "error": killed or (stderr or stdout)[-2000:], "proc_s": wall}
    result = json.loads(stdout.strip().splitlines()[-1])
    result["command"] = label
    result["proc_s"] = wall
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--suite", default="smoke", choices=sorted(SUITES))
    ap.add_argument("--case", action="append", default=[], help="extra bench arguments (repeatable)")
    ap.add_argument("--csv", type=Path, default=None)
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop starting new cases after this")
    ap.add_argument("--profile", default="profiles/h100.yaml", help="hardware profile substituted for {profile}")
    ap.add_argument("--keep-free-gib", type=float, default=6.0, help="kill a case whose RSS leaves less RAM free")
    args = ap.parse_args()
    out_dir = str(args.csv.parent) if args.csv else "."
    cases = [c.replace("{profile}", args.profile).replace("{out}", out_dir) for c in SUITES[args.suite] + args.case]
    import psutil

    rss_limit = psutil.virtual_memory().total - int(args.keep_free_gib * GIB)
    start = time.perf_counter()
    rows = []
    for case in cases:
        left = args.budget_s - (time.perf_counter() - start)
        if left < 30:
            rows.append({"command": "flexgen bench " + case, "error": "skipped: time budget"})
            continue
        row = run_case(case, timeout=left, rss_limit=rss_limit)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("plan_items", "tokens", "predicted_breakdown")}),
              flush=True)
    print_table(rows)
    if args.csv:
        write_csv(rows, args.csv)


def print_table(rows: list[dict]) -> None:
    head = (f"{'model':9s} {'policy':50s} {'block':>5s} {'prefill s':>9s} {'decode s':>9s} {'total t/s':>9s} "
            f"{'decode t/s':>10s} {'pred t/s':>8s} {'meas/bound':>10s} {'GPU GiB':>7s} {'host GiB':>8s}")
    print(head)
    for r in rows:
        if "error" in r:
            print(f"ERROR {r['command']}: {r['error'][-300:]}")
            continue
        print(f"{r['model']:9s} {r['policy_str'][:50]:50s} {r['block_size']:5d} {r['prefill_s']:9.2f} "
              f"{r['decode_s']:9.2f} {r['total_tok_s']:9.1f} {r['decode_tok_s']:10.1f} "
              f"{r.get('predicted_tok_s', 0):8.1f} {r.get('measured_over_bound', 0):10.2f} "
              f"{r['peak_bytes'].get('gpu', 0) / GIB:7.1f} {r['peak_bytes'].get('cpu_rss', 0) / GIB:8.1f}"
              + (f"  INVALID: {r['nonfinite_logprobs']} inf/NaN log-probs" if r.get("nonfinite_logprobs") else ""))
        if r.get("shortfall"):
            print(f"  {r['shortfall']}")


def write_csv(rows: list[dict], path: Path) -> None:
    fields = ["model", "policy_str", "block_size", "prompt_len", "gen_len", "prefill_s", "decode_s", "total_s",
              "total_tok_s", "decode_tok_s", "predicted_tok_s", "bound_tok_s", "measured_over_bound",
              "gpu_peak_gib", "host_peak_gib", "load_s", "device", "nonfinite_logprobs", "shortfall", "command",
              "error"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            r = dict(r)
            peak = r.get("peak_bytes", {})
            r["gpu_peak_gib"] = round(peak.get("gpu", 0) / GIB, 2)
            r["host_peak_gib"] = round(peak.get("cpu_rss", 0) / GIB, 2)
            w.writerow(r)


if __name__ == "__main__":
    main()
