"""The `evaluate` flow: run entries -> instances -> requests -> policy -> chunked generation -> scores -> outputs.

    flexgen eval synthetic_reasoning:mode=pattern_match --max-eval-instances 100   # in-process, embedded server
    python flows/evaluate.py                                                       # the same on 10 instances

Resume: each chunk's results are in the run store before the next chunk starts, so rerunning with the same
parameters and output path, or retrying the flow run from the UI, regenerates nothing already stored. The
engine is loaded once per flow run (again only after an out-of-memory re-plan) and stays in this process
across the chunk tasks. With `fan_out_deployment`, each run entry becomes a child run of that deployment.
With `engine.pipeline_stages` N > 1 the generation step runs on N pipeline ranks (torchrun, one process per
stage, each planning its own slice): one task starts them and waits, streaming the chunks they commit into the
progress artifact; preparation, scoring and the artifacts stay in this process, and the outputs equal those of
a single-process evaluation. The same resume holds: rank 0 commits each chunk before the next starts.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.utilities.annotations import quote

from flexgen_core.evaluation.pipeline_worker import PipelineJob
from flexgen_core.evaluation.runner import PreparedRun, RunIdentity, pending_chunks, workload_of
from flexgen_core.evaluation.store import RunStore
from flexgen_core.policy import Policy
from flows.params import EngineParams, EvaluateParams
from flows.reporting import ChunkProgress, artifact_key, publish_efficiency, publish_scores
from tasks.fanout import launch_child, wait_children
from tasks.generation import ChunkOutOfMemory, close_engine, generate_chunk, generate_pipelined, load_engine
from tasks.planning import PlannedPolicy, check_fits, choose_eval_policy, replan_smaller_batch
from tasks.preparation import prepare_entry, request_counts, resolve_device, run_identity, run_names, skip_completed
from tasks.scoring import finalize, run_records, summary_rows


@flow(name="evaluate")
def evaluate(evaluation: EvaluateParams,
             engine: EngineParams = EngineParams.model_construct()) -> dict[str, Any]:
    """Evaluate HELM run entries on a model under an offloading policy (auto or given), resumably.

    Writes OUTPUT_PATH/runs/SUITE/<run>/ (HELM's files, efficiency.json, policy.json) and publishes a
    progress artifact, a table of scores and a markdown report of throughput, policy and padding.
    """
    start = time.perf_counter()
    ev = evaluation
    engine.check_pipeline(ev.model)
    device, dtype = resolve_device(engine.device, engine.dtype)
    identity = run_identity(ev.model, dtype, engine.identity_flags())
    names = run_names(ev.run_entries, identity.model, ev.max_eval_instances)
    entries = ev.run_entries
    if ev.skip_completed_runs:
        entries = skip_completed(entries, names, ev.output_path, ev.suite)
    if ev.fan_out_deployment and len(entries) > 1:
        name_of = dict(zip(ev.run_entries, names, strict=True))
        wait_children([launch_child(ev.fan_out_deployment, {"evaluation": ev.child(e).model_dump(mode="json"),
                                                            "engine": engine.model_dump(mode="json")}, name_of[e])
                       for e in entries])
    elif entries:
        runs = [prepare_entry(e, ev.model, ev.suite, ev.output_path, ev.max_eval_instances, identity, ev.metrics)
                for e in entries]
        workload = workload_of(runs)
        budget = engine.budget_kwargs()
        # blocks of at most a quarter of the requests: at least four durable chunks to resume from
        requests = sum(len(run.requests) for run in runs)
        max_block = max(1, -(-requests // 4))
        if engine.pipeline_stages > 1:  # every stage plans (and checks) its own slice, in the ranks
            planned = _generate_pipelined(entries, runs, ev, engine, (device, dtype), identity, max_block)
        else:
            planned = choose_eval_policy(ev.model, workload, engine.given_policy(), engine.fixed_fields(),
                                         engine.hardware_profile(), device, dtype, budget, engine.memory_margin,
                                         max_block)
            check_fits(ev.model, planned.policy, workload, device, dtype, budget)
        with ExitStack() as stack:
            stores = {run.run_dir: stack.enter_context(RunStore(run.run_dir)) for run in runs}
            if engine.pipeline_stages == 1:
                planned = _generate(runs, stores, planned, ev, engine, (device, dtype))
            for run in runs:
                finalize(quote(run), quote(stores[run.run_dir]), planned.record())
    rows = summary_rows(ev.output_path, ev.suite, names)
    records = run_records(ev.output_path, ev.suite, names)
    publish_scores(artifact_key(ev.suite, "scores"), rows)
    publish_efficiency(artifact_key(ev.suite, "efficiency"), records, time.perf_counter() - start)
    return {"output_path": ev.output_path, "suite": ev.suite, "runs": names, "scores": rows, "records": records}


def _generate(runs: Sequence[PreparedRun], stores: Mapping[Path, RunStore], planned: PlannedPolicy,
              ev: EvaluateParams, engine_params: EngineParams, device_dtype: tuple[str, str]) -> PlannedPolicy:
    """Run every pending chunk, each a task, on one resident engine; after a CUDA out-of-memory error,
    re-plan with half the GPU batch size, reload and continue with the chunks still pending."""
    device, dtype = device_dtype
    workload, budget = workload_of(runs), engine_params.budget_kwargs()
    total = request_counts(runs)
    progress: ChunkProgress | None = None
    engine, number = None, 0
    try:
        while True:
            chunks = pending_chunks(runs, stores, planned.policy.block_size)
            if progress is None:
                progress = ChunkProgress(artifact_key(ev.suite, "progress"), total,
                                         total - sum(len(c.requests) for c in chunks))
            if not chunks:
                return planned
            engine = engine or load_engine(ev.model, planned.policy, workload, device, dtype, budget)
            try:
                for chunk in chunks:
                    number += 1
                    report = generate_chunk(quote(engine), quote(chunk), quote(stores[chunk.run_dir]),
                                            label=f"chunk-{number}")
                    progress.update(report.num_requests, report.generated_tokens)
                return planned
            except ChunkOutOfMemory as exc:
                close_engine(engine)
                engine = None
                planned = replan_smaller_batch(planned, str(exc), f"chunk-{number}", ev.model, workload,
                                               engine_params.hardware_profile(), device, dtype, budget,
                                               engine_params.memory_margin)
                check_fits(ev.model, planned.policy, workload, device, dtype, budget)
    finally:
        close_engine(engine)


def _generate_pipelined(entries: Sequence[str], runs: Sequence[PreparedRun], ev: EvaluateParams,
                        engine_params: EngineParams, device_dtype: tuple[str, str], identity: RunIdentity,
                        max_chunk: int) -> PlannedPolicy:
    """Run every pending chunk of `runs` (prepared from `entries`) on `engine_params.pipeline_stages` ranks: one
    task starts them and waits; the progress artifact follows the chunks they commit. Returns the plan with what
    the stages chose (stage 0's policy as `policy`, every stage's under `pipeline`)."""
    device, dtype = device_dtype
    total = request_counts(runs)
    with ExitStack() as stack:  # opened to count what is stored, then released: rank 0 is the writer
        stores = {run.run_dir: stack.enter_context(RunStore(run.run_dir)) for run in runs}
        pending = sum(len(c.requests) for c in pending_chunks(runs, stores, max(1, total)))
    given, fixed = engine_params.given_policy(), engine_params.fixed_fields()
    planned = PlannedPolicy(given or Policy(**fixed), "file" if given else "auto", None, fixed,
                            pipeline={"num_stages": engine_params.pipeline_stages})
    progress = ChunkProgress(artifact_key(ev.suite, "progress"), total, total - pending)
    if not pending:
        return planned
    budget = {k: v for k, v in engine_params.budget_kwargs().items() if k != "device"}
    job = PipelineJob(entries=list(entries), model=ev.model, suite=ev.suite, output_path=ev.output_path,
                      max_eval_instances=ev.max_eval_instances, identity=identity.to_dict(),
                      nproc=engine_params.pipeline_stages, device=device, dtype=dtype,
                      policy=given.to_dict() if given else None,
                      auto={"fixed": fixed, "profile": engine_params.profile, "margin": engine_params.memory_margin},
                      budget=budget, micro_batches=engine_params.micro_batches, timeout_s=engine_params.timeout_s,
                      max_chunk=max_chunk)
    plan = generate_pipelined(job, [run.run_dir for run in runs],
                              quote(lambda meta: progress.update(meta["num_requests"], meta["generated_tokens"])))
    chosen = {k: plan[k] for k in ("stages", "micro_batches", "partition", "block_size", "chunk_size")}
    return dataclasses.replace(planned, policy=Policy.from_dict(plan["stages"][0]["policy"]),
                               pipeline={"num_stages": engine_params.pipeline_stages, **chosen})


if __name__ == "__main__":
    evaluate(EvaluateParams(run_entries=["synthetic_reasoning:mode=pattern_match"], max_eval_instances=10))
