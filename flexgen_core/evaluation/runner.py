"""The evaluation runner: run entry -> adapted requests -> chunks of one engine block -> durable results -> outputs.

Each function is a plain library function; the Prefect flows wrap them as thin tasks:

    identity = RunIdentity.for_model(model, "float32", policy)           # no weights loaded
    runs = [prepare_run(e, model=model, identity=identity) for e in entries]
    prompt_len, gen_len = workload_of(runs)                              # what the policy plans for
    stores = {run.run_dir: RunStore(run.run_dir) for run in runs}       # one writer per run directory
    for chunk in pending_chunks(runs, stores, policy.block_size):
        run_chunk(engine, chunk, stores[chunk.run_dir])                  # ONE store transaction per chunk
    summaries = [finalize_run(run, stores[run.run_dir]) for run in runs]

Keys: a request's key hashes the model name, weights revision, dtype and compression (`RunIdentity`), the
prompt token ids (BOS first) and its generation settings (max_new_tokens, temperature, top_p, stop
sequences and stop ids, HELM's `random`), never batch size or placement: a rerun under another policy
reuses every stored result, and a key is generated once whatever the chunking.
Chunking: the pending (not yet stored) requests of one run are grouped by the settings one
`engine.generate` call takes, sorted longest first and cut into chunks of one engine block
(`store.plan_chunks`). Deterministic, so an interrupted run resumes with exactly the chunks it had not
finished. Resume = rerun `prepare_run` + `pending_chunks`: only keys missing from the store come back.
Scoring reads run_spec.json, run_manifest.json (the adapted requests and their keys) and the store only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexgen_core.evaluation.adapters import adapt
from flexgen_core.evaluation.execution import (
    GENERATE,
    RESULT_FORMAT,
    SCORE,
    Chunk,
    ChunkReport,
    PendingRequest,
    RunIdentity,
    run_chunk,
)
from flexgen_core.evaluation.outputs import (
    EFFICIENCY_FILE,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    PER_INSTANCE_STATS_FILE,
    POLICY_FILE,
    RUN_SPEC_FILE,
    SCENARIO_FILE,
    SCENARIO_STATE_FILE,
    STATS_FILE,
    read_json,
    suite_dir,
    write_json_atomic,
)
from flexgen_core.evaluation.prompt import ContextWindow
from flexgen_core.evaluation.requests import scoring_token_ids, stop_token_ids
from flexgen_core.evaluation.run_spec import construct_run_spec, parse_run_entry
from flexgen_core.evaluation.scenarios import create_scenario, downsample_eval_instances, with_instance_ids
from flexgen_core.evaluation.schema import (
    ADAPT_MULTIPLE_CHOICE_SEPARATE_ORIGINAL,
    EVAL_SPLITS,
    AdapterSpec,
    Instance,
    RunSpec,
    ScenarioState,
)
from flexgen_core.evaluation.scoring import attach_results, compute_stats
from flexgen_core.evaluation.stats import stats_to_json
from flexgen_core.evaluation.store import RunStore, plan_chunks, request_key
from flexgen_core.evaluation.summary import efficiency_record, policy_summary, run_summary
from flexgen_core.evaluation.tokenizer import HFTokenizer, Vocabulary

__all__ = ["Chunk", "ChunkReport", "PendingRequest", "PreparedRun", "RunDirConflictError", "RunIdentity",
           "finalize_run", "pending_chunks", "prepare_run", "run_chunk", "score_run_dir", "workload_of"]


class RunDirConflictError(ValueError):
    """The run directory holds results of a run that differs in a way that changes results."""


@dataclass
class PreparedRun:
    """One run entry, adapted: its spec, directory, scenario metadata, instances and requests (no results)."""

    run_spec: RunSpec
    run_dir: Path
    scenario: dict[str, Any]
    instances: list[Instance]
    scenario_state: ScenarioState
    requests: list[PendingRequest]
    identity: RunIdentity
    tokenizer: Vocabulary = field(repr=False)


# ---- preparing ------------------------------------------------------------------------------------------------

def prepare_run(entry: str, *, model: str | Path, suite: str = "default",
                output_path: Path = Path("benchmark_output"), max_eval_instances: int | None = None,
                identity: RunIdentity, tokenizer: Vocabulary | None = None, record: bool = True) -> PreparedRun:
    """Build the run spec, instances and requests of `entry` for `model` and record them in the run directory.

    Writes run_spec.json and run_manifest.json (atomically; `record=False` writes nothing: the ranks of a
    pipelined evaluation rebuild the run their parent recorded). Refuses (RunDirConflictError) a run directory
    whose recorded run differs in scenario, adapter spec (other than max_eval_instances) or identity.
    `tokenizer` defaults to the model directory's tokenizer.json.
    """
    from flexgen_core.runtime import checkpoint as ckpt_io

    parsed = parse_run_entry(entry)
    named = dict(parsed.args).get("model")
    if named is not None and named != identity.model:
        raise ValueError(f"run entry {entry!r} names model={named} but the model evaluated is {identity.model}; "
                         f"drop model= from the entry (the run name records the model actually run)")
    run_spec = construct_run_spec(parsed, model=identity.model, max_eval_instances=max_eval_instances)
    ckpt = ckpt_io.resolve(model)
    if (ckpt.name, ckpt.revision) != (identity.model, identity.revision):
        raise ValueError(f"identity is for {identity.model}@{identity.revision} but {model} is "
                         f"{ckpt.name}@{ckpt.revision}; build it with RunIdentity.for_model({str(model)!r}, ...)")
    if tokenizer is None:
        if ckpt.directory is None:
            raise ValueError(f"model {model} has no directory to read tokenizer.json from; pass tokenizer=")
        tokenizer = HFTokenizer(ckpt.directory)
    run_dir = suite_dir(output_path, suite) / run_spec.name
    _check_run_dir(run_dir, run_spec, identity)
    spec = run_spec.adapter_spec
    scenario = create_scenario(run_spec.scenario_spec)
    instances = with_instance_ids(scenario.get_instances(Path(output_path) / "scenarios" / scenario.name))
    instances = downsample_eval_instances(instances, spec.max_eval_instances, spec.eval_splits or EVAL_SPLITS)
    window = ContextWindow(tokenizer, ckpt.spec.max_positions, reserved_tokens=1)  # + the BOS we prepend
    state = adapt(instances, spec, window)
    requests = _pending_requests(state, tokenizer, identity, ckpt.spec.bos_token_id, ckpt.spec.eos_token_id,
                                 ckpt.spec.max_positions)
    run = PreparedRun(run_spec, run_dir, scenario.metadata(), instances, state, requests, identity, tokenizer)
    if record:
        write_json_atomic(run_dir / MANIFEST_FILE, _manifest(run, suite, model), compact=True)
        write_json_atomic(run_dir / RUN_SPEC_FILE, run_spec.to_dict())
    return run


def _pending_requests(state: ScenarioState, tok: Vocabulary, identity: RunIdentity, bos: int, eos: int,
                      max_positions: int) -> list[PendingRequest]:
    spec = state.adapter_spec
    _check_adapter_spec(spec)
    stops: dict[tuple[str, ...], tuple[int, ...]] = {}
    out = []
    for i, rs in enumerate(state.request_states):
        req = rs.request
        if spec.method == ADAPT_MULTIPLE_CHOICE_SEPARATE_ORIGINAL:
            context, continuation = scoring_token_ids(tok, rs)
            context = [bos, *context]
            excess = len(context) + len(continuation) - max_positions
            if excess > 0:  # the split encoding can be a token longer than the whole one the adapter fitted
                context = [bos, *context[1 + excess:]]
            settings: dict[str, Any] = {"mode": SCORE, "continuation": continuation}
            pending = PendingRequest("", SCORE, tuple(context), 0, 0.0, 1.0, (), (), i, tuple(continuation))
        else:
            if req.num_completions != 1:
                raise ValueError(f"num_outputs={req.num_completions}: the runner generates one completion per "
                                 "request; use num_outputs=1")
            if req.stop_sequences not in stops:
                stops[req.stop_sequences] = tuple(sorted({*stop_token_ids(tok, req.stop_sequences), eos}))
            ids = (bos, *tok.encode(req.prompt))
            settings = {"mode": GENERATE, "max_new_tokens": req.max_tokens, "temperature": req.temperature,
                        "top_p": req.top_p, "stop_sequences": list(req.stop_sequences),
                        "stop_token_ids": list(stops[req.stop_sequences]), "num_completions": 1,
                        "random": req.random}
            pending = PendingRequest("", GENERATE, ids, req.max_tokens, req.temperature, req.top_p,
                                     stops[req.stop_sequences], req.stop_sequences, i)
        key = request_key({**identity.key_fields(), "prompt": list(pending.token_ids), "generation": settings,
                           "result_format": RESULT_FORMAT})
        seed = int(key[:8], 16) if pending.temperature > 0 else 0
        out.append(dataclasses.replace(pending, key=key, seed=seed))
    return out


def _check_adapter_spec(spec: AdapterSpec) -> None:
    if spec.method != ADAPT_MULTIPLE_CHOICE_SEPARATE_ORIGINAL and spec.max_tokens < 1:
        raise ValueError(f"max_tokens={spec.max_tokens}: a {spec.method} run must generate at least one token")


def _check_run_dir(run_dir: Path, run_spec: RunSpec, identity: RunIdentity) -> None:
    """Refuse a run directory recorded for a run whose results differ: scenario, adapter spec, identity.

    Request keys differ for such runs, so the store alone would stay correct; we refuse anyway because the
    directory is the run's name in HELM's layout: a second experiment there would overwrite the first one's
    outputs under the same name, pool both runs' chunks in efficiency.json and leave dead results in the
    store. max_eval_instances (HELM's seed-0 sample of k instances is a prefix of that of k + n) and the
    metric specs (scoring only) may change: stored results are reused and the run is rescored.
    """
    problems: list[str] = []
    if (run_dir / RUN_SPEC_FILE).is_file():
        old = RunSpec.from_dict(read_json(run_dir / RUN_SPEC_FILE))
        if old.scenario_spec != run_spec.scenario_spec:
            problems.append(f"scenario_spec: {old.scenario_spec.to_dict()} -> {run_spec.scenario_spec.to_dict()}")
        before = dataclasses.replace(old.adapter_spec, max_eval_instances=None)
        after = dataclasses.replace(run_spec.adapter_spec, max_eval_instances=None)
        problems += [f"adapter_spec.{f.name}: {getattr(before, f.name)!r} -> {getattr(after, f.name)!r}"
                     for f in dataclasses.fields(AdapterSpec) if getattr(before, f.name) != getattr(after, f.name)]
    if (run_dir / MANIFEST_FILE).is_file():
        old_identity = RunIdentity.from_dict(read_json(run_dir / MANIFEST_FILE)["identity"])
        problems += [f"{name}: {getattr(old_identity, name)!r} -> {getattr(identity, name)!r}"
                     for name in identity.to_dict() if getattr(old_identity, name) != getattr(identity, name)]
    if problems:
        raise RunDirConflictError(
            f"run directory {run_dir} holds a run that differs in what changes results ({'; '.join(problems)}). "
            f"Use another --suite or --output-path, or delete {run_dir} to start this run over.")


def _manifest(run: PreparedRun, suite: str, model: str | Path) -> dict[str, Any]:
    return {"format": MANIFEST_FORMAT, "run_name": run.run_spec.name, "suite": suite, "model": str(model),
            "identity": run.identity.to_dict(), "scenario": run.scenario,
            "requests": [{"key": r.key, "mode": r.mode, "num_tokens": r.num_tokens} for r in run.requests],
            "scenario_state": run.scenario_state.to_dict()}


def workload_of(runs: Sequence[PreparedRun]) -> tuple[int, int]:
    """(max prompt tokens, max new tokens) over every request of `runs`: what the policy must plan for."""
    requests = [r for run in runs for r in run.requests]
    if not requests:
        raise ValueError("the runs have no requests (no evaluation instances?)")
    return (max(r.num_tokens for r in requests),
            max((r.max_new_tokens for r in requests if r.mode == GENERATE), default=1))


# ---- chunks ---------------------------------------------------------------------------------------------------

StoreFor = Callable[[PreparedRun], RunStore] | Mapping[Any, RunStore]


def _store_of(store_for: StoreFor, run: PreparedRun) -> RunStore:
    if isinstance(store_for, Mapping):
        for k in (run.run_dir, str(run.run_dir), run.run_spec.name):
            if k in store_for:
                return store_for[k]
        raise KeyError(f"no run store given for {run.run_dir}")
    return store_for(run)


def pending_chunks(runs: Sequence[PreparedRun], store_for: StoreFor, block_size: int) -> list[Chunk]:
    """The requests not yet stored, as chunks of at most `block_size` (run by run; deterministic).

    `store_for` maps a run to its store: a callable, or a mapping keyed by run_dir (or run name).
    """
    chunks: list[Chunk] = []
    for run in runs:
        done = _store_of(store_for, run).completed_keys()
        by_key: dict[str, PendingRequest] = {}
        for r in run.requests:
            if r.key not in done:
                by_key.setdefault(r.key, r)
        planned = plan_chunks(((k, r.num_tokens, r.settings) for k, r in by_key.items()), block_size)
        for keys in planned:
            first = by_key[keys[0]]
            chunks.append(Chunk(run.run_spec.name, run.run_dir, run.identity, first.mode, first.max_new_tokens,
                                first.temperature, first.top_p, tuple(by_key[k] for k in keys), run.tokenizer))
    return chunks


# ---- outputs --------------------------------------------------------------------------------------------------

def finalize_run(run: PreparedRun, store: RunStore, policy_record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score every request from the store (no model) and write the run's HELM files, efficiency.json and
    policy.json (atomically). `policy_record`: the plan, e.g. {"policy": ..., "predicted_tok_s": ...,
    "replans": [...]}. Returns the run's summary (its metrics and throughput)."""
    return _write_outputs(run.run_dir, run.run_spec, run.scenario, run.scenario_state,
                          [r.key for r in run.requests], [r.num_tokens for r in run.requests], store, policy_record)


def score_run_dir(run_dir: Path) -> dict[str, Any]:
    """Rebuild every output of a run directory from run_spec.json, run_manifest.json and the run store,
    without the model (`flexgen score`). The metrics are those of run_spec.json, so editing them rescores."""
    run_dir = Path(run_dir)
    manifest = read_json(run_dir / MANIFEST_FILE)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{run_dir / MANIFEST_FILE} has format {manifest.get('format')}, expected {MANIFEST_FORMAT}")
    run_spec = RunSpec.from_dict(read_json(run_dir / RUN_SPEC_FILE))
    state = ScenarioState.from_dict(manifest["scenario_state"])
    planned = None
    if (run_dir / POLICY_FILE).is_file():
        planned = read_json(run_dir / POLICY_FILE).get("planned")
    with RunStore(run_dir, readonly=True) as store:
        return _write_outputs(run_dir, run_spec, manifest["scenario"], state,
                              [r["key"] for r in manifest["requests"]],
                              [r["num_tokens"] for r in manifest["requests"]], store, planned)


def _write_outputs(run_dir: Path, run_spec: RunSpec, scenario: dict[str, Any], state: ScenarioState,
                   keys: list[str], num_tokens: list[int], store: RunStore,
                   planned: Mapping[str, Any] | None) -> dict[str, Any]:
    full = attach_results(state, keys, store.completed_keys(), store.get, str(store.db_path))
    per_instance, stats = compute_stats(run_spec, full, num_tokens)
    chunks = store.chunks()
    efficiency = efficiency_record(chunks)
    write_json_atomic(run_dir / RUN_SPEC_FILE, run_spec.to_dict())
    write_json_atomic(run_dir / SCENARIO_FILE, scenario)
    write_json_atomic(run_dir / SCENARIO_STATE_FILE, full.to_dict(), compact=True)
    write_json_atomic(run_dir / PER_INSTANCE_STATS_FILE, [p.to_dict() for p in per_instance], compact=True)
    write_json_atomic(run_dir / EFFICIENCY_FILE, efficiency)
    write_json_atomic(run_dir / POLICY_FILE, policy_summary(chunks, planned, efficiency))
    write_json_atomic(run_dir / STATS_FILE, stats_to_json(stats))  # last: the five files now describe one run
    return run_summary(run_spec, scenario, stats, efficiency)
