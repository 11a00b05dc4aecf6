"""4-bit weights compute exactly transformers' function on the quantize->dequantize'd weights (every tier); a
4-bit KV cache and top-K sparse attention are judged by their accuracy cost on the shipped tiny trained model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hf_reference import hf_model

from flexgen_core import Engine, Policy
from flexgen_core.quant import dequantize, quantize

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [11, 12, 13], [20, 21, 22, 23, 24], [30, 31]]
NEW = 8
TOL = 1e-4


def _simulated_hf(path: Path):  # noqa: ANN202
    """transformers' OPT with every weight matrix replaced by its 4-bit round trip (groups of 64 output rows)."""
    model = hf_model(str(path)).__class__.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and not name.startswith("lm_head"):  # the head is tied to embed_tokens
                p.copy_(dequantize(quantize(p, 4, 64, dim=0)))
    return model


@pytest.mark.parametrize("weights", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0.3, 0.4, 0.3)])
def test_compressed_weights_equal_transformers_on_round_tripped_weights(
        tiny_opt_wide: Path, offload_dir: Path, weights: tuple[float, float, float]) -> None:
    ref_model = _simulated_hf(tiny_opt_wide)
    policy = Policy(2, 2, weights=weights, cache=(0.5, 0.5, 0), compress_weights=True)
    with Engine.from_pretrained(tiny_opt_wide, policy=policy, device="cpu", offload_dir=offload_dir) as engine:
        gens = engine.generate(PROMPTS, NEW, return_logprobs=True)
    for prompt, gen in zip(PROMPTS, gens, strict=True):
        with torch.no_grad():
            out = ref_model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, output_scores=True,
                                     return_dict_in_generate=True, eos_token_id=None, pad_token_id=1)
        tokens = out.sequences[0, len(prompt):].tolist()
        logprobs = [torch.log_softmax(s[0], -1)[t].item() for s, t in zip(out.scores, tokens, strict=True)]
        assert gen.token_ids == tokens
        assert max(abs(a - b) for a, b in zip(gen.logprobs, logprobs, strict=True)) < TOL


def _accuracy_cost(model: Path, prompts: list[list[int]], policy: Policy, reference: list) -> tuple[float, float]:
    """(greedy agreement position by position, mean KL(reference || policy) of the next-token distributions
    over the positions where both prefixes are still identical)."""
    with Engine.from_pretrained(model, policy=policy, device="cpu") as engine:
        out = engine.generate(prompts, 16, top_logprobs=engine.spec.vocab_size)
    same = total = 0
    kls: list[float] = []
    for a, b in zip(reference, out, strict=True):
        pairs = list(zip(a.token_ids, b.token_ids, strict=False))
        same += sum(x == y for x, y in pairs)
        total += len(pairs)
        for n, (x, y) in enumerate(pairs):
            p, q = a.top_logprobs[n], b.top_logprobs[n]
            kls.append(sum(math.exp(lp) * (lp - q[t]) for t, lp in p.items()))
            if x != y:
                break
    return same / total, sum(kls) / len(kls)


@pytest.fixture(scope="module")
def tiny_prompts() -> list[list[int]]:
    """Test-split inputs of three procedural scenarios, tokenized as the evaluation does (BOS first)."""
    from flexgen_core.assets import TINY_MODEL_DIR
    from flexgen_core.evaluation.scenarios import get_scenario
    from flexgen_core.evaluation.tokenizer import HFTokenizer

    tok = HFTokenizer(TINY_MODEL_DIR)
    prompts = []
    entries = [("synthetic_reasoning", {"mode": "pattern_match"}), ("dyck_language", {"num_parenthesis_pairs": 3}),
               ("synthetic_reasoning_natural", {"difficulty": "easy"})]
    for name, args in entries:
        tests = [i for i in get_scenario(name, **args).get_instances() if i.split == "test"][:6]
        prompts += [[2] + tok.encode(i.input.text)[-200:] for i in tests]
    return prompts


# (policy, minimum greedy agreement, maximum mean KL in nats). Measured on the shipped model (2026-11-23):
# compress_cache 0.712 / 0.0265, attn_topk 0.2 0.795 / 0.0032, compress_cache + topk 0.5 delegated 0.691 /
# 0.0270, compress_weights 0.545 / 0.0669; the bounds leave room for run-to-run noise of a few flipped tokens.
# A broken path (wrong groups, stale cache rows) scores near 0 agreement and KL of several nats.
ACCURACY_BOUNDS = {
    "compress_cache": (Policy(6, 3, cache=(0.5, 0.5, 0), compress_cache=True), 0.6, 0.04),
    "attn_topk_0.2": (Policy(6, 3, cache=(0, 0.5, 0.5), attn_topk=0.2), 0.7, 0.01),
    "compress_cache_topk_0.5": (Policy(6, 3, compress_cache=True, attn_topk=0.5, cpu_attention=True,
                                       cache=(0, 1, 0)), 0.6, 0.04),
    "compress_weights": (Policy(6, 3, compress_weights=True), 0.45, 0.1),
}


def test_accuracy_cost_of_compression_and_sparsity_is_bounded(tiny_prompts: list[list[int]]) -> None:
    from flexgen_core.assets import TINY_MODEL_DIR

    with Engine.from_pretrained(TINY_MODEL_DIR, policy=Policy(6, 3), device="cpu") as engine:
        reference = engine.generate(tiny_prompts, 16, top_logprobs=engine.spec.vocab_size)
    for name, (policy, min_agreement, max_kl) in ACCURACY_BOUNDS.items():
        agreement, kl = _accuracy_cost(TINY_MODEL_DIR, tiny_prompts, policy, reference)
        print(f"{name}: greedy agreement {agreement:.3f}, mean KL {kl:.4f} nats")
        assert agreement >= min_agreement, (name, agreement)
        assert kl <= max_kl, (name, kl)
