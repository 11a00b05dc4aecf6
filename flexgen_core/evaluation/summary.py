"""Run-level records beside HELM's files (efficiency.json, policy.json), the summary `finalize_run` returns, and
the suite's summary table (one row per run and metric, also written as `runs/<suite>/summary.csv`).

Both records are rebuilt from the run store's chunk metadata (what `runner.run_chunk` writes per chunk), so
`flexgen score` reproduces them without the model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from flexgen_core.evaluation.metrics import ChunkEfficiency, efficiency_summary
from flexgen_core.evaluation.outputs import (
    RUN_SPEC_FILE,
    SCENARIO_FILE,
    STATS_FILE,
    SUMMARY_FILE,
    read_json,
    run_dirs,
    suite_dir,
    write_text_atomic,
)
from flexgen_core.evaluation.run_specs import metric_names
from flexgen_core.evaluation.schema import RunSpec
from flexgen_core.evaluation.stats import Stat, stats_from_json

if TYPE_CHECKING:
    import pandas

SUMMARY_COLUMNS = ("run", "scenario", "metric", "split", "mean", "count")
COUNT_METRICS = ("num_instances",)


def _efficiency(metas: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return efficiency_summary([ChunkEfficiency(int(m.get("num_requests", 0)), int(m.get("prompt_tokens", 0)),
                                               int(m.get("padded_prompt_tokens", 0)),
                                               int(m.get("generated_tokens", 0)), float(m.get("prefill_s", 0.0)),
                                               float(m.get("decode_s", 0.0))) for m in metas])


def efficiency_record(chunks: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """efficiency.json from the store's chunks: token counts, tokens/s, padding efficiency, requests per chunk
    (`batch_size`), the policy's block size, prefill/decode seconds, wall seconds, per mode when mixed."""
    metas = [c.get("metadata", {}) for c in chunks]
    out = _efficiency(metas)
    out["wall_s"] = sum(float(m.get("wall_s", 0.0)) for m in metas)
    out["engine_calls"] = sum(int(m.get("engine_calls", 0)) for m in metas)
    out["block_size"] = max((int(m.get("block_size", 0)) for m in metas), default=0)
    peak: dict[str, int] = {}
    for m in metas:
        for tier, n in m.get("peak_bytes", {}).items():
            peak[tier] = max(peak.get(tier, 0), int(n))
    out["peak_bytes"] = peak
    modes = sorted({m.get("mode", "generate") for m in metas})
    if len(modes) > 1:
        out["by_mode"] = {mode: _efficiency([m for m in metas if m.get("mode", "generate") == mode])
                          for mode in modes}
    return out


def policy_summary(chunks: Sequence[Mapping[str, Any]], planned: Mapping[str, Any] | None,
                  efficiency: Mapping[str, Any]) -> dict[str, Any]:
    """policy.json: the plan the caller made (`planned`: e.g. {"policy": ..., "predicted_tok_s": ...,
    "replans": [...]}), the policies the chunks actually ran with (consecutive chunks grouped), and
    measured versus predicted generation throughput (output tokens per second)."""
    used: list[dict[str, Any]] = []
    for c in chunks:
        policy = c.get("metadata", {}).get("policy")
        if used and used[-1]["policy"] == policy:
            used[-1]["last_chunk"] = c["chunk_id"]
            used[-1]["num_chunks"] += 1
        else:
            used.append({"policy": policy, "first_chunk": c["chunk_id"], "last_chunk": c["chunk_id"],
                         "num_chunks": 1})
    measured = float(efficiency.get("output_tokens_per_s", 0.0))
    predicted = planned.get("predicted_tok_s") if planned else None
    return {"planned": dict(planned) if planned else None, "policies": used,
            "replans": list(planned.get("replans", [])) if planned else [],
            "measured_output_tok_s": measured, "predicted_tok_s": predicted,
            "measured_over_predicted": measured / predicted if predicted else None}


def _rows(run_spec: RunSpec, scenario: str, stats: Sequence[Stat], all_stats: bool) -> list[dict[str, Any]]:
    wanted = [*metric_names(run_spec), *COUNT_METRICS]
    chosen = stats if all_stats else sorted((s for s in stats if s.name.name in wanted),
                                            key=lambda s: wanted.index(s.name.name))
    return [{"run": run_spec.name, "scenario": scenario, "metric": s.name.name, "split": s.name.split,
             "mean": s.mean, "count": s.count} for s in chosen]


def run_summary(run_spec: RunSpec, scenario: Mapping[str, Any], stats: Sequence[Stat],
                efficiency: Mapping[str, Any]) -> dict[str, Any]:
    """What `finalize_run` returns: the run's scores (its metrics and instance counts) and throughput."""
    keep = ("num_requests", "tokens_per_s", "output_tokens_per_s", "padding_efficiency", "batch_size",
            "prefill_runtime", "decode_runtime")
    return {"run": run_spec.name, "scenario": scenario.get("name"),
            "metrics": [{k: v for k, v in r.items() if k not in ("run", "scenario")}
                        for r in _rows(run_spec, str(scenario.get("name")), stats, False)],
            "efficiency": {k: efficiency[k] for k in keep if k in efficiency}}


def summary_table(output_path: str | os.PathLike[str], suite: str, *, all_stats: bool = False) -> pandas.DataFrame:
    """One row per (run, metric[, split]) of the suite's finished runs: run, scenario, metric, split, mean, count.

    By default the metrics are each run spec's reference metrics plus num_instances; `all_stats=True` lists
    every stat in stats.json. Also written (atomically) as `<output_path>/runs/<suite>/summary.csv`.
    """
    import pandas

    rows: list[dict[str, Any]] = []
    for run_dir in run_dirs(output_path, suite):
        if not (run_dir / STATS_FILE).is_file():
            continue
        run_spec = RunSpec.from_dict(read_json(run_dir / RUN_SPEC_FILE))
        scenario_file = run_dir / SCENARIO_FILE
        scenario = read_json(scenario_file).get("name", "") if scenario_file.is_file() else ""
        rows += _rows(run_spec, scenario, stats_from_json(read_json(run_dir / STATS_FILE)), all_stats)
    table = pandas.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    root = suite_dir(output_path, suite)
    if root.is_dir():
        write_text_atomic(root / SUMMARY_FILE, table.to_csv(index=False))
    return table
