"""Smoke-test scenarios: HELM's even/odd tutorials and two seeded generators of our own.

HELM's three (`simple_mcqa`, `simple_short_answer_qa`, `simple_classification`) ask whether each number
10..99 is even or odd; 10..20 are train (11), 21..99 test (79). `simple_copy` (repeat a word sequence) and
`simple_arithmetic` (add two numbers) are ours: seeded, with enough train instances to fit a tiny model on.
"""

from __future__ import annotations

import random
from abc import abstractmethod
from pathlib import Path

from flexgen_core.evaluation.scenarios.base import Scenario, register_scenario
from flexgen_core.evaluation.schema import CORRECT_TAG, TEST_SPLIT, TRAIN_SPLIT, Input, Instance, Output, Reference

PARITY_LABELS = ("Even", "Odd")
COPY_WORDS = ("red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone", "bird", "fish",
              "cloud", "rain", "fire", "snow", "wind", "leaf", "star", "sand")


def _parity_split(number: int) -> str:
    return TRAIN_SPLIT if number <= 20 else TEST_SPLIT


def _parity_choices(number: int) -> tuple[Reference, ...]:
    return tuple(Reference(Output(label), (CORRECT_TAG,) if number % 2 == i else ())
                 for i, label in enumerate(PARITY_LABELS))


@register_scenario
class SimpleMCQAScenario(Scenario):
    name = "simple_mcqa"
    description = "Answer if two-digit numbers are even or odd."
    tags = ("question answering",)

    def get_instances(self, output_dir: Path | None = None) -> list[Instance]:
        return [Instance(Input(f"Is {n} even or odd?"), _parity_choices(n), split=_parity_split(n))
                for n in range(10, 100)]


@register_scenario
class SimpleShortAnswerQAScenario(Scenario):
    name = "simple_short_answer_qa"
    description = "Answer if two-digit numbers are even or odd."
    tags = ("question answering",)

    def get_instances(self, output_dir: Path | None = None) -> list[Instance]:
        return [Instance(Input(f"Is {n} even or odd?"), (Reference(Output(PARITY_LABELS[n % 2]), (CORRECT_TAG,)),),
                         split=_parity_split(n)) for n in range(10, 100)]


@register_scenario
class SimpleClassificationScenario(Scenario):
    name = "simple_classification"
    description = "Classify numbers by parity."
    tags = ("classification",)

    def get_instances(self, output_dir: Path | None = None) -> list[Instance]:
        return [Instance(Input(str(n)), _parity_choices(n), split=_parity_split(n)) for n in range(10, 100)]


class _SeededScenario(Scenario):
    """A generator of (input, answer) pairs from `random.Random(seed)`: train first, then test."""

    def __init__(self, seed: int = 42, num_train_instances: int = 1000, num_test_instances: int = 500):
        self.seed = seed
        self.split_sizes = {TRAIN_SPLIT: num_train_instances, TEST_SPLIT: num_test_instances}

    def get_instances(self, output_dir: Path | None = None) -> list[Instance]:
        rng = random.Random(self.seed)
        instances = []
        for split, count in self.split_sizes.items():
            for _ in range(count):
                source, target = self._problem(rng)
                instances.append(Instance(Input(source), (Reference(Output(target), (CORRECT_TAG,)),), split=split))
        return instances

    @abstractmethod
    def _problem(self, rng: random.Random) -> tuple[str, str]:
        """One (input, answer) pair."""


@register_scenario
class SimpleCopyScenario(_SeededScenario):
    name = "simple_copy"
    description = "Repeat a sequence of 3-6 words exactly."
    tags = ("copying", "smoke test")

    def _problem(self, rng: random.Random) -> tuple[str, str]:
        words = " ".join(rng.choice(COPY_WORDS) for _ in range(rng.randint(3, 6)))
        return words, words


@register_scenario
class SimpleArithmeticScenario(_SeededScenario):
    name = "simple_arithmetic"
    description = "Add two numbers below 100."
    tags = ("arithmetic", "smoke test")

    def _problem(self, rng: random.Random) -> tuple[str, str]:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"{a} + {b} =", str(a + b)
