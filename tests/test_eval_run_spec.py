"""Run entries: parsing, HELM run names, HELM adapter settings per scenario, and clear refusals."""

from __future__ import annotations

import pytest

from flexgen_core.evaluation.run_spec import (
    RunEntry,
    construct_run_spec,
    parse_run_entry,
    run_spec_function,
    run_spec_names,
)
from flexgen_core.evaluation.run_specs import metric_names
from flexgen_core.evaluation.scenarios import create_scenario


def test_parse_run_entry() -> None:
    assert parse_run_entry("synthetic_reasoning:mode=pattern_match,model=org/m") == RunEntry(
        "synthetic_reasoning", (("mode", "pattern_match"), ("model", "org/m")))
    assert parse_run_entry("  simple_mcqa ") == RunEntry("simple_mcqa")
    assert parse_run_entry("custom:path=/d/a=b.jsonl").args == (("path", "/d/a=b.jsonl"),)  # split at first '='
    assert parse_run_entry("x:a=1,b=2").description == "x:a=1,b=2"


@pytest.mark.parametrize("entry, name", [
    ("synthetic_reasoning:mode=pattern_match,model=org/tiny-opt",
     "synthetic_reasoning:mode=pattern_match,model=org_tiny-opt"),
    ("synthetic_reasoning_natural:difficulty=easy,model=m", "synthetic_reasoning_natural:difficulty=easy,model=m"),
    ("dyck_language:num_parenthesis_pairs=3,model=org/m", "dyck_language_np=3:model=org_m"),  # HELM's quirk
    ("simple_mcqa:model=m", "simple_mcqa:model=m"),
    ("synthetic_reasoning:max_train_instances=2,mode=induction,model=m",
     "synthetic_reasoning:mode=induction,max_train_instances=2,model=m"),  # expanders append in written order
    ("custom:path=/data/q.jsonl,input_column=q,output_column=a,model=m",
     "custom:input_column=q,output_column=a,path=_data_q.jsonl,model=m"),
])
def test_run_names_follow_helm(entry: str, name: str) -> None:
    assert construct_run_spec(entry).name == name


def test_model_keyword_and_cli_style_options() -> None:
    spec = construct_run_spec("synthetic_reasoning:mode=induction", model="org/m", max_eval_instances=50,
                              num_train_trials=3)
    assert spec.name == "synthetic_reasoning:mode=induction,model=org_m"
    assert (spec.adapter_spec.model, spec.adapter_spec.model_deployment) == ("org/m", "org/m")
    assert spec.adapter_spec.max_eval_instances == 50 and spec.adapter_spec.num_train_trials == 3
    entry_wins = construct_run_spec("synthetic_reasoning:mode=induction,max_eval_instances=7,model=a", model="b",
                                    max_eval_instances=50)
    assert entry_wins.adapter_spec.max_eval_instances == 7 and entry_wins.adapter_spec.model == "a"
    zero_shot = construct_run_spec("synthetic_reasoning:mode=induction,max_train_instances=0,model=m",
                                   num_train_trials=3)
    assert zero_shot.adapter_spec.num_train_trials == 1  # HELM: no repeated trials without examples


def test_helm_adapter_settings() -> None:
    sr = construct_run_spec("synthetic_reasoning:mode=pattern_match,model=m")
    a = sr.adapter_spec
    assert (a.method, a.instructions, a.input_prefix, a.input_suffix, a.output_prefix, a.output_suffix) == (
        "generation", "Please solve the following problem.\n", "", "\n", "Target: ", "\n")
    assert (a.max_train_instances, a.max_tokens, a.stop_sequences, a.temperature, a.num_outputs) == (
        5, 50, ("\n",), 0.0, 1)
    assert metric_names(sr) == ["exact_match", "quasi_exact_match", "prefix_exact_match", "quasi_prefix_exact_match"]
    assert sr.groups == ("synthetic_reasoning", "synthetic_reasoning_pattern_match")

    srn = construct_run_spec("synthetic_reasoning_natural:difficulty=hard,model=m")
    assert (srn.adapter_spec.input_prefix, srn.adapter_spec.output_prefix) == ("Rules:\n", "")
    assert (srn.adapter_spec.max_train_instances, srn.adapter_spec.max_tokens) == (3, 20)
    assert metric_names(srn) == ["f1_set_match", "iou_set_match", "exact_set_match"]

    dyck = construct_run_spec("dyck_language:num_parenthesis_pairs=2,model=m")
    d = dyck.adapter_spec
    assert (d.input_prefix, d.input_suffix, d.output_prefix, d.output_suffix) == ("Input: ", "", "", "")
    assert (d.max_train_instances, d.max_tokens, d.stop_sequences) == (3, 5, ("\n",))
    assert metric_names(dyck) == ["exact_match_indicator", "exact_match"]
    assert create_scenario(dyck.scenario_spec).num_parenthesis_pairs == 2  # type: ignore[attr-defined]

    mc = construct_run_spec("simple_mcqa:model=m").adapter_spec
    assert (mc.method, mc.input_prefix, mc.reference_prefix, mc.output_prefix, mc.num_outputs) == (
        "multiple_choice_joint", "Question: ", "A. ", "Answer: ", 5)

    separate = construct_run_spec("custom:path=a.csv,choices_column=c,method=multiple_choice_separate_original,"
                                  "model=m").adapter_spec
    assert (separate.output_prefix, separate.max_train_instances, separate.max_tokens) == (" ", 0, 0)


@pytest.mark.parametrize("entry, message", [
    ("", "empty run entry"),
    (":mode=pattern_match", "no name before ':'"),
    ("synthetic_reasoning:mode", "argument 'mode' has no '='; write key=value"),
    ("synthetic_reasoning:", "has ':' but no arguments"),
    ("synthetic_reasoning:mode=induction,", "empty argument"),
    ("synthetic_reasoning:=x", "has no key before '='"),
    ("synthetic_reasoning:mode=a,mode=b", "gives 'mode' twice"),
    ("synthetic_reasonin:mode=induction,model=m", "unknown scenario 'synthetic_reasonin'; known scenarios: custom"),
    ("synthetic_reasoning:mood=induction,model=m", "has no argument 'mood'; it accepts mode"),
    ("synthetic_reasoning:model=m", "needs mode=..."),
    ("synthetic_reasoning:mode=deduction,model=m", "mode must be one of pattern_match, variable_substitution"),
    ("synthetic_reasoning:mode=induction", "names no model; add model=NAME"),
    ("dyck_language:num_parenthesis_pairs=three,model=m", "num_parenthesis_pairs='three' must be an integer"),
    ("dyck_language:num_parenthesis_pairs=9,model=m", "num_parenthesis_pairs must be 1..4"),
    ("synthetic_reasoning:mode=induction,num_train_trials=0,model=m", "num_train_trials must be >= 1"),
    ("custom:model=m", "exactly one of path=FILE"),
    ("custom:path=data.txt,model=m", "unsupported file type"),
    ("custom:path=a.jsonl,method=multiple_choice_joint,model=m", "needs choices_column"),
])
def test_malformed_entries_are_refused_with_a_fix(entry: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        construct_run_spec(entry)
    assert message in str(info.value)


def test_run_spec_registry_refuses_duplicates() -> None:
    assert {"synthetic_reasoning", "dyck_language", "custom", "hub"} <= set(run_spec_names())
    with pytest.raises(ValueError, match="already registered"):
        run_spec_function("synthetic_reasoning")(lambda: None)  # type: ignore[arg-type,return-value]
