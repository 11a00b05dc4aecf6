"""Run-spec functions: scenario name + arguments -> RunSpec with HELM's adapter settings and metrics.

Metric specs use HELM's class names (`BasicGenerationMetric` with `names`, `BasicReferenceMetric`,
`InstancesPerSplitMetric`) so run_spec.json reads as HELM's; `metric_names(run_spec)` lists the per-instance
reference metrics a run computes. Each function validates its arguments by building the (light) scenario.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from flexgen_core.evaluation.adapter_specs import (
    completion_adapter_spec,
    generation_adapter_spec,
    multiple_choice_adapter_spec,
)
from flexgen_core.evaluation.run_spec import run_spec_function
from flexgen_core.evaluation.scenarios import get_scenario, scenario_spec
from flexgen_core.evaluation.schema import (
    ADAPT_GENERATION,
    ADAPT_MULTIPLE_CHOICE_JOINT,
    ADAPT_MULTIPLE_CHOICE_SEPARATE_ORIGINAL,
    TEST_SPLIT,
    AdapterSpec,
    MetricSpec,
    RunSpec,
)

BASIC_GENERATION_METRIC = "helm.benchmark.metrics.basic_metrics.BasicGenerationMetric"
BASIC_REFERENCE_METRIC = "helm.benchmark.metrics.basic_metrics.BasicReferenceMetric"
INSTANCES_PER_SPLIT_METRIC = "helm.benchmark.metrics.basic_metrics.InstancesPerSplitMetric"
EXACT_MATCH_NAMES = ("exact_match", "quasi_exact_match", "prefix_exact_match", "quasi_prefix_exact_match")
OPEN_ENDED_NAMES = ("exact_match", "quasi_exact_match", "f1_score", "rouge_l", "bleu_1", "bleu_4")
SET_MATCH_NAMES = ("f1_set_match", "iou_set_match", "exact_set_match")
MC_METHODS = (ADAPT_MULTIPLE_CHOICE_JOINT, ADAPT_MULTIPLE_CHOICE_SEPARATE_ORIGINAL)


def basic_generation_metric_specs(names: tuple[str, ...]) -> list[MetricSpec]:
    return [MetricSpec(BASIC_GENERATION_METRIC, {"names": list(names)})]


def basic_metric_specs(names: tuple[str, ...]) -> list[MetricSpec]:
    """HELM's `get_basic_metric_specs`: reference metrics by name, log-likelihood accuracy, instance counts."""
    return [*basic_generation_metric_specs(names), MetricSpec(BASIC_REFERENCE_METRIC, {}),
            MetricSpec(INSTANCES_PER_SPLIT_METRIC, {})]


def metric_names(run_spec: RunSpec) -> list[str]:
    """The reference metric names (e.g. "exact_match") that a run's metric specs ask for, in order."""
    return [name for spec in run_spec.metric_specs if spec.class_name == BASIC_GENERATION_METRIC
            for name in spec.args.get("names", [])]


def _run_spec(name: str, scenario: str, scenario_args: dict[str, object], adapter_spec: AdapterSpec,
              metric_specs: list[MetricSpec], groups: list[str]) -> RunSpec:
    get_scenario(scenario, **scenario_args)  # refuses bad arguments before anything runs
    return RunSpec(name=name, scenario_spec=scenario_spec(scenario, **scenario_args), adapter_spec=adapter_spec,
                   metric_specs=tuple(metric_specs), groups=tuple(groups))


@run_spec_function("synthetic_reasoning")
def synthetic_reasoning_spec(mode: str) -> RunSpec:
    adapter_spec = generation_adapter_spec(instructions="Please solve the following problem.", output_noun="Target",
                                           max_train_instances=5, stop_sequences=["\n"], max_tokens=50)
    return _run_spec(f"synthetic_reasoning:mode={mode}", "synthetic_reasoning", {"mode": mode}, adapter_spec,
                     basic_metric_specs(EXACT_MATCH_NAMES), ["synthetic_reasoning", f"synthetic_reasoning_{mode}"])


@run_spec_function("synthetic_reasoning_natural")
def synthetic_reasoning_natural_spec(difficulty: str) -> RunSpec:
    adapter_spec = generation_adapter_spec(instructions="Please solve the following problem.", input_noun="Rules",
                                           newline_after_input_noun=True, output_noun=None, max_train_instances=3,
                                           max_tokens=20)
    return _run_spec(f"synthetic_reasoning_natural:difficulty={difficulty}", "synthetic_reasoning_natural",
                     {"difficulty": difficulty}, adapter_spec, basic_metric_specs(SET_MATCH_NAMES),
                     ["synthetic_reasoning", "synthetic_reasoning_natural"])


@run_spec_function("dyck_language")
def dyck_language_spec(num_parenthesis_pairs: int) -> RunSpec:
    adapter_spec = completion_adapter_spec(
        instructions="Please complete the rest of the following Dyck sequences, making sure that the parentheses "
                     "are closed properly.",
        input_prefix="Input: ", max_tokens=5, max_train_instances=3, stop_sequences=["\n"])
    # HELM scores Dyck with exact_match_indicator alone (last token only); a strict exact_match goes beside it.
    metrics = [*basic_generation_metric_specs(("exact_match_indicator", "exact_match")),
               MetricSpec(INSTANCES_PER_SPLIT_METRIC, {})]
    return _run_spec(f"dyck_language_np={num_parenthesis_pairs}", "dyck_language",
                     {"num_parenthesis_pairs": num_parenthesis_pairs}, adapter_spec, metrics, ["dyck_language"])


def _simple_mc_spec(name: str, instructions: str) -> RunSpec:
    # HELM uses max_tokens=5 here with no stop sequence, so a letter is followed by 4 more tokens and never
    # maps to a choice; we use 1, as HELM's other multiple-choice run specs do.
    adapter_spec = multiple_choice_adapter_spec(ADAPT_MULTIPLE_CHOICE_JOINT, instructions, "Question", "Answer",
                                                max_tokens=1)
    return _run_spec(name, name, {}, adapter_spec, basic_metric_specs(EXACT_MATCH_NAMES), [name])


@run_spec_function("simple_mcqa")
def simple_mcqa_spec() -> RunSpec:
    return _simple_mc_spec("simple_mcqa", "Answer the following questions with a single letter only.")


@run_spec_function("simple_classification")
def simple_classification_spec() -> RunSpec:
    return _simple_mc_spec("simple_classification", "Answer the following questions with a single word only.")


@run_spec_function("simple_short_answer_qa")
def simple_short_answer_qa_spec() -> RunSpec:
    adapter_spec = generation_adapter_spec(instructions="Answer the following questions with a single word only.",
                                           input_noun="Question", output_noun="Answer")
    return _run_spec("simple_short_answer_qa", "simple_short_answer_qa", {}, adapter_spec,
                     basic_metric_specs(OPEN_ENDED_NAMES), ["simple_short_answer_qa"])


@run_spec_function("simple_copy")
def simple_copy_spec() -> RunSpec:
    adapter_spec = generation_adapter_spec(instructions="Repeat the input exactly.", input_noun="Input",
                                           output_noun="Output", max_tokens=20)
    return _run_spec("simple_copy", "simple_copy", {}, adapter_spec, basic_metric_specs(EXACT_MATCH_NAMES),
                     ["simple_copy"])


@run_spec_function("simple_arithmetic")
def simple_arithmetic_spec() -> RunSpec:
    adapter_spec = generation_adapter_spec(instructions="Add the two numbers.", input_noun="Question",
                                           output_noun="Answer", max_tokens=5)
    return _run_spec("simple_arithmetic", "simple_arithmetic", {}, adapter_spec,
                     basic_metric_specs(EXACT_MATCH_NAMES), ["simple_arithmetic"])


def _user_data_adapter(choices_column: str | None, method: str | None, max_tokens: int | None,
                       input_noun: str, output_noun: str) -> tuple[AdapterSpec, list[MetricSpec]]:
    """MC joint when the data has choices (or the method asked for), else 5-shot generation."""
    method = method or (ADAPT_MULTIPLE_CHOICE_JOINT if choices_column else ADAPT_GENERATION)
    if method in MC_METHODS:
        if not choices_column:
            raise ValueError(f"method={method} needs choices_column=... naming the column that holds the choices")
        spec = multiple_choice_adapter_spec(method, "", input_noun, output_noun, max_tokens=max_tokens or 1)
        return spec, basic_metric_specs(EXACT_MATCH_NAMES)
    if method != ADAPT_GENERATION:
        raise ValueError(f"method must be one of {ADAPT_GENERATION}, {', '.join(MC_METHODS)}; got {method!r}")
    spec = generation_adapter_spec(input_noun=input_noun, output_noun=output_noun, max_tokens=max_tokens or 50)
    return spec, basic_metric_specs(("exact_match", "quasi_exact_match", "f1_score"))


def _args_name(name: str, func: Callable[..., RunSpec], args: dict[str, object]) -> str:
    """`name:k=v,...` over the arguments that differ from `func`'s defaults, in key order (HELM's `ice`)."""
    defaults = {p.name: p.default for p in inspect.signature(func).parameters.values()}
    given = sorted((k, v) for k, v in args.items() if v != defaults.get(k, inspect.Parameter.empty))
    return name + (":" + ",".join(f"{k}={v}" for k, v in given) if given else "")


@run_spec_function("custom")
def custom_spec(path: str | None = None, dataset: str | None = None, subset: str | None = None,
                input_column: str = "input", output_column: str = "output", choices_column: str | None = None,
                split: str = TEST_SPLIT, split_column: str | None = None, train_split: str | None = None,
                method: str | None = None, max_tokens: int | None = None, input_noun: str = "Question",
                output_noun: str = "Answer") -> RunSpec:
    scenario_args = {"path": path, "dataset": dataset, "subset": subset, "input_column": input_column,
                     "output_column": output_column, "choices_column": choices_column, "split": split,
                     "split_column": split_column, "train_split": train_split}
    adapter_spec, metrics = _user_data_adapter(choices_column, method, max_tokens, input_noun, output_noun)
    name = _args_name("custom", custom_spec, {**scenario_args, "method": method, "max_tokens": max_tokens,
                                              "input_noun": input_noun, "output_noun": output_noun})
    scenario_args = {k: v for k, v in scenario_args.items() if v is not None}
    return _run_spec(name, "custom", scenario_args, adapter_spec, metrics, ["custom"])


@run_spec_function("hub")
def hub_spec(dataset: str, subset: str | None = None, split: str = TEST_SPLIT, train_split: str | None = None,
             input_column: str = "input", output_column: str = "output", choices_column: str | None = None,
             method: str | None = None, max_tokens: int | None = None, input_noun: str = "Question",
             output_noun: str = "Answer") -> RunSpec:
    scenario_args = {"dataset": dataset, "subset": subset, "split": split, "train_split": train_split,
                     "input_column": input_column, "output_column": output_column, "choices_column": choices_column}
    adapter_spec, metrics = _user_data_adapter(choices_column, method, max_tokens, input_noun, output_noun)
    name = _args_name("hub", hub_spec, {**scenario_args, "method": method, "max_tokens": max_tokens,
                                        "input_noun": input_noun, "output_noun": output_noun})
    scenario_args = {k: v for k, v in scenario_args.items() if v is not None}
    return _run_spec(name, "hub", scenario_args, adapter_spec, metrics, ["hub"])
