"""LP policy search (FlexGen §4.3): the best placement for each batch shape, and the best batch shape.

For a fixed shape (gpu batch size, number of GPU batches, flags) the cost model is linear in the nine
placement fractions, so the fastest placement that fits every memory budget is a linear program: minimize
the block's time, with one auxiliary variable per (phase, layer kind) bounded below by each of that step's
terms (`LayerTerms.bounds`) and the memory `Linear`s bounded by the budgets. It is solved with pulp (HiGHS
through highspy where installed, CBC otherwise), always with a time limit, and a solution counts only if
the solver proved it optimal. Shapes are searched as DESIGN.md §4 says: gbs over 1, 2, 4, 8, ..., and for
each the largest feasible number of GPU batches (doubling, then bisection) and a geometric ladder below it.

The LP's memory model is conservative, but rounding (whole sequences of cache, whole rows of weights) can
still overshoot; every winner is therefore re-checked with the exact `build_plan(...).check(budget)` and, if
a tier overflows, the LP is re-solved with that tier's capacity tightened by the overshoot. Only policies
that pass the exact check are returned.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from flexgen_core.plan import MemoryBudget, PlanDoesNotFit, Workload, build_plan
from flexgen_core.planning.cost_model import KINDS, PHASES, CostModel, Estimate, estimate
from flexgen_core.planning.hardware import GIB, HardwareProfile
from flexgen_core.planning.linear import GROUPS, VARS, Linear
from flexgen_core.policy import TIERS, Policy, PolicyError, Tier
from flexgen_core.spec import ModelSpec, weight_bytes

PLACEMENT_FIELDS = ("weights", "cache", "acts")
SHAPE_FIELDS = ("gpu_batch_size", "num_gpu_batches")
FLAG_DEFAULTS: dict[str, Any] = {"overlap": True, "cpu_attention": None, "compress_weights": False,
                                 "compress_cache": False, "attn_topk": 1.0, "pin_weights": True}
MAX_TIGHTEN = 4
FINALISTS = 12  # LP solutions realized exactly and re-ranked by the estimate
# Finalists are ranked with the per-GPU-batch host costs of delegated decode scaled by this margin: they are
# the model's least certain terms (two probes on the same H100 box read 1744 and 2679 us per batch and pair),
# and where they decide the step, a pipeline of two busy host threads falls short of their maximum (OPT-30B
# 8x12 delegated, predicted within 0.2% of 24x4, measured 41.6 tok/s against 63.1; benchmarks/NOTES.md, visit 11)
HOST_COST_MARGIN = 1.5
HOST_COST_FIELDS = ("delegated_issue_us", "delegated_job_us", "delegated_latency_us")
# ... and with the disk's rates scaled by this one: every H100 run with some cache or weights on disk fell
# further short of its prediction than the same shape without (4-bit OPT-30B auto 64x5 with 3% of the cache on
# disk: decode 56.7 s against 44.7 predicted, as if the disk read at 0.66 of its probed rate, and 138.6 tok/s
# against 153.8 for 64x4 without disk; visits 9a, 10h)
DISK_RATE_MARGIN = 0.6


def cautious_profile(profile: HardwareProfile) -> HardwareProfile:
    """`profile` with the margins above on its least certain terms (for ranking the search's finalists)."""
    changes: dict[str, float] = {f: getattr(profile, f) * HOST_COST_MARGIN for f in HOST_COST_FIELDS
                                 if getattr(profile, f) is not None}
    changes.update(disk_read_gbps=profile.disk_read_gbps * DISK_RATE_MARGIN,
                   disk_write_gbps=profile.disk_write_gbps * DISK_RATE_MARGIN)
    return profile.with_(**changes)


class PolicySearchError(RuntimeError):
    """No policy fits (the model is too big for every tier), or the solver failed."""


@dataclass
class SearchResult:
    policy: Policy
    estimate: Estimate
    solver: str
    lp_solves: int
    elapsed_s: float
    ranking: list[tuple[str, float]] = field(default_factory=list)  # (policy, predicted tok/s), best first
    budget: MemoryBudget | None = None  # what the search had to fit

    def to_dict(self) -> dict[str, Any]:
        out = self.estimate.to_dict()
        out["search"] = {"solver": self.solver, "lp_solves": self.lp_solves, "elapsed_s": round(self.elapsed_s, 3),
                         "top": [{"policy": p, "predicted_tok_s": round(t, 3)} for p, t in self.ranking[:5]]}
        return out


def _solver(time_limit_s: float) -> tuple[Any, str]:
    import pulp

    if "HiGHS" in pulp.listSolvers(onlyAvailable=True):
        _silence_highs_banner()
        return pulp.HiGHS(msg=False, timeLimit=time_limit_s), "HiGHS"
    return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s), "CBC"


@functools.cache
def _silence_highs_banner() -> None:
    """HiGHS prints a copyright banner from the first `Highs()` of a process, before pulp can set its
    `output_flag` option; build that first instance with file descriptor 1 pointed at /dev/null."""
    import highspy

    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


class _LP:
    """One LP per policy shape; `solve` returns the optimal placement point and block time, or None."""

    def __init__(self, spec: ModelSpec, workload: Workload, profile: HardwareProfile, dtype_bytes: int,
                 fixed: dict[str, Any], time_limit_s: float) -> None:
        self.spec, self.workload, self.profile, self.dtype_bytes = spec, workload, profile, dtype_bytes
        self.fixed = fixed
        self.solver, self.solver_name = _solver(time_limit_s)
        self.solves = 0

    def solve(self, shape: Policy, budget: MemoryBudget, resident: bool) -> tuple[dict[str, float], float] | None:
        import pulp

        self.solves += 1
        model = CostModel(self.spec, shape, self.workload, self.profile, self.dtype_bytes)
        prob = pulp.LpProblem("flexgen_policy", pulp.LpMinimize)
        x = {v: pulp.LpVariable(v.replace(".", "_"), 0, 1) for v in VARS}

        def expr(lin: Linear) -> Any:
            return pulp.lpSum(c * x[k] for k, c in lin.coefs.items()) + lin.const

        for group in GROUPS:
            prob += pulp.lpSum(x[f"{group}.{t.value}"] for t in TIERS) == 1, f"sum_{group}"
            if group in self.fixed:
                for t, frac in zip(TIERS, self.fixed[group], strict=True):
                    prob += x[f"{group}.{t.value}"] == frac, f"fix_{group}_{t.value}"
            elif group != "weights":
                # the runtime splits cache and activations by whole sequences: integer counts per tier
                for t in TIERS:
                    seqs = pulp.LpVariable(f"seqs_{group}_{t.value}", 0, shape.gpu_batch_size, cat="Integer")
                    prob += x[f"{group}.{t.value}"] * shape.gpu_batch_size == seqs, f"seqs_{group}_{t.value}"
        if resident:
            prob += x["weights.gpu"] == 1, "resident_weights"
        if model.paired_decode and "cache" not in self.fixed:
            # the pipeline model holds only while the host attends to some sequences' cache (the same shape with
            # all of it on the device is the cpu_attention=False shape, which the search solves too)
            prob += x["cache.gpu"] * shape.gpu_batch_size <= shape.gpu_batch_size - 1, "paired_needs_host_cache"
        objective = []
        for phase in PHASES:
            weight = 1 if phase == "prefill" else model.decode_tokens
            if weight == 0:
                continue
            for kind in KINDS:
                step = pulp.LpVariable(f"T_{phase}_{kind.value}", 0)
                for n, bound in enumerate(model.terms(phase, kind).bounds(shape.overlap)):
                    prob += step >= expr(bound), f"T_{phase}_{kind.value}_{n}"
                objective.append(weight * model.layer_counts[kind] * step)
        prob += pulp.lpSum(objective)
        caps = {Tier.GPU: budget.gpu_bytes, Tier.CPU: budget.cpu_bytes, Tier.DISK: budget.disk_bytes}
        mem = {tier: model.memory(tier, weights_resident=resident) for tier in TIERS}
        scale = 1.0 / GIB  # keep coefficients well conditioned
        for tier in TIERS:
            prob += expr(mem[tier] * scale) <= caps[tier] * scale, f"mem_{tier.value}"
        if budget.host_bytes is not None:
            prob += expr((mem[Tier.GPU] + mem[Tier.CPU]) * scale) <= budget.host_bytes * scale, "mem_host"
        prob.solve(self.solver)
        # a solve stopped by the time limit can report status Optimal: require a proven-optimal solution
        if pulp.LpStatus[prob.status] != "Optimal" or prob.sol_status != pulp.LpSolutionOptimal:
            return None
        point = {v: min(max(float(x[v].value() or 0.0), 0.0), 1.0) for v in VARS}
        return point, float(pulp.value(prob.objective))


def _snap(point: dict[str, float], gbs: int, fixed: dict[str, Any]) -> dict[str, tuple[float, float, float]]:
    """Placement triples from an LP point: weights to 4 decimals; cache/acts as the whole sequence counts
    the LP chose (integer variables), or as fixed."""
    out: dict[str, tuple[float, float, float]] = {}
    g, c = round(point["weights.gpu"], 4), round(point["weights.cpu"], 4)
    c = min(c, 1 - g)
    out["weights"] = (g, c, max(0.0, round(1 - g - c, 6)))
    for group in ("cache", "acts"):
        if group in fixed:
            out[group] = fixed[group]
            continue
        n_gpu = round(point[f"{group}.gpu"] * gbs)
        n_gc = max(n_gpu, round((point[f"{group}.gpu"] + point[f"{group}.cpu"]) * gbs))
        out[group] = (n_gpu / gbs, (n_gc - n_gpu) / gbs, (gbs - n_gc) / gbs)
    if "weights" in fixed:
        out["weights"] = fixed["weights"]
    return out


def _shape_ladder(limit: int) -> list[int]:
    """1..8, then steps of about 1.25x, then the four values up to and including `limit` (the largest blocks
    that fit are usually the fastest, and the largest that fit without disk can be a few below `limit`)."""
    out, v = set(range(1, min(limit, 8) + 1)), 8
    while v < limit:
        v = max(v + 1, v * 5 // 4)
        out.add(min(v, limit))
    out.update(range(max(1, limit - 3), limit + 1))
    return sorted(out)


def _batch_sizes(limit: int) -> list[int]:
    """GPU batch sizes searched: powers of two and three times powers of two, up to `limit`."""
    out = {2 ** i for i in range(int(math.log2(limit)) + 1)}
    out.update(3 * 2 ** i for i in range(int(math.log2(max(1, limit // 3))) + 1) if 3 * 2 ** i <= limit)
    return sorted(out)


def search_policy(spec: ModelSpec, workload: Workload, profile: HardwareProfile, budget: MemoryBudget,
                  fixed: dict[str, Any] | None = None, time_limit_s: float = 10.0, max_gpu_batch_size: int = 512,
                  max_num_gpu_batches: int = 256, max_block_size: int | None = None, dtype_bytes: int | None = None,
                  log: Callable[[str], None] | None = None) -> SearchResult:
    """The fastest policy whose exact plan fits `budget` (see the module docstring).

    fixed: Policy fields the search must keep (e.g. {"compress_weights": True, "cache": (0, 1, 0)}).
    max_block_size: largest gpu_batch_size * num_gpu_batches worth planning (e.g. the number of requests).
    Compression and sparsity change accuracy, so they are off unless fixed; cpu_attention is searched.
    """
    started = time.perf_counter()
    fixed = dict(fixed or {})
    known = {f.name for f in fields(Policy)}
    unknown = sorted(set(fixed) - known)
    if unknown:
        raise PolicyError(f"unknown Policy fields to fix: {unknown}; known: {sorted(known)}")
    for name in PLACEMENT_FIELDS:
        if name in fixed:
            fixed[name] = getattr(Policy(**{name: tuple(fixed[name])}), name)  # validated triple
    say = log or (lambda _msg: None)
    db = dtype_bytes or profile.default_dtype_bytes
    lp = _LP(spec, workload, profile, db, fixed, time_limit_s)
    flags = {k: fixed.get(k, v) for k, v in FLAG_DEFAULTS.items()}
    attn_options = [flags["cpu_attention"]] if flags["cpu_attention"] is not None else [False, True]
    if workload.gen_len == 1:
        attn_options = attn_options[:1]
    resident_options = [False]
    if fixed.get("weights", (1.0,))[0] == 1.0 and weight_bytes(spec, db) < budget.gpu_bytes:
        resident_options.insert(0, True)
    if "weights" in fixed and fixed["weights"][0] < 1.0:
        resident_options = [False]

    def shape(gbs: int, ngb: int, cpu_attention: bool) -> Policy:
        base = {**{k: v for k, v in flags.items() if k != "cpu_attention"}, "cpu_attention": cpu_attention}
        return Policy(gpu_batch_size=gbs, num_gpu_batches=ngb, **base)

    def best_for(gbs: int, ngb: int) -> tuple[dict[str, float], float, Policy, bool] | None:
        best = None
        for cpu_attention in attn_options:
            for resident in resident_options:
                s = shape(gbs, ngb, cpu_attention)
                solved = lp.solve(s, budget, resident)
                if solved is not None and (best is None or solved[1] < best[1]):
                    best = (solved[0], solved[1], s, resident)
        return best

    if max_block_size is not None:
        if max_block_size < 1:
            raise PolicyError(f"max_block_size must be >= 1, got {max_block_size}")
        max_gpu_batch_size = min(max_gpu_batch_size, max_block_size)
    gbs_list = ([fixed["gpu_batch_size"]] if "gpu_batch_size" in fixed
                else _batch_sizes(max_gpu_batch_size))
    results: list[tuple[float, Policy, dict[str, float], bool]] = []
    for gbs in gbs_list:
        if "num_gpu_batches" in fixed:
            ngb_list = [fixed["num_gpu_batches"]]
        else:
            if best_for(gbs, 1) is None:
                say(f"gbs {gbs}: nothing fits even with one GPU batch")
                if results:
                    break
                continue
            ngb_cap = max_num_gpu_batches if max_block_size is None else max(1, min(max_num_gpu_batches,
                                                                                   max_block_size // gbs))
            lo, hi = 1, 2
            while hi <= ngb_cap and best_for(gbs, hi) is not None:
                lo, hi = hi, hi * 2
            hi = min(hi, ngb_cap + 1)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if best_for(gbs, mid) is not None else (lo, mid)
            ngb_list = _shape_ladder(lo)
        for ngb in ngb_list:
            solved = best_for(gbs, ngb)
            if solved is None:
                continue
            point, block_s, s, resident = solved
            tput = gbs * ngb * workload.gen_len / block_s
            results.append((tput, s, point, resident))
            say(f"LP {tput:10.2f} tok/s  {s.with_(**_snap(point, gbs, fixed)).describe()}")
    if not results:
        raise PolicySearchError(_infeasible_message(spec, workload, budget, db, fixed))
    # the best few LP solutions, realized exactly (snapped, tightened until the exact plan fits) and
    # ranked by the estimate of the policy the runtime will actually run, with margins on its least certain terms
    results.sort(key=lambda r: -r[0])
    cautious = cautious_profile(profile)
    finalists: list[tuple[Estimate, float]] = []
    for _lp_tput, s, point, resident in results[:FINALISTS]:
        policy = _exact(lp, s, point, resident, budget, say)
        if policy is not None:
            finalists.append((estimate(spec, policy, workload, profile, db),
                              estimate(spec, policy, workload, cautious, db).throughput_tok_s))
    if finalists:
        finalists.sort(key=lambda f: -f[1])
        ranking = [(e.policy.describe(), e.throughput_tok_s) for e, _ in finalists]
        return SearchResult(finalists[0][0].policy, finalists[0][0], lp.solver_name, lp.solves,
                            time.perf_counter() - started, ranking, budget)
    raise PolicySearchError("the LP found placements, but none passed the exact memory check after tightening; "
                            "raise the safety margin or fix a smaller --gpu-batch-size")


def _exact(lp: _LP, shape: Policy, point: dict[str, float], resident: bool, budget: MemoryBudget,
           say: Callable[[str], None]) -> Policy | None:
    """Snap the LP point to a Policy and tighten until `build_plan(...).check(budget)` passes."""
    caps = budget
    for _ in range(MAX_TIGHTEN + 1):
        policy = shape.with_(**_snap(point, shape.gpu_batch_size, lp.fixed))
        plan = build_plan(lp.spec, policy, lp.workload, lp.dtype_bytes, lp.profile.device_type)
        try:
            plan.check(budget)
            return policy
        except PlanDoesNotFit as exc:
            over = exc.needed - exc.available
            say(f"{policy.describe()}: exact plan exceeds {exc.tier} by {over} bytes; tightening")
            tier = exc.tier.split(" ")[0]
            cut = over + (64 << 20)
            caps = MemoryBudget(caps.gpu_bytes - (cut if tier == "gpu" else 0),
                                caps.cpu_bytes - (cut if tier == "cpu" else 0),
                                caps.disk_bytes - (cut if tier == "disk" else 0),
                                None if caps.host_bytes is None else caps.host_bytes - (cut if tier == "host" else 0))
            solved = lp.solve(shape, caps, resident)
            if solved is None:
                return None
            point = solved[0]
    return None


def _infeasible_message(spec: ModelSpec, workload: Workload, budget: MemoryBudget, db: int,
                        fixed: dict[str, Any]) -> str:
    w = weight_bytes(spec, db)
    if fixed.get("compress_weights"):
        w = int(w * 0.5625 / db)
    total = budget.gpu_bytes + budget.cpu_bytes + budget.disk_bytes
    if budget.host_bytes is not None:
        total = budget.host_bytes + budget.disk_bytes
    need = w + (2 << 30)
    if need > total:
        return (f"{spec.name} does not fit on this machine: its weights alone need {w / GIB:.1f} GiB, and GPU + CPU "
                f"+ disk budgets total {total / GIB:.1f} GiB (short by {(need - total) / GIB:.1f} GiB with working "
                "buffers). Free disk space or point --offload-dir at a larger disk, or use --compress-weights.")
    return (f"no policy for {spec.name} with prompt {workload.prompt_len} + {workload.gen_len} tokens fits the "
            f"budgets (gpu {budget.gpu_bytes / GIB:.1f} GiB, cpu {budget.cpu_bytes / GIB:.1f} GiB, disk "
            f"{budget.disk_bytes / GIB:.1f} GiB) with the fixed fields {sorted(fixed)}; relax a fixed field, "
            "lower the safety margin, or shorten the prompt.")
