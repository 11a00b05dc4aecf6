"""Preparation stage: run identity, completed-run filtering, and run entry -> instances -> requests.

`prepare_entry` reads the scenario's data (procedural, local files or the hub), so it retries transient I/O
errors; a malformed file, a missing one or an offline hub fails at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flexgen_core.evaluation.runner import PreparedRun, RunIdentity


def transient_io(_task: Any, _task_run: Any, state: Any) -> bool:
    """Retry condition: an OSError that a later attempt may not hit (not a missing file or an offline hub)."""
    from flexgen_core.evaluation.scenarios.hub import HubUnavailableError, offline_flag

    exc = state.data
    if not isinstance(exc, OSError) or isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    return not (isinstance(exc, HubUnavailableError) and offline_flag())


@task(name="resolve-device")
def resolve_device(device: str | None, dtype: str | None) -> tuple[str, str]:
    """(device, dtype) with the engine's defaults: cuda when present, float16 on cuda and float32 on cpu."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but CUDA is not available; use device 'cpu'")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return dev, dtype or ("float16" if dev == "cuda" else "float32")


@task(name="run-identity")
def run_identity(model: str, dtype: str, flags: Mapping[str, Any]) -> RunIdentity:
    """Model name, weights revision, dtype and compression: what makes stored results reusable."""
    return RunIdentity.for_model(model, dtype, dict(flags))


@task(name="run-names")
def run_names(entries: Sequence[str], model_name: str, max_eval_instances: int | None) -> list[str]:
    """HELM run names (the run directories' names) of `entries` evaluated on `model_name`."""
    from flexgen_core.evaluation.run_spec import construct_run_spec

    return [construct_run_spec(e, model=model_name, max_eval_instances=max_eval_instances).name for e in entries]


@task(name="skip-completed")
def skip_completed(entries: Sequence[str], names: Sequence[str], output_path: str, suite: str) -> list[str]:
    """The entries whose run directory lacks HELM's five output files (`--skip-completed-runs`)."""
    from flexgen_core.evaluation.outputs import is_complete, suite_dir

    root = suite_dir(output_path, suite)
    todo = [e for e, n in zip(entries, names, strict=True) if not is_complete(root / n)]
    skipped = len(entries) - len(todo)
    if skipped:
        get_run_logger().info(f"skipping {skipped} completed run(s) in {root}")
    return todo


@task(name="prepare", task_run_name="prepare {entry}", cache_policy=NO_CACHE, persist_result=False,
      retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=transient_io)
def prepare_entry(entry: str, model: str, suite: str, output_path: str, max_eval_instances: int | None,
                  identity: RunIdentity, metrics: Sequence[str] | None) -> PreparedRun:
    """Instances, adapted requests and their keys; writes run_spec.json and run_manifest.json."""
    from flexgen_core.evaluation.runner import prepare_run

    run = prepare_run(entry, model=model, suite=suite, output_path=Path(output_path),
                      max_eval_instances=max_eval_instances, identity=identity)
    if metrics:
        run = dataclasses.replace(run, run_spec=with_metrics(run.run_spec, metrics))
    get_run_logger().info(f"{run.run_spec.name}: {len(run.instances)} instances, {len(run.requests)} requests")
    return run


def with_metrics(run_spec: Any, metrics: Sequence[str]) -> Any:
    """The run spec with `metrics` as its reference metrics (HELM's BasicGenerationMetric names)."""
    from flexgen_core.evaluation.run_specs import BASIC_GENERATION_METRIC
    from flexgen_core.evaluation.schema import MetricSpec

    specs = [s for s in run_spec.metric_specs if s.class_name != BASIC_GENERATION_METRIC]
    return dataclasses.replace(run_spec, metric_specs=(MetricSpec(BASIC_GENERATION_METRIC, {"names": list(metrics)}),
                                                       *specs))


def request_counts(runs: Sequence[PreparedRun]) -> int:
    """Distinct requests of `runs` (a key shared by two request states is generated once)."""
    return sum(len({r.key for r in run.requests}) for run in runs)
