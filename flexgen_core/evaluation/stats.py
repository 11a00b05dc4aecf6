"""HELM's `Stat`, `MetricName` and `PerInstanceStats`, with HELM's aggregation and JSON shapes.

JSON is HELM's `asdict_without_nones`: fields that are None are omitted. A per-instance Stat has count 1 and a
name that carries the instance's split (and sub_split/perturbation). Run-level stats follow HELM's `Metric.evaluate`:
per train trial, merge every instance's stats by name and keep only the mean; then merge the trial means. So in
`stats.json`, `count` is the number of train trials and `mean` is the mean over trials of the per-trial means.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any


def _without_nones(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _perturbation_dict(p: Any) -> dict[str, Any] | None:
    """Accept HELM's PerturbationDescription (any dataclass) or a mapping; store a plain dict without Nones."""
    if p is None:
        return None
    if is_dataclass(p) and not isinstance(p, type):
        p = asdict(p)
    if not isinstance(p, Mapping) or "name" not in p:
        raise TypeError(f"perturbation must be a mapping with a 'name' (HELM PerturbationDescription), got {p!r}")
    return _without_nones(p)


@dataclass(frozen=True)
class MetricName:
    """A metric's name plus the context it was computed in (HELM field names)."""

    name: str
    split: str | None = None
    sub_split: str | None = None
    perturbation: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "perturbation", _perturbation_dict(self.perturbation))

    def __hash__(self) -> int:
        pert = json.dumps(self.perturbation, sort_keys=True) if self.perturbation is not None else None
        return hash((self.name, self.split, self.sub_split, pert))

    def to_dict(self) -> dict[str, Any]:
        return _without_nones({"name": self.name, "split": self.split, "sub_split": self.sub_split,
                               "perturbation": self.perturbation})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MetricName:
        return cls(d["name"], d.get("split"), d.get("sub_split"), d.get("perturbation"))


@dataclass
class Stat:
    """Running aggregate of one metric: count, sum, sum of squares, min, max, mean, population variance, stddev."""

    name: MetricName
    count: int = 0
    sum: float = 0
    sum_squared: float = 0
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    variance: float | None = None
    stddev: float | None = None

    def add(self, x: float | bool | None) -> Stat:
        """Add one value (None is skipped, bools count as 0/1, as in HELM); returns self."""
        if x is None:
            return self
        if isinstance(x, bool):
            x = int(x)
        self.sum += x
        self.sum_squared += x * x
        self.min = x if self.min is None else min(self.min, x)
        self.max = x if self.max is None else max(self.max, x)
        self.count += 1
        self._update()
        return self

    def merge(self, other: Stat) -> Stat:
        """Fold another Stat into this one (other's name is ignored, as in HELM); returns self."""
        self.sum += other.sum
        self.sum_squared += other.sum_squared
        if other.min is not None:
            self.min = other.min if self.min is None else min(self.min, other.min)
        if other.max is not None:
            self.max = other.max if self.max is None else max(self.max, other.max)
        self.count += other.count
        self._update()
        return self

    def _update(self) -> None:
        if not self.count:
            self.mean = None
            return
        self.mean = self.sum / self.count
        pvariance = self.sum_squared / self.count - self.mean**2  # HELM's formula; clamped at 0
        self.variance = 0 if pvariance < 0 else pvariance
        self.stddev = math.sqrt(self.variance)

    def take_mean(self) -> Stat:
        """A new Stat holding only this one's mean as a single value (self when empty)."""
        return self if self.count == 0 else Stat(self.name).add(self.mean)

    def copy(self) -> Stat:
        return Stat(**{**self.__dict__})

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "name"}
        return {"name": self.name.to_dict(), **_without_nones(d)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Stat:
        fields = {k: d.get(k) for k in ("min", "max", "mean", "variance", "stddev")}
        return cls(MetricName.from_dict(d["name"]), d.get("count", 0), d.get("sum", 0), d.get("sum_squared", 0),
                   **fields)


@dataclass(frozen=True)
class PerInstanceStats:
    """The stats of one (instance, train trial), as in HELM's `per_instance_stats.json`."""

    instance_id: str
    train_trial_index: int
    stats: list[Stat] = field(default_factory=list)
    perturbation: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "perturbation", _perturbation_dict(self.perturbation))

    def to_dict(self) -> dict[str, Any]:
        return _without_nones({"instance_id": self.instance_id, "perturbation": self.perturbation,
                               "train_trial_index": self.train_trial_index,
                               "stats": [s.to_dict() for s in self.stats]})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PerInstanceStats:
        return cls(d["instance_id"], d["train_trial_index"], [Stat.from_dict(s) for s in d["stats"]],
                   d.get("perturbation"))


def merge_stat(stats: dict[MetricName, Stat], stat: Stat) -> None:
    """Merge `stat` into `stats[stat.name]`, copying on first sight so the input is never mutated."""
    if stat.name in stats:
        stats[stat.name].merge(stat)
    else:
        stats[stat.name] = stat.copy()


def add_context(stat: Stat, split: str | None, sub_split: str | None = None,
                perturbation: Mapping[str, Any] | None = None) -> Stat:
    """A copy of `stat` whose name carries an instance's split, sub_split and perturbation (HELM's add_context)."""
    name = MetricName(stat.name.name, split, sub_split, dict(perturbation) if perturbation is not None else None)
    return Stat(name).merge(stat)


def aggregate_per_instance(per_instance: Iterable[PerInstanceStats]) -> list[Stat]:
    """Run-level stats as HELM computes them: per trial, merge instances and take the mean; then merge trials.

    Stats with a NaN sum are dropped (HELM's remove_stats_nans). Order: first appearance.
    """
    trials: dict[int, dict[MetricName, Stat]] = {}
    for pis in per_instance:
        trial = trials.setdefault(pis.train_trial_index, {})
        for stat in pis.stats:
            merge_stat(trial, stat)
    overall: dict[MetricName, Stat] = {}
    for index in sorted(trials):
        for stat in trials[index].values():
            merge_stat(overall, stat.take_mean())
    return remove_nans(overall.values())


def remove_nans(stats: Iterable[Stat]) -> list[Stat]:
    """Drop stats whose sum is NaN (stdlib json would write invalid JSON for them)."""
    return [s for s in stats if not (isinstance(s.sum, float) and math.isnan(s.sum))]


def stats_to_json(stats: Iterable[Stat]) -> list[dict[str, Any]]:
    return [s.to_dict() for s in stats]


def stats_from_json(items: Iterable[Mapping[str, Any]]) -> list[Stat]:
    return [Stat.from_dict(d) for d in items]
