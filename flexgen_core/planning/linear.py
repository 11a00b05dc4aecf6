"""Affine expressions over the nine placement fractions, shared by the cost model and the LP.

A `Linear` is `const + sum(coef * var)`; the variables are named `weights.gpu` ... `acts.disk`. The cost
model writes every time and memory term once as a `Linear`; the estimator evaluates it at a policy's
realized placement and the LP hands the same expression to the solver, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flexgen_core.policy import TIERS, Policy

GROUPS = ("weights", "cache", "acts")
VARS = tuple(f"{g}.{t.value}" for g in GROUPS for t in TIERS)


@dataclass(frozen=True)
class Linear:
    const: float = 0.0
    coefs: Mapping[str, float] = field(default_factory=dict)

    @staticmethod
    def var(name: str, coef: float = 1.0) -> Linear:
        if name not in VARS:
            raise KeyError(f"unknown placement variable {name!r}; known: {VARS}")
        return Linear(0.0, {name: coef})

    @staticmethod
    def of(group: str, *tiers: str, coef: float = 1.0) -> Linear:
        """coef * (sum of the group's fractions on `tiers`), e.g. of("cache", "cpu", "disk")."""
        return Linear(0.0, {f"{group}.{t}": coef for t in tiers})

    def __add__(self, other: Linear | float) -> Linear:
        if not isinstance(other, Linear):
            return Linear(self.const + float(other), self.coefs)
        coefs = dict(self.coefs)
        for k, v in other.coefs.items():
            coefs[k] = coefs.get(k, 0.0) + v
        return Linear(self.const + other.const, coefs)

    __radd__ = __add__

    def __mul__(self, scale: float) -> Linear:
        return Linear(self.const * scale, {k: v * scale for k, v in self.coefs.items()})

    __rmul__ = __mul__

    def __truediv__(self, scale: float) -> Linear:
        return self * (1.0 / scale)

    def value(self, point: Mapping[str, float]) -> float:
        return self.const + sum(v * point[k] for k, v in self.coefs.items())


def total(items: Iterable[Linear]) -> Linear:
    out = Linear()
    for item in items:
        out = out + item
    return out


def policy_point(policy: Policy) -> dict[str, float]:
    """The placement fractions of a policy as a variable assignment."""
    point = {}
    for group in GROUPS:
        for tier, frac in zip(TIERS, getattr(policy, group), strict=True):
            point[f"{group}.{tier.value}"] = frac
    return point
