"""Generation stage: load the engine once per flow run, run one chunk per task, close the engine.

The engine stays resident in the flow's process between chunk tasks (it is passed in-process, never
serialized or cached). `generate_chunk` is never retried: a chunk's results are durable once
`run_chunk` returns (one store transaction), and a CUDA out-of-memory error is raised as
`ChunkOutOfMemory` so the flow can re-plan with a smaller GPU batch instead of repeating the same failure.
With pipeline stages, `generate_pipelined` starts the ranks (torchrun) that load the stages and run every
pending chunk, and waits for them, streaming each chunk rank 0 commits to the flow's progress (no re-plan: an
out-of-memory error ends the run with the failed rank named; rerunning resumes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flexgen_core.evaluation.pipeline_worker import PipelineJob
from flexgen_core.evaluation.runner import Chunk, ChunkReport
from flexgen_core.evaluation.store import RunStore
from flexgen_core.policy import Policy


class ChunkOutOfMemory(RuntimeError):
    """The compute device ran out of memory in a chunk (nothing of the chunk was stored)."""


@task(name="load-engine", cache_policy=NO_CACHE, persist_result=False)
def load_engine(model: str, policy: Policy, workload: tuple[int, int], device: str, dtype: str,
                budget: Mapping[str, Any]) -> Any:
    """Load the weights into their tiers and allocate cache and activation homes for `workload`."""
    import time

    import torch

    from flexgen_core.runtime.engine import Engine

    start = time.perf_counter()
    engine = Engine.from_pretrained(model, policy=policy, dtype=getattr(torch, dtype),
                                    **{**budget, "device": device})
    try:
        engine.reserve(*workload)
    except BaseException:
        engine.close()
        raise
    get_run_logger().info(f"engine loaded in {time.perf_counter() - start:.1f} s: {policy.describe()} on {device}")
    return engine


@task(name="generate-chunk", task_run_name="{label}", cache_policy=NO_CACHE, persist_result=False)
def generate_chunk(engine: Any, chunk: Chunk, store: RunStore, label: str) -> ChunkReport:
    """Generate (or score) one chunk and append its results to the run store in one transaction."""
    import torch

    from flexgen_core.evaluation.runner import run_chunk

    try:
        return run_chunk(engine, chunk, store)
    except torch.cuda.OutOfMemoryError as exc:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise ChunkOutOfMemory(f"{label} of {chunk.run_name}: {exc}") from exc


@task(name="generate-pipelined", task_run_name="pipeline-{job.nproc}-stages", cache_policy=NO_CACHE,
      persist_result=False)
def generate_pipelined(job: PipelineJob, run_dirs: Sequence[Path],
                       on_chunk: Callable[[Mapping[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run every pending chunk on `job.nproc` pipeline ranks and wait for them (never retried: rerun to resume).

    `on_chunk` gets each chunk's metadata as rank 0 commits it. A failed or dead rank raises PipelineRunError
    naming it. Returns the ranks' plan: each stage's slice and policy, micro-batches, chunk size.
    """
    import time

    from flexgen_core.evaluation.pipeline_worker import run_pipeline

    log = get_run_logger()
    log.info(f"starting {job.nproc} pipeline ranks (torchrun) on {job.device}")
    start = time.perf_counter()
    plan = run_pipeline(job, run_dirs, on_chunk)
    log.info(f"{plan['requests']} requests in {plan['chunks']} chunks on {job.nproc} stages "
             f"({plan['micro_batches']} micro-batches in flight) in {time.perf_counter() - start:.1f} s")
    for st in plan["stages"]:
        log.info(f"stage {st['stage']}: {st['slice']}; policy {Policy.from_dict(st['policy']).describe()}")
    return plan


def close_engine(engine: Any) -> None:
    """Free every tier and remove the offload files (idempotent)."""
    if engine is not None:
        engine.close()
