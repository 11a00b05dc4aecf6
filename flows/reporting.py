"""What people see of a run: a progress artifact updated per chunk, score and efficiency artifacts, and log
records. Each progress log record carries a `flexgen_progress` attribute (done, total, tok_s, eta_s), which
`flexgen eval` draws as a terminal progress bar.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

PROGRESS_ATTR = "flexgen_progress"
ARTIFACT_MIN_INTERVAL_S = 1.0  # fast chunks (tiny models) update the progress artifact at most once a second


def artifact_key(*parts: str) -> str:
    """An artifact key (lowercase letters, digits and dashes) from free text."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")[:200] or "artifact"


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class ChunkProgress:
    """Requests done out of all requests of the flow run (stored ones count as done), tokens/s, ETA.

    `update` after each chunk logs a progress record and updates the progress artifact (at most once per
    ARTIFACT_MIN_INTERVAL_S, and always when the last request is done). Records go to the logger of the run that
    created it (the flow's, which `flexgen eval` draws as a bar), even when `update` is called inside a task.
    """

    def __init__(self, key: str, total: int, done: int) -> None:
        self.logger = get_run_logger()
        self.total, self.done = total, done
        self.done_here = self.tokens_here = 0
        self.start = self.updated = time.perf_counter()
        self.artifact_id = create_progress_artifact(progress=self.percent, key=key, description=self.text())
        self.emit()

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 100.0

    @property
    def tokens_per_s(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.tokens_here / elapsed if elapsed > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        if not self.done_here:
            return None
        return (self.total - self.done) * (time.perf_counter() - self.start) / self.done_here

    def text(self) -> str:
        return (f"{self.done}/{self.total} requests ({self.percent:.1f}%), {self.tokens_per_s:.1f} generated "
                f"tok/s, ETA {format_eta(self.eta_s)}")

    def update(self, num_requests: int, generated_tokens: int) -> None:
        self.done += num_requests
        self.done_here += num_requests
        self.tokens_here += generated_tokens
        now = time.perf_counter()
        if self.artifact_id is not None and (now - self.updated >= ARTIFACT_MIN_INTERVAL_S or self.done >= self.total):
            update_progress_artifact(self.artifact_id, self.percent, description=self.text())
            self.updated = now
        self.emit()

    def emit(self) -> None:
        data = {"done": self.done, "total": self.total, "tok_s": self.tokens_per_s, "eta_s": self.eta_s}
        self.logger.info(self.text(), extra={PROGRESS_ATTR: data})


def publish_scores(key: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Table artifact: one row per run entry and metric (HELM's per-split means)."""
    table = [{"run": r["run"], "metric": r["metric"], "split": r.get("split") or "",
              "mean": round(float(r["mean"]), 4), "count": r["count"]} for r in rows]
    create_table_artifact(table=table, key=key, description="Scores per run entry and metric")


def _policy_text(planned: Mapping[str, Any] | None) -> str:
    if not planned or not planned.get("policy"):
        return "?"
    p = planned["policy"]

    def frac(name: str) -> str:
        return "/".join(f"{x:g}" for x in p[name])

    return (f"{p['gpu_batch_size']}x{p['num_gpu_batches']} w={frac('weights')} c={frac('cache')} "
            f"a={frac('acts')} ({planned.get('source', '?')})")


def efficiency_markdown(records: Sequence[Mapping[str, Any]], wall_s: float) -> str:
    """Throughput, policy and padding efficiency per run (records of `tasks.scoring.run_records`)."""
    lines = ["# Evaluation efficiency", "", f"Flow wall time {wall_s:.1f} s.", "",
             "| run | requests | output tok/s | predicted tok/s | tokens/s | padding efficiency | policy | re-plans |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in records:
        e, planned = r.get("efficiency", {}), r.get("planned") or {}
        predicted = planned.get("predicted_tok_s")
        lines.append(f"| {r['run']} | {e.get('num_requests', 0)} | {e.get('output_tokens_per_s', 0.0):.2f} | "
                     f"{f'{predicted:.2f}' if predicted else 'n/a'} | {e.get('tokens_per_s', 0.0):.1f} | "
                     f"{e.get('padding_efficiency', 1.0):.3f} | {_policy_text(planned)} | "
                     f"{len(planned.get('replans') or [])} |")
    return "\n".join(lines) + "\n"


def publish_efficiency(key: str, records: Sequence[Mapping[str, Any]], wall_s: float) -> None:
    create_markdown_artifact(markdown=efficiency_markdown(records, wall_s), key=key,
                             description="Throughput, policy and padding efficiency")
