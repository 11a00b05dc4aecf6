"""HELM's `synthetic_reasoning` (LIME-style): patterns over rule symbols X/Y/Z and `+ - * =`.

A pattern such as `X + Y = Y + X` is instantiated by substituting each rule symbol with 1-2 random words
(animals and fruits). Three modes:
- pattern_match: given 4 candidate patterns and one instantiated result, name the matching pattern;
- variable_substitution: given a pattern and its substitutions, write the result;
- induction: given two results of the same pattern, write "Rule: <pattern>".
1000 train / 5000 valid / 5000 test instances from `np.random.RandomState(42)`, drawn in HELM's order, so
the instances equal HELM's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flexgen_core.evaluation.scenarios.base import Scenario, register_scenario
from flexgen_core.evaluation.schema import (
    CORRECT_TAG,
    TEST_SPLIT,
    TRAIN_SPLIT,
    VALID_SPLIT,
    Input,
    Instance,
    Output,
    Reference,
)

ANIMALS = ("zebra", "cobra", "stork", "penguin", "shark", "lion", "buffalo", "whale", "seal", "eagle", "horse", "rat")
FRUITS = ("apple", "peach", "watermelon", "banana", "grape", "kiwi", "pear", "strawberry", "blueberry", "blackberry")
RULE_SYMBOLS = ("X", "Y", "Z")
MATH_SYMBOLS = ("+", "-", "*", "=")
MODES = ("pattern_match", "variable_substitution", "induction")


def substitute(pattern: list[str], substitutions: dict[str, str]) -> list[str]:
    """Replace every rule symbol of `pattern` by its substitution (symbols not in the dict stay)."""
    return [substitutions.get(symbol, symbol) for symbol in pattern]


@register_scenario
class SyntheticReasoningScenario(Scenario):
    name = "synthetic_reasoning"
    description = "Synthetic reasoning benchmark"
    tags = ("reasoning", "language", "pattern_matching")

    def __init__(self, mode: str, random_seed: int = 42, num_train_instances: int = 1000,
                 num_valid_instances: int = 5000, num_test_instances: int = 5000):
        if mode not in MODES:
            raise ValueError(f"synthetic_reasoning mode must be one of {', '.join(MODES)}; got {mode!r}")
        self.mode = mode
        self.random_seed = random_seed
        self.split_sizes = {TRAIN_SPLIT: num_train_instances, VALID_SPLIT: num_valid_instances,
                            TEST_SPLIT: num_test_instances}

    def get_instances(self, output_dir: Path | None = None) -> list[Instance]:
        rng = np.random.RandomState(self.random_seed)
        instances = []
        for split, count in self.split_sizes.items():
            for _ in range(count):
                source, target = self._problem(rng)
                instances.append(Instance(Input(source), (Reference(Output(target), (CORRECT_TAG,)),), split=split))
        return instances

    def _problem(self, rng: np.random.RandomState) -> tuple[str, str]:
        """One (input, target) pair. Every draw happens in HELM's order, whatever the mode."""
        rule_symbols = [str(s) for s in rng.choice(RULE_SYMBOLS, size=rng.randint(2, 4))]
        distinct_symbols = sorted(set(rule_symbols))
        math_symbols = [str(s) for s in rng.choice(MATH_SYMBOLS, size=rng.randint(2, 4))]
        pattern = _shuffled(rng, rule_symbols + math_symbols)
        substitutions, substitutions_text = _substitutions(rng, distinct_symbols)
        result = " ".join(substitute(pattern, substitutions))
        second_substitutions, _ = _substitutions(rng, distinct_symbols)
        second_result = " ".join(substitute(pattern, second_substitutions))
        pattern_text = " ".join(pattern)
        if self.mode == "induction":
            return f"Two results: {result} | {second_result}", f"Rule: {pattern_text}"
        if self.mode == "variable_substitution":
            return f"Rules: {pattern_text} | Substitutions: {substitutions_text}", result
        distractors = [" ".join(_shuffled(rng, distinct_symbols + math_symbols)) for _ in range(3)]
        candidates = _shuffled(rng, distractors + [pattern_text])
        return f"Rules: {' | '.join(candidates)} | Result: {result}", pattern_text


def _shuffled(rng: np.random.RandomState, items: list[str]) -> list[str]:
    rng.shuffle(items)
    return items


def _substitutions(rng: np.random.RandomState, symbols: list[str]) -> tuple[dict[str, str], str]:
    """Each symbol -> 1 or 2 random words; also the text form `X by "lion" , Y by "kiwi pear"`."""
    words = ANIMALS + FRUITS
    substitutions: dict[str, str] = {}
    parts: list[str] = []
    for symbol in symbols:
        length = rng.randint(1, 3)
        substitutions[symbol] = " ".join(str(w) for w in rng.choice(words, size=length))
        parts.append(f'{symbol} by " {substitutions[symbol]} "')
    return substitutions, " , ".join(parts)
