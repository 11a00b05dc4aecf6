"""flexgen_core: a FlexGen-style offloading inference engine, its planner, and a HELM-style evaluation layer.

Public API: `Engine` (load a model across GPU/CPU/disk, `generate`, `score`), `Policy`, `ModelSpec`,
`Generation`, `Score`. Prefect-free: orchestration lives in `tasks/` and `flows/`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flexgen_core.outputs import CallStats, Generation, Score
from flexgen_core.policy import Policy
from flexgen_core.spec import ModelSpec

if TYPE_CHECKING:
    from flexgen_core.runtime.engine import Engine

__all__ = ["CallStats", "Engine", "Generation", "ModelSpec", "Policy", "Score"]


def __getattr__(name: str) -> Any:  # import torch-heavy modules only when used
    if name == "Engine":
        from flexgen_core.runtime.engine import Engine

        return Engine
    raise AttributeError(name)
