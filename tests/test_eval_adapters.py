"""Adapters: HELM's in-context example choice, golden prompts (equal to HELM 0.5.16's assembly), window
truncation, multiple-choice requests, and the request bridge (stop token ids, completion truncation, scoring)."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest

from flexgen_core.evaluation.adapters import adapt, get_adapter, sample_examples
from flexgen_core.evaluation.prompt import ContextWindow
from flexgen_core.evaluation.requests import scoring_texts, scoring_token_ids, stop_token_ids, truncate_completion
from flexgen_core.evaluation.run_spec import construct_run_spec
from flexgen_core.evaluation.scenarios import create_scenario, downsample_eval_instances
from flexgen_core.evaluation.schema import AdapterSpec, Input, Instance, Output, Reference, ScenarioState, Token
from flexgen_core.evaluation.tokenizer import ByteTokenizer, HFTokenizer

BYTES = ByteTokenizer()
WIDE = ContextWindow(BYTES, 100_000)


@functools.cache
def _instances(entry: str, max_eval_instances: int) -> tuple[Instance, ...]:
    run_spec = construct_run_spec(entry, model="org/m")
    instances = create_scenario(run_spec.scenario_spec).get_instances()
    return tuple(downsample_eval_instances(instances, max_eval_instances))


def _state(entry: str, window: ContextWindow = WIDE, max_eval_instances: int = 3, **spec_changes) -> ScenarioState:
    """Adapt the first eval instances of a run entry's scenario (HELM's seed-0 sample of them)."""
    run_spec = construct_run_spec(entry, model="org/m", max_eval_instances=max_eval_instances)
    spec = dataclasses.replace(run_spec.adapter_spec, **spec_changes)
    return adapt(_instances(entry, max_eval_instances), spec, window)


def _qa(text: str, answer: str | None, split: str = "train") -> Instance:
    refs = [Reference(Output(answer), ["correct"])] if answer is not None else [Reference(Output("x"))]
    return Instance(Input(text), refs, split=split)


# ---- in-context examples ------------------------------------------------------------------------------------
def test_sample_examples_balances_labels_as_helm() -> None:
    no, yes1, yes2 = _qa("say no", "no"), _qa("say yes", "yes"), _qa("say yes again", "yes")
    picked = sample_examples([no, yes1, yes2], 2, seed=0)
    assert [i.references[0].output.text for i in picked] == ["yes", "no"]  # HELM's docstring example
    assert sample_examples([no, yes1, yes2], 2, seed=0) == picked  # seeded
    unlabeled = [_qa(f"u{i}", None) for i in range(4)]
    mixed = sample_examples([no, *unlabeled], 3, seed=1)  # labels run dry: the rest are unlabeled (HELM hangs)
    assert mixed[0] is no and len(mixed) == 3 and all(i in unlabeled for i in mixed[1:])
    train = [_qa(f"q{i}", str(i)) for i in range(10)]
    assert sample_examples(train, 3, seed=2, sample_train=False) == train[6:9]
    assert sample_examples(train, 0, seed=0) == [] and len(sample_examples(train, 50, seed=0)) == 10


# ---- golden prompts -------------------------------------------------------------------------------------------
SYNTHETIC_REASONING_PROMPT = (
    "Please solve the following problem.\n\n"
    "Rules: Y - X * | - * X Y | * Y - X | * X - Y | Result: * blackberry - banana lion\nTarget: * Y - X\n\n"
    "Rules: X * - | * - X | * - X | - X X * | Result: - pear rat pear rat *\nTarget: - X X *\n\n"
    "Rules: Y + X * | Y * X + | * + X Y | + * Y X | Result: + * apple apple buffalo blackberry\nTarget: + * Y X\n\n"
    "Rules: Z * * | Z * * | * * Z Z | Z * * | Result: * * shark shark\nTarget: * * Z Z\n\n"
    "Rules: Y - Z - | - Z Y - | - - Z Y | Z - Y - | Result: watermelon - penguin pear -\nTarget: Y - Z -\n\n"
    "Rules: * X + = | X = + * | = + * X | X = + * X | Result: kiwi = + * kiwi\nTarget:")
SIMPLE_MCQA_PROMPT = (
    "Answer the following questions with a single letter only.\n\n"
    "Question: Is 16 even or odd?\nA. Even\nB. Odd\nAnswer: A\n\n"
    "Question: Is 17 even or odd?\nA. Even\nB. Odd\nAnswer: B\n\n"
    "Question: Is 10 even or odd?\nA. Even\nB. Odd\nAnswer: A\n\n"
    "Question: Is 15 even or odd?\nA. Even\nB. Odd\nAnswer: B\n\n"
    "Question: Is 20 even or odd?\nA. Even\nB. Odd\nAnswer: A\n\n"
    "Question: Is 70 even or odd?\nA. Even\nB. Odd\nAnswer:")
DYCK_PROMPT = (
    "Please complete the rest of the following Dyck sequences, making sure that the parentheses are closed "
    "properly.\n\n"
    "Input: ( [ ( [ [ ( [ ( [ ] ) ] ) [ ( [ ] ) ] ( ) ] ] ) ] [ ( ( ) ) ] [ ] [ ] ( [ ] ) )\n"
    "Input: [ [ [ [ [ [ ] ] ] ] ] ]\n"
    "Input: ( ( [ ( ) ] ) )\n"
    "Input: [ [ ( ( ( ) ) ) [ [ ( ( ( [ [ ] ( [ [ ] ] ) ( [ ] ) ] [ ( ) ( ( ) ) ] ) ) ) ] ] ( ( ) [ [ ] ] ) [ ] ] ] "
    "( ( ( [ [ ( ( ( [ ] ) ) ) ] ( [ ( [ [ ] ] [ ] ) [ ] ] ) ] )")


def test_golden_generation_prompt() -> None:
    state = _state("synthetic_reasoning:mode=pattern_match")
    first = state.request_states[0]
    assert first.request.prompt == SYNTHETIC_REASONING_PROMPT
    assert (first.num_train_instances, first.prompt_truncated, first.train_trial_index) == (5, False, 0)
    r = first.request
    assert (r.model, r.temperature, r.num_completions, r.max_tokens, r.stop_sequences) == ("org/m", 0.0, 1, 50, ("\n",))
    assert len(state.request_states) == 3 and state.adapter_spec.max_eval_instances == 3
    assert _state("dyck_language:num_parenthesis_pairs=2").request_states[0].request.prompt == DYCK_PROMPT


def test_golden_multiple_choice_joint_prompt() -> None:
    first = _state("simple_mcqa").request_states[0]
    assert first.request.prompt == SIMPLE_MCQA_PROMPT
    assert first.output_mapping == {"A": "Even", "B": "Odd"}
    r = first.request
    assert (r.num_completions, r.top_k_per_token, r.max_tokens, r.stop_sequences) == (1, 5, 1, ())
    custom_labels = _state("simple_mcqa", reference_prefix="(1) ", reference_prefix_characters=["x", "y"])
    prompt = custom_labels.request_states[0].request.prompt
    assert "(x) Even\n(y) Odd\nAnswer: x\n" in prompt and custom_labels.request_states[0].output_mapping == {
        "x": "Even", "y": "Odd"}


def test_trials_share_examples_and_repeat_requests() -> None:
    state = _state("simple_mcqa", num_train_trials=2, num_trials=2)
    assert len(state.request_states) == 2 * 3 * 2
    by_trial = [[s for s in state.request_states if s.train_trial_index == t] for t in (0, 1)]
    prompts = [{s.request.prompt.rsplit("\n\n", 1)[0] for s in states} for states in by_trial]
    assert len(prompts[0]) == 1 and len(prompts[1]) == 1 and prompts[0] != prompts[1]  # one example set per trial
    assert [s.request.random for s in by_trial[0]] == [None, None, None, "1", "1", "1"]


# ---- context window --------------------------------------------------------------------------------------------
def test_window_drops_examples_first_then_truncates_from_the_right() -> None:
    full = len(SYNTHETIC_REASONING_PROMPT.encode())
    fewer = _state("synthetic_reasoning:mode=pattern_match", ContextWindow(BYTES, full + 50 - 1))  # 1 byte short
    first = fewer.request_states[0]
    assert (first.num_train_instances, first.prompt_truncated) == (4, False)
    fifth_example = ("Rules: Y - Z - | - Z Y - | - - Z Y | Z - Y - | Result: watermelon - penguin pear -\n"
                     "Target: Y - Z -\n\n")
    assert first.request.prompt == SYNTHETIC_REASONING_PROMPT.replace(fifth_example, "")  # the last one goes
    tiny = _state("synthetic_reasoning:mode=pattern_match", ContextWindow(BYTES, 80, reserved_tokens=1))
    cut = tiny.request_states[0]
    assert (cut.num_train_instances, cut.prompt_truncated) == (0, True)
    assert len(cut.request.prompt.encode()) == 80 - 1 - 50  # window - reserved - max_tokens
    assert cut.request.prompt == "Please solve the following pr"  # HELM keeps the beginning
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        _state("synthetic_reasoning:mode=pattern_match", ContextWindow(BYTES, 50))


# ---- multiple choice by log-likelihood --------------------------------------------------------------------------
def _separate_state(window: ContextWindow = WIDE) -> ScenarioState:
    spec = construct_run_spec("custom:path=x.jsonl,choices_column=c,method=multiple_choice_separate_original,"
                              "model=m").adapter_spec
    question = Instance(Input("The sky is"), [Reference(Output("blue"), ["correct"]), Reference(Output("green"))],
                        split="test")
    return get_adapter(spec, window).adapt([question])


def test_multiple_choice_separate_requests_and_scoring_pairs() -> None:
    state = _separate_state()
    assert [s.request.prompt for s in state.request_states] == ["The sky is blue", "The sky is green"]
    first = state.request_states[0]
    assert (first.reference_index, first.request_mode, first.request.echo_prompt, first.request.max_tokens) == (
        0, "original", True, 0)
    assert scoring_texts(first) == ("The sky is", " blue")
    context, continuation = scoring_token_ids(BYTES, state.request_states[1])
    assert BYTES.decode(context) == "The sky is" and BYTES.decode(continuation) == " green"
    cut = _separate_state(ContextWindow(BYTES, 12)).request_states[1]  # too long: the start goes, the answer stays
    assert cut.prompt_truncated and cut.request.prompt == "sky is green" and scoring_texts(cut)[1] == " green"
    with pytest.raises(ValueError, match="not a scoring request"):
        scoring_texts(_state("simple_mcqa").request_states[0])


# ---- stop tokens and completion truncation ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> HFTokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Each text ends in a run of newlines, which byte-level pre-tokenization keeps whole: "\n\n" gets merged.
    tok.train_from_iterator(["Question: is it red?\nAnswer: yes.\n\n", "###\n\n"] * 20, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return HFTokenizer(path.parent)


def test_stop_token_ids(hf_tokenizer: HFTokenizer) -> None:
    assert stop_token_ids(BYTES, ["\n"]) == [10] and stop_token_ids(BYTES, []) == []
    assert stop_token_ids(BYTES, ["\n", "#"]) == [10, 35]
    ids = stop_token_ids(hf_tokenizer, ["\n"])
    texts = hf_tokenizer.token_texts()
    assert ids and all("\n" in texts[i] for i in ids)
    assert {i for i, t in enumerate(texts) if "\n" in t} == set(ids)
    assert hf_tokenizer.token_id("</s>") not in ids and texts[hf_tokenizer.token_id("</s>")] == ""  # type: ignore[index]
    merged = [i for i in ids if texts[i] != "\n"]
    assert merged, "the trained vocabulary merges newlines with other text; those tokens must stop too"
    with pytest.raises(ValueError, match="empty stop sequence"):
        stop_token_ids(BYTES, [""])


def test_hf_tokenizer_round_trip_and_missing_file(hf_tokenizer: HFTokenizer, tmp_path: Path) -> None:
    text = "Question: is it red?\nAnswer:"
    assert hf_tokenizer.decode(hf_tokenizer.encode(text)) == text
    assert hf_tokenizer.vocab_size == len(hf_tokenizer.token_texts()) > 256
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        HFTokenizer(tmp_path)


def test_truncate_completion_as_helm() -> None:
    tokens = [Token("Par", -0.5), Token("is", -0.25), Token("\n", -1.0), Token("Question", -2.0)]
    out = truncate_completion("Paris\nQuestion", tokens, ["\n"], max_tokens=10, finish_reason="stop")
    assert (out.text, [t.text for t in out.tokens], out.logprob, out.finish_reason) == (
        "Paris", ["Par", "is"], -0.75, {"reason": "stop"})
    straddling = [Token("Yes", -0.5), Token(".\n", -0.5), Token("Q", -1.0)]  # token containing the stop is kept
    out = truncate_completion("Yes.\nQ", straddling, ["\n"], max_tokens=10)
    assert (out.text, len(out.tokens), out.logprob) == ("Yes.", 2, -1.0)
    out = truncate_completion("a###b\nc", [Token(c, -1.0) for c in "a###b\nc"], ["\n", "###"], max_tokens=10)
    assert out.text == "a" and len(out.tokens) == 1  # the earliest stop sequence wins
    out = truncate_completion("abcd", [Token(c, -1.0) for c in "abcd"], ["\n"], max_tokens=2, finish_reason="length")
    assert (out.text, out.logprob, out.finish_reason) == ("ab", -2.0, {"reason": "length"})
    out = truncate_completion("ab", [Token("ab", -0.1)], ["\n"], max_tokens=5, finish_reason="length")
    assert (out.text, out.finish_reason) == ("ab", {"reason": "length"})


def test_adapter_refuses_unknown_method() -> None:
    with pytest.raises(ValueError, match="unknown adaptation method 'language_modeling'"):
        get_adapter(AdapterSpec(method="language_modeling"), WIDE)
