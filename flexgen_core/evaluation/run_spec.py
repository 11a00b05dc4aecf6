"""Run entries -> RunSpecs, as HELM builds them.

A run entry is `NAME` or `NAME:key=value,key=value` (split at the first ':', then at ','; each argument at
its first '='). NAME selects a registered run-spec function (`@run_spec_function`), which receives the
scenario arguments, converted to the types its signature declares. The run options below are "run
expanders" in HELM: each is applied in the order written and appends `,key=value` to the run name (`:` if
the name has no arguments yet), with '/' in the value replaced by '_':

    model                 the model evaluated (always applied; required here or as `model=` keyword)
    max_train_instances   in-context examples per prompt
    max_eval_instances    evaluation instances (sampled with seed 0)
    num_train_trials      independent in-context example sets
    num_outputs           completions per request
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from flexgen_core.evaluation.schema import RunSpec

RUN_OPTIONS: dict[str, str] = {  # run expander -> AdapterSpec field it sets
    "model": "model", "max_train_instances": "max_train_instances", "max_eval_instances": "max_eval_instances",
    "num_train_trials": "num_train_trials", "num_outputs": "num_outputs",
}
EXAMPLE_ENTRY = "synthetic_reasoning:mode=pattern_match,model=NAME"

RunSpecFunction = Callable[..., RunSpec]
F = TypeVar("F", bound=RunSpecFunction)
_RUN_SPEC_FUNCTIONS: dict[str, RunSpecFunction] = {}


@dataclass(frozen=True)
class RunEntry:
    """A parsed run entry: the run-spec name and its (key, raw text value) arguments in written order."""

    name: str
    args: tuple[tuple[str, str], ...] = ()

    @property
    def description(self) -> str:
        return self.name + (":" + ",".join(f"{k}={v}" for k, v in self.args) if self.args else "")


def parse_run_entry(description: str) -> RunEntry:
    """Parse `NAME[:key=value,...]`; malformed entries raise ValueError saying what to write instead."""
    text = description.strip()
    if not text:
        raise ValueError(f"empty run entry; write NAME or NAME:key=value,..., e.g. {EXAMPLE_ENTRY}")
    name, colon, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"run entry {description!r} has no name before ':'; write NAME:key=value,..., "
                         f"e.g. {EXAMPLE_ENTRY}")
    if colon and not rest.strip():
        raise ValueError(f"run entry {description!r} has ':' but no arguments after it; "
                         f"write {name} or {name}:key=value")
    args: list[tuple[str, str]] = []
    for part in rest.split(",") if colon else []:
        key, equals, value = part.partition("=")
        key = key.strip()
        if not part.strip():
            raise ValueError(f"run entry {description!r} has an empty argument (a stray ','?)")
        if not equals:
            raise ValueError(f"run entry {description!r}: argument {part.strip()!r} has no '='; write key=value")
        if not key:
            raise ValueError(f"run entry {description!r}: argument {part.strip()!r} has no key before '='")
        if any(key == k for k, _ in args):
            raise ValueError(f"run entry {description!r} gives {key!r} twice")
        args.append((key, value.strip()))
    return RunEntry(name, tuple(args))


def run_spec_function(name: str) -> Callable[[F], F]:
    """Register a function returning the RunSpec of scenario `name`; a second one for `name` is refused."""
    def register(func: F) -> F:
        if name in _RUN_SPEC_FUNCTIONS:
            raise ValueError(f"a run spec function named {name!r} is already registered")
        _RUN_SPEC_FUNCTIONS[name] = func
        return func
    return register


def run_spec_names() -> list[str]:
    _load_run_specs()
    return sorted(_RUN_SPEC_FUNCTIONS)


def get_run_spec_function(name: str) -> RunSpecFunction:
    _load_run_specs()
    if name not in _RUN_SPEC_FUNCTIONS:
        raise ValueError(f"unknown scenario {name!r}; known scenarios: {', '.join(sorted(_RUN_SPEC_FUNCTIONS))}")
    return _RUN_SPEC_FUNCTIONS[name]


def append_to_name(name: str, key: str, value: Any) -> str:
    """HELM's run-expander naming: `name:key=value`, or `name,key=value` once the name has a ':'."""
    return f"{name}{',' if ':' in name else ':'}{key}={str(value).replace('/', '_')}"


def construct_run_spec(entry: str | RunEntry, *, model: str | None = None, max_eval_instances: int | None = None,
                       num_train_trials: int | None = None) -> RunSpec:
    """The RunSpec of one run entry. Keywords act as HELM's command-line flags: `model` when the entry
    names none, `max_eval_instances` unless the entry sets it, `num_train_trials` (1 for zero-shot runs)."""
    parsed = parse_run_entry(entry) if isinstance(entry, str) else entry
    func = get_run_spec_function(parsed.name)
    options = [(k, v) for k, v in parsed.args if k in RUN_OPTIONS]
    if not any(k == "model" for k, _ in options):
        if model is None:
            raise ValueError(f"run entry {parsed.description!r} names no model; add model=NAME to it "
                             f"(e.g. {EXAMPLE_ENTRY}) or pass the model separately")
        options.append(("model", model))
    try:
        run_spec = func(**_scenario_arguments(parsed, func))
    except ValueError as e:
        message = str(e)
        raise ValueError(message if message.startswith("run entry") else
                         f"run entry {parsed.description!r}: {message}") from None
    for key, raw in options:
        value = raw if key == "model" else _option_int(parsed, key, raw)
        changes: dict[str, Any] = {RUN_OPTIONS[key]: value}
        if key == "model":
            changes["model_deployment"] = value
        run_spec = dataclasses.replace(run_spec, name=append_to_name(run_spec.name, key, value),
                                       adapter_spec=dataclasses.replace(run_spec.adapter_spec, **changes))
    adapter_spec = run_spec.adapter_spec
    if max_eval_instances is not None and adapter_spec.max_eval_instances is None:
        adapter_spec = dataclasses.replace(adapter_spec, max_eval_instances=max_eval_instances)
    if adapter_spec.max_train_instances == 0:
        adapter_spec = dataclasses.replace(adapter_spec, num_train_trials=1)
    elif num_train_trials is not None:
        adapter_spec = dataclasses.replace(adapter_spec, num_train_trials=num_train_trials)
    return dataclasses.replace(run_spec, adapter_spec=adapter_spec)


def _option_int(entry: RunEntry, key: str, raw: str) -> int:
    minimum = 1 if key in ("num_train_trials", "num_outputs", "max_eval_instances") else 0
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"run entry {entry.description!r}: {key}={raw!r} must be an integer") from None
    if value < minimum:
        raise ValueError(f"run entry {entry.description!r}: {key} must be >= {minimum}, got {value}")
    return value


def _scenario_arguments(entry: RunEntry, func: RunSpecFunction) -> dict[str, Any]:
    """The entry's non-option arguments, checked against `func`'s parameters and converted to their types."""
    params = inspect.signature(func).parameters
    hints = typing.get_type_hints(func)
    given = {k: v for k, v in entry.args if k not in RUN_OPTIONS}
    unknown = [k for k in given if k not in params]
    if unknown:
        accepted = ", ".join(params) or "no scenario arguments"
        raise ValueError(f"run entry {entry.description!r}: {entry.name} has no argument "
                         f"{', '.join(map(repr, unknown))}; it accepts {accepted} "
                         f"(and the run options {', '.join(RUN_OPTIONS)})")
    missing = [p.name for p in params.values() if p.default is inspect.Parameter.empty and p.name not in given]
    if missing:
        raise ValueError(f"run entry {entry.description!r}: {entry.name} needs "
                         f"{', '.join(f'{m}=...' for m in missing)}")
    return {k: _convert(entry, k, v, hints.get(k, str)) for k, v in given.items()}


def _convert(entry: RunEntry, key: str, raw: str, hint: Any) -> Any:
    """Raw argument text -> the parameter's type (str, int, float, bool, or an Optional of one)."""
    types = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    target = types[0]
    try:
        if target is bool:
            if raw.lower() not in ("true", "false"):
                raise ValueError
            return raw.lower() == "true"
        return target(raw) if target in (int, float) else raw
    except ValueError:
        raise ValueError(f"run entry {entry.description!r}: {key}={raw!r} must be "
                         f"{'true or false' if target is bool else 'an integer' if target is int else 'a number'}"
                         ) from None


def _load_run_specs() -> None:
    from flexgen_core.evaluation import run_specs  # noqa: F401  (registers the run-spec functions)
