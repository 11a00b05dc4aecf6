"""HELM data model: JSON shapes and exact round trips for every schema class, and refusals of bad JSON."""

from __future__ import annotations

import dataclasses
import json

import pytest

from flexgen_core.evaluation.schema import (
    AdapterSpec,
    GeneratedOutput,
    Input,
    Instance,
    MetricSpec,
    ObjectSpec,
    Output,
    Reference,
    Request,
    RequestResult,
    RequestState,
    RunSpec,
    ScenarioSpec,
    ScenarioState,
    Substitution,
    Token,
)

INSTANCE = Instance(Input("Is 24 even or odd?"), [Reference(Output("Even"), ["correct"]), Reference(Output("Odd"))],
                    split="test", sub_split="numbers", id="id7")
ADAPTER_SPEC = AdapterSpec(method="multiple_choice_joint", instructions="Answer.\n", input_prefix="Question: ",
                           reference_prefix_characters=["W", "X"], substitutions=[Substitution("\n", ";\n")],
                           max_eval_instances=10, num_outputs=1, temperature=0.0, max_tokens=1,
                           stop_sequences=["\n", "###"], random="3", eval_splits=["test"],
                           output_mapping_pattern=r"([A-Z])", model="org/tiny", model_deployment="org/tiny")
REQUEST = Request(model="org/tiny", model_deployment="org/tiny", prompt="Q: 1+1?\nA:", temperature=0.0,
                  num_completions=2, top_k_per_token=5, max_tokens=4, stop_sequences=["\n"], random="1")
COMPLETION = GeneratedOutput("2", -0.25, [Token("2", -0.25)], {"reason": "stop"})
RESULT = RequestResult(success=True, completions=[COMPLETION, GeneratedOutput("3", -2.5, [Token("3", -2.5)])],
                       cached=False, request_time=0.5, request_datetime=1700000000, batch_size=8,
                       batch_request_time=4.0)
STATE = RequestState(INSTANCE, None, None, 0, {"A": "Even", "B": "Odd"}, REQUEST, RESULT, 5, False)
SCORING_STATE = RequestState(INSTANCE, 1, "original", 2, None, dataclasses.replace(REQUEST, echo_prompt=True), None,
                             0, True, num_conditioning_tokens=1, annotations={"judge": {"score": 1}})
RUN_SPEC = RunSpec("synthetic_reasoning:mode=pattern_match,model=org/tiny",
                   ScenarioSpec("flexgen_core.evaluation.scenarios.x.X", {"mode": "pattern_match", "n": 3}),
                   ADAPTER_SPEC, [MetricSpec("m.BasicGenerationMetric", {"names": ["exact_match"]}), MetricSpec("m.C")],
                   groups=["synthetic_reasoning"])

RECORDS = [Input("x"), Output("y"), Reference(Output("y"), ["correct"]), INSTANCE, Instance(Input("bare"), []),
           Substitution("a", "b"), AdapterSpec(), ADAPTER_SPEC, Request(), REQUEST, Token("a", -1.0), COMPLETION,
           RequestResult(success=False, error="out of memory"), RESULT, STATE, SCORING_STATE,
           ScenarioState(ADAPTER_SPEC, [STATE, SCORING_STATE]), ObjectSpec("a.B", {"k": [1, 2]}),
           ScenarioSpec("a.B"), MetricSpec("a.C", {"names": ["f1_score"]}), RUN_SPEC]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_json_round_trip_is_exact(record) -> None:
    data = record.to_dict()
    text = json.dumps(data)
    again = type(record).from_dict(json.loads(text))
    assert again == record
    assert again.to_dict() == data
    assert json.dumps(again.to_dict()) == text  # same keys in the same order


def test_none_fields_are_left_out_as_helm_writes_them() -> None:
    data = STATE.to_dict()
    assert "reference_index" not in data and "request_mode" not in data and "annotations" not in data
    assert data["num_conditioning_tokens"] == 0
    assert Instance(Input("x"), []).to_dict() == {"input": {"text": "x"}, "references": []}
    assert "finish_reason" not in GeneratedOutput("a", 0.0, []).to_dict()


def test_helm_shapes_and_field_order() -> None:
    assert INSTANCE.to_dict() == {
        "input": {"text": "Is 24 even or odd?"},
        "references": [{"output": {"text": "Even"}, "tags": ["correct"]}, {"output": {"text": "Odd"}, "tags": []}],
        "split": "test", "sub_split": "numbers", "id": "id7"}
    assert list(AdapterSpec().to_dict()) == [
        "method", "global_prefix", "global_suffix", "instructions", "input_prefix", "input_suffix",
        "reference_prefix", "reference_suffix", "chain_of_thought_prefix", "chain_of_thought_suffix",
        "output_prefix", "output_suffix", "instance_prefix", "substitutions", "max_train_instances", "num_outputs",
        "num_train_trials", "num_trials", "sample_train", "model_deployment", "model", "temperature", "max_tokens",
        "stop_sequences", "multi_label"]
    assert RESULT.to_dict()["embedding"] == []  # HELM's RequestResult always carries it
    assert list(RUN_SPEC.to_dict()) == ["name", "scenario_spec", "adapter_spec", "metric_specs", "groups"]


def test_reads_json_written_by_helm() -> None:
    helm_state = {
        "instance": {"input": {"text": "2+2"}, "references": [{"output": {"text": "4"}, "tags": ["correct"]}],
                     "split": "test", "id": "id3"},
        "train_trial_index": 0,
        "request": {"model_deployment": "huggingface/gpt2", "model": "openai/gpt2", "embedding": False,
                    "prompt": "2+2=", "temperature": 0, "num_completions": 1, "top_k_per_token": 1, "max_tokens": 5,
                    "stop_sequences": ["\n"], "echo_prompt": False, "top_p": 1, "presence_penalty": 0,
                    "frequency_penalty": 0},
        "result": {"success": True, "embedding": [], "completions": [
            {"text": " 4", "logprob": -0.5, "tokens": [{"text": " 4", "logprob": -0.5}]}],
            "cached": True, "request_time": 0.1, "request_datetime": 1690000000},
        "num_train_instances": 5, "prompt_truncated": False, "num_conditioning_tokens": 0}
    state = RequestState.from_dict(helm_state)
    assert state.reference_index is None and state.output_mapping is None
    assert state.request.temperature == 0.0 and isinstance(state.request.temperature, float)
    assert state.result is not None and state.result.completions[0].tokens[0].text == " 4"
    assert state.instance.first_correct_reference == Reference(Output("4"), ("correct",))


@pytest.mark.parametrize("cls, data, message", [
    (Instance, {"input": {"text": "a"}, "references": [], "extra": 1}, "unknown field(s) 'extra'"),
    (Instance, {"input": {"text": "a"}}, "missing required field(s) 'references'"),
    (Instance, {"input": {"text": 5}, "references": []}, "Input.text: expected str, got int 5"),
    (Reference, {"output": {"text": "a"}, "tags": "correct"}, "Reference.tags: expected list"),
    (AdapterSpec, {"max_tokens": True}, "AdapterSpec.max_tokens: expected an integer, got bool"),
    (AdapterSpec, {"temperature": "hot"}, "AdapterSpec.temperature: expected a number"),
    (RequestState, [], "expected a JSON object"),
])
def test_malformed_json_is_refused_naming_the_field(cls, data, message) -> None:
    with pytest.raises(ValueError) as info:
        cls.from_dict(data)
    assert message in str(info.value)


def test_records_are_frozen_and_lists_become_tuples() -> None:
    assert INSTANCE.references[0].tags == ("correct",)
    assert isinstance(ADAPTER_SPEC.stop_sequences, tuple) and ADAPTER_SPEC.eval_splits == ("test",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        INSTANCE.split = "train"  # type: ignore[misc]


def test_instance_gold_helpers_and_run_name_sanitising() -> None:
    assert INSTANCE.first_correct_reference == Reference(Output("Even"), ("correct",))
    assert [r.output.text for r in INSTANCE.all_correct_references] == ["Even"]
    assert Instance(Input("x"), [Reference(Output("y"))]).first_correct_reference is None
    assert RUN_SPEC.name == "synthetic_reasoning:mode=pattern_match,model=org_tiny"
