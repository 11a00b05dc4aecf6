"""HELM's `dyck_language`: close the last 1-3 brackets of a Dyck-n word (Suzgun et al., 2019).

Words come from the PCFG S -> (_i S )_i with probability p (bracket type uniform), S -> S S with
probability q, S -> empty otherwise (p=0.5, q=0.25, recursion depth <= 100). The input is the word minus its
last closers, cut where 1..3 brackets are open; the target is the closing sequence, with a leading space.
3 train words of length 4-50, 500 test words of length 52-100 whose inputs differ from every other input.
Draws use `random.Random(42)` and `np.random.RandomState(42)` in HELM's order, so instances equal HELM's.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from flexgen_core.evaluation.scenarios.base import Scenario, register_scenario
from flexgen_core.evaluation.schema import CORRECT_TAG, TEST_SPLIT, TRAIN_SPLIT, Input, Instance, Output, Reference

BRACKET_PAIRS = (("(", ")"), ("[", "]"), ("{", "}"), ("<", ">"))


@register_scenario
class DyckLanguageScenario(Scenario):
    name = "dyck_language"
    description = "Generate the closing parentheses of a Dyck-n prefix"
    tags = ("reasoning", "language", "hierarchy")

    def __init__(self, num_parenthesis_pairs: int, num_train_instances: int = 3, num_test_instances: int = 500,
                 prob_p: float = 0.5, prob_q: float = 0.25, max_recursive_depth: int = 100,
                 min_seq_train_length: int = 4, max_seq_train_length: int = 50, min_seq_test_length: int = 52,
                 max_seq_test_length: int = 100, max_output_size: int = 3, seed: int = 42):
        if not 1 <= num_parenthesis_pairs <= len(BRACKET_PAIRS):
            raise ValueError(f"dyck_language num_parenthesis_pairs must be 1..{len(BRACKET_PAIRS)}; "
                             f"got {num_parenthesis_pairs}")
        if not (prob_p > 0 and prob_q > 0 and prob_p + prob_q < 1):
            raise ValueError(f"dyck_language needs 0 < prob_p, prob_q and prob_p + prob_q < 1; got {prob_p}, {prob_q}")
        self.num_parenthesis_pairs = num_parenthesis_pairs
        self.openers = [o for o, _ in BRACKET_PAIRS[:num_parenthesis_pairs]]
        self.closers = [c for _, c in BRACKET_PAIRS[:num_parenthesis_pairs]]
        self.num_train_instances = num_train_instances
        self.num_test_instances = num_test_instances
        self.prob_p, self.prob_q = prob_p, prob_q
        self.max_recursive_depth = max_recursive_depth
        self.train_lengths = (min_seq_train_length, max_seq_train_length)
        self.test_lengths = (min_seq_test_length, max_seq_test_length)
        self.max_output_size = max_output_size
        self.seed = seed

    def get_instances(self, output_dir: Path | None = None) -> list[Instance]:
        draw = _Draws(random.Random(self.seed), np.random.RandomState(self.seed))
        train_inputs, train = self._corpus(draw, TRAIN_SPLIT, self.num_train_instances, *self.train_lengths, set())
        _, test = self._corpus(draw, TEST_SPLIT, self.num_test_instances, *self.test_lengths, train_inputs)
        return train + test

    def _corpus(self, draw: _Draws, split: str, size: int, min_length: int, max_length: int,
                not_allowed: set[str]) -> tuple[set[str], list[Instance]]:
        seen: set[str] = set()
        instances: list[Instance] = []
        while len(instances) < size:
            source, target = self._input_output(draw, min_length, max_length)
            if source in seen or source in not_allowed:
                continue
            seen.add(source)
            instances.append(Instance(Input(source), (Reference(Output(" " + target), (CORRECT_TAG,)),), split=split))
        return seen, instances

    def _input_output(self, draw: _Draws, min_length: int, max_length: int) -> tuple[str, str]:
        while True:
            word: list[str] = []
            self._append_word(draw, 0, word, max_length)
            if len(word) < min_length:
                continue
            num_open = draw.py.randint(1, self.max_output_size)
            prefix = self._prefix_with_open(word, num_open)
            if prefix:
                return " ".join(prefix), " ".join(self._closing(prefix))

    def _append_word(self, draw: _Draws, depth: int, out: list[str], max_length: int = 100) -> None:
        """Append a random Dyck word from the PCFG to `out`; nothing when deeper than the limit, and a word
        longer than `max_length` is taken out again. As in HELM, nested words are limited to 100 symbols."""
        if depth > self.max_recursive_depth:
            return
        start = len(out)
        u = draw.py.random()
        if u < self.prob_p:
            kind = draw.np.randint(self.num_parenthesis_pairs)
            out.append(self.openers[kind])
            self._append_word(draw, depth + 1, out)
            out.append(self.closers[kind])
        elif u < self.prob_p + self.prob_q:
            self._append_word(draw, depth, out)
            self._append_word(draw, depth, out)
        if len(out) - start > max_length:
            del out[start:]

    def _prefix_with_open(self, word: list[str], num_open: int) -> list[str]:
        """Longest prefix of `word` that leaves exactly `num_open` brackets open, scanning from the end
        ([] if none); HELM's `get_input`."""
        open_count = 0
        for i in range(len(word) - 1, -1, -1):
            open_count += -1 if word[i] in self.openers else 1
            if open_count == num_open:
                return word[:i]
        return []

    def _closing(self, prefix: list[str]) -> list[str]:
        stack: list[str] = []
        for symbol in prefix:
            if symbol in self.openers:
                stack.append(self.closers[self.openers.index(symbol)])
            else:
                stack.pop()
        return stack[::-1]


class _Draws:
    """The two random streams HELM's generator reads: Python's `random` and numpy's legacy global state."""

    def __init__(self, py: random.Random, np_state: np.random.RandomState):
        self.py = py
        self.np = np_state
