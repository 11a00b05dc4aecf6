"""HELM's `synthetic_reasoning_natural`: one step of deduction from natural-language rules.

Each problem has up to 5 rules about one subject ("If a cow is weak or old, then the cow is small."), a fact
("The cow is old and hot.") and asks what follows; the target lists the consequents ("The cow is small.",
or "Nothing."). easy: rules name the subject itself; medium: rules may name its category ("an animal");
hard: additionally the fact uses synonyms of the attributes ("ancient" for "old").
1000 train / 5000 valid / 5000 test from `random.Random(42)`, drawn in HELM's order, so the instances equal
HELM's (whose scenario name is misspelled "sythetic_reasoning_natural"; ours is not).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

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

DIFFICULTIES = ("easy", "medium", "hard")
SUBJECTS: dict[str, tuple[str, ...]] = {
    "person": ("Alice", "Bob", "Carol", "Dan", "Erin", "Frank"),
    "animal": ("dog", "cat", "rabbit", "mouse", "tiger", "lion", "bear", "squirrel", "cow", "panda", "hedgehog",
               "elephant", "giraffe", "hippo"),
    "plant": ("poppy", "dandelion", "tree", "rose", "sunflower"),
}
# Each generic attribute and the specific words (synonyms) that imply it; insertion order matters.
ATTRIBUTE_GROUPS: dict[str, tuple[str, ...]] = {
    "young": ("young",), "soft": ("soft",), "sad": ("sad",), "scary": ("scary",),
    "cold": ("cold", "chill", "cool"), "hot": ("hot", "warm"), "smart": ("smart", "clever", "wise", "intelligent"),
    "clean": ("clean", "tidy"), "small": ("small", "little", "tiny"), "big": ("big", "enormous", "giant", "huge"),
    "good": ("good", "kind", "nice"), "beautiful": ("beautiful", "pretty"), "red": ("red", "crimson"),
    "blue": ("blue", "cobalt"), "green": ("green", "viridian"), "purple": ("purple", "violet"),
    "boring": ("boring", "dull"), "old": ("old", "ancient", "antique"), "strong": ("strong", "powerful", "muscular"),
    "weak": ("weak", "frail", "fragile"), "fast": ("fast", "quick"), "slow": ("slow", "sluggish"),
    "bad": ("bad", "evil", "wicked", "mean"), "happy": ("happy", "elated", "glad", "cheerful"),
    "round": ("round", "circular", "spherical"),
}
CATEGORIES = tuple(SUBJECTS)
ATTRIBUTES = tuple(ATTRIBUTE_GROUPS)
MAX_RULES = 5
P_CONSEQUENCELESS = 0.1  # chance of keeping a fact from which nothing follows


def specified_subject(subject: str, category: str, article: str, capitalize: bool = False) -> str:
    """"a dog" / "an elephant" / "The cow"; people (and the bare category "person") get no article."""
    if category == "person" or subject == "person":
        return subject
    first = article[0].upper() if capitalize else article[0]
    if article == "a":
        return f"{first}n {subject}" if subject[0].lower() in "aeiou" else f"{first} {subject}"
    return f"{first}{article[1:]} {subject}"


@dataclass(frozen=True)
class Rule:
    subject: str  # the subject itself or its category
    category: str
    condition: tuple[str, ...]
    conjunction: str  # "and" | "or"
    consequent: str

    def applies_to(self, attributes: list[str]) -> bool:
        if self.consequent in attributes:
            return False
        if self.conjunction == "and":
            return set(self.condition).issubset(attributes)
        return not set(self.condition).isdisjoint(attributes)

    def __str__(self) -> str:
        condition = f" {self.conjunction} ".join(self.condition)
        return (f"If {specified_subject(self.subject, self.category, 'a')} is {condition}, "
                f"then {specified_subject(self.subject, self.category, 'the')} is {self.consequent}.")


def fact_text(subject: str, category: str, attributes: list[str]) -> str:
    """"The dog is big and red." or "Nothing." when there are no attributes."""
    if not attributes:
        return "Nothing."
    return f"{specified_subject(subject, category, 'the', capitalize=True)} is {' and '.join(attributes)}."


@register_scenario
class SyntheticReasoningNaturalScenario(Scenario):
    name = "synthetic_reasoning_natural"
    description = "Language Pattern Matching"
    tags = ("reasoning", "language", "pattern_matching")

    def __init__(self, difficulty: str, random_seed: int = 42, num_train_instances: int = 1000,
                 num_valid_instances: int = 5000, num_test_instances: int = 5000):
        if difficulty not in DIFFICULTIES:
            raise ValueError(f"synthetic_reasoning_natural difficulty must be one of {', '.join(DIFFICULTIES)}; "
                             f"got {difficulty!r}")
        self.difficulty = difficulty
        self.rules_name_subject = difficulty == "easy"
        self.fact_uses_synonyms = difficulty == "hard"
        self.random_seed = random_seed
        self.split_sizes = {TRAIN_SPLIT: num_train_instances, VALID_SPLIT: num_valid_instances,
                            TEST_SPLIT: num_test_instances}

    def get_instances(self, output_dir: Path | None = None) -> list[Instance]:
        rng = random.Random(self.random_seed)
        instances = []
        for split, count in self.split_sizes.items():
            for _ in range(count):
                question, answer = self._problem(rng)
                instances.append(Instance(Input(question), (Reference(Output(answer), (CORRECT_TAG,)),), split=split))
        return instances

    def _problem(self, rng: random.Random) -> tuple[str, str]:
        category = rng.choice(CATEGORIES)
        subject = rng.choice(SUBJECTS[category])
        rules = self._rules(rng, subject, category)
        shown_attributes, consequents = _fact(rng, rules, self.fact_uses_synonyms)
        question = "\n".join(str(rule) for rule in rules) + "\n"
        question += f"Fact:\n{fact_text(subject, category, shown_attributes)}\n"
        question += f"The following can be determined about {specified_subject(subject, category, 'the')}:"
        return question, fact_text(subject, category, consequents)

    def _rules(self, rng: random.Random, subject: str, category: str) -> list[Rule]:
        """Up to 5 rules over disjoint attribute sets, so one step of reasoning decides everything."""
        remaining = list(ATTRIBUTES)
        rng.shuffle(remaining)
        rules: list[Rule] = []
        while len(remaining) > 2 and len(rules) < MAX_RULES:
            rule_subject = subject if self.rules_name_subject else rng.choice([category, subject])
            size = rng.randint(2, 3)
            used, remaining = remaining[:size], remaining[size:]
            rules.append(Rule(rule_subject, category, tuple(used[:-1]), rng.choice(["and", "or"]), used[-1]))
        return rules


def _fact(rng: random.Random, rules: list[Rule], use_synonyms: bool) -> tuple[list[str], list[str]]:
    """The two attribute words the fact shows (synonyms when `use_synonyms`) and the consequents the rules
    derive from the two generic attributes behind them.
    A fact with no consequent is redrawn unless a 10% draw keeps it (HELM's `p_consequenceless`)."""
    while True:
        attributes = rng.sample(ATTRIBUTES, 2)
        synonyms = [rng.choice(ATTRIBUTE_GROUPS[a]) for a in attributes]
        consequents = [rule.consequent for rule in rules if rule.applies_to(attributes)]
        if consequents or rng.random() <= P_CONSEQUENCELESS:
            return (synonyms if use_synonyms else attributes), consequents
