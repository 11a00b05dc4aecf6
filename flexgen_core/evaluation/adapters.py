"""Adapters: instances -> RequestStates, with HELM's in-context example choice and prompt assembly.

- `generation`: one request per eval instance; the model writes the answer.
- `multiple_choice_joint`: the choices are listed as "A. ...", "B. ..."; the model writes a letter;
  `output_mapping` maps letters back to choice texts.
- `multiple_choice_separate_original`: one scoring request per (instance, choice); its prompt ends with the
  choice text, whose log-likelihood the engine's `score()` gives (see `requests.scoring_token_ids`).
For each train trial t, one set of in-context examples is drawn with seed t and shared by every eval
instance of that trial (HELM's `sample_examples`).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Sequence
from typing import ClassVar

from flexgen_core.evaluation.prompt import ContextWindow, Prompt, fit_prompt
from flexgen_core.evaluation.schema import (
    ADAPT_GENERATION,
    ADAPT_MULTIPLE_CHOICE_JOINT,
    ADAPT_MULTIPLE_CHOICE_SEPARATE_ORIGINAL,
    EVAL_SPLITS,
    TRAIN_SPLIT,
    AdapterSpec,
    Instance,
    Request,
    RequestState,
    ScenarioState,
)

log = logging.getLogger(__name__)
NO_CORRECT_REFERENCE = "n/a"
MULTI_LABEL_DELIMITER = ", "


def sample_examples(train: Sequence[Instance], max_train_instances: int, seed: int,
                    sample_train: bool = True) -> list[Instance]:
    """HELM's in-context example choice for train trial `seed`.

    Labels (first correct reference texts) are ordered by how many train instances carry them, most first,
    ties shuffled; then one instance per label is drawn round-robin, at random without replacement, until
    `max_train_instances` are chosen; unlabeled instances fill what is left. With `sample_train=False` the
    trial takes the next consecutive block of train instances instead.
    """
    rng = random.Random(seed)
    count = min(len(train), max_train_instances)
    if not sample_train:
        return list(train[count * seed: count * (seed + 1)])
    by_label: dict[str, list[Instance]] = defaultdict(list)
    unlabeled: list[Instance] = []
    for inst in train:
        gold = inst.first_correct_reference
        if gold:
            by_label[gold.output.text].append(inst)
        else:
            unlabeled.append(inst)
    labels_by_count: dict[int, list[str]] = defaultdict(list)
    for label, members in sorted(by_label.items()):
        labels_by_count[len(members)].append(label)
    ordered_labels: list[str] = []
    for n in sorted(labels_by_count, reverse=True):
        tied = labels_by_count[n]
        rng.shuffle(tied)
        ordered_labels += tied
    examples: list[Instance] = []
    labeled_left = sum(len(m) for m in by_label.values())
    position = 0
    while count > 0 and labeled_left > 0:  # HELM cycles forever once labels run dry; we stop there
        label = ordered_labels[position % len(ordered_labels)]
        position += 1
        if not label:  # HELM stops at an empty label text
            break
        members = by_label[label]
        if members:
            examples.append(members.pop(rng.randrange(len(members))))
            count -= 1
            labeled_left -= 1
    return examples + rng.sample(unlabeled, min(count, len(unlabeled)))


class Adapter(ABC):
    """Turns instances into a ScenarioState for one AdapterSpec and one model's context window."""

    method: ClassVar[str]
    keep_prompt_end: ClassVar[bool] = False

    def __init__(self, spec: AdapterSpec, window: ContextWindow):
        if spec.method != self.method:
            raise ValueError(f"{type(self).__name__} adapts method {self.method!r}, not {spec.method!r}")
        self.spec = spec
        self.window = window

    def adapt(self, instances: Sequence[Instance]) -> ScenarioState:
        """Request states for every train trial x eval instance (x num_trials copies), in HELM's order."""
        train = [inst for inst in instances if inst.split == TRAIN_SPLIT]
        eval_splits = self.spec.eval_splits or EVAL_SPLITS
        evals = [inst for inst in instances if inst.split in eval_splits]
        if len(train) < self.spec.max_train_instances:
            log.warning("only %d training instances, wanted %d", len(train), self.spec.max_train_instances)
        states: list[RequestState] = []
        for trial in range(self.spec.num_train_trials):
            examples = sample_examples(train, self.spec.max_train_instances, trial, self.spec.sample_train)
            trial_states = [s for inst in evals for s in self.generate_requests(inst, trial, examples)]
            states += _with_repeats(trial_states, self.spec.num_trials)
        return ScenarioState(self.spec, tuple(states))

    @abstractmethod
    def generate_requests(self, instance: Instance, trial: int, examples: Sequence[Instance]) -> list[RequestState]:
        """The request states for one eval instance."""

    def construct_prompt(self, examples: Sequence[Instance], instance: Instance, include_output: bool,
                         reference_index: int | None, completion_tokens: int) -> Prompt:
        prompt = Prompt(
            global_prefix=self.spec.global_prefix, global_suffix=self.spec.global_suffix,
            instance_prefix=self.spec.instance_prefix, substitutions=self.spec.substitutions,
            instructions_block=self.spec.instructions,
            train_instance_blocks=tuple(self.example_block(e, True, None) for e in examples),
            eval_instance_block=self.example_block(instance, include_output, reference_index))
        return fit_prompt(prompt, self.window, completion_tokens, keep_end=self.keep_prompt_end)

    def example_block(self, instance: Instance, include_output: bool, reference_index: int | None) -> str:
        """input_prefix + input + input_suffix, then output_prefix + gold + output_suffix (or the bare
        output prefix, right-stripped, to be completed)."""
        block = self.spec.input_prefix + instance.input.text + self.spec.input_suffix
        if include_output:
            gold = self.gold_output(instance, reference_index)
            return block + self.spec.output_prefix + gold + self.spec.output_suffix
        return block + self.spec.output_prefix.rstrip()

    def gold_output(self, instance: Instance, reference_index: int | None) -> str:
        if reference_index is not None:
            return instance.references[reference_index].output.text
        golds = instance.all_correct_references
        if not golds:
            return NO_CORRECT_REFERENCE
        if self.spec.multi_label:
            return MULTI_LABEL_DELIMITER.join(r.output.text for r in golds)
        return golds[0].output.text

    def request_state(self, instance: Instance, trial: int, prompt: Prompt, request: Request,
                      reference_index: int | None = None, request_mode: str | None = None,
                      output_mapping: dict[str, str] | None = None) -> RequestState:
        return RequestState(instance=instance, reference_index=reference_index, request_mode=request_mode,
                            train_trial_index=trial, output_mapping=output_mapping, request=request, result=None,
                            num_train_instances=prompt.num_train_instances, prompt_truncated=prompt.truncated)


class GenerationAdapter(Adapter):
    method = ADAPT_GENERATION

    def generate_requests(self, instance: Instance, trial: int, examples: Sequence[Instance]) -> list[RequestState]:
        prompt = self.construct_prompt(examples, instance, False, None, self.spec.max_tokens)
        request = Request(model_deployment=self.spec.model_deployment, model=self.spec.model, prompt=prompt.text,
                          temperature=self.spec.temperature, num_completions=self.spec.num_outputs,
                          max_tokens=self.spec.max_tokens, stop_sequences=self.spec.stop_sequences,
                          random=self.spec.random)
        return [self.request_state(instance, trial, prompt, request)]


def reference_label_char(reference_prefix: str) -> str:
    """The first letter or digit of the reference prefix ("A" in "A. "); labels count up from it."""
    chars = [c for c in reference_prefix if c.isalnum()]
    if not chars:
        raise ValueError(f"reference_prefix {reference_prefix!r} has no letter or digit to number choices with")
    return chars[0]


def reference_prefix_for(prefix: str, index: int, label_characters: Sequence[str] | None = None) -> str:
    """"A. " -> "C. " for index 2: the label character is replaced by the index-th of `label_characters`,
    or by the character `index` places after it."""
    char = reference_label_char(prefix)
    if label_characters:
        if index >= len(label_characters):
            raise ValueError(f"{index + 1} choices but only {len(label_characters)} reference_prefix_characters")
        return prefix.replace(char, label_characters[index])
    return prefix.replace(char, chr(ord(char) + index))


class MultipleChoiceJointAdapter(Adapter):
    method = ADAPT_MULTIPLE_CHOICE_JOINT

    def label(self, index: int) -> str:
        """The answer label of choice `index` ("A", "B", ...)."""
        return reference_prefix_for(reference_label_char(self.spec.reference_prefix), index,
                                    self.spec.reference_prefix_characters)

    def generate_requests(self, instance: Instance, trial: int, examples: Sequence[Instance]) -> list[RequestState]:
        prompt = self.construct_prompt(examples, instance, False, None, self.spec.max_tokens)
        mapping = {self.label(i): ref.output.text for i, ref in enumerate(instance.references)}
        # As HELM: one completion, the top `num_outputs` tokens per position, no stop sequences.
        request = Request(model_deployment=self.spec.model_deployment, model=self.spec.model, prompt=prompt.text,
                          temperature=self.spec.temperature, num_completions=1, top_k_per_token=self.spec.num_outputs,
                          max_tokens=self.spec.max_tokens, stop_sequences=(), random=self.spec.random)
        return [self.request_state(instance, trial, prompt, request, output_mapping=mapping)]

    def example_block(self, instance: Instance, include_output: bool, reference_index: int | None) -> str:
        """The input, then each choice on its own line ("A. Paris\\n"), then "Answer: C" (or "Answer:")."""
        block = self.spec.input_prefix + instance.input.text + self.spec.input_suffix
        output = NO_CORRECT_REFERENCE
        for i, ref in enumerate(instance.references):
            prefix = reference_prefix_for(self.spec.reference_prefix, i, self.spec.reference_prefix_characters)
            block += prefix + ref.output.text + self.spec.reference_suffix
            if ref.is_correct:
                if output == NO_CORRECT_REFERENCE:
                    output = self.label(i)
                elif self.spec.multi_label:
                    output += MULTI_LABEL_DELIMITER + self.label(i)
        if include_output:
            return block + self.spec.output_prefix + output + self.spec.output_suffix
        return block + self.spec.output_prefix.rstrip()


class MultipleChoiceSeparateAdapter(Adapter):
    """One scoring request per choice; the prompt ends with the choice text (no output suffix after it)."""

    method = ADAPT_MULTIPLE_CHOICE_SEPARATE_ORIGINAL
    keep_prompt_end = True

    def generate_requests(self, instance: Instance, trial: int, examples: Sequence[Instance]) -> list[RequestState]:
        states = []
        for index in range(len(instance.references)):
            prompt = self.construct_prompt(examples, instance, True, index, completion_tokens=0)
            request = Request(model_deployment=self.spec.model_deployment, model=self.spec.model,
                              prompt=prompt.text, temperature=0.0, num_completions=1, max_tokens=0,
                              stop_sequences=(), echo_prompt=True)
            states.append(self.request_state(instance, trial, prompt, request, index, "original"))
        return states

    def example_block(self, instance: Instance, include_output: bool, reference_index: int | None) -> str:
        block = super().example_block(instance, include_output, reference_index)
        if reference_index is not None and self.spec.output_suffix:
            block = block[: -len(self.spec.output_suffix)]
        return block


ADAPTERS: dict[str, type[Adapter]] = {
    cls.method: cls for cls in (GenerationAdapter, MultipleChoiceJointAdapter, MultipleChoiceSeparateAdapter)}


def get_adapter(spec: AdapterSpec, window: ContextWindow) -> Adapter:
    if spec.method not in ADAPTERS:
        raise ValueError(f"unknown adaptation method {spec.method!r}; known methods: {', '.join(ADAPTERS)}")
    return ADAPTERS[spec.method](spec, window)


def adapt(instances: Sequence[Instance], spec: AdapterSpec, window: ContextWindow) -> ScenarioState:
    """Adapt `instances` (all splits, eval ones already downsampled) with the adapter for `spec.method`."""
    return get_adapter(spec, window).adapt(instances)


def _with_repeats(states: list[RequestState], num_trials: int) -> list[RequestState]:
    """HELM's `num_trials`: repeat every request with `random` = "1", "2", ... so each is a distinct request."""
    repeats = [dataclasses.replace(s, request=dataclasses.replace(s.request, random=str(i)))
               for i in range(1, num_trials) for s in states]
    return states + repeats
