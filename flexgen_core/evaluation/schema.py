"""HELM's data model: field names, defaults and JSON shapes of crfm-helm 0.5 (see reference/helm.md §1.2).

Scenario -> Instance(Input, References) -> AdapterSpec -> RequestState(Request, RequestResult) -> ScenarioState;
a RunSpec names the scenario, adapter and metrics of one run. Every class is a frozen dataclass with
`to_dict()` / `from_dict()` (see `serialization.py`). Multimodal, perturbation and image-generation fields of
HELM are left out; `Stat` and `PerInstanceStats` live in `stats.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flexgen_core.evaluation.serialization import JsonRecord

TRAIN_SPLIT = "train"
VALID_SPLIT = "valid"
TEST_SPLIT = "test"
EVAL_SPLITS = (VALID_SPLIT, TEST_SPLIT)
ALL_SPLITS = (TRAIN_SPLIT, *EVAL_SPLITS)
CORRECT_TAG = "correct"

ADAPT_GENERATION = "generation"
ADAPT_MULTIPLE_CHOICE_JOINT = "multiple_choice_joint"
ADAPT_MULTIPLE_CHOICE_SEPARATE_ORIGINAL = "multiple_choice_separate_original"


# ---- scenario side ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Input(JsonRecord):
    """The input of an Instance."""

    text: str


@dataclass(frozen=True)
class Output(JsonRecord):
    """The output of a Reference."""

    text: str


@dataclass(frozen=True)
class Reference(JsonRecord):
    """A possible output; the tag "correct" marks a gold one."""

    output: Output
    tags: tuple[str, ...] = ()

    @property
    def is_correct(self) -> bool:
        return CORRECT_TAG in self.tags


@dataclass(frozen=True)
class Instance(JsonRecord):
    """One data point: input, references, split ("train", "valid", "test") and an id."""

    input: Input
    references: tuple[Reference, ...]
    split: str | None = None
    sub_split: str | None = None
    id: str | None = None

    @property
    def first_correct_reference(self) -> Reference | None:
        return next((r for r in self.references if r.is_correct), None)

    @property
    def all_correct_references(self) -> list[Reference]:
        return [r for r in self.references if r.is_correct]


# ---- adaptation --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Substitution(JsonRecord):
    """A regular-expression search/replace applied to the finished prompt."""

    source: str
    target: str


@dataclass(frozen=True)
class AdapterSpec(JsonRecord):
    """How instances become requests (HELM's field order and raw defaults)."""

    method: str = ""
    global_prefix: str = ""
    global_suffix: str = ""
    instructions: str = ""
    input_prefix: str = "Input: "
    input_suffix: str = "\n"
    reference_prefix: str = "A. "
    reference_prefix_characters: tuple[str, ...] | None = None
    reference_suffix: str = "\n"
    chain_of_thought_prefix: str = ""
    chain_of_thought_suffix: str = "\n"
    output_prefix: str = "Output: "
    output_suffix: str = "\n"
    instance_prefix: str = "\n"
    substitutions: tuple[Substitution, ...] = ()
    max_train_instances: int = 5
    max_eval_instances: int | None = None
    num_outputs: int = 5
    num_train_trials: int = 1
    num_trials: int = 1
    sample_train: bool = True
    model_deployment: str = ""
    model: str = ""
    temperature: float = 1.0
    max_tokens: int = 100
    stop_sequences: tuple[str, ...] = ()
    random: str | None = None
    multi_label: bool = False
    eval_splits: tuple[str, ...] | None = None
    output_mapping_pattern: str | None = None


# ---- requests and results -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Request(JsonRecord):
    """What is asked of the model for one prompt."""

    model_deployment: str = ""
    model: str = ""
    embedding: bool = False
    prompt: str = ""
    temperature: float = 1.0
    num_completions: int = 1
    top_k_per_token: int = 1
    max_tokens: int = 100
    stop_sequences: tuple[str, ...] = ()
    echo_prompt: bool = False
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    random: str | None = None


@dataclass(frozen=True)
class Token(JsonRecord):
    """One generated token: its text and natural-log probability."""

    text: str
    logprob: float


@dataclass(frozen=True)
class GeneratedOutput(JsonRecord):
    """One completion: text, summed logprob, tokens, and why it finished ({"reason": "stop"|"length"|...})."""

    text: str
    logprob: float
    tokens: tuple[Token, ...]
    finish_reason: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class RequestResult(JsonRecord):
    """What came back for a Request. `batch_size`/`batch_request_time` describe the engine chunk it ran in."""

    success: bool
    embedding: tuple[float, ...] = ()
    completions: tuple[GeneratedOutput, ...] = ()
    cached: bool = False
    request_time: float | None = None
    request_datetime: int | None = None
    error: str | None = None
    batch_size: int | None = None
    batch_request_time: float | None = None


@dataclass(frozen=True)
class RequestState(JsonRecord):
    """One request made for an instance, with everything a metric needs to judge its result."""

    instance: Instance
    reference_index: int | None
    request_mode: str | None
    train_trial_index: int
    output_mapping: Mapping[str, str] | None
    request: Request
    result: RequestResult | None
    num_train_instances: int
    prompt_truncated: bool
    num_conditioning_tokens: int = 0
    annotations: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class ScenarioState(JsonRecord):
    """The adapter spec and all request states of a run (HELM's scenario_state.json)."""

    adapter_spec: AdapterSpec
    request_states: tuple[RequestState, ...]


# ---- run description ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ObjectSpec(JsonRecord):
    """Names something to construct (a scenario class, a metric family) and its arguments."""

    class_name: str
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ScenarioSpec(ObjectSpec):
    """A registered scenario class (dotted name) and its constructor arguments."""


@dataclass(frozen=True)
class MetricSpec(ObjectSpec):
    """A metric family and its arguments (e.g. {"names": ["exact_match", ...]})."""


@dataclass(frozen=True)
class RunSpec(JsonRecord):
    """One run: its name (the output folder, "/" replaced by "_"), scenario, adapter and metrics."""

    name: str
    scenario_spec: ScenarioSpec
    adapter_spec: AdapterSpec
    metric_specs: tuple[MetricSpec, ...]
    groups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "name", self.name.replace("/", "_"))
