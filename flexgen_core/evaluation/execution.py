"""Running requests on the engine: run identity, pending requests, chunks, and engine outputs -> HELM results.

`run_chunk` refuses an engine whose identity (model, weights revision, dtype, compression) differs from the one
the chunk's keys were computed for, skips requests already stored (so a retried task regenerates nothing), and
appends the chunk's results and metadata in ONE store transaction. Its halves: `call_engine`, the only function
here that computes on the engine (public API: `generate`, `score`, `last_stats`), and `store_chunk`, conversion
and the store write (reading `policy` and `spec`). Pipeline mode calls them apart: every rank calls the engine
with the same arguments, rank 0 alone converts and stores.
Sampling (temperature > 0): `Engine.generate` seeds each sequence from (seed, index within the call), so a
sampled request is generated alone with a seed derived from its key; its sample then does not depend on the
chunk it lands in. Greedy requests are batched.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexgen_core.evaluation.requests import truncate_completion
from flexgen_core.evaluation.schema import GeneratedOutput, RequestResult, Token
from flexgen_core.evaluation.store import RunStore
from flexgen_core.evaluation.tokenizer import Vocabulary

GENERATE, SCORE = "generate", "score"
RESULT_FORMAT = 1  # bump when the conversion of engine outputs to RequestResults changes (new keys)
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class RunIdentity:
    """What makes a stored result reusable: model name + weights revision + dtype + compression."""

    model: str
    revision: str
    dtype: str
    compress_weights: bool = False
    compress_cache: bool = False
    attn_topk: float = 1.0

    def __post_init__(self) -> None:
        dtype = str(self.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "attn_topk", float(self.attn_topk))
        if not self.model or not self.revision:
            raise ValueError("a run identity needs a model name and a weights revision")

    @classmethod
    def for_model(cls, model_path: str | Path, dtype: Any, policy_flags: Any = None) -> RunIdentity:
        """From `checkpoint.resolve()` (config and file headers only, no weights loaded). `policy_flags` is a
        Policy or a mapping with compress_weights / compress_cache / attn_topk (defaults: off, off, 1.0)."""
        from flexgen_core.runtime import checkpoint as ckpt_io

        ckpt = ckpt_io.resolve(model_path)

        def flag(name: str, default: Any) -> Any:
            if isinstance(policy_flags, Mapping):
                return policy_flags.get(name, default)
            return getattr(policy_flags, name, default)

        return cls(ckpt.name, ckpt.revision, str(dtype), bool(flag("compress_weights", False)),
                   bool(flag("compress_cache", False)), float(flag("attn_topk", 1.0)))

    @classmethod
    def of_engine(cls, engine: Any) -> RunIdentity:
        """The identity of a loaded engine (from `Engine.identity`)."""
        ident = engine.identity
        return cls(ident["model"], ident["revision"], ident["dtype"], ident["compress_weights"] == "True",
                   ident["compress_cache"] == "True", float(ident["attn_topk"]))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunIdentity:
        return cls(**data)

    def key_fields(self) -> dict[str, Any]:
        return {"model": self.model, "weights_revision": self.revision, "dtype": self.dtype,
                "compression": {"weights": self.compress_weights, "cache": self.compress_cache,
                                "attn_topk": self.attn_topk}}


@dataclass(frozen=True)
class PendingRequest:
    """One engine request. `token_ids`: the prompt (generate) or context (score), BOS first; `index`: its
    request state in `PreparedRun.scenario_state`."""

    key: str
    mode: str
    token_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float
    top_p: float
    stop_token_ids: tuple[int, ...]
    stop_sequences: tuple[str, ...]
    index: int
    continuation_ids: tuple[int, ...] = ()
    seed: int = 0

    @property
    def num_tokens(self) -> int:
        """Tokens the engine reads: prompt, or context + continuation."""
        return len(self.token_ids) + len(self.continuation_ids)

    @property
    def settings(self) -> tuple[str, int, float, float]:
        """What one engine call shares: mode, max_new_tokens, temperature, top_p."""
        return (self.mode, self.max_new_tokens, self.temperature, self.top_p)


@dataclass(frozen=True)
class Chunk:
    """Pending requests of one run that share one engine call's settings, at most one engine block."""

    run_name: str
    run_dir: Path
    identity: RunIdentity
    mode: str
    max_new_tokens: int
    temperature: float
    top_p: float
    requests: tuple[PendingRequest, ...]
    tokenizer: Vocabulary = field(repr=False, compare=False)

    @property
    def keys(self) -> list[str]:
        return [r.key for r in self.requests]


@dataclass(frozen=True)
class ChunkReport:
    """What `run_chunk` did, for progress reporting (chunk_id None: everything was already stored)."""

    run_name: str
    chunk_id: int | None
    num_requests: int
    num_skipped: int
    prompt_tokens: int
    padded_prompt_tokens: int
    generated_tokens: int
    prefill_s: float
    decode_s: float
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        busy = self.prefill_s + self.decode_s
        return (self.prompt_tokens + self.generated_tokens) / busy if busy > 0 else 0.0

    @property
    def output_tokens_per_s(self) -> float:
        busy = self.prefill_s + self.decode_s
        return self.generated_tokens / busy if busy > 0 else 0.0

    @property
    def padding_efficiency(self) -> float:
        return self.prompt_tokens / self.padded_prompt_tokens if self.padded_prompt_tokens else 1.0


def run_chunk(engine: Any, chunk: Chunk, store: RunStore) -> ChunkReport:
    """Run one chunk on `engine` and append its results to `store` in ONE transaction (all or nothing).

    Requests already stored (a retried task) are skipped. Results are HELM RequestResult dicts: text decoded
    with the run's tokenizer and cut at the first stop sequence (HELM's truncate_sequence), per-token
    logprobs from the engine. The chunk's metadata records the policy, engine timings and token counts.
    The two halves are `call_engine` (the engine calls) and `store_chunk` (conversion and the store write),
    which pipeline mode runs apart: every rank calls the engine, rank 0 alone stores.
    """
    check_chunk(engine, chunk, store)
    todo = [r for r in chunk.requests if not store.has(r.key)]
    skipped = len(chunk.requests) - len(todo)
    if not todo:
        return ChunkReport(chunk.run_name, None, 0, skipped, 0, 0, 0, 0.0, 0.0, 0.0)
    return store_chunk(engine, chunk, call_engine(engine, chunk, todo), store, skipped)


@dataclass(frozen=True)
class EngineOutputs:
    """What `call_engine` got for `requests`: one Generation or Score each, the calls' CallStats, wall time."""

    requests: tuple[PendingRequest, ...]
    outputs: tuple[Any, ...]
    calls: tuple[Any, ...]
    wall_s: float


def check_chunk(engine: Any, chunk: Chunk, store: RunStore | None = None) -> None:
    """Refuse an engine whose identity differs from the chunk's (wrong keys) or the store of another run."""
    engine_identity = RunIdentity.of_engine(engine)
    if engine_identity != chunk.identity:
        raise ValueError(f"chunk of {chunk.run_name} was prepared for {chunk.identity} but the engine is "
                         f"{engine_identity}; its results would be stored under the wrong keys")
    if store is not None and Path(store.run_dir).resolve() != Path(chunk.run_dir).resolve():
        raise ValueError(f"chunk of {chunk.run_dir} given the store of {store.run_dir}")


def call_engine(engine: Any, chunk: Chunk, todo: Sequence[PendingRequest]) -> EngineOutputs:
    """The engine calls of one chunk for the requests `todo` (greedy: one call; sampled: one call per request,
    seeded from its key). Deterministic in its arguments, so pipeline ranks make the same calls."""
    start = time.perf_counter()
    calls, outputs = [], []
    if chunk.mode == SCORE:
        outputs += engine.score([list(r.token_ids) for r in todo], [list(r.continuation_ids) for r in todo])
        calls.append(engine.last_stats)
    else:
        groups = [list(todo)] if chunk.temperature == 0 else [[r] for r in todo]  # sampled: one call per seed
        for group in groups:
            outputs += engine.generate([list(r.token_ids) for r in group], chunk.max_new_tokens,
                                       temperature=chunk.temperature, top_p=chunk.top_p, seed=group[0].seed,
                                       stop_token_ids=[list(r.stop_token_ids) for r in group], return_logprobs=True)
            calls.append(engine.last_stats)
    return EngineOutputs(tuple(todo), tuple(outputs), tuple(calls), time.perf_counter() - start)


def store_chunk(engine: Any, chunk: Chunk, out: EngineOutputs, store: RunStore, skipped: int = 0,
                extra_metadata: Mapping[str, Any] | None = None) -> ChunkReport:
    """Convert `out` to HELM RequestResults and append them with the chunk's metadata (policy, timings, token
    counts; `extra_metadata` added on top) to `store` in ONE transaction. Reads `engine.spec` and
    `engine.policy` only."""
    start = time.perf_counter()
    tok, eos = chunk.tokenizer, engine.spec.eos_token_id
    if chunk.mode == SCORE:
        results = {r.key: _score_result(tok, r, s) for r, s in zip(out.requests, out.outputs, strict=True)}
    else:
        results = {r.key: _generation_result(tok, r, g, eos) for r, g in zip(out.requests, out.outputs, strict=True)}
    calls, wall = out.calls, out.wall_s + time.perf_counter() - start  # engine calls + conversion, as before
    totals = {name: sum(getattr(c, name) for c in calls) for name in
              ("prompt_tokens", "padded_prompt_tokens", "generated_tokens", "prefill_s", "decode_s", "blocks",
               "decode_steps")}
    report = ChunkReport(chunk.run_name, None, len(out.requests), skipped, totals["prompt_tokens"],
                         totals["padded_prompt_tokens"], totals["generated_tokens"], totals["prefill_s"],
                         totals["decode_s"], wall)
    peak: dict[str, int] = {}
    for c in calls:
        for tier, n in c.peak_bytes.items():
            peak[tier] = max(peak.get(tier, 0), int(n))
    metadata = {**totals, "run": chunk.run_name, "mode": chunk.mode, "num_requests": len(out.requests),
                "settings": {"max_new_tokens": chunk.max_new_tokens, "temperature": chunk.temperature,
                             "top_p": chunk.top_p},
                "engine_calls": len(calls), "wall_s": wall, "policy": engine.policy.to_dict(),
                "block_size": engine.policy.block_size, "identity": chunk.identity.to_dict(), "peak_bytes": peak,
                "tokens_per_s": report.tokens_per_s, "output_tokens_per_s": report.output_tokens_per_s,
                "padding_efficiency": report.padding_efficiency, **(extra_metadata or {})}
    chunk_id = store.put_chunk(results, metadata)
    return dataclasses.replace(report, chunk_id=chunk_id)


def token_texts(tok: Vocabulary, ids: Sequence[int]) -> list[str]:
    """Each token's text as what it adds to the decoded prefix, so the texts join to the decoded whole (for
    prefix-stable decoders such as byte-level BPE); a token ending inside a multi-byte character adds "" and
    the next one carries the character."""
    texts, emitted = [], ""
    for n in range(1, len(ids) + 1):
        text = tok.decode(list(ids[:n]))
        if (n < len(ids) and text.endswith("\ufffd")) or not text.startswith(emitted):
            texts.append("")
            continue
        texts.append(text[len(emitted):])
        emitted = text
    return texts


def _generation_result(tok: Vocabulary, req: PendingRequest, gen: Any, eos: int) -> dict[str, Any]:
    if gen.logprobs is None or len(gen.logprobs) != len(gen.token_ids):
        raise RuntimeError("the engine returned no per-token logprobs (generate(return_logprobs=True))")
    texts = token_texts(tok, gen.token_ids)
    tokens = [Token(t, float(lp)) for t, lp in zip(texts, gen.logprobs, strict=True)]
    reason = gen.finish_reason
    if reason == "stop" and gen.token_ids and gen.token_ids[-1] == eos:
        reason = "endoftext"
    out = truncate_completion("".join(texts), tokens, req.stop_sequences, req.max_new_tokens, reason)
    return RequestResult(success=True, completions=(out,)).to_dict()


def _score_result(tok: Vocabulary, req: PendingRequest, score: Any) -> dict[str, Any]:
    """The scored continuation as one completion: its tokens, their logprobs and their sum (context omitted)."""
    texts = token_texts(tok, req.continuation_ids)
    tokens = tuple(Token(t, float(lp)) for t, lp in zip(texts, score.token_logprobs, strict=True))
    out = GeneratedOutput("".join(texts), float(score.logprob), tokens, {"reason": "length"})
    return RequestResult(success=True, completions=(out,)).to_dict()

