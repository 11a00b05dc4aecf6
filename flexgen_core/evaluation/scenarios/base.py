"""Scenario base class, the scenario registry, and HELM's instance bookkeeping (ids, eval downsampling)."""

from __future__ import annotations

import dataclasses
import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from flexgen_core.evaluation.schema import EVAL_SPLITS, TRAIN_SPLIT, Instance, ScenarioSpec

_PACKAGE_ROOT = Path(__file__).resolve().parents[3]


class Scenario(ABC):
    """A task and its data. The constructor is light (checks arguments); `get_instances` does the work."""

    name: ClassVar[str]
    description: ClassVar[str]
    tags: ClassVar[tuple[str, ...]]

    @abstractmethod
    def get_instances(self, output_dir: Path | None = None) -> list[Instance]:
        """All instances of all splits, in a deterministic order. `output_dir` may hold downloads or caches."""

    def metadata(self) -> dict[str, Any]:
        """HELM's scenario.json: name, description, tags, definition_path."""
        path = Path(inspect.getfile(type(self))).resolve()
        definition = path.relative_to(_PACKAGE_ROOT) if path.is_relative_to(_PACKAGE_ROOT) else path
        return {"name": self.name, "description": self.description, "tags": list(self.tags),
                "definition_path": str(definition)}


ScenarioT = TypeVar("ScenarioT", bound=type[Scenario])
_SCENARIOS: dict[str, type[Scenario]] = {}


def register_scenario(cls: ScenarioT) -> ScenarioT:
    """Class decorator: register a Scenario subclass under its `name`; a second class with that name is refused."""
    if cls.name in _SCENARIOS:
        raise ValueError(f"scenario {cls.name!r} is already registered by {_SCENARIOS[cls.name].__qualname__}")
    _SCENARIOS[cls.name] = cls
    return cls


def scenario_names() -> list[str]:
    return sorted(_SCENARIOS)


def scenario_class(name: str) -> type[Scenario]:
    if name not in _SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; registered scenarios: {', '.join(scenario_names())}")
    return _SCENARIOS[name]


def get_scenario(name: str, **args: Any) -> Scenario:
    """Construct the registered scenario `name`; unknown or missing arguments raise ValueError."""
    cls = scenario_class(name)
    params = {p for p in inspect.signature(cls).parameters if p != "self"}
    unknown = [a for a in args if a not in params]
    if unknown:
        raise ValueError(f"scenario {name!r} has no argument {', '.join(map(repr, unknown))}; "
                         f"its arguments are: {', '.join(sorted(params)) or '(none)'}")
    try:
        return cls(**args)
    except TypeError as e:
        raise ValueError(f"scenario {name!r}: {e}") from None


def scenario_spec(name: str, **args: Any) -> ScenarioSpec:
    """A ScenarioSpec naming the registered class (dotted path) with `args`."""
    cls = scenario_class(name)
    return ScenarioSpec(class_name=f"{cls.__module__}.{cls.__qualname__}", args=dict(args))


def create_scenario(spec: ScenarioSpec) -> Scenario:
    """The scenario a ScenarioSpec names (looked up among registered classes, never imported by name)."""
    for name, cls in _SCENARIOS.items():
        if f"{cls.__module__}.{cls.__qualname__}" == spec.class_name:
            return get_scenario(name, **spec.args)
    raise ValueError(f"no registered scenario class {spec.class_name!r}")


def with_instance_ids(instances: Sequence[Instance]) -> list[Instance]:
    """HELM's ids: if any instance lacks one, all get "id0", "id1", ... in list order."""
    if all(inst.id is not None for inst in instances):
        return list(instances)
    return [dataclasses.replace(inst, id=f"id{i}") for i, inst in enumerate(instances)]


def downsample_eval_instances(instances: Sequence[Instance], max_eval_instances: int | None,
                              eval_splits: Sequence[str] = EVAL_SPLITS) -> list[Instance]:
    """HELM's downsampling: keep every train instance and at most `max_eval_instances` eval instances,
    drawn without replacement with numpy seed 0 (in the order numpy draws them)."""
    train = [inst for inst in instances if inst.split == TRAIN_SPLIT]
    evals = [inst for inst in instances if inst.split in eval_splits]
    if max_eval_instances is not None and len(evals) > max_eval_instances:
        picked = np.random.RandomState(0).choice(len(evals), max_eval_instances, replace=False)
        evals = [evals[i] for i in picked]
    return train + evals
