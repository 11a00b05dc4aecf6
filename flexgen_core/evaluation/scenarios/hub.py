"""`hub`: a Hugging Face hub dataset through `datasets.load_dataset`, failing fast when the hub is unreachable.

With HF_DATASETS_OFFLINE / HF_HUB_OFFLINE set, only the local datasets cache is consulted (no network).
Otherwise the hub is asked about the dataset first, with a short timeout in a helper thread (so neither
DNS nor datasets' own retries, 23 s of them, can stall a run); only when it answers is the dataset loaded.
Run entry: `hub:dataset=org/name[,subset=config],split=test[,train_split=train],input_column=...,
output_column=...[,choices_column=...]`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from flexgen_core.evaluation.scenarios.base import Scenario, register_scenario
from flexgen_core.evaluation.scenarios.rows import ColumnMapping, check_columns, rows_to_instances
from flexgen_core.evaluation.schema import TEST_SPLIT, TRAIN_SPLIT, VALID_SPLIT, Instance

HUB_TIMEOUT_S = 3.0
OFFLINE_FLAGS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
VALID_SPLIT_NAMES = ("validation", "valid", "dev")


class HubUnavailableError(ConnectionError):
    """The hub dataset cannot be loaded here (offline, unreachable, missing or gated)."""


def offline_flag() -> str | None:
    """The environment variable that puts HF offline, if one is set to a true value."""
    for name in OFFLINE_FLAGS:
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return name
    return None


def helm_split_of(hub_split: str) -> str:
    """HELM split for evaluation rows of a hub split: validation-like names -> "valid", else "test"."""
    return VALID_SPLIT if hub_split in VALID_SPLIT_NAMES else TEST_SPLIT


def probe_hub(dataset: str, endpoint: str | None = None, timeout_s: float = HUB_TIMEOUT_S) -> None:
    """Ask the hub about `dataset` within `timeout_s`; raise HubUnavailableError saying why it cannot be used."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    outcome: dict[str, BaseException | None] = {}

    def ask() -> None:
        try:
            HfApi(endpoint=endpoint).dataset_info(dataset, timeout=timeout_s)
            outcome["error"] = None
        except BaseException as e:  # reported to the caller below
            outcome["error"] = e

    worker = threading.Thread(target=ask, name="hub-probe", daemon=True)
    worker.start()
    worker.join(timeout_s + 1.0)
    where = endpoint or "the Hugging Face hub"
    if "error" not in outcome:
        raise HubUnavailableError(f"{where} did not answer within {timeout_s:g} s about dataset {dataset!r}; "
                                  f"{_offline_advice()}")
    error = outcome["error"]
    if error is None:
        return
    if isinstance(error, GatedRepoError):
        raise HubUnavailableError(f"hub dataset {dataset!r} is gated: accept its terms on the hub and log in "
                                  f"(`hf auth login`), or export it to a file and use custom:path=FILE")
    if isinstance(error, RepositoryNotFoundError):
        raise HubUnavailableError(f"hub dataset {dataset!r} does not exist (or is private); check the name")
    raise HubUnavailableError(f"cannot reach {where} for dataset {dataset!r} ({type(error).__name__}: "
                              f"{str(error)[:200]}); {_offline_advice()}")


def _offline_advice() -> str:
    return ("the machine looks offline. Set HF_DATASETS_OFFLINE=1 to use a copy already in the local datasets "
            "cache, or export the data to a file and use custom:path=FILE.jsonl")


def load_hub_rows(dataset: str, subset: str | None, split: str,
                  cache_dir: Path | None = None) -> tuple[list[str], list[dict[str, Any]]]:
    """Column names and rows of one split of a hub dataset (see the module docstring for offline rules)."""
    import datasets  # heavy import, only when hub data is loaded

    flag = offline_flag() or ("HF_HUB_OFFLINE" if datasets.config.HF_HUB_OFFLINE else None)
    if flag is not None and not datasets.config.HF_HUB_OFFLINE:
        # The flag was set after `datasets` was imported: it would still go online, so do not call it.
        raise HubUnavailableError(f"{flag} is set, so hub dataset {dataset!r} cannot be downloaded; "
                                  f"export it to a file and use custom:path=FILE")
    if flag is None:
        probe_hub(dataset, os.environ.get("HF_ENDPOINT") or None)
    try:
        data = datasets.load_dataset(dataset, subset, split=split, cache_dir=str(cache_dir) if cache_dir else None)
    except ConnectionError as e:
        if flag is not None:
            raise HubUnavailableError(f"{flag} is set and hub dataset {dataset!r} is not in the local datasets cache "
                                      f"({e}); load it once with network access, or export it to a file and use "
                                      f"custom:path=FILE") from None
        raise HubUnavailableError(f"could not download hub dataset {dataset!r}: {e}") from e
    except FileNotFoundError as e:
        raise HubUnavailableError(f"hub dataset {dataset!r} (subset {subset!r}) was not found: {e}") from e
    except ValueError as e:  # unknown split or config
        raise ValueError(f"hub dataset {dataset!r}: {e}") from e
    return list(data.column_names), data.to_list()


def load_hub_instances(dataset: str, subset: str | None, mapping: ColumnMapping, eval_split: str,
                       train_split: str | None, cache_dir: Path | None) -> list[Instance]:
    """Instances from hub split `eval_split` (HELM valid/test) and, if given, `train_split` (HELM train)."""
    parts = ([(train_split, TRAIN_SPLIT)] if train_split else []) + [(eval_split, helm_split_of(eval_split))]
    instances: list[Instance] = []
    for hub_split, helm_split in parts:
        columns, rows = load_hub_rows(dataset, subset, hub_split, cache_dir)
        source = f"{dataset}[{hub_split}]"
        split_mapping = ColumnMapping(mapping.input_column, mapping.output_column, mapping.choices_column,
                                      None, helm_split)
        check_columns(source, columns, split_mapping)
        instances += rows_to_instances(source, rows, [f"row {i + 1}" for i in range(len(rows))], split_mapping)
    return instances


@register_scenario
class HubScenario(Scenario):
    name = "hub"
    description = "A Hugging Face hub dataset loaded through datasets.load_dataset"
    tags = ("custom", "hub")

    def __init__(self, dataset: str, subset: str | None = None, split: str = TEST_SPLIT,
                 train_split: str | None = None, input_column: str = "input", output_column: str = "output",
                 choices_column: str | None = None):
        if not dataset.strip():
            raise ValueError("hub needs dataset=ORG/NAME")
        self.dataset, self.subset, self.split, self.train_split = dataset, subset, split, train_split
        self.mapping = ColumnMapping(input_column, output_column, choices_column, None, helm_split_of(split))

    def get_instances(self, output_dir: Path | None = None) -> list[Instance]:
        cache_dir = output_dir / "datasets_cache" if output_dir is not None else None
        return load_hub_instances(self.dataset, self.subset, self.mapping, self.split, self.train_split, cache_dir)
