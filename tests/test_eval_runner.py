"""The evaluation runner end to end on a tiny random OPT with a trained byte-level BPE tokenizer (CPU).

prepare -> pending chunks -> run_chunk -> finalize for generation, multiple_choice_joint and
multiple_choice_separate runs; resume after a crash; chunking independence; scoring without the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import make_opt, without_logprobs

from flexgen_core.evaluation.commands import register
from flexgen_core.evaluation.outputs import (
    EFFICIENCY_FILE,
    HELM_RUN_FILES,
    POLICY_FILE,
    RUN_SPEC_FILE,
    SCENARIO_STATE_FILE,
    STATS_FILE,
    SUMMARY_FILE,
    is_complete,
    read_json,
    write_json_atomic,
)
from flexgen_core.evaluation.run_specs import metric_names
from flexgen_core.evaluation.runner import (
    PreparedRun,
    RunDirConflictError,
    RunIdentity,
    finalize_run,
    pending_chunks,
    prepare_run,
    run_chunk,
    score_run_dir,
    workload_of,
)
from flexgen_core.evaluation.schema import RunSpec, ScenarioState
from flexgen_core.evaluation.stats import PerInstanceStats, Stat
from flexgen_core.evaluation.store import RunStore
from flexgen_core.evaluation.summary import summary_table
from flexgen_core.evaluation.tokenizer import HFTokenizer

SR = "synthetic_reasoning:mode=pattern_match"
MCQA = "simple_mcqa"
MAX_EVAL = 5
ALL_OUTPUTS = (*HELM_RUN_FILES, EFFICIENCY_FILE, POLICY_FILE)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny OPT (window 192) + tokenizer.json: byte-level BPE trained on the scenarios' own text."""
    from tokenizers import ByteLevelBPETokenizer

    from flexgen_core.evaluation.scenarios import get_scenario

    corpus = [inst.input.text + " " + inst.references[0].output.text
              for inst in get_scenario("synthetic_reasoning", mode="pattern_match").get_instances()[:300]]
    corpus += [f"Question: Is {n} even or odd?\nA. Even\nB. Odd\nAnswer: B" for n in range(10, 100)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=400, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False)
    d = tmp_path_factory.mktemp("eval_model") / "tiny-eval"
    make_opt(d, vocab_size=bpe.get_vocab_size(), max_position_embeddings=192)
    bpe.save(str(d / "tokenizer.json"))
    return d


@pytest.fixture(scope="module")
def separate_entry(tmp_path_factory: pytest.TempPathFactory) -> str:
    rows = [{"q": f"The color of thing {i} is", "choices": ["red", "green", "blue"], "a": i % 3} for i in range(4)]
    path = tmp_path_factory.mktemp("data") / "colors.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return (f"custom:path={path},input_column=q,output_column=a,choices_column=choices,"
            "method=multiple_choice_separate_original")


def _identity(model_dir: Path) -> RunIdentity:
    return RunIdentity.for_model(model_dir, "float32", {"compress_weights": False})


def _engine(model_dir: Path, block_size: int) -> Any:
    import torch

    from flexgen_core import Engine, Policy

    return Engine.from_pretrained(model_dir, policy=Policy(gpu_batch_size=block_size), device="cpu",
                                  dtype=torch.float32)


def _prepare(model_dir: Path, entries: Sequence[str], out: Path) -> list[PreparedRun]:
    identity = _identity(model_dir)
    return [prepare_run(e, model=model_dir, output_path=out, max_eval_instances=MAX_EVAL, identity=identity)
            for e in entries]


def evaluate(model_dir: Path, entries: Sequence[str], out: Path, block_size: int,
             stop_after: int | None = None) -> list[PreparedRun]:
    """The flow's loop: prepare, plan, run chunks (all, or `stop_after` then "crash"), finalize."""
    runs = _prepare(model_dir, entries, out)
    stores = {run.run_dir: RunStore(run.run_dir) for run in runs}
    engine = _engine(model_dir, block_size)
    try:
        engine.reserve(*workload_of(runs))
        chunks = pending_chunks(runs, stores, engine.policy.block_size)
        for chunk in chunks[:stop_after]:
            report = run_chunk(engine, chunk, stores[chunk.run_dir])
            assert report.chunk_id is not None and report.num_requests == len(chunk.requests)
        if stop_after is None:
            for run in runs:
                finalize_run(run, stores[run.run_dir], {"policy": engine.policy.to_dict(), "predicted_tok_s": 10.0})
    finally:
        engine.close()
        for store in stores.values():
            store.close()
    return runs


@pytest.fixture(scope="module")
def full_run(model_dir: Path, separate_entry: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("full") / "benchmark_output"
    evaluate(model_dir, [SR, MCQA, separate_entry], out, block_size=2)
    return out


def _run_dirs(out: Path) -> list[Path]:
    return sorted(p for p in (out / "runs" / "default").iterdir() if p.is_dir())


def test_end_to_end_outputs_parse_and_hold_the_run_specs_metrics(full_run: Path) -> None:
    dirs = _run_dirs(full_run)
    assert len(dirs) == 3 and all(is_complete(d) for d in dirs)
    methods = set()
    for d in dirs:
        assert all((d / name).is_file() for name in ALL_OUTPUTS)
        run_spec = RunSpec.from_dict(read_json(d / RUN_SPEC_FILE))
        state = ScenarioState.from_dict(read_json(d / SCENARIO_STATE_FILE))
        methods.add(state.adapter_spec.method)
        per_instance = [PerInstanceStats.from_dict(p) for p in read_json(d / "per_instance_stats.json")]
        stats = [Stat.from_dict(s) for s in read_json(d / STATS_FILE)]
        assert read_json(d / "scenario.json")["name"]
        names = {s.name.name for s in stats}
        assert set(metric_names(run_spec)) <= names and "num_instances" in names
        assert {p.instance_id for p in per_instance} == {rs.instance.id for rs in state.request_states}
        for rs in state.request_states:  # real per-token logprobs, never zeros
            (completion,) = rs.result.completions
            assert completion.tokens and all(t.logprob < 0 for t in completion.tokens)
            assert math.isclose(completion.logprob, sum(t.logprob for t in completion.tokens), rel_tol=1e-5)
        eff = read_json(d / EFFICIENCY_FILE)
        with RunStore(d, readonly=True) as store:
            assert eff["num_requests"] == len(store) == len(set(read_json(d / "run_manifest.json")["requests"]
                                                                [i]["key"] for i in range(len(store))))
        assert eff["tokens_per_s"] > 0 and 0 < eff["padding_efficiency"] <= 1 and eff["block_size"] == 2
        policy = read_json(d / POLICY_FILE)
        assert policy["policies"][0]["policy"]["gpu_batch_size"] == 2 and policy["predicted_tok_s"] == 10.0
    assert methods == {"generation", "multiple_choice_joint", "multiple_choice_separate_original"}


def test_generation_texts_are_cut_at_stop_sequences(full_run: Path) -> None:
    (sr,) = [d for d in _run_dirs(full_run) if d.name.startswith("synthetic_reasoning")]
    state = ScenarioState.from_dict(read_json(sr / SCENARIO_STATE_FILE))
    for rs in state.request_states:
        (c,) = rs.result.completions
        assert "\n" not in c.text and len(c.tokens) <= 50
        assert c.finish_reason["reason"] in ("stop", "length", "endoftext")


def test_resume_after_crash_generates_only_the_rest(model_dir: Path, full_run: Path, separate_entry: str,
                                                    tmp_path: Path) -> None:
    out = tmp_path / "benchmark_output"
    entries = [SR, MCQA, separate_entry]
    first = _prepare(model_dir, entries, out)
    with RunStore(first[0].run_dir) as s0, RunStore(first[1].run_dir) as s1, RunStore(first[2].run_dir) as s2:
        everything = pending_chunks(first, {r.run_dir: s for r, s in zip(first, (s0, s1, s2), strict=True)}, 2)
    half = len(everything) // 2
    evaluate(model_dir, entries, out, block_size=2, stop_after=half)  # then every object is dropped
    runs = _prepare(model_dir, entries, out)
    stores = {run.run_dir: RunStore(run.run_dir) for run in runs}
    try:
        rest = pending_chunks(runs, stores, 2)
        assert [c.keys for c in rest] == [c.keys for c in everything[half:]]
    finally:
        for store in stores.values():
            store.close()
    evaluate(model_dir, entries, out, block_size=2)
    for done, ref in zip(_run_dirs(out), _run_dirs(full_run), strict=True):
        for name in (STATS_FILE, SCENARIO_STATE_FILE, "per_instance_stats.json"):
            assert (done / name).read_bytes() == (ref / name).read_bytes(), name
        with RunStore(done, readonly=True) as store:
            assert all(store.write_count(k) == 1 for k in store.completed_keys())
    assert sum(len(c.requests) for c in everything) == sum(len(RunStore(d, readonly=True)) for d in _run_dirs(out))


def test_chunking_does_not_change_results(model_dir: Path, full_run: Path, separate_entry: str,
                                          tmp_path: Path) -> None:
    """Block size 5 vs 2: identical texts, tokens, finish reasons and scores. Logprobs agree to float noise only:
    the engine's matmuls round differently for other batch shapes (an engine change would make them exact)."""
    out = tmp_path / "benchmark_output"
    evaluate(model_dir, [SR, MCQA, separate_entry], out, block_size=5)
    for five, two in zip(_run_dirs(out), _run_dirs(full_run), strict=True):
        assert len(RunStore(five, readonly=True).chunks()) < len(RunStore(two, readonly=True).chunks())
        for name in (SCENARIO_STATE_FILE, STATS_FILE, "per_instance_stats.json"):
            a_floats: list[float] = []
            b_floats: list[float] = []
            a = without_logprobs(read_json(five / name), a_floats)
            b = without_logprobs(read_json(two / name), b_floats)
            assert a == b, name
            assert len(a_floats) == len(b_floats) and all(
                math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-4) for x, y in zip(a_floats, b_floats, strict=True))


def test_score_run_dir_rebuilds_identical_outputs_without_the_model(full_run: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from flexgen_core.runtime import engine as engine_module

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("scoring must not construct an Engine")

    monkeypatch.setattr(engine_module.Engine, "__init__", refuse)
    out = tmp_path / "benchmark_output"
    shutil.copytree(full_run, out)
    for run_dir in _run_dirs(out):
        for name in ALL_OUTPUTS:
            if name not in (RUN_SPEC_FILE, POLICY_FILE):  # policy.json keeps the plan (not in the store)
                (run_dir / name).unlink()
        summary = score_run_dir(run_dir)
        assert summary["run"] == run_dir.name and summary["metrics"]
        for name in ALL_OUTPUTS:
            assert (run_dir / name).read_bytes() == (full_run / "runs" / "default" / run_dir.name / name).read_bytes()


def test_summary_table_and_score_command(full_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = summary_table(full_run, "default")
    assert list(table.columns) == ["run", "scenario", "metric", "split", "mean", "count"]
    expected = {(d.name, m) for d in _run_dirs(full_run)
                for m in [*metric_names(RunSpec.from_dict(read_json(d / RUN_SPEC_FILE))), "num_instances"]}
    assert set(zip(table["run"], table["metric"], strict=True)) == expected  # one row per split of each
    assert not table.duplicated(["run", "metric", "split"]).any()
    assert (full_run / "runs" / "default" / SUMMARY_FILE).is_file()
    everything = summary_table(full_run, "default", all_stats=True)
    assert len(everything) > len(table) and "num_prompt_tokens" in set(everything["metric"])

    out = tmp_path / "benchmark_output"
    shutil.copytree(full_run, out)
    parser = argparse.ArgumentParser(prog="flexgen")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["score", str(out)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "quasi_exact_match" in printed and "simple_mcqa" in printed
    one = _run_dirs(out)[0]
    args = parser.parse_args(["score", str(one)])
    assert args.func(args) == 0
    assert one.name in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no runs to score"):
        parser.parse_args(["score", str(out), "--suite", "nope"]).func(parser.parse_args(["score", str(out),
                                                                                           "--suite", "nope"]))


def test_prepare_refuses_a_run_dir_recorded_for_other_results(model_dir: Path, full_run: Path, tmp_path: Path
                                                              ) -> None:
    out = tmp_path / "benchmark_output"
    shutil.copytree(full_run, out)
    identity = _identity(model_dir)
    with pytest.raises(RunDirConflictError, match="dtype: 'float32' -> 'float16'"):
        prepare_run(MCQA, model=model_dir, output_path=out, identity=dataclasses.replace(identity, dtype="float16"))
    # more instances or other metrics reuse the stored results
    run = prepare_run(MCQA, model=model_dir, output_path=out, max_eval_instances=MAX_EVAL + 2, identity=identity)
    with RunStore(run.run_dir) as store:
        assert len(pending_chunks([run], lambda r: store, 4)[0].requests) == 2
    spec_file = run.run_dir / RUN_SPEC_FILE
    spec = read_json(spec_file)
    spec["adapter_spec"]["max_tokens"] = 7
    write_json_atomic(spec_file, spec)
    with pytest.raises(RunDirConflictError, match="adapter_spec.max_tokens: 7 -> 1"):
        prepare_run(MCQA, model=model_dir, output_path=out, identity=identity)
    with pytest.raises(ValueError, match="names model=other"):
        prepare_run(MCQA + ":model=other", model=model_dir, output_path=out, identity=identity)


def test_engine_identity_and_retried_chunks(model_dir: Path, tmp_path: Path) -> None:
    runs = _prepare(model_dir, [MCQA], tmp_path)
    engine = _engine(model_dir, 4)
    try:
        with RunStore(runs[0].run_dir) as store:
            chunk = pending_chunks(runs, lambda r: store, 4)[0]
            wrong = dataclasses.replace(chunk, identity=dataclasses.replace(chunk.identity, compress_cache=True))
            with pytest.raises(ValueError, match="wrong keys"):
                run_chunk(engine, wrong, store)
            assert run_chunk(engine, chunk, store).chunk_id == 1
            again = run_chunk(engine, chunk, store)  # a retried task after the commit: nothing regenerated
            assert again.chunk_id is None and again.num_skipped == len(chunk.requests)
            assert all(store.write_count(k) == 1 for k in chunk.keys)
    finally:
        engine.close()


def test_sampled_requests_do_not_depend_on_their_chunk(model_dir: Path, tmp_path: Path) -> None:
    (run,) = _prepare(model_dir, [MCQA], tmp_path / "a")
    sampled = [dataclasses.replace(r, temperature=0.9, max_new_tokens=6, seed=1000 + i, key=f"k{i}")
               for i, r in enumerate(run.requests[:3])]
    engine = _engine(model_dir, 4)
    try:
        with RunStore(tmp_path / "s1") as together, RunStore(tmp_path / "s2") as alone:
            base = pending_chunks([run], lambda r: together, 4)[0]
            chunk = dataclasses.replace(base, run_dir=tmp_path / "s1", temperature=0.9, max_new_tokens=6,
                                        requests=tuple(sampled))
            run_chunk(engine, chunk, together)
            run_chunk(engine, dataclasses.replace(chunk, run_dir=tmp_path / "s2", requests=tuple(sampled[2:])), alone)
            assert together.get("k2") == alone.get("k2")
    finally:
        engine.close()


def test_hf_tokenizer_round_trip(model_dir: Path) -> None:
    tok = HFTokenizer(model_dir)
    assert tok.decode(tok.encode("Target: + Z = X")) == "Target: + Z = X" and tok.vocab_size <= 400
