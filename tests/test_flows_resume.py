"""Resume for real: `flexgen eval` killed with SIGKILL after some chunks landed, then rerun.

Checks: no request generated twice (the store's append-only `write_count`), nothing lost (every request of
the manifest stored), the final stats.json identical to an uninterrupted run's, and no orphaned process (the
CLI runs in its own process group, which also holds Prefect's temporary server).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import make_eval_model

from flexgen_core.evaluation.outputs import MANIFEST_FILE, STATS_FILE, read_json
from flexgen_core.evaluation.store import STORE_FILENAME, RunStore

SR = "synthetic_reasoning:mode=pattern_match"
INSTANCES = 24  # 12 chunks of 2 requests
KILL_AFTER_CHUNKS = 3


@pytest.fixture(scope="module")
def slower_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wider than the other tests' model so that chunks take long enough to be interrupted."""
    return make_eval_model(tmp_path_factory.mktemp("resume_model") / "tiny-eval", hidden_size=256,
                           word_embed_proj_dim=256, ffn_dim=1024, num_hidden_layers=4, std=0.05)


def _command(model: Path, out: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "flexgen"), "eval", SR, "--model", str(model), "--output-path", str(out),
            "--max-eval-instances", str(INSTANCES), "--profile", "cpu-2core", "--gpu-batch-size", "2",
            "--num-gpu-batches", "1"]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    env.update(PREFECT_HOME=str(home), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _group_alive(pgid: int) -> list[int]:
    alive = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return alive


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _committed_chunks(run_root: Path) -> int:
    stores = list(run_root.glob(f"*/{STORE_FILENAME}"))
    if not stores:
        return 0
    try:
        with RunStore(stores[0].parent, readonly=True) as store:
            return len(store.chunks())
    except (sqlite3.Error, RuntimeError):  # mid-write or schema not created yet
        return 0


@pytest.fixture
def process_groups() -> Iterator[list[int]]:
    """Process groups started by a test; SIGKILLed at teardown whatever happened."""
    groups: list[int] = []
    yield groups
    for pgid in groups:
        _kill_group(pgid)


def test_sigkill_then_rerun_resumes_without_regenerating(slower_model: Path, tmp_path: Path,
                                                         process_groups: list[int], prefect_harness: None) -> None:
    out, env = tmp_path / "benchmark_output", _env(tmp_path / "prefect-home")
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(_command(slower_model, out), env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    process_groups.append(first.pid)
    run_root = out / "runs" / "default"
    deadline = time.monotonic() + 240
    while _committed_chunks(run_root) < KILL_AFTER_CHUNKS:
        assert first.poll() is None, f"flexgen eval exited early: {(tmp_path / 'first.log').read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no chunks landed in time"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    deadline = time.monotonic() + 15
    while _group_alive(first.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(first.pid), "the killed run left processes behind (Prefect's temporary server?)"
    landed = _committed_chunks(run_root)
    assert KILL_AFTER_CHUNKS <= landed < INSTANCES // 2, f"{landed} chunks landed before the kill"

    second = subprocess.Popen(_command(slower_model, out), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    process_groups.append(second.pid)
    stdout, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr[-3000:]
    assert "exact_match" in stdout  # the summary table

    (run_dir,) = [p for p in run_root.iterdir() if p.is_dir()]
    keys = {r["key"] for r in read_json(run_dir / MANIFEST_FILE)["requests"]}
    with RunStore(run_dir, readonly=True) as store:
        assert store.completed_keys() == keys  # nothing lost
        assert all(store.write_count(k) == 1 for k in keys)  # nothing generated twice
        assert len(store.chunks()) == INSTANCES // 2 and store.integrity_check() == "ok"

    import torch

    from flows.evaluate import evaluate
    from flows.params import EngineParams, EvaluateParams

    torch.set_num_threads(1)
    reference = tmp_path / "uninterrupted"
    evaluate(EvaluateParams(run_entries=[SR], model=str(slower_model), output_path=str(reference),
                            max_eval_instances=INSTANCES),
             EngineParams(profile="cpu-2core", gpu_batch_size=2, num_gpu_batches=1))
    uninterrupted = reference / "runs" / "default" / run_dir.name / STATS_FILE
    assert (run_dir / STATS_FILE).read_text() == uninterrupted.read_text()
