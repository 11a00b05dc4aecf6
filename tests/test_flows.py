"""The Prefect layer: bad input refused before heavy work, task bodies through `.fn()`, and real flow runs
(evaluate, out-of-memory re-plan, resume, plan, profile, benchmark) on a tiny random model under one
session-scoped `prefect_test_harness`."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from flexgen_core.evaluation.outputs import HELM_RUN_FILES, POLICY_FILE, STATS_FILE, read_json
from flexgen_core.evaluation.store import RunStore
from flexgen_core.policy import Policy
from flows.params import EngineParams, EvaluateParams

SR = "synthetic_reasoning:mode=pattern_match"
MCQA = "simple_mcqa"
ENGINE = EngineParams(profile="cpu-2core", gpu_batch_size=2, num_gpu_batches=1)  # the LP places, shape fixed


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _params(model: Path, out: Path, entries: list[str] | None = None, **kw: Any) -> EvaluateParams:
    return EvaluateParams(run_entries=entries or [SR], model=str(model), output_path=str(out), **kw)


def _policy_file(path: Path, policy: Policy) -> Path:
    path.write_text(json.dumps({"policy": policy.to_dict()}))
    return path


# ---- bad input: refused with a clear message before anything heavy -------------------------------------------

@pytest.mark.parametrize(("entries", "extra", "message"), [
    (["no_such_scenario"], {}, "unknown scenario 'no_such_scenario'"),
    (["synthetic_reasoning:mode"], {}, "has no '='"),
    (["synthetic_reasoning:mode=pattern_match,colour=red"], {}, "has no argument 'colour'"),
    ([SR, SR], {}, "are the same run"),
    ([SR], {"metrics": ["exact_matc"]}, "unknown metric 'exact_matc'"),
    ([SR], {"model": "/nonexistent/model-dir"}, "model path /nonexistent/model-dir does not exist"),
    ([SR], {"suite": "a/b"}, "must be a plain name"),
])
def test_evaluate_params_refuse_bad_input(eval_model: Path, tmp_path: Path, entries: list[str],
                                          extra: dict[str, Any], message: str) -> None:
    kw = {"model": str(eval_model), "output_path": str(tmp_path), **extra}
    with pytest.raises(ValidationError, match=message):
        EvaluateParams(run_entries=entries, **kw)


def test_unwritable_output_path_is_refused(eval_model: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValidationError, match="is a file, not a directory"):
        _params(eval_model, blocker / "out")
    import os

    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValidationError, match="is not writable"):
            _params(eval_model, locked / "out")


def test_engine_params_refuse_bad_profile_and_policy_files(tmp_path: Path) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: [unclosed\n")
    with pytest.raises(ValidationError, match="is not valid YAML"):
        EngineParams(profile=str(bad_yaml))
    with pytest.raises(ValidationError, match="not found"):
        EngineParams(profile="no-such-profile")
    bad_json = tmp_path / "policy.json"
    bad_json.write_text("{not json")
    with pytest.raises(ValidationError, match="is not valid JSON"):
        EngineParams(policy=str(bad_json))
    with pytest.raises(ValidationError, match="neither 'auto' nor an existing policy JSON file"):
        EngineParams(policy=str(tmp_path / "missing.json"))
    with pytest.raises(ValidationError, match="sums to"):
        EngineParams(weights=(0.5, 0.6, 0.0))


def test_cli_reports_bad_input_as_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flexgen_core.cli import main

    assert main(["eval", "no_such_scenario", "--output-path", str(tmp_path), "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flexgen eval: error: run_entries: ") and "unknown scenario 'no_such_scenario'" in err
    assert "model: model directory" in err and "no config.json" in err and "pydantic.dev" not in err


def test_flow_defaults_do_not_touch_the_filesystem_at_import() -> None:
    from flows.benchmark import benchmark
    from flows.evaluate import evaluate
    from flows.plan import plan
    from flows.profile import profile

    assert {f.name for f in (benchmark, evaluate, plan, profile)} == {"benchmark", "evaluate", "plan", "profile"}
    assert "description" in json.dumps(evaluate.parameters.model_dump())  # the UI form has field descriptions


def _top_level_imports(path: Path) -> set[str]:
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_imports_go_one_way_flows_tasks_core() -> None:
    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "flexgen_core").rglob("*.py")):
        assert not _top_level_imports(path) & {"prefect", "pydantic", "flows", "tasks"}, path
    for path in sorted((root / "tasks").rglob("*.py")):
        assert "flows" not in _top_level_imports(path), path
    assert not _top_level_imports(root / "flows" / "params.py") & {"torch", "prefect"}


# ---- task bodies (no Prefect engine) ----------------------------------------------------------------------------

def test_replan_halves_the_gpu_batch_and_records_it() -> None:
    from prefect.logging import disable_run_logger

    from tasks.planning import PlannedPolicy, replan_smaller_batch

    planned = PlannedPolicy(Policy(gpu_batch_size=4, num_gpu_batches=2), "file", 10.0)
    with disable_run_logger():
        again = replan_smaller_batch.fn(planned, "CUDA out of memory", "chunk-3", "unused", (8, 4), None, "cpu",
                                        "float32", {}, 0.05)
        assert again.policy.gpu_batch_size == 2 and again.policy.num_gpu_batches == 2
        (entry,) = again.record()["replans"]
        assert entry["at"] == "chunk-3" and entry["from"]["gpu_batch_size"] == 4 and entry["to"]["gpu_batch_size"] == 2
        smallest = PlannedPolicy(Policy(gpu_batch_size=1), "file")
        with pytest.raises(RuntimeError, match="gpu_batch_size 1"):
            replan_smaller_batch.fn(smallest, "oom", "chunk-1", "unused", (8, 4), None, "cpu", "float32", {}, 0.05)


def test_dataset_reads_retry_only_transient_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    from flexgen_core.evaluation.scenarios.hub import HubUnavailableError
    from tasks.preparation import transient_io

    def retries(exc: BaseException) -> bool:
        return transient_io(None, None, SimpleNamespace(data=exc))

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert retries(ConnectionResetError("reset")) and retries(TimeoutError("slow disk"))
    assert not retries(FileNotFoundError("x.jsonl")) and not retries(ValueError("malformed row"))
    assert not retries(HubUnavailableError("offline"))


def test_with_metrics_replaces_the_reference_metrics() -> None:
    from flexgen_core.evaluation.run_spec import construct_run_spec
    from flexgen_core.evaluation.run_specs import metric_names
    from tasks.preparation import with_metrics

    spec = construct_run_spec(SR, model="m")
    assert metric_names(with_metrics(spec, ["f1_score", "exact_match"])) == ["f1_score", "exact_match"]


def test_progress_bar_draws_progress_records() -> None:
    from flows.cli import ProgressBar
    from flows.reporting import PROGRESS_ATTR, format_eta

    out = io.StringIO()
    bar = ProgressBar(out)
    for done in (0, 5, 10):
        record = logging.LogRecord("prefect.flow_runs", logging.INFO, __file__, 1, "msg", None, None)
        setattr(record, PROGRESS_ATTR, {"done": done, "total": 10, "tok_s": 12.5, "eta_s": 65.0 if done else None})
        bar.emit(record)
    text = out.getvalue()
    assert "  0.0%" in text and " 50.0%  5/10 requests  12.5 tok/s  ETA 1m05s" in text and "100.0%" in text
    assert format_eta(3725) == "1h02m"


# ---- real flow runs ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def evaluated(prefect_harness: None, eval_model: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Any, Path]:
    from flows.evaluate import evaluate

    out = tmp_path_factory.mktemp("evaluate") / "benchmark_output"
    state = evaluate(_params(eval_model, out, [SR, MCQA], max_eval_instances=6), ENGINE, return_state=True)
    return state, out


def _run_dirs(out: Path) -> list[Path]:
    return sorted(p for p in (out / "runs" / "default").iterdir() if p.is_dir())


def test_evaluate_writes_helm_outputs_scores_and_policy(evaluated: tuple[Any, Path]) -> None:
    state, out = evaluated
    result = state.result()
    dirs = _run_dirs(out)
    assert len(dirs) == 2 and {d.name for d in dirs} == set(result["runs"])
    for d in dirs:
        assert all((d / name).is_file() for name in HELM_RUN_FILES)
        planned = read_json(d / POLICY_FILE)["planned"]
        assert planned["source"] == "auto" and planned["policy"]["gpu_batch_size"] == 2 and planned["predicted_tok_s"]
        with RunStore(d, readonly=True) as store:
            assert all(store.write_count(k) == 1 for k in store.completed_keys())
    assert {r["run"] for r in result["scores"]} == set(result["runs"])
    assert any(r["metric"] == "exact_match" for r in result["scores"])
    assert (out / "runs" / "default" / "summary.csv").is_file()


def test_evaluate_publishes_progress_scores_and_efficiency_artifacts(evaluated: tuple[Any, Path]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    state, _ = evaluated
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    by_key = {a.key: a for a in arts}
    assert set(by_key) == {"default-progress", "default-scores", "default-efficiency"}
    assert by_key["default-progress"].type == "progress" and float(by_key["default-progress"].data) == 100.0
    assert by_key["default-scores"].type == "table" and "exact_match" in str(by_key["default-scores"].data)
    efficiency = str(by_key["default-efficiency"].data)
    assert "padding efficiency" in efficiency and "output tok/s" in efficiency and "2x1" in efficiency


def test_rerun_regenerates_nothing_and_skip_completed_prepares_nothing(
        evaluated: tuple[Any, Path], eval_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flexgen_core.evaluation.runner as runner
    from flexgen_core.runtime.engine import Engine
    from flows.evaluate import evaluate

    _, out = evaluated
    before = {d.name: (d / STATS_FILE).read_text() for d in _run_dirs(out)}

    def refuse(*_a: Any, **_k: Any) -> None:
        raise AssertionError("nothing is pending: the engine must not be loaded")

    monkeypatch.setattr(Engine, "from_pretrained", classmethod(refuse))
    result = evaluate(_params(eval_model, out, [SR, MCQA], max_eval_instances=6), ENGINE)
    assert {d.name: (d / STATS_FILE).read_text() for d in _run_dirs(out)} == before
    assert len(result["scores"]) > 0
    monkeypatch.setattr(runner, "prepare_run", refuse)
    again = evaluate(_params(eval_model, out, [SR, MCQA], max_eval_instances=6, skip_completed_runs=True), ENGINE)
    assert again["scores"] == result["scores"]


def test_run_names_and_skip_completed_task_bodies(evaluated: tuple[Any, Path], eval_model: Path) -> None:
    from prefect.logging import disable_run_logger

    from tasks.preparation import run_names, skip_completed

    _, out = evaluated
    names = run_names.fn([SR, MCQA, "simple_copy"], eval_model.name, 6)
    assert set(names[:2]) == {d.name for d in _run_dirs(out)} and names[2].startswith("simple_copy")
    with disable_run_logger():
        assert skip_completed.fn([SR, MCQA, "simple_copy"], names, str(out), "default") == ["simple_copy"]


def test_out_of_memory_replans_with_half_the_gpu_batch(prefect_harness: None, eval_model: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import flexgen_core.evaluation.runner as runner
    from flexgen_core.runtime.engine import Engine
    from flows.evaluate import evaluate

    real_chunk, real_load = runner.run_chunk, Engine.from_pretrained
    loads: list[int] = []

    def oom_at_four(engine: Any, chunk: Any, store: Any) -> Any:
        if engine.policy.gpu_batch_size == 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real_chunk(engine, chunk, store)

    def counting_load(cls: type, model: Any, **kw: Any) -> Any:
        loads.append(kw["policy"].gpu_batch_size)
        return real_load(model, **kw)

    monkeypatch.setattr(runner, "run_chunk", oom_at_four)
    monkeypatch.setattr(Engine, "from_pretrained", classmethod(counting_load))
    policy = _policy_file(tmp_path / "policy.json", Policy(gpu_batch_size=4, cache=(0, 1, 0)))
    out = tmp_path / "out"
    evaluate(_params(eval_model, out, max_eval_instances=6), EngineParams(policy=str(policy)))
    assert loads == [4, 2]  # loaded once per policy, never per chunk
    (run_dir,) = _run_dirs(out)
    record = read_json(run_dir / POLICY_FILE)
    (replan,) = record["replans"]
    assert replan["from"]["gpu_batch_size"] == 4 and replan["to"]["gpu_batch_size"] == 2
    assert "out of memory" in replan["reason"] and replan["to"]["cache"] == [0.0, 1.0, 0.0]
    assert [p["policy"]["gpu_batch_size"] for p in record["policies"]] == [2]
    with RunStore(run_dir, readonly=True) as store:
        assert len(store) == 6 and all(store.write_count(k) == 1 for k in store.completed_keys())


def test_policy_that_does_not_fit_is_refused_before_loading(prefect_harness: None, eval_model: Path,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flexgen_core.plan import PlanDoesNotFit
    from flexgen_core.runtime.engine import Engine
    from flows.evaluate import evaluate

    def refuse(*_a: Any, **_k: Any) -> None:
        raise AssertionError("a plan that does not fit must be refused before loading")

    monkeypatch.setattr(Engine, "from_pretrained", classmethod(refuse))
    policy = _policy_file(tmp_path / "policy.json", Policy(gpu_batch_size=64))
    with pytest.raises(PlanDoesNotFit, match="does not fit in gpu memory"):
        evaluate(_params(eval_model, tmp_path / "out", max_eval_instances=2),
                 EngineParams(policy=str(policy), device="cpu", gpu_mem_gib=0.0005))


def test_plan_flow_writes_a_policy_that_evaluate_reads(prefect_harness: None, tmp_path: Path) -> None:
    from flows.params import PlanParams
    from flows.plan import plan

    out = tmp_path / "policy.json"
    result = plan(PlanParams(model="opt-125m", prompt_len=128, gen_len=8, output=str(out)),
                  EngineParams(profile="t4-paper"))
    assert result["predicted"]["throughput_tok_s"] > 0 and Path(result["path"]) == out
    assert EngineParams(policy=str(out)).given_policy() == Policy.from_dict(result["policy"])


def test_profile_flow_writes_a_profile_that_loads(prefect_harness: None, tmp_path: Path) -> None:
    from flexgen_core.planning.hardware import HardwareProfile
    from flows.params import ProfileParams
    from flows.profile import profile

    result = profile(ProfileParams(name="test-box", device="cpu", quick=True, output=str(tmp_path / "p.yaml")))
    loaded = HardwareProfile.load(result["path"])
    assert loaded.name == "test-box" and loaded.device_type == "cpu" and loaded.disk_read_gbps > 0


def test_benchmark_flow_appends_rows_and_plots(prefect_harness: None, eval_model: Path, tmp_path: Path) -> None:
    import csv

    from flows.benchmark import benchmark
    from flows.params import BenchmarkParams

    params = BenchmarkParams(model=str(eval_model), prompt_len=8, gen_len=4, warmup=0, hf_baseline=True,
                             policies=[EngineParams(policy="auto", profile="cpu-2core", gpu_batch_size=2),
                                       EngineParams(policy="auto", profile="cpu-2core", gpu_batch_size=4)],
                             results_csv=str(tmp_path / "t.csv"), plot=str(tmp_path / "t.png"))
    result = benchmark(params)
    rows = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert [r["system"] for r in rows] == ["flexgen", "flexgen", "hf-transformers"]
    assert all(float(r["generation_tok_s"]) > 0 for r in rows) and rows[0]["predicted_tok_s"]
    assert (tmp_path / "t.png").stat().st_size > 1000 and result["plot"] == str(tmp_path / "t.png")
