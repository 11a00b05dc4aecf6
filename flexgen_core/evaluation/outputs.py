"""Run directory layout and atomic writers for HELM's output files (see `reference/helm.md` §3.1).

    benchmark_output/runs/<suite>/<run_name>/
        run_spec.json scenario.json scenario_state.json per_instance_stats.json stats.json   HELM's five
        efficiency.json policy.json                                                          ours
        run_manifest.json   the adapted requests and their keys (so scoring needs no model)
        run_store.sqlite    the request results (see `store.py`)
    benchmark_output/runs/<suite>/summary.csv

Every file is written to a temporary file in the same directory, fsynced, then `os.replace`d over the
target, so a reader sees the old file or the new one, never a torn one. JSON is HELM's: indent 2, None
fields left out by the records' `to_dict()`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RUN_SPEC_FILE = "run_spec.json"
SCENARIO_FILE = "scenario.json"
SCENARIO_STATE_FILE = "scenario_state.json"
PER_INSTANCE_STATS_FILE = "per_instance_stats.json"
STATS_FILE = "stats.json"
EFFICIENCY_FILE = "efficiency.json"
POLICY_FILE = "policy.json"
MANIFEST_FILE = "run_manifest.json"
SUMMARY_FILE = "summary.csv"
HELM_RUN_FILES = (RUN_SPEC_FILE, SCENARIO_FILE, SCENARIO_STATE_FILE, PER_INSTANCE_STATS_FILE, STATS_FILE)
MANIFEST_FORMAT = 1


def suite_dir(output_path: str | os.PathLike[str], suite: str) -> Path:
    """`<output_path>/runs/<suite>`; a suite name must be one path component."""
    if not suite or "/" in suite or suite in (".", ".."):
        raise ValueError(f"suite {suite!r} must be a plain name (no '/'), e.g. 'default'")
    return Path(output_path) / "runs" / suite


def run_dirs(output_path: str | os.PathLike[str], suite: str) -> list[Path]:
    """Run directories of a suite that hold a run_spec.json, sorted by name."""
    root = suite_dir(output_path, suite)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / RUN_SPEC_FILE).is_file())


def is_complete(run_dir: str | os.PathLike[str]) -> bool:
    """HELM's `--skip-completed-runs` test: all five HELM files exist."""
    return all((Path(run_dir) / name).is_file() for name in HELM_RUN_FILES)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` to `path` atomically (temp file + fsync + os.replace + directory fsync)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def dumps(obj: Any, compact: bool = False) -> str:
    """HELM's JSON text: indent 2, ASCII, no NaN (a NaN is a bug upstream, not a value to write). `compact`
    (one line, no indent) is for the per-instance bulk files: Python's JSON encoder is about 10x faster
    without indentation, which is seconds per thousand instances."""
    if compact:
        return json.dumps(obj, allow_nan=False, separators=(",", ":")) + "\n"
    return json.dumps(obj, indent=2, allow_nan=False) + "\n"


def write_json_atomic(path: str | os.PathLike[str], obj: Any, compact: bool = False) -> Path:
    return write_text_atomic(path, dumps(obj, compact))


def read_json(path: str | os.PathLike[str]) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
