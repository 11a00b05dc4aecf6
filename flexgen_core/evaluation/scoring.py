"""Request states with results -> HELM's per-instance stats and run stats (no model needed).

Per request state, as HELM's `BasicGenerationMetric`:
- the run spec's reference metrics (`metric_names(run_spec)`), max over the correct references, of the
  top-logprob completion stripped and, for multiple_choice_joint, mapped from its letter to the choice text
  (an unmapped letter scores 0);
- num_references, num_train_trials, num_train_instances, prompt_truncated, finish_reason_{length,stop,
  endoftext,unknown}, num_prompt_tokens (with the BOS the runner adds), num_completion_tokens,
  num_output_tokens, logprob, num_perplexity_tokens, num_bytes.
For multiple_choice_separate_original (HELM's `BasicReferenceMetric`) the choices of one instance are ranked
by log-likelihood per token; the reference metrics score the best choice's text.
Stats carry the instance's split; run stats are HELM's per-trial means (`aggregate_per_instance`) plus
`num_instances` per split. Timing stats (inference_runtime, batch_size) depend on how requests were batched,
so they live in efficiency.json, not here: these outputs are a function of the results alone.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flexgen_core.evaluation.metrics import request_efficiency_stats, score_references
from flexgen_core.evaluation.run_specs import metric_names
from flexgen_core.evaluation.schema import (
    ADAPT_MULTIPLE_CHOICE_SEPARATE_ORIGINAL,
    AdapterSpec,
    GeneratedOutput,
    RequestResult,
    RequestState,
    RunSpec,
    ScenarioState,
)
from flexgen_core.evaluation.stats import (
    MetricName,
    PerInstanceStats,
    Stat,
    add_context,
    aggregate_per_instance,
    merge_stat,
)

FINISH_REASONS = ("length", "stop", "endoftext", "unknown")


def attach_results(state: ScenarioState, keys: Sequence[str], completed: set[str],
                   get: Callable[[str], Mapping[str, Any]], where: str) -> ScenarioState:
    """The scenario state with each request's stored result (`keys[i]` belongs to request state i).

    Refuses, naming the count, when any key has no result yet (`completed` is the set of stored keys).
    """
    if len(keys) != len(state.request_states):
        raise ValueError(f"{len(keys)} keys for {len(state.request_states)} request states")
    missing = sorted({k for k in keys if k not in completed})
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(set(keys))} requests have no result in {where} "
                           f"(e.g. {missing[0]}); run the pending chunks before scoring")
    cache: dict[str, RequestResult] = {}
    states = []
    for rs, key in zip(state.request_states, keys, strict=True):
        if key not in cache:
            cache[key] = RequestResult.from_dict(get(key))
        states.append(_replace_result(rs, cache[key]))
    return ScenarioState(state.adapter_spec, tuple(states))


def _replace_result(rs: RequestState, result: RequestResult) -> RequestState:
    return dataclasses.replace(rs, result=result)


def compute_stats(run_spec: RunSpec, state: ScenarioState, num_prompt_tokens: Sequence[int]
                  ) -> tuple[list[PerInstanceStats], list[Stat]]:
    """(per_instance_stats, stats) for a scenario state whose requests all have results."""
    names = metric_names(run_spec)
    spec = state.adapter_spec
    groups: dict[tuple[str, int], list[int]] = {}
    for i, rs in enumerate(state.request_states):
        if rs.result is None:
            raise ValueError(f"request state {i} has no result; attach results before scoring")
        groups.setdefault((str(rs.instance.id), rs.train_trial_index), []).append(i)
    per_instance: list[PerInstanceStats] = []
    for (instance_id, trial), indices in groups.items():
        states = [state.request_states[i] for i in indices]
        tokens = [num_prompt_tokens[i] for i in indices]
        if spec.method == ADAPT_MULTIPLE_CHOICE_SEPARATE_ORIGINAL:
            raw = _separate_stats(spec, names, states, tokens)
        else:
            raw = [s for rs, n in zip(states, tokens, strict=True) for s in _generation_stats(spec, names, rs, n)]
        merged: dict[MetricName, Stat] = {}
        for stat in raw:
            merge_stat(merged, stat)
        inst = states[0].instance
        stats = [add_context(s, inst.split, inst.sub_split) for s in merged.values()]
        per_instance.append(PerInstanceStats(instance_id, trial, stats))
    counts: dict[MetricName, Stat] = {}
    seen: set[str] = set()
    for rs in state.request_states:
        if str(rs.instance.id) not in seen:
            seen.add(str(rs.instance.id))
            merge_stat(counts, add_context(Stat(MetricName("num_instances")).add(1), rs.instance.split,
                                           rs.instance.sub_split))
    return per_instance, aggregate_per_instance(per_instance) + list(counts.values())


def _map_output(pred: str, mapping: Mapping[str, str], pattern: str | None) -> str | None:
    """HELM: optionally extract the label with `output_mapping_pattern`, then map it to the choice text."""
    if pattern is not None:
        found = re.search(pattern, pred)
        if found is None:
            return None
        pred = found.group(1) if found.groups() else found.group(0)
    return mapping.get(pred)


def _reason(output: GeneratedOutput | None) -> str:
    reason = (output.finish_reason or {}).get("reason") if output is not None else None
    return reason if reason in FINISH_REASONS else "unknown"


def _general_stats(spec: AdapterSpec, rs: RequestState, prompt_truncated: bool) -> list[Stat]:
    return [Stat(MetricName("num_references")).add(len(rs.instance.references)),
            Stat(MetricName("num_train_trials")).add(spec.num_train_trials),
            Stat(MetricName("num_train_instances")).add(rs.num_train_instances),
            Stat(MetricName("prompt_truncated")).add(prompt_truncated)]


def _generation_stats(spec: AdapterSpec, names: Sequence[str], rs: RequestState, num_prompt_tokens: int
                      ) -> list[Stat]:
    assert rs.result is not None
    completions = sorted(rs.result.completions, key=lambda c: -c.logprob)  # stable: ties keep their order
    top = completions[0] if completions else None
    pred: str | None = top.text.strip() if top is not None else ""
    if rs.output_mapping is not None and pred is not None:
        pred = _map_output(pred, rs.output_mapping, spec.output_mapping_pattern)
    golds = [r.output.text for r in rs.instance.all_correct_references]
    stats = [Stat(MetricName(name)).add(score_references(name, golds, pred)) for name in names] if golds else []
    stats += _general_stats(spec, rs, rs.prompt_truncated)
    reason = _reason(top)
    stats += [Stat(MetricName(f"finish_reason_{r}")).add(r == reason) for r in FINISH_REASONS]
    stats += request_efficiency_stats(num_prompt_tokens, [len(c.tokens) for c in completions])
    if top is not None:
        stats += [Stat(MetricName("logprob")).add(top.logprob),
                  Stat(MetricName("num_perplexity_tokens")).add(len(top.tokens)),
                  Stat(MetricName("num_bytes")).add(len(top.text.encode("utf-8")))]
    return stats


def _separate_stats(spec: AdapterSpec, names: Sequence[str], states: Sequence[RequestState],
                    num_prompt_tokens: Sequence[int]) -> list[Stat]:
    """One instance's choices (and their num_trials repeats): the best choice by logprob per token wins."""
    by_repeat: dict[str | None, list[RequestState]] = {}
    for rs in states:
        by_repeat.setdefault(rs.request.random, []).append(rs)
    stats: list[Stat] = []
    for choices in by_repeat.values():
        scores = []
        for rs in choices:
            assert rs.result is not None and rs.result.completions, "a scoring result needs one completion"
            out = rs.result.completions[0]
            scores.append(out.logprob / max(len(out.tokens), 1))
        best = max(range(len(choices)), key=lambda j: (scores[j], -j))  # first best on ties
        winner = choices[best]
        assert winner.reference_index is not None
        pred = winner.instance.references[winner.reference_index].output.text
        golds = [r.output.text for r in winner.instance.all_correct_references]
        if golds:
            stats += [Stat(MetricName(name)).add(score_references(name, golds, pred)) for name in names]
        stats += _general_stats(spec, winner, any(rs.prompt_truncated for rs in choices))
        stats.append(Stat(MetricName("predicted_index")).add(winner.reference_index))
    stats.append(Stat(MetricName("num_prompt_tokens")).add(sum(num_prompt_tokens)))
    return stats
