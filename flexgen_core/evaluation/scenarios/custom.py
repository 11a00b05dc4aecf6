"""`custom`: the user's own data, from a JSONL/JSON, CSV or Parquet file or a hub dataset, via HF `datasets`.

Run entry: `custom:path=data.jsonl,input_column=question,output_column=answer[,choices_column=options]
[,split=test|split_column=split]` (`split`: the HELM split of every row, default test; `split_column`: a
column holding train/valid/test per row), or `custom:dataset=org/name,split=test[,train_split=train],...`
for a hub dataset (see `hub.py`; there `split` names the hub split to evaluate on).
Problems are reported with the file and the line (JSONL, CSV) or row (JSON array, Parquet) they are on.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from flexgen_core.evaluation.scenarios.base import Scenario, register_scenario
from flexgen_core.evaluation.scenarios.hub import helm_split_of, load_hub_instances
from flexgen_core.evaluation.scenarios.rows import (
    ColumnMapping,
    DataValidationError,
    RowProblem,
    check_columns,
    rows_to_instances,
)
from flexgen_core.evaluation.schema import TEST_SPLIT, Instance

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@register_scenario
class CustomScenario(Scenario):
    name = "custom"
    description = "User-provided instances (JSONL, CSV, Parquet or a hub dataset)"
    tags = ("custom",)

    def __init__(self, path: str | None = None, dataset: str | None = None, subset: str | None = None,
                 input_column: str = "input", output_column: str = "output", choices_column: str | None = None,
                 split: str = TEST_SPLIT, split_column: str | None = None, train_split: str | None = None):
        if (path is None) == (dataset is None):
            raise ValueError("custom needs exactly one of path=FILE (.jsonl, .json, .csv, .parquet) "
                             "or dataset=ORG/NAME (a hub dataset)")
        if path is not None and Path(path).suffix.lower() not in BUILDERS:
            raise ValueError(f"custom path={path}: unsupported file type; use one of {', '.join(BUILDERS)}")
        if dataset is not None and split_column is not None:
            raise ValueError("split_column applies to files; for a hub dataset name its splits with "
                             "split=... (evaluation) and train_split=... (in-context examples)")
        self.path = Path(path) if path is not None else None
        self.dataset, self.subset, self.split, self.train_split = dataset, subset, split, train_split
        helm_split = split if dataset is None else helm_split_of(split)
        self.mapping = ColumnMapping(input_column, output_column, choices_column, split_column, helm_split)

    def get_instances(self, output_dir: Path | None = None) -> list[Instance]:
        cache_dir = output_dir / "datasets_cache" if output_dir is not None else None
        if self.dataset is not None:
            return load_hub_instances(self.dataset, self.subset, self.mapping, self.split, self.train_split,
                                      cache_dir)
        assert self.path is not None
        return load_file_instances(self.path, self.mapping, cache_dir)


def load_file_instances(path: Path, mapping: ColumnMapping, cache_dir: Path | None = None) -> list[Instance]:
    """Validate and convert every row of a local file; DataValidationError lists all malformed rows."""
    source = str(path)
    if not path.is_file():
        raise FileNotFoundError(f"custom data file {path} does not exist")
    builder = BUILDERS[path.suffix.lower()]
    if path.stat().st_size == 0 or (builder != "parquet" and not path.read_text(errors="replace").strip()):
        raise DataValidationError(source, [RowProblem("file", "the file is empty")])
    columns, rows = _load_with_datasets(path, builder, cache_dir)
    check_columns(source, columns, mapping)
    locations = _record_locations(path, builder, len(rows))
    return rows_to_instances(source, rows, locations, mapping)


def _load_with_datasets(path: Path, builder: str, cache_dir: Path | None) -> tuple[list[str], list[dict[str, Any]]]:
    import datasets  # heavy import, only when user data is loaded

    kwargs: dict[str, Any] = {}
    if builder == "csv":  # read every cell as text: "42" stays "42", an empty cell becomes None
        header = _csv_header(path)
        kwargs["features"] = datasets.Features({name: datasets.Value("string") for name in header})
    try:
        data = datasets.load_dataset(builder, data_files=str(path), split="train",
                                     cache_dir=str(cache_dir) if cache_dir else None, **kwargs)
    except Exception as e:
        if builder == "json":
            problems = _json_line_problems(path)
            if problems:
                raise DataValidationError(str(path), problems) from None
            if not _is_json_array(path):  # valid JSON Lines that datasets cannot type (mixed value types)
                return _read_json_lines(path)
        if "corresponds to no data" in str(e):
            raise DataValidationError(str(path), [RowProblem("file", "no rows: the file has no data")]) from None
        raise ValueError(f"could not read {path} with datasets.load_dataset({builder!r}): {e}") from e
    return list(data.column_names), data.to_list()


def _csv_header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as f:
        return next(csv.reader(f), [])


def _is_json_array(path: Path) -> bool:
    return path.read_text(encoding="utf-8", errors="replace").lstrip().startswith("[")


def _read_json_lines(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns (in first-seen order) and rows of a JSON Lines file whose lines are all JSON objects."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return list(dict.fromkeys(key for row in rows for key in row)), rows


def _json_line_problems(path: Path) -> list[RowProblem]:
    """Per-line JSON errors of a JSON Lines file (used when `datasets` refuses the whole file)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if _is_json_array(path):
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return [RowProblem(f"line {e.lineno}", f"invalid JSON: {e.msg}")]
        return []
    problems = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(RowProblem(f"line {number}", f"invalid JSON: {e.msg} (column {e.colno})"))
            continue
        if not isinstance(value, dict):
            problems.append(RowProblem(f"line {number}", f"expected a JSON object, got {type(value).__name__}"))
    return problems


def _record_locations(path: Path, builder: str, num_rows: int) -> list[str]:
    """Where each record is: "line N" for JSON Lines and CSV (blank lines skipped, as datasets does),
    "row N" (1-based) for JSON arrays and Parquet, or when the count does not match."""
    lines: list[int] = []
    if builder == "json" and not _is_json_array(path):
        text = path.read_text(encoding="utf-8", errors="replace")
        lines = [n for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    elif builder == "csv":
        with path.open(newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.reader(f)
            next(reader, None)
            start = reader.line_num + 1
            for record in reader:
                if record:
                    lines.append(start)
                start = reader.line_num + 1
    if len(lines) == num_rows:
        return [f"line {n}" for n in lines]
    return [f"row {i + 1}" for i in range(num_rows)]
