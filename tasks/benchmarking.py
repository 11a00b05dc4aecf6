"""Benchmark stage: synthetic-workload throughput per policy (`flexgen_core.bench.run_bench`), an optional Hugging
Face transformers baseline on the same prompts, the CSV the rows append to, and the throughput plot."""

from __future__ import annotations

import argparse
import csv
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

BENCH_COLUMNS = ("timestamp", "system", "model", "device", "policy", "block_size", "prompt_len", "gen_len",
                 "num_sequences", "prefill_s", "decode_s", "total_s", "generation_tok_s", "predicted_tok_s")


@task(name="bench-policy", task_run_name="bench {label}", cache_policy=NO_CACHE)
def bench_policy(args: argparse.Namespace, label: str) -> dict[str, Any]:
    """Load the engine under one policy, warm up, and time prefill and decode of the synthetic blocks."""
    from flexgen_core.bench import run_bench

    r = run_bench(args)
    row = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "system": "flexgen", "model": r["model"],
           "device": r["device"], "policy": r["policy_str"], "block_size": r["block_size"],
           "prompt_len": r["prompt_len"], "gen_len": r["gen_len"], "num_sequences": r["block_size"] * r["blocks"],
           "prefill_s": r["prefill_s"], "decode_s": r["decode_s"], "total_s": r["total_s"],
           "generation_tok_s": r["total_tok_s"], "predicted_tok_s": r.get("predicted_tok_s")}
    get_run_logger().info(f"{label}: {r['policy_str']} -> {r['total_tok_s']:.2f} tok/s")
    return row


@task(name="hf-baseline", cache_policy=NO_CACHE)
def hf_baseline(model: str, prompt_len: int, gen_len: int, num_sequences: int, seed: int) -> dict[str, Any]:
    """transformers `generate` (greedy, exactly gen_len new tokens) on the prompts `flexgen bench` uses, placed by
    Accelerate on the whole device (`flexgen_core.hf_baseline`): "hf-accelerate" when weights had to stay on
    the CPU, else plain "hf-transformers"."""
    from flexgen_core.hf_baseline import BaselineConfig, run_baseline

    r = run_baseline(BaselineConfig(model, prompt_len, gen_len, num_sequences, seed=seed))
    offloaded = r["weight_bytes"]["cpu"] > 0 and r["device"] != "cpu"
    return {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "system": "hf-accelerate" if offloaded else
            "hf-transformers", "model": r["model"], "device": r["device"], "policy": r["policy_str"],
            "block_size": num_sequences, "prompt_len": prompt_len, "gen_len": gen_len, "num_sequences": num_sequences,
            "prefill_s": r["prefill_s"], "decode_s": r["decode_s"], "total_s": r["total_s"],
            "generation_tok_s": r["total_tok_s"], "predicted_tok_s": None}


@task(name="append-csv", retries=2, retry_delay_seconds=1)
def append_rows(path: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """Append `rows` to the results CSV (header written when the file is new)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.is_file() or out.stat().st_size == 0
    with out.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=BENCH_COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return str(out)


@task(name="plot-throughput")
def plot_throughput(path: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """A bar per measured system/policy: generation throughput (new tokens per second)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['system']}\n{r['policy']}" for r in rows]
    values = [float(r["generation_tok_s"]) for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 2.2 * len(rows)), 4.0))
    ax.bar(range(len(rows)), values, color=["tab:blue" if r["system"] == "flexgen" else "tab:gray" for r in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("generated tokens / s")
    first = rows[0]
    ax.set_title(f"{first['model']}: prompt {first['prompt_len']}, gen {first['gen_len']}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
