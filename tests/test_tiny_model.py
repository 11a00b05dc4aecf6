"""The shipped tiny model (`flexgen_core.assets.TINY_MODEL_DIR`): files and size, special ids, tokenizer,
loading through the engine and transformers, and greedy completions pinned so that retraining is noticed."""

from __future__ import annotations

import dataclasses
import json
from functools import cache

import torch

from flexgen_core.assets import TINY_MODEL_DIR
from flexgen_core.evaluation.adapters import adapt
from flexgen_core.evaluation.prompt import ContextWindow
from flexgen_core.evaluation.requests import stop_token_ids, truncate_completion
from flexgen_core.evaluation.run_spec import construct_run_spec
from flexgen_core.evaluation.scenarios import create_scenario, downsample_eval_instances
from flexgen_core.evaluation.schema import TEST_SPLIT, RequestState, Token
from flexgen_core.evaluation.tokenizer import HFTokenizer

MAX_BYTES = 20 * 2**20
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "TRAINING.md")
BOS = 2
# Greedy completions of the first two test prompts of ENTRY (HELM's seed-0 sample of 100 test instances, the
# run spec's prompt format, BOS prepended), as TRAINING.md's evaluation produces them.
ENTRY = "synthetic_reasoning:mode=pattern_match"
GOLDEN = (" X * - X =", " X + * Z = Z")


@cache
def _tokenizer() -> HFTokenizer:
    return HFTokenizer(TINY_MODEL_DIR)


@cache
def _states() -> tuple[RequestState, ...]:
    run_spec = construct_run_spec(ENTRY, model="flexgen/tiny-opt", max_eval_instances=100)
    spec = dataclasses.replace(run_spec.adapter_spec, eval_splits=(TEST_SPLIT,))
    instances = create_scenario(run_spec.scenario_spec).get_instances()
    instances = downsample_eval_instances(instances, 100, eval_splits=(TEST_SPLIT,))
    config = json.loads((TINY_MODEL_DIR / "config.json").read_text())
    window = ContextWindow(_tokenizer(), config["max_position_embeddings"], reserved_tokens=1)
    return adapt(instances, spec, window).request_states[:2]


def _prompts() -> list[list[int]]:
    return [[BOS, *_tokenizer().encode(s.request.prompt)] for s in _states()]


def test_checkpoint_is_shipped_and_small() -> None:
    for name in FILES:
        assert (TINY_MODEL_DIR / name).is_file(), name
    total = sum(f.stat().st_size for f in TINY_MODEL_DIR.iterdir() if f.is_file())
    assert total <= MAX_BYTES, f"{total / 2**20:.1f} MiB"


def test_special_token_ids_match_the_config() -> None:
    config = json.loads((TINY_MODEL_DIR / "config.json").read_text())
    assert (config["pad_token_id"], config["bos_token_id"], config["eos_token_id"]) == (1, BOS, BOS)
    assert config["architectures"] == ["OPTForCausalLM"] and config["do_layer_norm_before"]
    tok = _tokenizer()
    assert [tok.token_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert tok.vocab_size == config["vocab_size"]


def test_tokenizer_round_trips_text() -> None:
    tok = _tokenizer()
    text = 'Rules: X + Y | Substitutions: X by " lion " , Y by " kiwi pear "\nTarget: 107 ( [ ] ) { < > }\n\n café'
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode("12") == tok.encode("1") + tok.encode("2")  # digits are split one by one
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    assert hf(text).input_ids == [BOS, *ids]  # as OPT's tokenizer: </s> first
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (1, BOS, BOS)


def test_greedy_completions_are_pinned_in_engine_and_transformers() -> None:
    from flexgen_core import Engine

    tok = _tokenizer()
    request = _states()[0].request
    prompts = _prompts()
    with Engine.from_pretrained(TINY_MODEL_DIR, device="cpu") as engine:
        outs = engine.generate(prompts, request.max_tokens, stop_token_ids=stop_token_ids(tok, request.stop_sequences))
    texts = []
    for out in outs:
        pieces = [tok.token_texts()[i] for i in out.token_ids]
        tokens = [Token(piece, 0.0) for piece in pieces]
        texts.append(truncate_completion("".join(pieces), tokens, request.stop_sequences, request.max_tokens).text)
    assert tuple(texts) == GOLDEN

    from transformers import OPTForCausalLM

    model = OPTForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            hf = model.generate(torch.tensor([prompt]), max_new_tokens=len(out.token_ids), do_sample=False,
                                eos_token_id=None, pad_token_id=1)
        assert hf[0, len(prompt):].tolist() == out.token_ids


def test_weights_are_fp16_safetensors() -> None:
    from safetensors import safe_open

    with safe_open(str(TINY_MODEL_DIR / "model.safetensors"), "pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"F16"}  # noqa: SIM118
