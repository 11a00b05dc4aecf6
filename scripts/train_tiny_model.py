"""Train the shipped tiny OPT (`flexgen_core/assets/tiny-opt/`) on the procedural scenarios' train splits.

Corpus: for every run entry in ENTRIES, the scenario's *train* instances are adapted as the evaluation adapts
its eval instances (the real run spec, adapter and context window), each with in-context examples drawn by
HELM's `sample_examples` from the other train instances (a fresh draw per instance and epoch), followed by
the gold completion and the stop sequence. Train instances whose input equals a valid/test input of their
scenario are dropped. `dyck_language` has only 3 train instances, so its pool is extended with train-split
words of the same generator under other seeds (train lengths widened to 4-100; eval inputs excluded).
Tokenizer: byte-level BPE (`tokenizers`), digits split one by one, OPT's special ids (`<s>` 0, `<pad>` 1,
`</s>` 2, `<unk>` 3); every sequence starts with `</s>` (2), OPT's BOS.
Model: pre-LayerNorm `OPTForCausalLM`, AdamW, warmup + cosine, bf16 autocast, fixed seeds. The shipped model
was trained on one H100 (`--set device=cuda`, rounds prepared by worker processes); TRAINING.md has the exact
command. `--set time_budget_s=S` measures the step rate over the first steps and sets `--steps` to what fits.
Scores (`--eval-only`, also run after training): greedy decoding of each scenario's test split through
`flexgen_core.Engine` on the CPU, HELM's truncation and metrics, a few prompts cross-checked against transformers.

    .venv/bin/python scripts/train_tiny_model.py --eval-only          # re-evaluate the shipped model
    .venv/bin/python scripts/train_tiny_model.py --steps 30 --out /tmp/t --no-eval   # time a short run (CPU)
    PYTHONPATH=. python3 scripts/train_tiny_model.py --out DIR --no-eval --steps N --set device=cuda \
        --set prep_workers=12                                         # train as the shipped model was
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import itertools
import json
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (exploration on a GPU)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from flexgen_core.assets import TINY_MODEL_DIR  # noqa: E402
from flexgen_core.evaluation.adapters import Adapter, adapt, get_adapter, sample_examples  # noqa: E402
from flexgen_core.evaluation.metrics import score_references  # noqa: E402
from flexgen_core.evaluation.prompt import ContextWindow  # noqa: E402
from flexgen_core.evaluation.requests import stop_token_ids, truncate_completion  # noqa: E402
from flexgen_core.evaluation.run_spec import construct_run_spec  # noqa: E402
from flexgen_core.evaluation.run_specs import metric_names  # noqa: E402
from flexgen_core.evaluation.scenarios import create_scenario, downsample_eval_instances, get_scenario  # noqa: E402
from flexgen_core.evaluation.schema import EVAL_SPLITS, TEST_SPLIT, TRAIN_SPLIT, Instance, RunSpec, Token  # noqa: E402
from flexgen_core.evaluation.tokenizer import HFTokenizer  # noqa: E402

MODEL_NAME = "flexgen/tiny-opt"
WARMUP_ENTRY = "simple_copy"
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3, as in OPT
PAD_ID, BOS_ID = 1, 2  # OPT: </s> is both BOS and EOS
ENTRIES = (
    "synthetic_reasoning:mode=pattern_match",
    "synthetic_reasoning:mode=variable_substitution",
    "synthetic_reasoning:mode=induction",
    "synthetic_reasoning_natural:difficulty=easy",
    "synthetic_reasoning_natural:difficulty=hard",
    "dyck_language:num_parenthesis_pairs=2",
    "dyck_language:num_parenthesis_pairs=3",
    "dyck_language:num_parenthesis_pairs=4",
    "simple_mcqa",
    "simple_short_answer_qa",
    "simple_classification",
    "simple_copy",
    "simple_arithmetic",
)


@dataclass(frozen=True)
class Config:
    """Everything that determines the trained model (recorded in training.json)."""

    seed: int = 0
    vocab_size: int = 2048
    min_frequency: int = 2
    hidden_size: int = 320
    num_layers: int = 6
    num_heads: int = 5
    ffn_dim: int = 1280
    max_positions: int = 1024
    steps: int = 1200
    batch_tokens: int = 16384  # padded tokens per step (rows = batch_tokens // longest row)
    lr: float = 2e-3
    min_lr_frac: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    context_weight: float = 0.1  # loss weight of non-answer tokens (answer tokens weigh 1)
    min_samples_per_entry: int = 300  # small train splits are repeated with fresh in-context draws
    curriculum_rounds: int = 3  # round r < this uses floor(max_train_instances * r / this) in-context examples
    warmup_shots: tuple[int, ...] = (0, 1, 0, 1, 0, 1, 2, 3, 5)  # simple_copy-only rounds before the mixture
    warmup_size: int = 8000  # train instances per warm-up round
    example_window: int = 100  # in-context examples are drawn from this many neighbours in the pool
    round_size: int = 1000  # train instances per generated split (HELM's train split size)
    dyck_max_train_length: int = 100
    pos_init: str = "sinusoidal"  # learned positions start as a scaled sinusoid table ("normal": OPT's init)
    threads: int = 2
    device: str = "cpu"
    prep_workers: int = 0  # processes preparing rounds ahead (0: inline); does not change the data
    time_budget_s: float = 0.0  # > 0: after `rate_probe_steps`, set `steps` to what fits (recorded as --steps)
    rate_probe_steps: int = 100


# ---- corpus -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One training sequence: prompt + gold completion, and the character spans of every answer in it."""

    entry: str
    text: str
    answer_spans: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Pool:
    """The train instances of one run entry for one round of training."""

    entry: str
    run_spec: RunSpec
    train: tuple[Instance, ...]
    helm: int  # of them from HELM's train split (seed 42)
    generated: int  # of them from the same generator under another seed
    dropped: int  # train instances left out for equalling an eval input (or an earlier instance)


@functools.cache
def helm_splits(entry: str) -> tuple[RunSpec, tuple[Instance, ...], frozenset[str]]:
    """The entry's run spec, its scenario's train split, and the inputs of its valid and test splits."""
    run_spec = construct_run_spec(entry, model=MODEL_NAME)
    instances = create_scenario(run_spec.scenario_spec).get_instances()
    eval_inputs = frozenset(inst.input.text for inst in instances if inst.split in EVAL_SPLITS)
    return run_spec, tuple(inst for inst in instances if inst.split == TRAIN_SPLIT), eval_inputs


def build_pool(entry: str, cfg: Config, round_: int, size: int | None = None) -> Pool:
    """Round 0: HELM's train split. Later rounds: a fresh train split of the same generator under seed
    `1000 * (seed + 1) + round`, so no instance is seen in more than one round. A train split smaller than
    `round_size` (Dyck's 3) is topped up with a generated one in every round; scenarios without a seed (the
    even/odd ones) reuse their split. Instances whose input equals an eval input are dropped."""
    run_spec, helm_train, eval_inputs = helm_splits(entry)
    scenario = create_scenario(run_spec.scenario_spec)
    params = inspect.signature(type(scenario)).parameters
    seed_arg = next((arg for arg in ("random_seed", "seed") if arg in params), None)
    small = len(helm_train) < cfg.round_size
    helm = list(helm_train) if round_ == 0 or small or seed_arg is None else []
    generated: list[Instance] = []
    if seed_arg is not None and (round_ != 0 or small):
        args: dict[str, Any] = {**run_spec.scenario_spec.args, seed_arg: 1000 * (cfg.seed + 1) + round_,
                                "num_train_instances": size or cfg.round_size}
        args.update({arg: 0 for arg in ("num_valid_instances", "num_test_instances") if arg in params})
        if "max_seq_train_length" in params:
            args["max_seq_train_length"] = cfg.dyck_max_train_length
        generated = [inst for inst in get_scenario(scenario.name, **args).get_instances()
                     if inst.split == TRAIN_SPLIT]
    seen = set(eval_inputs)
    kept: list[Instance] = []
    counts = [0, 0]
    for origin, instances in enumerate((helm, generated)):
        for inst in instances:
            if inst.input.text not in seen:
                seen.add(inst.input.text)
                kept.append(inst)
                counts[origin] += 1
    return Pool(entry, run_spec, tuple(kept), counts[0], counts[1], len(helm) + len(generated) - len(kept))


def adapt_train_instance(entry: str, adapter: Adapter, instance: Instance, examples: Sequence[Instance]) -> Sample:
    """The eval-format prompt of `instance` + its gold completion + the stop sequence, with answer spans."""
    state = adapter.generate_requests(instance, 0, examples)[0]
    prompt = state.request.prompt
    spans: list[tuple[int, int]] = []
    cursor = 0
    for example in examples[: state.num_train_instances]:  # blocks dropped to fit the window are absent
        closed, opened = adapter.example_block(example, True, None), adapter.example_block(example, False, None)
        assert closed.startswith(opened), (closed, opened)
        start = prompt.index(closed, cursor)
        spans.append((start + len(opened), start + len(closed)))
        cursor = start + len(closed)
    closed, opened = adapter.example_block(instance, True, None), adapter.example_block(instance, False, None)
    completion = closed[len(opened):]
    stops = adapter.spec.stop_sequences
    if stops and not completion.endswith(stops[0]):
        completion += stops[0]
    spans.append((len(prompt), len(prompt) + len(completion)))
    return Sample(entry, prompt + completion, tuple(spans))


def num_shots(max_train_instances: int, round_: int, cfg: Config) -> int:
    """The curriculum: in-context examples grow from 0 to the run spec's number over the first rounds, so the
    model learns to copy and look up on short prompts before it has to find what it needs in long ones."""
    if round_ >= cfg.curriculum_rounds:
        return max_train_instances
    return max_train_instances * round_ // cfg.curriculum_rounds


def round_samples(pools: Sequence[Pool], window: ContextWindow, cfg: Config, round_: int,
                  shots: int | None = None) -> list[Sample]:
    """Every train instance of every pool as a training sequence, with in-context draws seeded by round;
    `shots` in-context examples if given, else the curriculum's number."""
    samples: list[Sample] = []
    for p_index, pool in enumerate(pools):
        adapter = get_adapter(pool.run_spec.adapter_spec, window)
        spec = pool.run_spec.adapter_spec
        k = num_shots(spec.max_train_instances, round_, cfg) if shots is None else shots
        repeats = max(1, math.ceil(cfg.min_samples_per_entry / len(pool.train)))
        for i, instance in enumerate(pool.train):
            lo = max(0, min(i - cfg.example_window // 2, len(pool.train) - cfg.example_window - 1))
            others = pool.train[lo:i] + pool.train[i + 1: lo + cfg.example_window + 1]  # i.i.d., so any will do
            for r in range(repeats):
                seed = ((cfg.seed * 1009 + round_) * 101 + p_index) * 1_000_003 + i * 131 + r
                examples = sample_examples(others, k, seed, spec.sample_train)
                samples.append(adapt_train_instance(pool.entry, adapter, instance, examples))
    return samples


# ---- tokenizer ----------------------------------------------------------------------------------------------
def train_tokenizer(texts: Sequence[str], cfg: Config, out: Path) -> HFTokenizer:
    """Byte-level BPE with single-digit pre-tokens, OPT's special ids and a `</s> $A` post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    # As OPT's tokenizer: transformers prepends </s>; HFTokenizer (add_special_tokens=False) does not.
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                       special_tokens=[("</s>", BOS_ID)])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"), bos_token="</s>", eos_token="</s>",
                            pad_token="<pad>", unk_token="<unk>", model_max_length=cfg.max_positions
                            ).save_pretrained(out)
    return HFTokenizer(out)


@dataclass(frozen=True)
class Encoded:
    entry: str
    ids: list[int]  # BOS + text
    weights: list[float]  # loss weight of predicting ids[t] (weights[0], the BOS, is unused)
    answer: list[bool]  # whether ids[t] belongs to an answer


def encode_samples(tok: HFTokenizer, samples: Sequence[Sample], cfg: Config) -> list[Encoded]:
    """Token ids with BOS, and per-token loss weights: 1 on tokens overlapping an answer span."""
    encodings = tok._tok.encode_batch([s.text for s in samples], add_special_tokens=False)
    out = []
    for sample, enc in zip(samples, encodings, strict=True):
        answer = [False] + [any(start < b and end > a for a, b in sample.answer_spans) for start, end in enc.offsets]
        weights = [1.0 if a else cfg.context_weight for a in answer]
        weights[0] = 0.0
        out.append(Encoded(sample.entry, [BOS_ID, *enc.ids], weights, answer))
    return out


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # ids (b, s), loss weights (b, s), answer mask (b, s)


def batches(encoded: Sequence[Encoded], cfg: Config, seed: int) -> list[Batch]:
    """Rows bucketed by length (rounded up to 32) and cut into batches of `batch_tokens // width` rows, in a
    seeded order. Few distinct shapes keep the CPU kernels' per-shape setup cached. Padding is on the right
    and attention is causal, so no real token attends to a pad and no attention mask is needed."""
    rng = random.Random(seed)
    buckets: dict[int, list[int]] = {}
    for i, row in enumerate(encoded):
        buckets.setdefault(-(-len(row.ids) // 32) * 32, []).append(i)
    groups: list[tuple[int, list[int]]] = []
    for width, members in sorted(buckets.items()):
        rng.shuffle(members)
        rows = max(1, cfg.batch_tokens // width)
        groups += [(width, members[k: k + rows]) for k in range(0, len(members), rows)]
    rng.shuffle(groups)
    result = []
    for width, group in groups:
        ids = torch.full((len(group), width), PAD_ID, dtype=torch.long)
        weights = torch.zeros((len(group), width))
        answer = torch.zeros((len(group), width), dtype=torch.bool)
        for row, i in enumerate(group):
            n = len(encoded[i].ids)
            ids[row, :n] = torch.tensor(encoded[i].ids)
            weights[row, :n] = torch.tensor(encoded[i].weights)
            answer[row, :n] = torch.tensor(encoded[i].answer)
        result.append((ids, weights, answer))
    return result


# ---- model and training -------------------------------------------------------------------------------------
def make_model(cfg: Config, vocab_size: int) -> Any:
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                       ffn_dim=cfg.ffn_dim, num_attention_heads=cfg.num_heads,
                       max_position_embeddings=cfg.max_positions, word_embed_proj_dim=cfg.hidden_size,
                       do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                       layerdrop=0.0, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=BOS_ID)
    model = OPTForCausalLM._from_config(config, attn_implementation="sdpa")
    if cfg.pos_init == "sinusoidal":
        table = model.model.decoder.embed_positions.weight  # (max_positions + 2, h): OPT's offset of 2
        with torch.no_grad():
            positions = torch.arange(table.shape[0], dtype=torch.float32)[:, None] - 2
            freqs = torch.exp(-math.log(10_000.0) * torch.arange(0, cfg.hidden_size, 2) / cfg.hidden_size)
            angles = positions * freqs  # (p, h/2)
            sinusoid = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)  # (p, h)
            table.copy_(sinusoid * config.init_std / sinusoid.std())
    return model.to(cfg.device)


def lr_factor(step: int, cfg: Config) -> float:
    """Linear warmup, then cosine decay to `min_lr_frac` at `cfg.steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


def step_losses(model: Any, batch: Batch) -> tuple[torch.Tensor, float]:
    """(weighted next-token loss, mean loss on answer tokens) of one batch."""
    ids, weights, answer_mask = (t.to(model.device) for t in batch)
    with torch.autocast(model.device.type, dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits  # (b, s, v)
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (b, s-1)
    w, answer = weights[:, 1:], answer_mask[:, 1:]
    answer_loss = nll.detach()[answer].mean().item() if answer.any() else float("nan")
    return (nll * w).sum() / w.sum(), answer_loss


def train(model: Any, round_batches: Iterator[list[Batch]], cfg: Config) -> tuple[dict[str, Any], Config]:
    """Train; returns the run's record and the config it ran (with `steps` fixed if `time_budget_s` chose it)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
    schedule = {"cfg": cfg}  # the lambda reads the final step count once the rate probe has set it
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, schedule["cfg"]))
    model.train()
    history: list[tuple[int, float, float]] = []
    start = time.perf_counter()
    pending: list[Batch] = []
    rounds = 0
    step = 0
    compute_s = 0.0  # time in steps after the first (no waiting for data, no warm-up of kernels)
    while step < schedule["cfg"].steps:
        if not pending:
            pending = list(next(round_batches))
            rounds += 1
        step_start = time.perf_counter()
        loss, answer_loss = step_losses(model, pending.pop(0))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        history.append((step, loss.item(), answer_loss))
        compute_s += (time.perf_counter() - step_start) if step > 0 else 0.0
        if cfg.time_budget_s > 0 and step + 1 == cfg.rate_probe_steps:
            assert cfg.rate_probe_steps <= cfg.warmup_steps, "the schedule must not depend on steps before it is set"
            rate = step / compute_s
            schedule["cfg"] = dataclasses.replace(cfg, steps=int(rate * cfg.time_budget_s) // 100 * 100)
            print(f"{rate:.1f} steps/s: {schedule['cfg'].steps} steps fit in {cfg.time_budget_s:.0f} s", flush=True)
        if step % 100 == 0 or step == schedule["cfg"].steps - 1:
            elapsed = time.perf_counter() - start
            recent = history[-100:]
            print(f"step {step:5d}  round {rounds}  loss {np.mean([h[1] for h in recent]):.4f}  "
                  f"answer {np.nanmean([h[2] for h in recent]):.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{(step + 1) / elapsed:.2f} steps/s", flush=True)
        step += 1
    last = history[-50:]
    final = dataclasses.replace(schedule["cfg"], time_budget_s=0.0)
    return {"train_s": round(time.perf_counter() - start, 1), "rounds_started": rounds,
            "final_loss": round(float(np.mean([h[1] for h in last])), 4),
            "final_answer_loss": round(float(np.nanmean([h[2] for h in last])), 4)}, final


def save_model(model: Any, out: Path) -> None:
    """fp16 safetensors in the Hugging Face layout (config.json, generation_config.json, model.safetensors)."""
    model.eval()
    model.generation_config.update(bos_token_id=BOS_ID, eos_token_id=BOS_ID, pad_token_id=PAD_ID, do_sample=False)
    model.half().save_pretrained(out, safe_serialization=True)
    model.float()


# ---- evaluation ---------------------------------------------------------------------------------------------
def evaluate(model_dir: Path, max_eval_instances: int, device: str = "cpu", batch_size: int = 16,
             cross_check: int = 2) -> dict[str, Any]:
    """Greedy scores on each entry's test split (HELM's seed-0 sample of `max_eval_instances`, 1 trial)."""
    from flexgen_core import Engine, Policy

    tok = HFTokenizer(model_dir)
    texts = tok.token_texts()
    results: dict[str, Any] = {"max_eval_instances": max_eval_instances, "scores": {}, "examples": {}}
    checked = agreed = 0
    start = time.perf_counter()
    with Engine.from_pretrained(model_dir, device=device, policy=Policy(gpu_batch_size=batch_size)) as engine:
        window = ContextWindow(tok, engine.spec.max_positions, reserved_tokens=1)  # the BOS
        for entry in ENTRIES:
            run_spec = construct_run_spec(entry, model=MODEL_NAME, max_eval_instances=max_eval_instances)
            spec = dataclasses.replace(run_spec.adapter_spec, eval_splits=(TEST_SPLIT,))
            instances = create_scenario(run_spec.scenario_spec).get_instances()
            instances = downsample_eval_instances(instances, max_eval_instances, eval_splits=(TEST_SPLIT,))
            states = adapt(instances, spec, window).request_states
            request = states[0].request
            stops = stop_token_ids(tok, request.stop_sequences)
            prompts = [[BOS_ID, *tok.encode(s.request.prompt)] for s in states]
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
            generated: list[list[int]] = [[] for _ in prompts]
            for k in range(0, len(order), batch_size):
                chunk = order[k: k + batch_size]
                outs = engine.generate([prompts[i] for i in chunk], request.max_tokens, stop_token_ids=stops,
                                       return_logprobs=True)
                for i, out in zip(chunk, outs, strict=True):
                    generated[i] = out.token_ids
            names = metric_names(run_spec)
            totals = dict.fromkeys(names, 0.0)
            for state, ids in zip(states, generated, strict=True):
                tokens = [Token(texts[t], 0.0) for t in ids]
                pred: str | None = truncate_completion("".join(texts[t] for t in ids), tokens,
                                                       request.stop_sequences, request.max_tokens).text
                if state.output_mapping is not None:
                    pred = state.output_mapping.get(pred.strip())
                golds = [ref.output.text for ref in state.instance.all_correct_references]
                for name in names:
                    totals[name] += score_references(name, golds, pred)
            results["scores"][entry] = {name: round(total / len(states), 3) for name, total in totals.items()}
            results["examples"][entry] = [{"completion": tok.decode(generated[i]),
                                           "gold": states[i].instance.all_correct_references[0].output.text}
                                          for i in range(2)]
            c, a = cross_check_hf(model_dir, prompts[:cross_check], generated[:cross_check])
            checked, agreed = checked + c, agreed + a
            print(f"{entry:50s} " + "  ".join(f"{n}={v:.3f}" for n, v in results["scores"][entry].items()),
                  flush=True)
    results["eval_s"] = round(time.perf_counter() - start, 1)
    results["hf_cross_check"] = f"{agreed}/{checked} prompts: identical greedy tokens from transformers"
    print(results["hf_cross_check"])
    return results


_HF_MODELS: dict[str, Any] = {}


def cross_check_hf(model_dir: Path, prompts: list[list[int]], generated: list[list[int]]) -> tuple[int, int]:
    """How many of `prompts` transformers' greedy `generate` continues with exactly `generated` (fp32)."""
    from transformers import OPTForCausalLM

    key = str(model_dir)
    if key not in _HF_MODELS:
        _HF_MODELS[key] = OPTForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = _HF_MODELS[key]
    agreed = 0
    for prompt, ids in zip(prompts, generated, strict=True):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=len(ids), do_sample=False,
                                 eos_token_id=None, pad_token_id=PAD_ID)
        agreed += out[0, len(prompt):].tolist() == ids
    return len(prompts), agreed


# ---- record -------------------------------------------------------------------------------------------------
def write_training_md(out: Path, record: dict[str, Any]) -> None:
    cfg, corpus, run = record["config"], record["corpus"], record["training"]
    lines = [
        "# tiny-opt: the embedded default model",
        "",
        "A pre-LayerNorm OPT trained from scratch on the train splits of the procedural scenarios, in the exact",
        "prompt format the evaluation uses. It is the default model of `make demo` and `flexgen eval`.",
        "",
        ("Reproduce (CPU, bf16 autocast; deterministic on one machine):" if cfg["device"] == "cpu" else
         "Reproduce (trained on the GPU machine, one H100, with `PYTHONPATH=.`; deterministic on one machine up to "
         "CUDA kernels without a deterministic mode):"),
        "",
        f"    {record['command']}",
        "",
        f"- seed {cfg['seed']}; torch {record['versions']['torch']}, transformers {record['versions']['transformers']},"
        f" tokenizers {record['versions']['tokenizers']}",
        f"- model: {cfg['num_layers']} layers, hidden {cfg['hidden_size']}, {cfg['num_heads']} heads, ffn "
        f"{cfg['ffn_dim']}, vocab {record['vocab_size']}, {cfg['max_positions']} positions, "
        f"{record['parameters'] / 1e6:.2f} M parameters, stored fp16 ({record['size_bytes'] / 2**20:.1f} MiB)",
        "- tokenizer: byte-level BPE trained on the epoch-0 corpus, digits split one by one; `<s>` 0, `<pad>` 1,"
        " `</s>` 2 (BOS and EOS), `<unk>` 3",
        f"- training: {cfg['steps']} steps of <= {cfg['batch_tokens']} padded tokens, AdamW (lr {cfg['lr']}, betas "
        f"{tuple(cfg['betas'])}, weight decay {cfg['weight_decay']}), {cfg['warmup_steps']} warmup steps then "
        f"cosine to {cfg['min_lr_frac']} x lr, grad clip {cfg['grad_clip']}, bf16 autocast, "
        f"{cfg['threads']} threads",
        f"- loss: next-token cross-entropy; answer tokens (every in-context answer and the final completion with "
        f"its stop sequence) weigh 1, all other tokens {cfg['context_weight']}",
        f"- wall time: {run['train_s'] / 60:.1f} min training ({run['rounds_started']} rounds started), "
        f"{record['total_s'] / 60:.1f} min in all",
        f"- final loss (mean of the last 50 steps): {run['final_loss']} weighted, {run['final_answer_loss']} on "
        f"answer tokens",
        "",
        "## Corpus (train splits only)",
        "",
        "Each train instance is adapted by its run entry's own run spec and adapter as if it were an eval instance,",
        "with in-context examples drawn by HELM's `sample_examples` from the other train instances of its round;",
        "the gold completion and the stop sequence follow. Round 0 uses HELM's train splits (seed 42). Every later",
        "round uses fresh train splits of the same generators (seed 1000 * (seed + 1) + round), so no instance",
        "is seen twice and the model cannot memorise its way through. Dyck's 3-instance split gets",
        f"{cfg['round_size']} generated words (lengths 4-{cfg['dyck_max_train_length']}) in every round; the even/odd "
        f"scenarios have no seed and reuse their 11 instances, repeated to {cfg['min_samples_per_entry']} sequences "
        "with fresh in-context draws. Any instance whose input equals a valid or test input of its scenario is "
        "dropped.",
        "",
        "| run entry | round 0: HELM train | generated | dropped | sequences | tokens | longest |",
        "|---|---|---|---|---|---|---|",
    ]
    first = corpus["rounds"][0] if corpus["rounds"] else {"entries": {}, "sequences": 0, "tokens": 0}
    for entry, c in first["entries"].items():
        lines.append(f"| `{entry}` | {c['helm']} | {c['generated']} | {c['dropped']} | {c['sequences']} | "
                     f"{c['tokens']} | {c['longest']} |")
    seen = corpus["warmup"] + corpus["rounds"]
    lines += [f"| all | | | | {first['sequences']} | {first['tokens']} | |", "",
              f"Before round 0, {len(corpus['warmup'])} warm-up rounds of `{WARMUP_ENTRY}` alone "
              f"({cfg['warmup_size']} fresh instances each, with {', '.join(map(str, cfg['warmup_shots']))} "
              "in-context examples) teach copying; in rounds below "
              f"{cfg['curriculum_rounds']} the number of in-context examples grows to the run spec's. Training "
              f"used {len(corpus['warmup'])} warm-up and {len(corpus['rounds'])} main rounds "
              f"({sum(r['sequences'] for r in seen)} sequences, {sum(r['tokens'] for r in seen)} tokens prepared; "
              "the last round is used in part).", ""]
    if "evaluation" in record:
        ev = record["evaluation"]
        lines += [
            "## Scores",
            "",
            f"Greedy decoding with `flexgen_core.Engine` (CPU, fp32), {ev['max_eval_instances']} test instances per "
            "scenario (HELM's seed-0 sample of the test split), 1 train trial, the run spec's in-context examples,",
            "stop sequences and max tokens, BOS `</s>` prepended, HELM's truncation and metrics; multiple-choice",
            f"letters mapped to their choice. {ev['hf_cross_check']}. Evaluation took {ev['eval_s'] / 60:.1f} min.",
            "",
            "| run entry | scores |",
            "|---|---|",
        ]
        for entry, scores in ev["scores"].items():
            lines.append(f"| `{entry}` | " + ", ".join(f"{n} {v:.2f}" for n, v in scores.items()) + " |")
        lines.append("")
    (out / "TRAINING.md").write_text("\n".join(lines))


# ---- main ---------------------------------------------------------------------------------------------------
def seed_everything(seed: int, threads: int, device: str) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=device != "cpu")  # some CUDA backward kernels have none


def train_and_save(cfg: Config, out: Path) -> dict[str, Any]:
    import tokenizers
    import transformers

    seed_everything(cfg.seed, cfg.threads, cfg.device)
    t0 = time.perf_counter()
    first_pools = [build_pool(entry, cfg, 0) for entry in ENTRIES]
    loose = ContextWindow(_CharCounter(), 10**9)
    tok = train_tokenizer([s.text for s in round_samples(first_pools, loose, cfg, cfg.curriculum_rounds)], cfg, out)
    corpus: dict[str, Any] = {"warmup": [], "rounds": []}

    def round_batches() -> Iterator[list[Batch]]:
        # Warm-up: copying is the skill most tasks build on, and a small model finds it late (or never) in
        # long mixed prompts; on short copy prompts alone it appears within ~100 steps. Rounds are prepared
        # ahead by `prep_workers` processes; each round depends only on (cfg, its index), never on the workers.
        keys = itertools.chain(((True, k) for k in range(len(cfg.warmup_shots))),
                               ((False, r) for r in itertools.count()))
        for (warmup, index), (batch_list, stats) in _prefetched(cfg, out, keys):
            corpus["warmup" if warmup else "rounds"].append(stats)
            if not warmup and index == 0:
                print(f"round 0: {stats['sequences']} sequences, {stats['tokens']} tokens; vocab "
                      f"{tok.vocab_size}; prepared in {time.perf_counter() - t0:.1f} s", flush=True)
            yield batch_list

    torch.manual_seed(cfg.seed)
    model = make_model(cfg, tok.vocab_size)
    run, cfg = train(model, round_batches(), cfg)
    save_model(model, out)
    return {"command": reproduce_command(cfg),
            "config": dataclasses.asdict(cfg), "vocab_size": tok.vocab_size,
            "parameters": sum(p.numel() for p in model.parameters()),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "tokenizers": tokenizers.__version__},
            "corpus": corpus, "training": run}


def prepare_round(cfg: Config, tok_dir: Path, warmup: bool, index: int) -> tuple[list[Batch], dict[str, Any]]:
    """The batches and corpus statistics of warm-up round `index` (simple_copy only, a fixed number of
    in-context examples) or of main round `index` (every entry, the curriculum's number of examples)."""
    torch.set_num_threads(1)
    tok = HFTokenizer(tok_dir)
    window = ContextWindow(tok, cfg.max_positions, reserved_tokens=1)
    if warmup:
        round_, shots = -1 - index, cfg.warmup_shots[index]
        pools = [build_pool(WARMUP_ENTRY, cfg, round_, cfg.warmup_size)]  # seeds below every main round's
        seed = cfg.seed * 7919 - 1 - index
    else:
        round_, shots = index, None
        pools = [build_pool(entry, cfg, round_) for entry in ENTRIES]
        seed = cfg.seed * 7919 + round_
    encoded = encode_samples(tok, round_samples(pools, window, cfg, round_, shots), cfg)
    assert max(len(e.ids) for e in encoded) <= cfg.max_positions
    return batches(encoded, cfg, seed), round_stats(pools, encoded, round_, cfg, shots)


def _prefetched(cfg: Config, tok_dir: Path, keys: Iterator[tuple[bool, int]]
                ) -> Iterator[tuple[tuple[bool, int], tuple[list[Batch], dict[str, Any]]]]:
    """(key, prepare_round(key)) in key order; with `prep_workers` > 0, up to that many rounds are prepared
    ahead in worker processes (spawned: the trainer may hold a CUDA context)."""
    if cfg.prep_workers <= 0:
        for key in keys:
            yield key, prepare_round(cfg, tok_dir, *key)
        return
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(cfg.prep_workers, mp_context=multiprocessing.get_context("spawn")
                                                ) as pool:
        try:
            queue = [(key, pool.submit(prepare_round, cfg, tok_dir, *key))
                     for key in itertools.islice(keys, cfg.prep_workers)]
            while queue:
                key, future = queue.pop(0)
                queue += [(k, pool.submit(prepare_round, cfg, tok_dir, *k)) for k in itertools.islice(keys, 1)]
                yield key, future.result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


def reproduce_command(cfg: Config) -> str:
    """The command line that trains exactly `cfg`: --steps/--seed and a --set for every non-default field."""
    defaults = Config()
    parts = ["python scripts/train_tiny_model.py", f"--steps {cfg.steps}"]
    if cfg.seed != defaults.seed:
        parts.append(f"--seed {cfg.seed}")
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        skip = f.name in ("steps", "seed", "rate_probe_steps") or isinstance(value, tuple)
        if not skip and value != getattr(defaults, f.name):
            parts.append(f"--set {f.name}={value}")
    return " ".join(parts)


class _CharCounter:
    """A TokenCounter of one token per character: the window for the tokenizer's own training corpus."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(map(chr, ids))


def round_stats(pools: Sequence[Pool], encoded: Sequence[Encoded], round_: int, cfg: Config,
                shots: int | None = None) -> dict[str, Any]:
    """Per entry: train instances (from HELM's split, generated, dropped), sequences and tokens of one round."""
    entries: dict[str, Any] = {}
    for pool in pools:
        rows = [e for e in encoded if e.entry == pool.entry]
        k = num_shots(pool.run_spec.adapter_spec.max_train_instances, round_, cfg) if shots is None else shots
        entries[pool.entry] = {"helm": pool.helm, "generated": pool.generated, "dropped": pool.dropped, "shots": k,
                               "sequences": len(rows), "tokens": sum(len(r.ids) for r in rows),
                               "longest": max(len(r.ids) for r in rows)}
    return {"entries": entries, "sequences": len(encoded), "tokens": sum(len(r.ids) for r in encoded)}


def save_record(out: Path, record: dict[str, Any], total_s: float | None) -> None:
    """training.json (machine-readable) and TRAINING.md; `total_s` is the whole run's wall time, if known."""
    if total_s is not None:
        record["total_s"] = round(total_s, 1)
    record["size_bytes"] = sum(f.stat().st_size for f in out.iterdir()
                               if f.is_file() and f.name not in ("training.json", "TRAINING.md"))
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    write_training_md(out, record)


def config_from(args: argparse.Namespace) -> Config:
    """Config defaults, then --steps/--seed, then each --set FIELD=VALUE (converted to the field's type)."""
    cfg = Config(seed=args.seed, steps=args.steps)
    types = {f.name: type(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in types or types[name] is tuple:
            settable = ", ".join(n for n, t in types.items() if t is not tuple)
            raise SystemExit(f"--set {item!r}: settable fields are {settable}")
        cfg = dataclasses.replace(cfg, **{name: types[name](value)})
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=TINY_MODEL_DIR, help="model directory (default: the shipped asset)")
    ap.add_argument("--steps", type=int, default=Config.steps)
    ap.add_argument("--seed", type=int, default=Config.seed)
    ap.add_argument("--eval-only", action="store_true", help="evaluate the saved model and rewrite its scores")
    ap.add_argument("--no-eval", action="store_true", help="train and save only")
    ap.add_argument("--eval-instances", type=int, default=100, help="test instances per scenario")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a Config field (exploration; the shipped model uses the defaults)")
    args = ap.parse_args()
    record_path = args.out / "training.json"
    start = time.perf_counter()
    if args.eval_only:
        record = json.loads(record_path.read_text())
        torch.set_num_threads(record["config"]["threads"])
    else:
        record = train_and_save(config_from(args), args.out)
        save_record(args.out, record, time.perf_counter() - start)  # kept even if the evaluation fails
    if not args.no_eval:
        record["evaluation"] = evaluate(args.out, args.eval_instances, "cpu")
        save_record(args.out, record, None if args.eval_only else time.perf_counter() - start)
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
