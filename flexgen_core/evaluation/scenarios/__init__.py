"""Scenarios, registered by name: procedural (no download) ones first, then user and hub data.

    synthetic_reasoning            mode = pattern_match | variable_substitution | induction
    synthetic_reasoning_natural    difficulty = easy | medium | hard
    dyck_language                  num_parenthesis_pairs = 1..4
    simple_mcqa, simple_short_answer_qa, simple_classification, simple_copy, simple_arithmetic
    custom                         path=FILE (.jsonl/.json/.csv/.parquet) or dataset=ORG/NAME, column options
    hub                            dataset=ORG/NAME, split, column options

`get_scenario(name, **args)` builds one; `register_scenario` (class decorator) adds one and refuses a
second scenario with the same name.
"""

from flexgen_core.evaluation.scenarios import (  # noqa: F401  (imported to register their scenarios)
    custom,
    dyck_language,
    hub,
    simple,
    synthetic_reasoning,
    synthetic_reasoning_natural,
)
from flexgen_core.evaluation.scenarios.base import (
    Scenario,
    create_scenario,
    downsample_eval_instances,
    get_scenario,
    register_scenario,
    scenario_class,
    scenario_names,
    scenario_spec,
    with_instance_ids,
)
from flexgen_core.evaluation.scenarios.hub import HubUnavailableError
from flexgen_core.evaluation.scenarios.rows import ColumnMapping, DataValidationError, RowProblem

__all__ = [
    "ColumnMapping", "DataValidationError", "HubUnavailableError", "RowProblem", "Scenario", "create_scenario",
    "downsample_eval_instances", "get_scenario", "register_scenario", "scenario_class", "scenario_names",
    "scenario_spec", "with_instance_ids",
]
