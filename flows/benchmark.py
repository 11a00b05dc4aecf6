"""The `benchmark` flow: synthetic-workload throughput per policy (FlexGen's benchmark), optionally beside a Hugging
Face transformers/Accelerate baseline measured in the same run; rows append to a CSV, with a bar plot.

    python flows/benchmark.py          # the shipped tiny model, auto policy, plus the transformers baseline
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.params import BenchmarkParams
from tasks.benchmarking import append_rows, bench_policy, hf_baseline, plot_throughput


@flow(name="benchmark")
def benchmark(params: BenchmarkParams = BenchmarkParams.model_construct()) -> dict[str, Any]:
    """Measure generation throughput of each policy on the same synthetic prompts (and the baseline)."""
    rows = [bench_policy(params.bench_namespace(p), label=f"policy-{i}") for i, p in enumerate(params.policies)]
    if params.hf_baseline:
        rows.append(hf_baseline(params.model, params.prompt_len, params.gen_len, rows[0]["num_sequences"],
                                params.seed))
    csv_path = append_rows(params.results_csv, rows)
    plot_path = plot_throughput(params.plot, rows)
    create_table_artifact(table=[{k: r[k] for k in ("system", "policy", "block_size", "generation_tok_s",
                                                   "predicted_tok_s", "total_s")} for r in rows],
                          key="benchmark-throughput", description="Generation throughput per policy")
    best = max(rows, key=lambda r: r["generation_tok_s"])
    create_markdown_artifact(key="benchmark-summary", markdown=(
        f"# Benchmark\n\nBest: **{best['system']} {best['policy']}** at {best['generation_tok_s']:.2f} tok/s "
        f"(prompt {params.prompt_len}, gen {params.gen_len}).\n\nRows appended to `{csv_path}`; plot `{plot_path}`.\n"))
    return {"rows": rows, "csv": csv_path, "plot": plot_path}


if __name__ == "__main__":
    benchmark(BenchmarkParams(hf_baseline=True))
