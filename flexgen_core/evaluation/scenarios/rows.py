"""User rows -> Instances: column mapping and validation that reports every bad row at once.

A row needs a non-empty text input and at least one reference. Without `choices_column` the output column
holds the gold answer (text, or a list of texts when several answers are right). With `choices_column` the
row holds a list of choices (in CSV: a JSON array such as ["Paris", "Rome"]) and the output column names the
correct one: its text, its letter (A, B, ...) or its 0-based index. Problems are collected over all rows and
raised together as `DataValidationError`, so a run never starts on silently dropped data.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flexgen_core.evaluation.schema import (
    ALL_SPLITS,
    CORRECT_TAG,
    TEST_SPLIT,
    VALID_SPLIT,
    Input,
    Instance,
    Output,
    Reference,
)

MAX_PROBLEMS_SHOWN = 50
SPLIT_ALIASES = {"validation": VALID_SPLIT, "dev": VALID_SPLIT}


@dataclass(frozen=True)
class RowProblem:
    """One thing wrong with the data: where ("line 3", "row 3", or "file") and what."""

    location: str
    message: str


class DataValidationError(ValueError):
    """Malformed user data; `problems` lists every problem found, in row order."""

    def __init__(self, source: str, problems: Sequence[RowProblem]):
        self.source = source
        self.problems = list(problems)
        shown = "\n".join(f"  {source} {p.location}: {p.message}" for p in self.problems[:MAX_PROBLEMS_SHOWN])
        more = len(self.problems) - MAX_PROBLEMS_SHOWN
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{len(self.problems)} problem(s) in {source}; fix them (or drop those rows yourself) "
                         f"and rerun, the evaluation does not start on malformed data:\n{shown}{tail}")


@dataclass(frozen=True)
class ColumnMapping:
    """Which columns hold the input, the answer, the choices and the split (None: not used)."""

    input_column: str = "input"
    output_column: str = "output"
    choices_column: str | None = None
    split_column: str | None = None
    split: str = TEST_SPLIT  # split of every row when there is no split column

    def __post_init__(self) -> None:
        if self.split not in ALL_SPLITS:
            raise ValueError(f"split must be one of {', '.join(ALL_SPLITS)}; got {self.split!r}")

    @property
    def columns(self) -> list[str]:
        return [c for c in (self.input_column, self.output_column, self.choices_column, self.split_column) if c]


def check_columns(source: str, available: Sequence[str], mapping: ColumnMapping) -> None:
    """Refuse mapped columns that the data does not have (one problem per missing column)."""
    option = {mapping.input_column: "input_column", mapping.output_column: "output_column",
              mapping.choices_column: "choices_column", mapping.split_column: "split_column"}
    missing = [c for c in mapping.columns if c not in available]
    if missing:
        raise DataValidationError(source, [
            RowProblem("file", f"no column {c!r} (set {option[c]}=...); the columns are: {', '.join(available)}")
            for c in missing])


def rows_to_instances(source: str, rows: Sequence[Mapping[str, Any]], locations: Sequence[str],
                      mapping: ColumnMapping) -> list[Instance]:
    """One Instance per row, in order; raises DataValidationError listing every malformed row."""
    if not rows:
        raise DataValidationError(source, [RowProblem("file", "no rows: the file is empty")])
    instances: list[Instance] = []
    problems: list[RowProblem] = []
    for row, where in zip(rows, locations, strict=True):
        row_problems: list[str] = []
        text = _input_text(row.get(mapping.input_column), mapping.input_column, row_problems)
        if mapping.choices_column:
            references = _choice_references(row.get(mapping.choices_column), row.get(mapping.output_column),
                                            mapping, row_problems)
        else:
            references = _answer_references(row.get(mapping.output_column), mapping.output_column, row_problems)
        split = _split(row, mapping, row_problems)
        problems += [RowProblem(where, m) for m in row_problems]
        if not row_problems:
            instances.append(Instance(Input(text), references, split=split))
    if problems:
        raise DataValidationError(source, problems)
    return instances


def _input_text(value: Any, column: str, problems: list[str]) -> str:
    if value is None:
        problems.append(f"missing input (column {column!r} is empty)")
    elif not isinstance(value, str):
        problems.append(f"input column {column!r} must be text, got {_describe(value)}")
    elif not value.strip():
        problems.append(f"empty input (column {column!r} is blank)")
    else:
        return value
    return ""


def _answer_references(value: Any, column: str, problems: list[str]) -> tuple[Reference, ...]:
    answers = value if isinstance(value, list) else [value]
    if value is None or (isinstance(value, list) and not value):
        problems.append(f"no reference (column {column!r} is empty)")
        return ()
    for answer in answers:
        if not isinstance(answer, str):
            problems.append(f"answer column {column!r} must be text or a list of texts, got {_describe(answer)}"
                            + (" (write numbers as strings)" if isinstance(answer, (int, float)) else ""))
            return ()
        if not answer.strip():
            problems.append(f"no reference (column {column!r} is blank)")
            return ()
    return tuple(Reference(Output(a), (CORRECT_TAG,)) for a in answers)


def _choice_references(choices: Any, answer: Any, mapping: ColumnMapping, problems: list[str]) -> tuple[Reference, ...]:
    column = mapping.choices_column
    if isinstance(choices, str):
        try:
            choices = json.loads(choices)
        except json.JSONDecodeError:
            problems.append(f"choices column {column!r} must be a list of texts (in CSV a JSON array such as "
                            f'["yes", "no"]), got the text {choices!r:.60}')
            return ()
    if choices is None:
        problems.append(f"no reference (choices column {column!r} is empty)")
        return ()
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        problems.append(f"choices column {column!r} must be a list of at least 2 non-empty texts, "
                        f"got {_describe(choices)}")
        return ()
    gold = _gold_index(answer, choices, mapping.output_column, problems)
    if gold is None:
        return ()
    return tuple(Reference(Output(c), (CORRECT_TAG,) if i == gold else ()) for i, c in enumerate(choices))


def _gold_index(answer: Any, choices: list[str], column: str, problems: list[str]) -> int | None:
    """The correct choice: given as its 0-based index, its text, or its letter."""
    if answer is None:
        problems.append(f"no correct choice (column {column!r} is empty)")
        return None
    if isinstance(answer, int) and not isinstance(answer, bool):
        if 0 <= answer < len(choices):
            return answer
        problems.append(f"answer index {answer} is out of range for {len(choices)} choices (indices are 0-based)")
        return None
    if not isinstance(answer, str):
        problems.append(f"answer column {column!r} must be a choice text, letter or index, got {_describe(answer)}")
        return None
    if answer in choices:
        return choices.index(answer)
    letter = answer.strip()
    if len(letter) == 1 and "A" <= letter <= "Z" and ord(letter) - ord("A") < len(choices):
        return ord(letter) - ord("A")
    if letter.isdigit() and int(letter) < len(choices):
        return int(letter)
    problems.append(f"answer {answer!r} is not one of the {len(choices)} choices, nor a letter "
                    f"A-{chr(ord('A') + len(choices) - 1)}, nor a 0-based index")
    return None


def _split(row: Mapping[str, Any], mapping: ColumnMapping, problems: list[str]) -> str:
    if not mapping.split_column:
        return mapping.split
    value = row.get(mapping.split_column)
    split = SPLIT_ALIASES.get(value, value) if isinstance(value, str) else value
    if split not in ALL_SPLITS:
        problems.append(f"split column {mapping.split_column!r} must be one of {', '.join(ALL_SPLITS)}, "
                        f"got {_describe(value)}")
        return mapping.split
    return split


def _describe(value: Any) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r:.60}"
