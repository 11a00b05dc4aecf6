"""Orchestration overhead of the `evaluate` flow: its wall time versus the engine's own generation time for the
same requests, and versus the same pipeline run with the plain library (no Prefect).

Three runs of the same run entries and policy, each into its own output directory (so each generates everything):
  library  prepare -> load -> reserve -> run_chunk per chunk -> finalize, plain `flexgen_core` calls
  flow     the `evaluate` flow in this process, after a warm-up flow has started Prefect's embedded server
  cli      `flexgen eval ...` as a fresh process (interpreter, imports, its embedded server), optional: first
           with a fresh PREFECT_HOME (its database is created: once per machine), then with that home
Engine time = sum of the engine's prefill + decode seconds over the chunks (efficiency.json inference_runtime).

    .venv/bin/python benchmarks/eval_overhead.py --max-eval-instances 400 --cli
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ENTRIES = ["synthetic_reasoning:mode=pattern_match", "synthetic_reasoning:mode=induction"]


def engine_seconds(output_path: Path, suite: str = "default") -> tuple[float, int, int]:
    """(engine prefill + decode seconds, requests, chunks) summed over the suite's efficiency.json files."""
    total, requests, chunks = 0.0, 0, 0
    for eff in sorted((output_path / "runs" / suite).glob("*/efficiency.json")):
        data = json.loads(eff.read_text())
        total += data["inference_runtime"]
        requests += data["num_requests"]
        chunks += data["num_chunks"]
    return total, requests, chunks


def library_run(args: argparse.Namespace, policy: Any, out: Path) -> float:
    """The flow's work with plain library calls; returns its wall seconds."""
    import torch

    from flexgen_core.evaluation.runner import (
        RunIdentity,
        finalize_run,
        pending_chunks,
        prepare_run,
        run_chunk,
        workload_of,
    )
    from flexgen_core.evaluation.store import RunStore
    from flexgen_core.runtime.engine import Engine

    start = time.perf_counter()
    identity = RunIdentity.for_model(args.model, "float32", policy)
    runs = [prepare_run(e, model=args.model, output_path=out, max_eval_instances=args.max_eval_instances,
                        identity=identity) for e in args.entries]
    stores = {run.run_dir: RunStore(run.run_dir) for run in runs}
    with Engine.from_pretrained(args.model, policy=policy, device="cpu", dtype=torch.float32) as engine:
        engine.reserve(*workload_of(runs))
        for chunk in pending_chunks(runs, stores, policy.block_size):
            run_chunk(engine, chunk, stores[chunk.run_dir])
    for run in runs:
        finalize_run(run, stores[run.run_dir], {"policy": policy.to_dict()})
        stores[run.run_dir].close()
    return time.perf_counter() - start


def main() -> None:
    from flexgen_core.assets import TINY_MODEL_DIR

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(TINY_MODEL_DIR))
    p.add_argument("--entries", nargs="+", default=ENTRIES)
    p.add_argument("--max-eval-instances", type=int, default=400)
    p.add_argument("--gpu-batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out", type=Path, default=Path("build/eval-overhead"))
    p.add_argument("--cli", action="store_true", help="also time `flexgen eval` as a fresh process")
    args = p.parse_args()
    out = args.out.absolute()
    shutil.rmtree(out, ignore_errors=True)  # every run generates everything
    home = Path(tempfile.mkdtemp(prefix="overhead-prefect-"))
    os.environ.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                      PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
                      PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL="WARNING", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    os.environ.pop("PREFECT_API_URL", None)
    import torch

    torch.set_num_threads(args.threads)
    from flexgen_core.policy import Policy

    # one fixed policy for every run (activations on the compute device, KV cache in CPU memory)
    policy = Policy(gpu_batch_size=args.gpu_batch_size, cache=(0.0, 1.0, 0.0))
    results: dict[str, Any] = {"model": args.model, "entries": args.entries, "policy": policy.describe(),
                               "max_eval_instances": args.max_eval_instances, "torch_threads": args.threads}

    lib_wall = library_run(args, policy, out / "library")
    results["library"] = {"wall_s": lib_wall, "engine_s": engine_seconds(out / "library")[0]}

    policy_file = out / "policy.json"
    policy_file.write_text(json.dumps({"policy": policy.to_dict()}))
    from prefect import flow

    @flow(name="warm-up")
    def warm_up() -> None:
        """Starts the embedded server (cold start measured separately)."""

    start = time.perf_counter()
    warm_up()
    results["prefect_server_start_s"] = time.perf_counter() - start
    from flows.evaluate import evaluate
    from flows.params import EngineParams, EvaluateParams

    params = EvaluateParams(run_entries=args.entries, model=args.model, output_path=str(out / "flow"),
                            max_eval_instances=args.max_eval_instances)
    start = time.perf_counter()
    evaluate(params, EngineParams(policy=str(policy_file), device="cpu", dtype="float32"))
    flow_wall = time.perf_counter() - start
    engine_s, requests, chunks = engine_seconds(out / "flow")
    results["flow"] = {"wall_s": flow_wall, "engine_s": engine_s, "requests": requests, "chunks": chunks}

    if args.cli:  # first with a fresh PREFECT_HOME (the database is created), then again with that one
        env = {**os.environ, "PREFECT_HOME": str(home / "cli"), "OMP_NUM_THREADS": str(args.threads)}
        for name in ("cli_fresh_home", "cli"):
            cmd = [str(Path(sys.executable).parent / "flexgen"), "eval", *args.entries, "--model", args.model,
                   "--output-path", str(out / name), "--max-eval-instances", str(args.max_eval_instances),
                   "--policy", str(policy_file), "--device", "cpu", "--dtype", "float32"]
            start = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, capture_output=True)
            results[name] = {"wall_s": time.perf_counter() - start, "engine_s": engine_seconds(out / name)[0]}

    for name in ("library", "flow", "cli_fresh_home", "cli"):
        r = results.get(name)
        if r:
            r["non_engine_fraction"] = (r["wall_s"] - r["engine_s"]) / r["wall_s"]
    results["prefect_overhead_vs_library"] = (flow_wall - lib_wall) / lib_wall
    (out / "overhead.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
