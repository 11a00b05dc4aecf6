"""Scoring stage: score a run from its store (no model) into HELM's files, and the suite's summary table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flexgen_core.evaluation.runner import PreparedRun
from flexgen_core.evaluation.store import RunStore


@task(name="finalize", task_run_name="finalize {run.run_spec.name}", cache_policy=NO_CACHE, persist_result=False)
def finalize(run: PreparedRun, store: RunStore, policy_record: Mapping[str, Any] | None) -> dict[str, Any]:
    """Write stats.json and the other run files (atomically); returns the run's metrics and throughput."""
    from flexgen_core.evaluation.runner import finalize_run

    summary = finalize_run(run, store, dict(policy_record) if policy_record else None)
    get_run_logger().info(f"{run.run_spec.name}: " + ", ".join(
        f"{m['metric']}={m['mean']:.3f}" for m in summary["metrics"] if m.get("split") == "test"))
    return summary


@task(name="summary-table", cache_policy=NO_CACHE)
def summary_rows(output_path: str, suite: str, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Rows (run, scenario, metric, split, mean, count) of the suite's finished runs, `names` only if given;
    also writes `runs/<suite>/summary.csv`."""
    from flexgen_core.evaluation.summary import summary_table

    table = summary_table(output_path, suite)
    if names is not None:
        table = table[table["run"].isin(list(names))]
    return [{k: (None if v != v else v) for k, v in row.items()} for row in table.to_dict(orient="records")]


@task(name="run-records", cache_policy=NO_CACHE)
def run_records(output_path: str, suite: str, names: Sequence[str]) -> list[dict[str, Any]]:
    """Each finished run's efficiency.json and planned policy (policy.json), for the efficiency artifact."""
    from flexgen_core.evaluation.outputs import EFFICIENCY_FILE, POLICY_FILE, read_json, suite_dir

    records = []
    for name in names:
        run_dir = suite_dir(output_path, suite) / name
        if (run_dir / EFFICIENCY_FILE).is_file():
            policy = read_json(run_dir / POLICY_FILE) if (run_dir / POLICY_FILE).is_file() else {}
            records.append({"run": name, "efficiency": read_json(run_dir / EFFICIENCY_FILE),
                            "planned": policy.get("planned"),
                            "measured_over_predicted": policy.get("measured_over_predicted")})
    return records
