"""Pipelined evaluation: the generation step of an evaluation run by N pipeline ranks (one process per stage).

The parent (the `evaluate` flow's generation task, or any caller of `run_pipeline`) records the runs, writes a
`PipelineJob` and starts the ranks with the launcher `flexgen bench --nproc` uses (`flexgen_core.cli.launch_ranks`:
torchrun --standalone --nproc-per-node N), each running `flexgen eval-worker JOB_DIR` (`run_rank`). Every rank:

    prepare_run(..., record=False) for every entry          same runs, requests and keys on every rank
    PipelineEngine.from_pretrained(...); reserve(workload)  its stage; AutoPolicy: each stage's LP for its slice
    agree: same engine identity and same prepared requests  (a digest all-gathered; else every rank raises)
    rank 0: pending_chunks(runs, stores, chunk size) -> broadcast the chunks' keys to every rank
    for chunk in chunks: call_engine(engine, chunk, ...)    the same calls in the same order, in lockstep
        rank 0 only: store_chunk(...)                       the chunk durable (one transaction) before the next

Rank 0 alone opens the run stores (the writer lock), so the parent releases them while the ranks run and
watches the stores read-only to report progress. A chunk is the pending requests of one run under the same
settings, at most one pipeline flight (block size x micro-batches, capped like the single-process flow so
that a run has several durable chunks); keys never depend on it, so a rerun (whatever its pipeline degree)
skips every stored key. Every rank writes JOB_DIR/rank<R>.json when it ends (its error, if any); the parent
turns a failure into one `PipelineRunError` naming the rank that failed or died. Ranks stop when the parent
process dies or writes JOB_DIR/cancel, so a killed evaluation leaves no rank running (and writing).
Imports neither Prefect nor pydantic.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import select
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexgen_core.evaluation.execution import Chunk, RunIdentity

JOB_FILE, PLAN_FILE, CANCEL_FILE = "job.json", "plan.json", "cancel"
WATCH_PARENT_S = 0.5  # how often a rank checks that its parent process is alive
CANCEL_GRACE_S = 30.0  # how long the parent waits for the ranks after asking them to stop


class PipelineRunError(RuntimeError):
    """The ranks of a pipelined evaluation failed; `failed_ranks` are those that failed first or died."""

    def __init__(self, message: str, failed_ranks: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.failed_ranks = tuple(failed_ranks)


@dataclass(frozen=True)
class PipelineJob:
    """What every rank needs to rebuild the runs and the engine (JSON in JOB_DIR/job.json).

    policy: a Policy dict every stage uses, or None for each stage's LP (`auto`: fixed fields, profile, margin).
    max_chunk: the most requests per chunk (None: one pipeline flight). parent_pid/parent_started: the process
    whose death stops the ranks.
    """

    entries: list[str]
    model: str
    suite: str
    output_path: str
    max_eval_instances: int | None
    identity: dict[str, Any]
    nproc: int
    device: str
    dtype: str
    policy: dict[str, Any] | None = None
    auto: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, Any] = field(default_factory=dict)
    micro_batches: int | None = None
    timeout_s: float = 600.0
    max_chunk: int | None = None
    parent_pid: int | None = None
    parent_started: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PipelineJob:
        return cls(**data)


# ---- the parent: start the ranks, stream their progress, report a failure --------------------------------------

def run_pipeline(job: PipelineJob, run_dirs: Sequence[Path],
                 on_chunk: Callable[[Mapping[str, Any]], None] | None = None, poll_s: float = 0.5) -> dict[str, Any]:
    """Run `job` on `job.nproc` ranks and wait for them; returns what rank 0 planned (JOB_DIR/plan.json).

    The caller must not hold the run stores' writer locks (rank 0 takes them). While the ranks run, every chunk
    committed to a store of `run_dirs` is passed to `on_chunk` (its metadata: num_requests, generated_tokens,
    timings). Raises PipelineRunError naming the rank that failed or died; on any other way out (an error in
    `on_chunk`, KeyboardInterrupt) the ranks are told to stop.
    """
    import psutil

    from flexgen_core.cli import launch_ranks

    me = psutil.Process()
    job = dataclasses.replace(job, parent_pid=me.pid, parent_started=me.create_time())
    job_dir = Path(tempfile.mkdtemp(prefix="flexgen-pipeline-"))
    watcher = _StoreWatcher(run_dirs)
    try:
        (job_dir / JOB_FILE).write_text(json.dumps(job.to_dict()))
        outcome: dict[str, Any] = {}

        def launch() -> None:
            try:
                outcome["rc"] = launch_ranks(job.nproc, ["eval-worker", str(job_dir)])
            except BaseException as exc:  # e.g. no torch.distributed.run: re-raised below
                outcome["error"] = exc

        thread = threading.Thread(target=launch, name="flexgen-pipeline-ranks", daemon=True)
        thread.start()
        try:
            while thread.is_alive():
                thread.join(poll_s)
                for meta in watcher.new_chunks():
                    if on_chunk is not None:
                        on_chunk(meta)
        except BaseException:
            (job_dir / CANCEL_FILE).touch()
            thread.join(CANCEL_GRACE_S)
            raise
        for meta in watcher.new_chunks():
            if on_chunk is not None:
                on_chunk(meta)
        if "error" in outcome:
            raise outcome["error"]
        reports = _read_reports(job_dir, job.nproc)
        if outcome["rc"] != 0 or len(reports) < job.nproc or any(r.get("error") for r in reports.values()):
            message, failed = describe_failure(reports, job.nproc, outcome["rc"])
            raise PipelineRunError(message, failed)
        return json.loads((job_dir / PLAN_FILE).read_text())
    finally:
        watcher.close()
        shutil.rmtree(job_dir, ignore_errors=True)


class _StoreWatcher:
    """New committed chunks of some run stores, read-only (readers take no lock)."""

    def __init__(self, run_dirs: Sequence[Path]) -> None:
        self.run_dirs = [Path(d) for d in run_dirs]
        self.stores: dict[Path, Any] = {}
        self.seen = {d: self._last_id(d) for d in self.run_dirs}

    def _store(self, run_dir: Path) -> Any:
        from flexgen_core.evaluation.store import STORE_FILENAME, RunStore

        if run_dir not in self.stores and (run_dir / STORE_FILENAME).exists():
            self.stores[run_dir] = RunStore(run_dir, readonly=True)
        return self.stores.get(run_dir)

    def _chunks(self, run_dir: Path) -> list[dict[str, Any]]:
        import sqlite3

        store = self._store(run_dir)
        if store is None:
            return []
        try:
            return store.chunks()
        except sqlite3.Error:  # busy mid-commit: the next poll reads it
            return []

    def _last_id(self, run_dir: Path) -> int:
        return max((c["chunk_id"] for c in self._chunks(run_dir)), default=0)

    def new_chunks(self) -> list[dict[str, Any]]:
        found = []
        for d in self.run_dirs:
            for c in self._chunks(d):
                if c["chunk_id"] > self.seen[d]:
                    self.seen[d] = c["chunk_id"]
                    found.append(c["metadata"])
        return found

    def close(self) -> None:
        for store in self.stores.values():
            store.close()
        self.stores = {}


def _read_reports(job_dir: Path, nproc: int) -> dict[int, dict[str, Any]]:
    reports = {}
    for rank in range(nproc):
        path = job_dir / f"rank{rank}.json"
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            reports[rank] = json.loads(path.read_text())
    return reports


def describe_failure(reports: Mapping[int, Mapping[str, Any]], nproc: int, rc: int | None) -> tuple[str, list[int]]:
    """One message for a failed pipelined evaluation and the ranks to blame: those that died without a report
    or failed on their own (not a PipelineError, which reports another rank's failure; not stopped by torchrun)."""
    died = [r for r in range(nproc) if r not in reports]
    own = [r for r, rep in sorted(reports.items()) if rep.get("error") and rep.get("kind") == "error"]
    echoed = [r for r, rep in sorted(reports.items()) if rep.get("error") and rep.get("kind") == "pipeline"]
    stopped = [r for r, rep in sorted(reports.items()) if rep.get("kind") == "stopped"]
    parts = [f"rank {r} died without a report (killed by a signal, or crashed hard: see its output above)"
             for r in died]
    errors = {r: str(reports[r]["error"]) for r in own + echoed}
    if len(errors) == nproc and len(set(errors.values())) == 1:  # e.g. a stage that does not fit, agreed on
        parts.append(f"every rank: {next(iter(errors.values()))}")
    else:
        parts += [f"rank {r} failed: {errors[r]}" for r in own]
        parts += [f"rank {r}: {errors[r]}" for r in echoed]
    if stopped:
        parts.append(f"rank{'s' if len(stopped) > 1 else ''} {', '.join(map(str, stopped))} stopped by torchrun "
                     "after that failure")
    failed = died + own
    if not failed and echoed:  # the ranks agreed on a failure (a PipelineError on every rank names the cause)
        failed = _ranks_named(errors[echoed[0]])
    head = (f"pipelined evaluation failed on rank {', '.join(map(str, failed))}" if failed
            else "pipelined evaluation failed") + f" (torchrun exit code {rc})"
    return head + ": " + "; ".join(parts or ["no rank reported an error"]), failed


BLAME = (r"rank (\d+) (?:is gone|did not answer)", r"stage \d+ \(rank (\d+)", r"failed on rank (\d+)", r"on rank (\d+)")


def _ranks_named(text: str) -> list[int]:
    """The ranks a PipelineError blames: a lost peer, stages that do not fit, the rank a phase failed on."""
    import re

    for pattern in BLAME:
        found = sorted({int(m) for m in re.findall(pattern, text)})
        if found:
            return found
    return []


# ---- a rank ------------------------------------------------------------------------------------------------------

def run_rank(job_dir: Path) -> int:
    """One rank of a pipelined evaluation (under torchrun): see the module doc. Writes JOB_DIR/rank<R>.json."""
    rank = int(os.environ.get("RANK", "0"))
    job = PipelineJob.from_dict(json.loads((job_dir / JOB_FILE).read_text()))
    started = time.perf_counter()
    _watch(job, job_dir, rank)
    try:
        report: dict[str, Any] = {"chunks": _run(job, job_dir, rank), "error": None, "kind": "done"}
        code = 0
    except KeyboardInterrupt:
        report, code = {"kind": "stopped", "error": None, "reason": "interrupted"}, 130
    except BaseException as exc:
        from flexgen_core.runtime.stage_link import PipelineError

        report = {"kind": "pipeline" if isinstance(exc, PipelineError) else "error",
                  "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
        print(f"flexgen eval-worker (rank {rank}): error: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 3
    _write_report(job_dir, rank, {**report, "seconds": time.perf_counter() - started})
    return code


def _write_report(job_dir: Path, rank: int, report: Mapping[str, Any]) -> None:
    """JOB_DIR/rank<R>.json, once: the first report of a rank stands (its error, before a later SIGTERM)."""
    with contextlib.suppress(OSError):
        fd = os.open(job_dir / f"rank{rank}.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump({"rank": rank, **report}, f)


def _watch(job: PipelineJob, job_dir: Path, rank: int) -> None:
    """End this process (after reporting "stopped") on SIGTERM, when the parent is gone or when it asks the
    ranks to stop (JOB_DIR/cancel): a killed evaluation must not leave ranks that keep writing to its stores.

    torchrun stops the other ranks with SIGTERM once one fails; a rank may then be blocked inside a gloo wait,
    where a Python signal handler would not run, so the signal reaches a watcher thread through the wakeup fd.
    """
    import psutil

    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd)
    signal.signal(signal.SIGTERM, lambda *_: None)  # the watcher acts on it

    def parent_alive() -> bool:
        if job.parent_pid is None:
            return True
        try:
            parent = psutil.Process(job.parent_pid)
            same = job.parent_started is None or abs(parent.create_time() - job.parent_started) < 1.0
            return same and parent.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def watch() -> None:
        while True:
            ready, _, _ = select.select([read_fd], [], [], WATCH_PARENT_S)
            if ready and signal.SIGTERM in os.read(read_fd, 512):
                reason = "SIGTERM (torchrun stops the other ranks once one fails)"
            elif not parent_alive():
                reason = "the parent process is gone"
            elif not job_dir.is_dir() or (job_dir / CANCEL_FILE).exists():
                reason = "the parent asked the ranks to stop"
            else:
                continue
            _write_report(job_dir, rank, {"kind": "stopped", "error": None, "reason": reason})
            os._exit(143)  # an open store transaction rolls back; the other ranks see this one gone

    threading.Thread(target=watch, name="flexgen-rank-watch", daemon=True).start()


def _run(job: PipelineJob, job_dir: Path, rank: int) -> int:
    import torch

    from flexgen_core.evaluation.execution import call_engine, check_chunk, store_chunk
    from flexgen_core.evaluation.runner import prepare_run, workload_of
    from flexgen_core.pipeline_plan import AutoPolicy
    from flexgen_core.plan import Workload
    from flexgen_core.policy import Policy
    from flexgen_core.runtime.pipeline import PipelineEngine

    identity = RunIdentity.from_dict(job.identity)
    runs = [prepare_run(e, model=job.model, suite=job.suite, output_path=Path(job.output_path),
                        max_eval_instances=job.max_eval_instances, identity=identity, record=False)
            for e in job.entries]
    workload = workload_of(runs)
    if job.policy is not None:
        policy: Any = Policy.from_dict(job.policy)
    else:
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in (job.auto.get("fixed") or {}).items()}
        policy = AutoPolicy(Workload(*workload), job.auto.get("profile"), fixed, float(job.auto.get("margin", 0.05)))
    engine = PipelineEngine.from_pretrained(job.model, policy=policy, device=job.device,
                                            dtype=getattr(torch, job.dtype), micro_batches=job.micro_batches,
                                            timeout_s=job.timeout_s, **job.budget)
    with engine, contextlib.ExitStack() as stack:
        group = engine.group
        try:
            engine.reserve(*workload)
            _agree(engine, identity, runs)
            chunks, stores, plan = _plan_chunks(engine, runs, job, stack)
            if rank == 0:
                (job_dir / PLAN_FILE).write_text(json.dumps(plan))
            extra = {"pipeline": {key: plan[key] for key in ("stages", "micro_batches", "partition")},
                     "block_size": plan["block_size"]}
            for chunk in chunks:
                check_chunk(engine, chunk)
                out = call_engine(engine, chunk, chunk.requests)
                if rank == 0:
                    store_chunk(engine, chunk, out, stores[chunk.run_dir], extra_metadata=extra)
        except Exception as exc:  # name the cause for the other ranks (their next wait fails at once)
            from flexgen_core.runtime.stage_link import PipelineError

            if not isinstance(exc, PipelineError):
                group.abort(f"on rank {rank} (stage {engine.stage.stage}), {type(exc).__name__}: {exc}")
            raise
    return len(chunks)


def _agree(engine: Any, identity: RunIdentity, runs: Sequence[Any]) -> None:
    """Every rank must hold an engine of the runs' identity and the same requests (same tokens, same keys);
    otherwise every rank raises, naming the ranks that differ."""
    digest = hashlib.sha256()
    for run in runs:
        digest.update(run.run_spec.name.encode())
        for r in run.requests:
            digest.update(json.dumps([r.key, r.token_ids, r.continuation_ids, r.max_new_tokens]).encode())
    engine_identity = RunIdentity.of_engine(engine)
    mine = (digest.hexdigest(), None if engine_identity == identity else str(engine_identity))
    found = engine.group.all_gather_object(mine, "comparing the ranks' prepared requests")
    problems = [f"rank {r} prepared other requests than rank 0" for r, (d, _) in enumerate(found) if d != found[0][0]]
    problems += [f"rank {r}'s engine is {bad}, the runs were prepared for {identity}"
                 for r, (_, bad) in enumerate(found) if bad is not None]
    if problems:
        raise RuntimeError("the ranks disagree: " + "; ".join(problems) + " (nondeterministic preparation, or "
                           "different files on the ranks' machines)")


def _plan_chunks(engine: Any, runs: Sequence[Any], job: PipelineJob, stack: contextlib.ExitStack
                 ) -> tuple[list[Chunk], dict[Path, Any], dict[str, Any]]:
    """Rank 0 opens the stores (writer lock) and cuts the pending requests into chunks; every rank gets the
    chunks' keys and builds the same chunks from its own prepared runs."""
    from flexgen_core.evaluation.runner import pending_chunks
    from flexgen_core.evaluation.store import RunStore

    group = engine.group
    flight = engine.policy.block_size * engine.micro_batches
    size = min(flight, job.max_chunk) if job.max_chunk else flight
    stores: dict[Path, Any] = {}
    keys: Any = None
    if group.rank == 0:
        try:
            stores = {run.run_dir: stack.enter_context(RunStore(run.run_dir)) for run in runs}
            index = {run.run_dir: i for i, run in enumerate(runs)}
            keys = [(index[c.run_dir], c.keys) for c in pending_chunks(runs, stores, size)]
        except Exception as exc:
            keys = f"{type(exc).__name__}: {exc}"
    keys = group.broadcast_object(keys, 0, "sharing the pending chunks")
    if isinstance(keys, str):
        raise RuntimeError(f"rank 0 could not plan the chunks: {keys}")
    chunks = []
    for i, chunk_keys in keys:
        run = runs[i]
        by_key = {r.key: r for r in run.requests}
        first = by_key[chunk_keys[0]]
        chunks.append(Chunk(run.run_spec.name, run.run_dir, run.identity, first.mode, first.max_new_tokens,
                            first.temperature, first.top_p, tuple(by_key[k] for k in chunk_keys), run.tokenizer))
    stages = group.all_gather_object({"stage": engine.stage.stage, "slice": engine.stage.describe(),
                                      "policy": engine.policy.to_dict()}, "collecting the stages' policies")
    plan = {"stages": stages, "micro_batches": engine.micro_batches, "partition": engine.partition.describe(),
            "block_size": flight, "chunk_size": size, "chunks": len(chunks),
            "requests": sum(len(c.requests) for c in chunks)}
    return chunks, stores, plan


# ---- `flexgen eval-worker JOB_DIR` -------------------------------------------------------------------------------

def cmd_eval_worker(args: argparse.Namespace) -> int:
    return run_rank(Path(args.job_dir))


def register(sub: Any) -> None:
    """Add the internal `eval-worker` subcommand (what `run_pipeline` starts on every rank through torchrun)."""
    p = sub.add_parser("eval-worker", help="internal: one rank of a pipelined evaluation (`flexgen eval --nproc N` "
                                           "starts it through torchrun)")
    p.add_argument("job_dir", metavar="JOB_DIR", help="directory holding job.json (written by run_pipeline)")
    p.set_defaults(func=cmd_eval_worker)
