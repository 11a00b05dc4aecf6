"""The `evaluate` flow with pipeline stages: generation on 2 ranks (torchrun, gloo, CPU) gives the outputs of a
single-process evaluation, each chunk lands in the store once, a rerun generates nothing, bad pipeline degrees are
refused before anything starts, and a rank that fails or dies ends the flow with an error naming it."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import without_logprobs
from pydantic import ValidationError

from flexgen_core.evaluation.outputs import (
    PER_INSTANCE_STATS_FILE,
    POLICY_FILE,
    SCENARIO_STATE_FILE,
    STATS_FILE,
    read_json,
)
from flexgen_core.evaluation.store import RunStore
from flexgen_core.policy import Policy
from flows.params import EngineParams, EvaluateParams

SR = "synthetic_reasoning:mode=pattern_match"
MCQA = "simple_mcqa"
SINGLE = EngineParams(profile="cpu-2core", gpu_batch_size=2, num_gpu_batches=1)
PIPELINED = EngineParams(profile="cpu-2core", gpu_batch_size=2, num_gpu_batches=1, pipeline_stages=2)
COMPARED = (SCENARIO_STATE_FILE, STATS_FILE, PER_INSTANCE_STATS_FILE)


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_rank() -> Iterator[None]:
    """One torch thread here and in every rank (torchrun's default too; the box has 2 cores)."""
    import torch

    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(before)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(scope="module")
def entries(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A generation run, a joint multiple-choice run and a separate (scored: `engine.score`) one."""
    rows = [{"q": f"The color of thing {i} is", "choices": ["red", "green", "blue"], "a": i % 3} for i in range(4)]
    path = tmp_path_factory.mktemp("data") / "colors.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [SR, MCQA, f"custom:path={path},input_column=q,output_column=a,choices_column=choices,"
                      "method=multiple_choice_separate_original"]


def _params(model: Path, out: Path, entries: list[str], instances: int = 6) -> EvaluateParams:
    return EvaluateParams(run_entries=entries, model=str(model), output_path=str(out), max_eval_instances=instances)


def _run_dirs(out: Path) -> list[Path]:
    return sorted(p for p in (out / "runs" / "default").iterdir() if p.is_dir())


def assert_same_outputs(out: Path, reference: Path) -> None:
    """Same texts, tokens, finish reasons and scores; log-probs equal up to float noise."""
    dirs, refs = _run_dirs(out), _run_dirs(reference)
    assert [d.name for d in dirs] == [r.name for r in refs]
    for d, ref in zip(dirs, refs, strict=True):
        for name in COMPARED:
            a_floats: list[float] = []
            b_floats: list[float] = []
            a = without_logprobs(read_json(d / name), a_floats)
            b = without_logprobs(read_json(ref / name), b_floats)
            assert a == b, f"{d.name}/{name}"
            assert len(a_floats) == len(b_floats) and all(
                math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-4) for x, y in zip(a_floats, b_floats, strict=True))


def assert_each_request_stored_once(out: Path) -> None:
    for d in _run_dirs(out):
        keys = {r["key"] for r in read_json(d / "run_manifest.json")["requests"]}
        with RunStore(d, readonly=True) as store:
            assert store.completed_keys() == keys
            assert all(store.write_count(k) == 1 for k in keys)


@pytest.fixture(scope="module")
def single(prefect_harness: None, eval_model: Path, entries: list[str], tmp_path_factory: pytest.TempPathFactory
           ) -> Path:
    from flows.evaluate import evaluate

    out = tmp_path_factory.mktemp("single") / "benchmark_output"
    evaluate(_params(eval_model, out, entries), SINGLE)
    return out


# ---- parameters: refused before anything starts ---------------------------------------------------------------

def test_pipeline_degree_is_validated_against_the_model(eval_model: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from flexgen_core.cli import main
    from flows.params import BenchmarkParams, model_layers

    with pytest.raises(ValidationError, match="pipeline_stages"):
        EngineParams(pipeline_stages=0)
    with pytest.raises(ValidationError, match="micro_batches"):
        EngineParams(pipeline_stages=2, micro_batches=0)
    assert model_layers(str(eval_model)) == 2
    EngineParams(pipeline_stages=2).check_pipeline(str(eval_model))
    with pytest.raises(ValueError, match="pipeline_stages=3 but .* has only 2 transformer layers"):
        EngineParams(pipeline_stages=3).check_pipeline(str(eval_model))
    with pytest.raises(ValidationError, match="benchmark flow runs one process"):
        BenchmarkParams(model=str(eval_model), policies=[EngineParams(pipeline_stages=2)],
                        results_csv=str(tmp_path / "t.csv"), plot=str(tmp_path / "t.png"))
    assert main(["eval", SR, "--model", str(eval_model), "--output-path", str(tmp_path), "--nproc", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flexgen eval: error: pipeline_stages=3") and "only 2 transformer layers" in err
    assert main(["eval", SR, "--model", str(eval_model), "--output-path", str(tmp_path), "--nproc", "0"]) == 2
    assert "pipeline_stages: Input should be greater than or equal to 1" in capsys.readouterr().err


def test_failure_report_names_the_rank_that_died_or_failed() -> None:
    from flexgen_core.evaluation.pipeline_worker import describe_failure

    gone = ("PipelineError: pipeline aborted: on rank 0, rank 1 is gone (connection closed; it probably died, see "
            "its log) while waiting for a header from rank 1")
    message, failed = describe_failure({0: {"kind": "pipeline", "error": gone}}, 2, 1)
    assert failed == [1] and message.startswith("pipelined evaluation failed on rank 1 (torchrun exit code 1)")
    assert "rank 1 died without a report" in message and gone in message
    message, failed = describe_failure({0: {"kind": "stopped", "error": None},
                                        1: {"kind": "error", "error": "ValueError: NaN"}}, 2, 1)
    assert failed == [1] and "rank 1 failed: ValueError: NaN" in message and "rank 0 stopped by torchrun" in message
    fit = "StageDoesNotFit: stage 1 (rank 1: blocks 1..1 + head) does not fit in gpu memory"
    message, failed = describe_failure({0: {"kind": "pipeline", "error": fit}, 1: {"kind": "pipeline", "error": fit}},
                                       2, 1)
    assert failed == [1] and f"every rank: {fit}" in message


# ---- two ranks -------------------------------------------------------------------------------------------------

def test_pipelined_evaluate_matches_single_process_and_rerun_generates_nothing(
        prefect_harness: None, eval_model: Path, entries: list[str], single: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    import flexgen_core.evaluation.pipeline_worker as worker
    from flexgen_core.runtime.engine import Engine
    from flows.evaluate import evaluate

    out = tmp_path / "benchmark_output"
    state = evaluate(_params(eval_model, out, entries), PIPELINED, return_state=True)
    result = state.result()
    assert_same_outputs(out, single)
    assert_each_request_stored_once(out)
    for d in _run_dirs(out):
        with RunStore(d, readonly=True) as store:
            metas = [c["metadata"] for c in store.chunks()]
        assert metas and all(m["pipeline"]["micro_batches"] == 2 and len(m["pipeline"]["stages"]) == 2 for m in metas)
        planned = read_json(d / POLICY_FILE)["planned"]
        stages = planned["pipeline"]["stages"]
        assert planned["pipeline"]["num_stages"] == 2 and [s["stage"] for s in stages] == [0, 1]
        assert "embed" in stages[0]["slice"] and "head" in stages[1]["slice"]
        assert all(Policy.from_dict(s["policy"]).gpu_batch_size == 2 for s in stages)  # fixed; the LP placed
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    progress = {a.key: a for a in arts}["default-progress"]
    assert float(progress.data) == 100.0

    before = {d.name: (d / STATS_FILE).read_text() for d in _run_dirs(out)}

    def refuse(*_a: Any, **_k: Any) -> None:
        raise AssertionError("nothing is pending: no rank may start and no engine load")

    monkeypatch.setattr(worker, "run_pipeline", refuse)
    monkeypatch.setattr(Engine, "from_pretrained", classmethod(refuse))
    again = evaluate(_params(eval_model, out, entries), PIPELINED)
    assert {d.name: (d / STATS_FILE).read_text() for d in _run_dirs(out)} == before
    assert again["scores"] == result["scores"]
    assert_each_request_stored_once(out)


def _rank_processes(rank: int) -> list[Any]:
    """This test's `flexgen eval-worker` rank `rank` (a grandchild: torchrun is our child)."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "eval-worker" in proc.cmdline() and proc.environ().get("RANK") == str(rank):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _committed(out: Path) -> int:
    total = 0
    for store_file in (out / "runs" / "default").glob("*/run_store.sqlite"):
        try:
            with RunStore(store_file.parent, readonly=True) as store:
                total += len(store.chunks())
        except Exception:  # mid-write or schema not created yet
            continue
    return total


@pytest.mark.slow
def test_killed_rank_is_named_and_rerun_resumes(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory,
                                                tmp_path: Path) -> None:
    """SIGKILL rank 1 after a chunk landed: the flow fails naming rank 1, within bounded time, leaving no rank
    behind; the rerun generates only the rest, and the outputs equal an uninterrupted single-process run's."""
    from conftest import make_eval_model

    from flexgen_core.evaluation.pipeline_worker import PipelineRunError
    from flows.evaluate import evaluate

    model = make_eval_model(tmp_path_factory.mktemp("slower") / "tiny-eval", hidden_size=256, word_embed_proj_dim=256,
                            ffn_dim=1024, num_hidden_layers=4, std=0.05)
    out, instances = tmp_path / "benchmark_output", 24
    killed: list[int] = []

    def kill_rank_1() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            if _committed(out) >= 1:
                for proc in _rank_processes(1):
                    os.kill(proc.pid, signal.SIGKILL)
                    killed.append(proc.pid)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_rank_1, daemon=True)
    killer.start()
    started = time.monotonic()
    with pytest.raises(PipelineRunError, match="failed on rank 1") as info:
        evaluate(_params(model, out, [SR], instances), PIPELINED)
    assert killed and info.value.failed_ranks == (1,) and "rank 1 died without a report" in str(info.value)
    assert time.monotonic() - started < 200
    assert not _rank_processes(0) and not _rank_processes(1)
    landed = _committed(out)
    assert 1 <= landed < instances // 2, f"{landed} chunks landed before the kill"

    evaluate(_params(model, out, [SR], instances), PIPELINED)
    assert_each_request_stored_once(out)
    reference = tmp_path / "uninterrupted"
    evaluate(_params(model, reference, [SR], instances), SINGLE)
    assert_same_outputs(out, reference)
