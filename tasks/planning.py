"""Planning stage: choose the policy (LP or given), check that it fits before loading, re-plan after an OOM.

`PlannedPolicy` is what the evaluate flow carries: the policy, its predicted throughput and where it came
from, plus the re-plans made during the run; `record()` is what `finalize_run` writes into policy.json.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from prefect import get_run_logger, task

from flexgen_core.planning.hardware import HardwareProfile
from flexgen_core.policy import Policy


@dataclass(frozen=True)
class PlannedPolicy:
    """A policy for one workload: `source` is "auto" (the LP) or the policy file it came from. `pipeline`: with
    pipeline stages, what the stages chose (`policy` is then stage 0's)."""

    policy: Policy
    source: str
    predicted_tok_s: float | None = None
    fixed: Mapping[str, Any] = field(default_factory=dict)
    replans: tuple[dict[str, Any], ...] = ()
    pipeline: Mapping[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        """policy.json's "planned" entry."""
        out = {"policy": self.policy.to_dict(), "source": self.source, "predicted_tok_s": self.predicted_tok_s,
               "replans": list(self.replans)}
        if self.pipeline is not None:
            out["pipeline"] = dict(self.pipeline)
        return out


def _torch_dtype(dtype: str | None) -> Any:
    import torch

    return getattr(torch, dtype) if dtype else None


def _dtype_bytes(device: str, dtype: str | None) -> int:
    return {"float16": 2, "bfloat16": 2, "float32": 4}[dtype or ("float16" if device == "cuda" else "float32")]


def _estimate(model: str, policy: Policy, workload: tuple[int, int], profile: HardwareProfile | None,
              device: str, dtype: str | None) -> float | None:
    if profile is None:
        return None
    from flexgen_core.plan import Workload
    from flexgen_core.planning.cost_model import estimate
    from flexgen_core.runtime import checkpoint as ckpt_io

    spec = ckpt_io.resolve(model).spec
    return estimate(spec, policy, Workload(*workload), profile, _dtype_bytes(device, dtype)).throughput_tok_s


@task(name="choose-policy")
def choose_eval_policy(model: str, workload: tuple[int, int], given: Policy | None, fixed: Mapping[str, Any],
                       profile: HardwareProfile | None, device: str, dtype: str | None, budget: Mapping[str, Any],
                       margin: float, max_block_size: int | None = None) -> PlannedPolicy:
    """The given policy, or the LP's best for (max prompt tokens, max new tokens) on this machine, with blocks
    of at most `max_block_size` sequences."""
    log = get_run_logger()
    if given is not None:
        planned = PlannedPolicy(given, "file", _estimate(model, given, workload, profile, device, dtype), fixed)
    else:
        from flexgen_core.planning.auto import choose_policy

        found = choose_policy(model, *workload, dtype=_torch_dtype(dtype), profile=profile, fixed=dict(fixed),
                              margin=margin, max_block_size=max_block_size, **{**budget, "device": device})
        planned = PlannedPolicy(found.policy, "auto", found.estimate.throughput_tok_s, fixed)
        log.info(f"LP: {found.lp_solves} solves with {found.solver} in {found.elapsed_s:.1f} s")
    predicted = f"{planned.predicted_tok_s:.1f} tok/s" if planned.predicted_tok_s else "no profile"
    log.info(f"policy ({planned.source}) {planned.policy.describe()}, block {planned.policy.block_size}, "
             f"predicted {predicted}, workload prompt<={workload[0]} new<={workload[1]}")
    return planned


@task(name="check-fits")
def check_fits(model: str, policy: Policy, workload: tuple[int, int], device: str, dtype: str | None,
               budget: Mapping[str, Any]) -> None:
    """Refuse (PlanDoesNotFit, naming the tier and bytes) a policy whose exact plan exceeds a memory budget."""
    import torch

    from flexgen_core.plan import Workload, build_plan
    from flexgen_core.runtime import checkpoint as ckpt_io
    from flexgen_core.runtime.engine import memory_budget
    from flexgen_core.runtime.memory import OffloadDir

    spec = ckpt_io.resolve(model).spec
    limits = memory_budget(torch.device(device), OffloadDir(budget.get("offload_dir")), budget.get("gpu_mem_gib"),
                           budget.get("cpu_mem_gib"), budget.get("disk_gib"))
    build_plan(spec, policy, Workload(*workload), _dtype_bytes(device, dtype), device).check(limits)


@task(name="replan-smaller-batch")
def replan_smaller_batch(planned: PlannedPolicy, reason: str, where: str, model: str, workload: tuple[int, int],
                         profile: HardwareProfile | None, device: str, dtype: str | None, budget: Mapping[str, Any],
                         margin: float) -> PlannedPolicy:
    """Half the GPU batch size (the LP re-plans placement for auto policies); the re-plan is recorded."""
    old = planned.policy
    if old.gpu_batch_size == 1:
        raise RuntimeError(f"out of memory at {where} with gpu_batch_size 1 ({reason}); lower the memory budgets "
                           "or move weights/cache off the GPU")
    gbs = old.gpu_batch_size // 2
    fixed = {**planned.fixed, "gpu_batch_size": gbs}
    if planned.source == "auto":
        chosen = choose_eval_policy.fn(model, workload, None, fixed, profile, device, dtype, budget, margin)
        new, predicted = chosen.policy, chosen.predicted_tok_s
    else:
        new = old.with_(gpu_batch_size=gbs)
        predicted = _estimate(model, new, workload, profile, device, dtype)
    entry = {"at": where, "reason": reason[:500], "from": old.to_dict(), "to": new.to_dict(),
             "predicted_tok_s": predicted}
    get_run_logger().warning(f"out of memory at {where}: re-planned {old.describe()} -> {new.describe()}")
    return dataclasses.replace(planned, policy=new, predicted_tok_s=predicted, fixed=fixed,
                               replans=(*planned.replans, entry))


@task(name="plan-for-profile")
def plan_for_profile(model: str, workload: tuple[int, int], profile: HardwareProfile, fixed: Mapping[str, Any],
                     dtype: str | None, budget: Mapping[str, Any], margin: float) -> dict[str, Any]:
    """The LP's best policy on the profiled machine (budgets: the profile's capacities or the given limits)."""
    from flexgen_core.plan import Workload
    from flexgen_core.planning.commands import policy_budget
    from flexgen_core.planning.policy_search import search_policy
    from flexgen_core.runtime import checkpoint as ckpt_io

    spec = ckpt_io.resolve(model, dummy=True).spec
    limits = policy_budget(SimpleNamespace(memory_margin=margin, gpu_mem_gib=budget.get("gpu_mem_gib"),
                                           cpu_mem_gib=budget.get("cpu_mem_gib"),
                                           disk_gib=budget.get("disk_gib")), profile)
    found = search_policy(spec, Workload(*workload), profile, limits, fixed=dict(fixed),
                          dtype_bytes=_dtype_bytes(profile.device_type, dtype))
    return {**found.to_dict(), "model": spec.name, "profile": profile.name,
            "workload": {"prompt_len": workload[0], "gen_len": workload[1]}}


@task(name="this-machine-profile")
def this_machine_profile(device: str | None) -> HardwareProfile:
    """This machine's profile: measured once (under two minutes), then read from the cache."""
    import torch

    from flexgen_core.planning.auto import machine_profile

    return machine_profile(device or ("cuda" if torch.cuda.is_available() else "cpu"))


@task(name="save-policy")
def save_policy(result: Mapping[str, Any], path: str) -> str:
    """Write the plan as JSON (atomically); `{"policy": ...}` is what `--policy FILE` reads."""
    from flexgen_core.evaluation.outputs import write_json_atomic

    return str(write_json_atomic(path, dict(result)))
