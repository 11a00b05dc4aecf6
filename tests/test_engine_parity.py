"""Every engine configuration reproduces transformers' greedy tokens and log-probs (fp32, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hf_reference import hf_continuation_logprobs, hf_greedy

from flexgen_core import Engine, Policy

PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [20], [30, 31, 32, 33, 34, 35, 36], [40, 41, 42]]
NEW = 6
TOL = 1e-4

POLICIES = {
    "all_on_device": Policy(2, 3),
    "weights_cpu": Policy(2, 3, weights=(0, 1, 0)),
    "weights_disk": Policy(2, 3, weights=(0, 0, 1)),
    "cache_cpu": Policy(2, 3, cache=(0, 1, 0)),
    "cache_disk": Policy(2, 3, cache=(0, 0, 1)),
    "acts_cpu": Policy(2, 3, acts=(0, 1, 0)),
    "acts_disk": Policy(2, 3, acts=(0, 0, 1)),
    "mixed_fractions": Policy(2, 3, weights=(0.3, 0.5, 0.2), cache=(0.3, 0.5, 0.2), acts=(0.3, 0.5, 0.2)),
    "ngb1": Policy(5, 1, weights=(0.5, 0.5, 0), cache=(0.4, 0.6, 0)),
    # one GPU batch with activations off the device: the next step's input is this step's output
    "ngb1_acts_cpu": Policy(5, 1, acts=(0, 1, 0)),
    "ngb1_acts_mixed_disk": Policy(4, 1, weights=(0.5, 0.3, 0.2), acts=(0.5, 0.25, 0.25)),
    # three weight slots (delegated attention or disk weights) with one GPU batch
    "ngb1_three_slots": Policy(3, 1, weights=(0.2, 0.4, 0.4), cache=(0, 1, 0), cpu_attention=True),
    "ngb3_gbs1": Policy(1, 3, weights=(0, 1, 0), cache=(0, 1, 0), acts=(0, 1, 0)),
    "no_overlap": Policy(2, 3, weights=(0.3, 0.5, 0.2), cache=(0.3, 0.5, 0.2), acts=(0, 0.5, 0.5), overlap=False),
    "cpu_attention": Policy(2, 3, cache=(0, 0.5, 0.5), cpu_attention=True),
    "cpu_attention_mixed_no_overlap": Policy(2, 2, cache=(0.4, 0.3, 0.3), cpu_attention=True, overlap=False),
    # delegated attention finishes a GPU batch after the next one starts: with activations off the device, the
    # next layer's first input is requested only once its attention is finished (two and three GPU batches)
    "cpu_attention_acts_off_device": Policy(2, 2, cache=(0, 1, 0), acts=(0, 0.5, 0.5), cpu_attention=True),
    "cpu_attention_acts_cpu_3": Policy(2, 3, weights=(0.5, 0.5, 0), cache=(0.5, 0, 0.5), acts=(0.5, 0.5, 0),
                                       cpu_attention=True),
}


def assert_matches_hf(model: Path, prompts: list[list[int]], gens: list, n: int = NEW) -> None:
    for prompt, gen in zip(prompts, gens, strict=True):
        ref_tokens, ref_logprobs = hf_greedy(model, prompt, n)
        assert gen.token_ids == ref_tokens, f"prompt {prompt}"
        assert gen.finish_reason == "length"
        assert max(abs(a - b) for a, b in zip(gen.logprobs, ref_logprobs, strict=True)) < TOL


@pytest.mark.parametrize("name", list(POLICIES))
def test_policy_matches_transformers(name: str, tiny_opt: Path, offload_dir: Path) -> None:
    with Engine.from_pretrained(tiny_opt, policy=POLICIES[name], device="cpu", offload_dir=offload_dir) as engine:
        gens = engine.generate(PROMPTS, NEW, return_logprobs=True)
    assert_matches_hf(tiny_opt, PROMPTS, gens)
    assert list(offload_dir.iterdir()) == [], "offload files must be removed on close"


def test_block_larger_than_prompts_and_repeated_calls(tiny_opt: Path) -> None:
    """One partial block (3 prompts in a block of 8), then a call with longer prompts on the same engine."""
    with Engine.from_pretrained(tiny_opt, policy=Policy(4, 2, cache=(0.5, 0.5, 0)), device="cpu") as engine:
        first = engine.generate(PROMPTS[:3], NEW, return_logprobs=True)
        assert_matches_hf(tiny_opt, PROMPTS[:3], first)
        longer = [list(range(3, 40)), [7, 8]]
        second = engine.generate(longer, 9, return_logprobs=True)
        assert_matches_hf(tiny_opt, longer, second, n=9)


def test_single_prompt_single_token_batch_of_one(tiny_opt: Path) -> None:
    with Engine.from_pretrained(tiny_opt, policy=Policy(1, 1), device="cpu") as engine:
        gens = engine.generate([[17]], NEW, return_logprobs=True)
    assert_matches_hf(tiny_opt, [[17]], gens)


def test_many_blocks_keep_prompt_order(tiny_opt: Path) -> None:
    prompts = [[3 + i, 4 + 2 * i, 50 + i][: 1 + i % 3] for i in range(11)]
    with Engine.from_pretrained(tiny_opt, policy=Policy(2, 2, weights=(0, 1, 0)), device="cpu") as engine:
        gens = engine.generate(prompts, 4, return_logprobs=True)
        assert engine.last_stats.blocks == 3
    assert_matches_hf(tiny_opt, prompts, gens, n=4)


def test_post_layernorm_projected_embeddings_single_head(post_ln_opt: Path, offload_dir: Path) -> None:
    policy = Policy(2, 2, weights=(0.3, 0.4, 0.3), cache=(0, 0.5, 0.5), acts=(0, 1, 0))
    with Engine.from_pretrained(post_ln_opt, policy=policy, device="cpu", offload_dir=offload_dir) as engine:
        gens = engine.generate(PROMPTS[:4], NEW, return_logprobs=True)
    assert_matches_hf(post_ln_opt, PROMPTS[:4], gens)


def test_stop_tokens_hit_at_different_steps(tiny_opt: Path) -> None:
    refs = [hf_greedy(tiny_opt, p, NEW)[0] for p in PROMPTS[:3]]
    # per-prompt stop ids: the token each prompt generates at step 1, at step 3, and one it never generates
    stops = [[refs[0][1]], [refs[1][3]], [199]]
    assert 199 not in refs[2]
    with Engine.from_pretrained(tiny_opt, policy=Policy(3, 1), device="cpu") as engine:
        gens = engine.generate(PROMPTS[:3], NEW, stop_token_ids=stops, return_logprobs=True)
    for gen, ref, stop in zip(gens, refs, stops, strict=True):
        if stop[0] in ref:
            end = ref.index(stop[0]) + 1
            assert gen.token_ids == ref[:end] and gen.finish_reason == "stop"
            assert len(gen.logprobs) == end
        else:
            assert gen.token_ids == ref and gen.finish_reason == "length"


def test_block_stops_early_when_all_sequences_stopped(tiny_opt: Path) -> None:
    ref = hf_greedy(tiny_opt, PROMPTS[0], NEW)[0]
    with Engine.from_pretrained(tiny_opt, policy=Policy(1, 1), device="cpu") as engine:
        gens = engine.generate([PROMPTS[0]], NEW, stop_token_ids=[ref[0]])
        assert gens[0].token_ids == [ref[0]] and gens[0].finish_reason == "stop"
        assert engine.last_stats.decode_steps == 0


@pytest.mark.parametrize("policy", [Policy(2, 2), Policy(2, 2, weights=(0, 0.5, 0.5), acts=(0, 1, 0))])
def test_score_matches_transformers_loglikelihood(tiny_opt: Path, policy: Policy) -> None:
    contexts = [[5, 6, 7], [9], [3, 4, 5, 6, 7, 8], [12, 13]]
    continuations = [[8, 9], [10, 11, 12], [13], [14, 15, 16, 17]]
    with Engine.from_pretrained(tiny_opt, policy=policy, device="cpu") as engine:
        scores = engine.score(contexts, continuations)
    for ctx, cont, sc in zip(contexts, continuations, scores, strict=True):
        ref, greedy = hf_continuation_logprobs(tiny_opt, ctx, cont)
        assert max(abs(a - b) for a, b in zip(ref, sc.token_logprobs, strict=True)) < TOL
        assert abs(sc.logprob - sum(ref)) < TOL
        assert sc.is_greedy == greedy


def test_greedy_score_is_consistent_with_generate(tiny_opt: Path) -> None:
    with Engine.from_pretrained(tiny_opt, policy=Policy(2, 1), device="cpu") as engine:
        gen = engine.generate([PROMPTS[0]], 3, return_logprobs=True)[0]
        score = engine.score([PROMPTS[0]], [gen.token_ids])[0]
    assert score.is_greedy
    assert abs(score.logprob - sum(gen.logprobs)) < TOL


def test_sampling_is_reproducible_per_seed(tiny_opt: Path) -> None:
    with Engine.from_pretrained(tiny_opt, policy=Policy(2, 2), device="cpu") as engine:
        a = engine.generate(PROMPTS, 5, temperature=1.0, top_p=0.9, seed=7)
        b = engine.generate(PROMPTS, 5, temperature=1.0, top_p=0.9, seed=7)
        c = engine.generate(PROMPTS, 5, temperature=1.0, top_p=0.9, seed=8)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]


def test_decode_keeps_disk_rows_activations_off_disk(tiny_opt: Path, offload_dir: Path) -> None:
    """Activations of disk rows go to disk at prefill width only; decode-width states stay in host RAM."""
    policy = Policy(2, 2, acts=(0, 0.5, 0.5))
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14]]
    with Engine.from_pretrained(tiny_opt, policy=policy, device="cpu", offload_dir=offload_dir) as engine:
        engine.generate(prompts, 1)  # builds the activation store
        writes = []
        store = engine._acts  # noqa: SLF001
        real = store.transfer.disk_write
        store.transfer.disk_write = lambda *a, **k: writes.append(1) or real(*a, **k)
        engine.generate(prompts, 1)
        prefill_only = len(writes)
        writes.clear()
        gens = engine.generate(prompts, NEW, return_logprobs=True)
    assert prefill_only > 0 and len(writes) == prefill_only
    assert_matches_hf(tiny_opt, prompts, gens)
