"""Pipeline partition: which contiguous transformer blocks each stage holds, and each stage's policy.

A model of l transformer blocks runs on N stages (one process per GPU). Stage r holds blocks
[first_r, stop_r); stage 0 also holds the embedding, the last stage the LM head and its own copy of the tied
token embedding. The cut points balance bytes and compute, not block counts: every block is costed by its
stored bytes (weights, plus its KV cache when the workload is known) and its FLOPs per token, the embedding
and the head (with the copy) add to the first and last stage, and the cuts minimise the largest stage share
max(bytes / total bytes, FLOPs / total FLOPs) exactly (dynamic programming over cut points).

Each stage plans and checks its own slice (`plan.build_plan(..., layers=...)`). With `--policy auto` every
stage runs the LP (`search_policy`) on a spec restricted to its slice (`stage_spec`); stages must share the
micro-batch shape (gpu batch size, number of GPU batches), so `pick_shape` takes the shape whose slowest stage
is fastest. Nothing here touches a tensor or a process group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from flexgen_core.plan import MemoryBudget, Workload
from flexgen_core.planning.cost_model import estimate
from flexgen_core.planning.hardware import HardwareProfile
from flexgen_core.policy import Policy
from flexgen_core.spec import (
    ModelSpec,
    attention_flops,
    block_layers,
    block_matmul_flops,
    kv_bytes_per_token,
    layer_specs,
)


class PipelineConfigError(ValueError):
    """A pipeline configuration that cannot run (too many stages, mismatched per-stage settings)."""


@dataclass(frozen=True)
class StageSlice:
    """What one stage holds: transformer blocks [blocks[0], blocks[1]) = schedule layers [layers[0], layers[1])."""

    stage: int
    blocks: tuple[int, int]
    layers: tuple[int, int]
    weight_bytes: int  # stored weights (the last stage's copy of the tied embedding included)
    cache_bytes: int  # KV cache of its blocks for the partition's workload (0 without one)
    flops_per_token: int

    has_head: bool  # the last stage: LM head, with its own copy of the tied token embedding

    @property
    def has_embed(self) -> bool:
        return self.blocks[0] == 0

    def describe(self) -> str:
        extra = "+".join((["embed"] if self.has_embed else []) + (["head"] if self.has_head else []))
        return (f"blocks {self.blocks[0]}..{self.blocks[1] - 1}" + (f" + {extra}" if extra else "")
                + f" ({self.weight_bytes / 2**20:.1f} MiB weights)")


@dataclass(frozen=True)
class Partition:
    model: str
    stages: tuple[StageSlice, ...]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def describe(self) -> str:
        return "; ".join(f"stage {s.stage}: {s.describe()}" for s in self.stages)


def _layer_bytes(spec: ModelSpec, dtype_bytes: int) -> list[int]:
    """Stored bytes per schedule layer (the head counted with its own copy of the tied embedding)."""
    return [sum(t.numel for t in lay.tensors) * dtype_bytes for lay in layer_specs(spec)]


def partition(spec: ModelSpec, num_stages: int, dtype_bytes: int = 2, workload: Workload | None = None,
              sequences: int = 1) -> Partition:
    """Cut `spec`'s blocks into `num_stages` contiguous stages balancing bytes and compute (module doc).

    workload/sequences: when given, each block's KV cache for `sequences` in-flight sequences counts as bytes
    and attention over the average context as FLOPs.
    """
    l_ = spec.num_layers
    if num_stages < 1:
        raise PipelineConfigError(f"a pipeline needs at least one stage, got {num_stages}")
    if num_stages > l_:
        raise PipelineConfigError(
            f"{num_stages} pipeline stages but {spec.name} has only {l_} transformer layers; every stage needs at "
            f"least one: run at most {l_} processes (--nproc / --nproc-per-node)")
    per_layer = _layer_bytes(spec, dtype_bytes)
    cache = flops_attn = 0
    if workload is not None:
        cache = kv_bytes_per_token(spec, dtype_bytes) * workload.cache_len * sequences
        context = workload.prompt_len + workload.gen_len // 2
        flops_attn = attention_flops(spec, 1, 1, context)
    block_b = [per_layer[1 + 2 * b] + per_layer[2 + 2 * b] + cache for b in range(l_)]
    block_f = [block_matmul_flops(spec, 1) + flops_attn for _ in range(l_)]
    e, h, v = spec.word_embed_dim, spec.hidden_size, spec.vocab_size
    embed_b, head_b = per_layer[0], per_layer[-1]
    if num_stages == 1:  # one stage stores the tied embedding once
        head_b = sum(t.numel for t in layer_specs(spec)[-1].owned) * dtype_bytes
    embed_f = 2 * e * h if e != h else 0
    head_f = 2 * e * v + (2 * e * h if e != h else 0)
    total_b = sum(block_b) + embed_b + head_b
    total_f = sum(block_f) + embed_f + head_f

    def stage_cost(first: int, stop: int) -> tuple[int, int, float]:
        b = sum(block_b[first:stop]) + (embed_b if first == 0 else 0) + (head_b if stop == l_ else 0)
        f = sum(block_f[first:stop]) + (embed_f if first == 0 else 0) + (head_f if stop == l_ else 0)
        return b, f, max(b / total_b, f / total_f)

    # best[k][i]: smallest largest-stage-share cutting blocks [0, i) into k stages; cut[k][i]: the last cut
    inf = float("inf")
    best = [[inf] * (l_ + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (l_ + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for i in range(k, l_ - (num_stages - k) + 1):
            for j in range(k - 1, i):
                if best[k - 1][j] == inf:
                    continue
                value = max(best[k - 1][j], stage_cost(j, i)[2])
                if value < best[k][i] - 1e-12:
                    best[k][i], cut[k][i] = value, j
    bounds, i = [], l_
    for k in range(num_stages, 0, -1):
        bounds.append((cut[k][i], i))
        i = cut[k][i]
    stages = []
    for r, (first, stop) in enumerate(reversed(bounds)):
        b_, f_, _ = stage_cost(first, stop)
        weights = b_ - cache * (stop - first)
        stages.append(StageSlice(r, (first, stop), block_layers(spec, first, stop), weights, b_ - weights,
                                 f_, stop == l_))
    return Partition(spec.name, tuple(stages))


# ---- per-stage policy search -----------------------------------------------------------------------------


def stage_spec(spec: ModelSpec, stage: StageSlice) -> ModelSpec:
    """A model spec standing for one stage in the cost model and LP: its blocks; the vocabulary only where the
    stage holds the embedding or the head (a middle stage gets a one-token vocabulary, so the embedding and
    head it does not hold cost next to nothing). The head of a stage without one is still counted (its compute
    and streaming), which errs on the slow side."""
    vocab = spec.vocab_size if stage.has_embed or stage.has_head else 1
    return replace(spec, name=f"{spec.name}[stage {stage.stage}]", num_layers=stage.blocks[1] - stage.blocks[0],
                   vocab_size=vocab)


def pick_shape(table: list[dict[tuple[int, int], float | None]]) -> tuple[int, int]:
    """The (gpu batch size, GPU batches) whose slowest stage is fastest. table[stage][shape]: that stage's
    predicted throughput (tokens/s) with that shape, None where it does not fit."""
    shapes = sorted({s for row in table for s in row})
    best: tuple[float, tuple[int, int]] | None = None
    for shape in shapes:
        rates = [row.get(shape) for row in table]
        if any(r is None for r in rates):
            continue
        slowest = min(r for r in rates if r is not None)
        if best is None or slowest > best[0]:
            best = (slowest, shape)
    if best is None:
        unfit = {shape: [r for r, row in enumerate(table) if row.get(shape) is None] for shape in shapes}
        listed = ", ".join(f"{g}x{n}: stages {v}" for (g, n), v in unfit.items())
        raise PipelineConfigError(f"no micro-batch shape fits every stage ({listed} do not fit); give the stages "
                                  "larger budgets or fix a smaller --gpu-batch-size")
    return best[1]


@dataclass(frozen=True)
class AutoPolicy:
    """Ask every stage to choose its policy with the LP (`stage_policy_search`), for this workload.

    profile: a HardwareProfile, or a profile name/path; None measures this machine once (rank 0) and shares it.
    fixed: Policy fields every stage keeps (num_gpu_batches is per micro-batch). margin: fraction of each
    budget kept free.
    """

    workload: Workload
    profile: Any = None
    fixed: dict[str, Any] = field(default_factory=dict)
    margin: float = 0.05


def stage_policy_search(spec: ModelSpec, stage: StageSlice, auto: AutoPolicy, profile: HardwareProfile,
                        budget: MemoryBudget, micro_batches: int, dtype_bytes: int,
                        gather: Callable[[Any], list[Any]]) -> Policy:
    """This stage's LP policy, with the micro-batch shape all stages agree on (call on every rank at once).

    The LP runs on `stage_spec` with the stage's `micro_batches` micro-batches of g x n sequences modelled as one
    block of g x (n * micro_batches): the same cache, activations and compute per token (the LP then counts a
    layer's offloaded weights once per token where the pipeline streams them once per micro-batch). Each stage
    proposes its best shape; every stage scores every proposal; `pick_shape` keeps the one whose slowest stage
    is fastest; each stage keeps its own placement for it. `gather(x)` returns every rank's x.
    """
    from flexgen_core.planning.policy_search import PolicySearchError, search_policy

    sspec = stage_spec(spec, stage)
    keep = 1.0 - auto.margin
    caps = MemoryBudget(int(budget.gpu_bytes * keep), int(budget.cpu_bytes * keep), int(budget.disk_bytes * keep),
                        None if budget.host_bytes is None else int(budget.host_bytes * keep))
    fixed = dict(auto.fixed)
    if "num_gpu_batches" in fixed:
        fixed["num_gpu_batches"] = fixed["num_gpu_batches"] * micro_batches

    def search(extra: dict[str, Any]) -> Policy | None:
        try:
            return search_policy(sspec, auto.workload, profile, caps, fixed={**fixed, **extra},
                                 dtype_bytes=dtype_bytes).policy
        except PolicySearchError:
            return None

    def rate(policy: Policy | None) -> float | None:
        if policy is None:
            return None
        return estimate(sspec, policy, auto.workload, profile, dtype_bytes).throughput_tok_s

    own = search({})
    proposal = None if own is None else (own.gpu_batch_size, max(1, own.num_gpu_batches // micro_batches))
    shapes = sorted({p for p in gather(proposal) if p is not None})
    if not shapes:
        raise PipelineConfigError(f"no stage of {spec.name} found a policy that fits its budget with "
                                  f"{micro_batches} micro-batches in flight; give the stages more memory")
    policies = {s: search({"gpu_batch_size": s[0], "num_gpu_batches": s[1] * micro_batches}) for s in shapes}
    shape = pick_shape(gather({s: rate(p) for s, p in policies.items()}))
    chosen = policies[shape]
    assert chosen is not None
    return chosen.with_(num_gpu_batches=shape[1])
