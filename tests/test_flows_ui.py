"""The deployments end to end (`scripts/prefect_ui_demo.py`): local server, process pool, `prefect deploy --all`,
two workers, a deployment run whose Artifacts tab headless Chromium renders, a fan-out whose two children run
on different workers, and a run SIGKILLed mid-run then retried as the UI's Retry button does. Skipped when
Chromium is absent; slow (about 80 s)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "prefect_ui_demo.py"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not any(shutil.which(c) for c in ("chromium", "chromium-browser", "google-chrome")),
    reason="headless Chromium is not installed (apt-get install -y chromium)")]


def test_deployment_runs_render_fan_out_over_two_workers_and_retry_after_a_crash(eval_model: Path,
                                                                                 tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    cmd = [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--model", str(eval_model), "--profile", "cpu-2core",
           "--engine", json.dumps({"gpu_batch_size": 2}), "--max-eval-instances", "4",
           "--home", str(tmp_path / "prefect-home")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["deployments"]) == {"evaluate/local", "plan/local", "profile/local", "benchmark/local"}
    assert report["deployments"]["evaluate/local"] == [{"cron": "0 2 * * *", "active": False}]
    run = report["deployment_run"]
    assert run["state"] == "Completed" and run["worker"] in ("worker-0", "worker-1")
    assert run["artifacts"] == {"default-progress": "progress", "default-scores": "table",
                                "default-efficiency": "markdown"}
    shot = report["screenshot"]
    assert all(shot["shows"].values()) and not shot["server_unreachable"]
    assert Path(shot["path"]).stat().st_size > 20_000
    fan = report["fan_out"]
    assert fan["state"] == "Completed" and len(fan["children"]) == 2
    assert {c["state"] for c in fan["children"].values()} == {"Completed"}
    assert {c["worker"] for c in fan["children"].values()} == {"worker-0", "worker-1"}
    assert all(fan["screenshot"]["shows"].values())
    retry = report["crash_retry"]
    assert retry["killed_pids"] and retry["state_after_kill"] == "Crashed" and retry["chunks_before_kill"] >= 2
    assert retry["state_after_retry"] == "Completed" and retry["run_count"] == 2  # the same flow run, rerun
    assert retry["stored"] == retry["requests"] and retry["write_counts"] == [1]  # nothing lost or redone
