"""HELM's AdapterSpec helpers (`common_adapter_specs.py`): the prompt formats run specs are built from.

    generation:             [instructions]\\n\\n<Input noun>: <input>\\n<Output noun>: <output>\\n ...
    completion:             [instructions]\\n\\n<input_prefix><input><output_prefix><output><output_suffix> ...
    multiple_choice_joint:  [instructions]\\n\\n<Input noun>: <input>\\nA. <choice>\\nB. <choice>\\nAnswer: B\\n ...
    multiple_choice_separate_original: <input> <choice>   (one scoring request per choice)
"""

from __future__ import annotations

from collections.abc import Sequence

from flexgen_core.evaluation.schema import (
    ADAPT_GENERATION,
    ADAPT_MULTIPLE_CHOICE_JOINT,
    ADAPT_MULTIPLE_CHOICE_SEPARATE_ORIGINAL,
    AdapterSpec,
)


def format_instructions(instructions: str) -> str:
    """Non-empty instructions end with a newline, so a blank line separates them from the first example."""
    return instructions + "\n" if instructions else instructions


def _noun_prefix(noun: str | None, newline_after: bool) -> str:
    """"Question: " (or "Question:\\n"); "" without a noun."""
    if noun is None:
        return ""
    return f"{noun}:" + ("\n" if newline_after else " ")


def generation_adapter_spec(instructions: str = "", input_noun: str | None = None,
                            newline_after_input_noun: bool = False, output_noun: str | None = None,
                            newline_after_output_noun: bool = False, max_train_instances: int = 5,
                            num_outputs: int = 1, max_tokens: int = 5, stop_sequences: Sequence[str] | None = None,
                            temperature: float = 0.0, multi_label: bool = False,
                            sample_train: bool = True) -> AdapterSpec:
    """HELM's `get_generation_adapter_spec` (stop sequences default to a newline)."""
    return AdapterSpec(
        method=ADAPT_GENERATION, instructions=format_instructions(instructions),
        input_prefix=_noun_prefix(input_noun, newline_after_input_noun), input_suffix="\n",
        output_prefix=_noun_prefix(output_noun, newline_after_output_noun), output_suffix="\n",
        max_train_instances=max_train_instances, num_outputs=num_outputs, max_tokens=max_tokens,
        temperature=temperature, stop_sequences=tuple(stop_sequences) if stop_sequences is not None else ("\n",),
        multi_label=multi_label, sample_train=sample_train)


def completion_adapter_spec(instructions: str = "", input_prefix: str = "", output_prefix: str = "",
                            output_suffix: str = "", max_train_instances: int = 0, temperature: float = 0.0,
                            num_outputs: int = 1, max_tokens: int = 100,
                            stop_sequences: Sequence[str] = ()) -> AdapterSpec:
    """HELM's `get_completion_adapter_spec`: the input is continued directly (no input suffix)."""
    return AdapterSpec(
        method=ADAPT_GENERATION, instructions=format_instructions(instructions), input_prefix=input_prefix,
        input_suffix="", output_prefix=output_prefix, output_suffix=output_suffix,
        max_train_instances=max_train_instances, temperature=temperature, num_outputs=num_outputs,
        max_tokens=max_tokens, stop_sequences=tuple(stop_sequences))


def multiple_choice_joint_adapter_spec(instructions: str, input_noun: str | None, output_noun: str,
                                       num_outputs: int = 5, max_train_instances: int = 5, max_tokens: int = 5,
                                       sample_train: bool = True) -> AdapterSpec:
    """HELM's `get_multiple_choice_joint_adapter_spec`."""
    return AdapterSpec(
        method=ADAPT_MULTIPLE_CHOICE_JOINT, instructions=format_instructions(instructions),
        input_prefix=f"{input_noun}: " if input_noun is not None else "",
        input_suffix="\n" if input_noun is not None else "", output_prefix=f"{output_noun}: ", output_suffix="\n",
        max_train_instances=max_train_instances, num_outputs=num_outputs, max_tokens=max_tokens, temperature=0.0,
        stop_sequences=("\n",), sample_train=sample_train)


def multiple_choice_separate_adapter_spec(empty_input: bool = False) -> AdapterSpec:
    """HELM's `get_multiple_choice_separate_adapter_spec` ("original"): the input, a space, the choice."""
    return AdapterSpec(
        method=ADAPT_MULTIPLE_CHOICE_SEPARATE_ORIGINAL, instructions="", input_prefix="", input_suffix="",
        output_prefix="" if empty_input else " ", output_suffix="", max_train_instances=0, num_outputs=1,
        max_tokens=0, temperature=0.0)


def multiple_choice_adapter_spec(method: str, instructions: str, input_noun: str | None, output_noun: str,
                                 max_train_instances: int = 5, num_outputs: int = 5, max_tokens: int = 1,
                                 empty_input: bool = False, sample_train: bool = True) -> AdapterSpec:
    """HELM's `get_multiple_choice_adapter_spec`: joint or separate by `method`."""
    if method == ADAPT_MULTIPLE_CHOICE_JOINT:
        return multiple_choice_joint_adapter_spec(instructions, input_noun, output_noun, num_outputs=num_outputs,
                                                  max_train_instances=max_train_instances, max_tokens=max_tokens,
                                                  sample_train=sample_train)
    if method == ADAPT_MULTIPLE_CHOICE_SEPARATE_ORIGINAL:
        return multiple_choice_separate_adapter_spec(empty_input)
    raise ValueError(f"multiple-choice method must be {ADAPT_MULTIPLE_CHOICE_JOINT} or "
                     f"{ADAPT_MULTIPLE_CHOICE_SEPARATE_ORIGINAL}; got {method!r}")
