"""Pipeline-parallel generation: one process per stage, each running the offloading engine on its slice.

Every rank builds a `PipelineEngine` and calls `generate`/`score` with the same arguments (SPMD, as torchrun
programs do); every rank returns the same results. Rank r holds the stage r slice of `pipeline_plan.partition`
and plans, checks and loads only that slice (its own policy and budget). Prompts are cut into blocks exactly as
the single-process engine cuts them; `micro_batches` consecutive blocks are in flight together, one per
micro-batch. A round is one micro-batch through one stage for one token (the zig-zag schedule over the
stage's layers and the micro-batch's GPU batches). Rounds run token by token, micro-batch by micro-batch:

    stage 0        recv tokens (i-1, m) from the last stage (i > 0) -> embed .. its layers -> send hidden (i, m)
    stage 0 < r    recv hidden (i, m) from r-1 -> its layers -> send hidden to r+1, or (last stage) sample and
                   send tokens (i, m) to stage 0 (not after the last token)

so while stage r computes micro-batch m, stage r-1 computes m+1 (FlexGen's iteration-level pipelining). The
last stage owns sampling, stop tokens and log-probs; it marks a message DONE when every sequence of the
micro-batch has stopped, stage 0 then forwards DONE once through the stages and every rank skips that
micro-batch from then on, so a micro-batch ends at the same token as the single-process block. At the end of a
block the last stage broadcasts tokens, log-probs and its timings (the call's measured throughput).

Failures: a plan that does not fit, or a load that fails, on any rank is agreed on (all-gather) and raised on
every rank, naming the rank; during a call every wait is bounded and a dead peer is noticed at once
(`stage_link`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from flexgen_core.outputs import CallStats, Generation, Score
from flexgen_core.pipeline_plan import (
    AutoPolicy,
    Partition,
    PipelineConfigError,
    StageSlice,
    partition,
    stage_policy_search,
)
from flexgen_core.plan import GIB, MemoryBudget, Plan, PlanDoesNotFit, Workload, build_plan
from flexgen_core.planning.hardware import HardwareProfile, resolve_profile
from flexgen_core.policy import Policy
from flexgen_core.runtime import checkpoint as ckpt_io
from flexgen_core.runtime.block import BatchState, Sampler, make_batch, plan_blocks
from flexgen_core.runtime.checkpoint import Checkpoint
from flexgen_core.runtime.engine import Engine, _generation, memory_budget
from flexgen_core.runtime.memory import OffloadDir
from flexgen_core.runtime.schedule import prologue, stage_round
from flexgen_core.runtime.stage_link import DONE, RUN, PipelineError, StageGroup

DEFAULT_TIMEOUT_S = 600.0  # longest a rank waits for a peer (a round of a large offloaded model can take minutes)


class StageDoesNotFit(PipelineError):
    """One or more stages' plans exceed their budgets (raised on every rank)."""


class PipelineEngine(Engine):
    """One stage of a pipeline; `generate`/`score` have the `Engine` contract, called alike on every rank."""

    def __init__(self, checkpoint: Checkpoint, policy: Policy, device: torch.device, dtype: torch.dtype,
                 offload: OffloadDir, budget: MemoryBudget, group: StageGroup, parts: Partition,
                 micro_batches: int, seed: int = 0, dummy: bool = False) -> None:
        if parts.num_stages != group.world_size:
            raise PipelineConfigError(f"partition has {parts.num_stages} stages for {group.world_size} ranks")
        if micro_batches < 1:
            raise PipelineConfigError(f"micro_batches must be >= 1, got {micro_batches}")
        self.group, self.partition, self.micro_batches = group, parts, micro_batches
        self.stage: StageSlice = parts.stages[group.rank]
        self._owns_group = False  # from_pretrained sets it when it joined the group for this engine
        self.offload, self._cache, self._acts, self.weights = offload, None, None, None
        shapes = group.all_gather_object(("shape", (policy.gpu_batch_size, policy.num_gpu_batches, micro_batches)),
                                         "comparing the stages' batch shapes")
        if len({shape for _, shape in shapes}) > 1:
            listed = ", ".join(f"rank {r}: {g}x{n}, {m} in flight" for r, (_, (g, n, m)) in enumerate(shapes))
            raise PipelineConfigError("every stage must use the same gpu_batch_size, num_gpu_batches and "
                                      f"micro_batches (micro-batches flow through all stages); got {listed}")
        failure: BaseException | None = None
        try:
            super().__init__(checkpoint, policy, device, dtype, offload, budget, seed, dummy)
        except StageDoesNotFit:
            raise
        except Exception as exc:  # reported to every rank below
            failure = exc
        self._agree("load", failure)

    @classmethod
    def from_pretrained(cls, model: str | Path,  # type: ignore[override]
                        policy: Policy | Sequence[Policy] | AutoPolicy | None = None,
                        device: str | torch.device | None = None, offload_dir: str | Path | None = None,
                        dummy: bool = False, dtype: torch.dtype | None = None,
                        gpu_mem_gib: float | Sequence[float] | None = None,
                        cpu_mem_gib: float | Sequence[float] | None = None, seed: int = 0,
                        disk_gib: float | Sequence[float] | None = None, micro_batches: int | None = None,
                        timeout_s: float = DEFAULT_TIMEOUT_S, group: StageGroup | None = None) -> PipelineEngine:
        """Join the torchrun process group and load this rank's stage of `model` (see `Engine.from_pretrained`).

        policy: one for every stage, one per stage, or `AutoPolicy` (each stage runs the LP for its slice and
        budget; the stages agree on the micro-batch shape). gpu_mem_gib, cpu_mem_gib, disk_gib: one value for
        every stage or one per stage; unset host and disk budgets are this machine's free memory shared by its
        local ranks. micro_batches: blocks in flight (default: the number of stages). On CUDA, rank r uses the
        GPU of its LOCAL_RANK. group: the process group to run on (`StageGroup.from_env`, once per process, to
        run several engines one after the other); by default the engine joins one and leaves it on `close()`.
        """
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        ckpt = ckpt_io.resolve(model, dummy=dummy)
        if not dummy:
            ckpt_io.validate(ckpt)
        owned = group is None
        group = group or StageGroup.from_env(dev, timeout_s)
        try:
            n, r = group.world_size, group.rank
            if n < 2:
                raise PipelineConfigError("pipeline mode needs at least 2 processes; use Engine for one")
            dtype = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
            micro_batches = micro_batches or n
            parts = partition(ckpt.spec, n, dtype.itemsize)
            offload = OffloadDir(offload_dir)
            budget = stage_budget(dev, offload, group.local_world_size, _per_stage(gpu_mem_gib, r, n, "gpu_mem_gib"),
                                  _per_stage(cpu_mem_gib, r, n, "cpu_mem_gib"), _per_stage(disk_gib, r, n, "disk_gib"))
            if isinstance(policy, AutoPolicy):
                profile = _shared_profile(group, policy.profile, dev)
                stage_policy = stage_policy_search(
                    ckpt.spec, parts.stages[r], policy, profile, budget, micro_batches, dtype.itemsize,
                    lambda x: group.all_gather_object(x, "choosing the stages' policies"))
            else:
                stage_policy = _per_stage(policy, r, n, "policy") or Policy()
            engine = cls(ckpt, stage_policy, dev, dtype, offload, budget, group, parts, micro_batches, seed, dummy)
        except BaseException:
            if owned:
                group.close()
            raise
        engine._owns_group = owned
        return engine

    # ---- planning and agreement -------------------------------------------------------------------------
    def _build_plan(self, workload: Workload | None) -> Plan:
        """This stage's slice, with cache and activation homes for every micro-batch in flight."""
        inflight = self.policy.with_(num_gpu_batches=self.policy.num_gpu_batches * self.micro_batches)
        return build_plan(self.spec, inflight, workload, self.dtype.itemsize, self.device.type,
                          layers=self.stage.layers)

    def _check_plan(self, plan: Plan) -> None:
        try:
            plan.check(self.budget)
            mine = None
        except PlanDoesNotFit as exc:
            mine = (exc.tier, exc.needed, exc.available, str(exc))
        found = self.group.all_gather_object(("plan", mine), "checking every stage's memory plan")
        self._raise_other_phase("plan", found)
        bad = [(r, f) for r, (_, f) in enumerate(found) if f is not None]
        if bad:
            lines = [f"stage {r} (rank {r}: {self.partition.stages[r].describe()}) does not fit in {tier} memory: "
                     f"needs {need} bytes ({need / GIB:.2f} GiB), {avail} bytes ({avail / GIB:.2f} GiB) available"
                     for r, (tier, need, avail, _) in bad]
            detail = bad[0][1][3].split("available. ", 1)[-1]  # the largest items and the hint, of the first
            raise StageDoesNotFit("; ".join(lines) + f". Stage {bad[0][0]}: {detail}")

    def _agree(self, doing: str, failure: BaseException | None) -> None:
        """Raise on every rank when phase `doing` failed on any rank."""
        mine = None if failure is None else f"{type(failure).__name__}: {failure}"
        found = self.group.all_gather_object((doing, mine), doing)
        self._raise_other_phase(doing, found)
        bad = [f"rank {r}: {f}" for r, (_, f) in enumerate(found) if f is not None]
        if bad:
            if failure is not None:
                self.close()
            raise PipelineError(f"{doing} failed on " + "; ".join(bad)) from failure

    def _raise_other_phase(self, phase: str, found: list[tuple[str, object]]) -> None:
        """A rank that failed before reaching `phase` reports its failure in the gather instead."""
        early = [f"rank {r}: {msg}" for r, (p, msg) in enumerate(found) if p != phase]
        if early:
            raise PipelineError("setting up the pipeline failed on " + "; ".join(early))

    # ---- public API ---------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop_token_ids: Sequence[int] | Sequence[Sequence[int]] = (),
                 return_logprobs: bool = False) -> list[Generation]:
        stops, sampler, stats = self._begin_generate(prompts, max_new_tokens, temperature, top_p, seed,
                                                     stop_token_ids)
        results: list[Generation | None] = [None] * len(prompts)
        for blocks in self._flights(len(prompts)):
            micro = [[make_batch([prompts[i] for i in b], max(len(prompts[i]) for bb in block for i in bb),
                                 max_new_tokens, self.spec.pad_token_id, [stops[i] for i in b], self.device)
                      for b in block] for block in blocks]
            steps = self._guarded(self._run_flight, micro, blocks, max_new_tokens, sampler, stats)
            steps = self._share_tokens(micro, steps, stats)
            for m, block in enumerate(blocks):
                for b, idx in zip(micro[m], block, strict=True):
                    for r, i in enumerate(idx):
                        results[i] = _generation(b, r, steps[m], return_logprobs)
                        stats.generated_tokens += len(results[i].token_ids)  # type: ignore[union-attr]
                stats.padded_prompt_tokens += micro[m][0].prompt_len * sum(len(b) for b in block)
        self._end_call(stats)
        return results  # type: ignore[return-value]

    def score(self, contexts: list[list[int]], continuations: list[list[int]]) -> list[Score]:
        seqs = self._score_sequences(contexts, continuations)
        results: list[Score | None] = [None] * len(seqs)
        stats = self._begin_call(seqs)
        self._prepare(Workload(max(len(x) for x in seqs), 1), need_cache=False)
        for blocks in self._flights(len(seqs)):
            micro = [[make_batch([seqs[i] for i in b], max(len(seqs[i]) for bb in block for i in bb), 1,
                                 self.spec.pad_token_id, [[] for _ in b], self.device) for b in block]
                     for block in blocks]
            flat = [b for block in blocks for b in block]
            self._score_targets = [[continuations[i] for i in b] for b in flat]
            self._score_results = [[] for _ in flat]
            self._guarded(self._run_flight, micro, blocks, 1, None, stats)
            scores = self.group.broadcast_object(self._score_results, self.group.last, "sharing the scores")
            for batch_scores, idx in zip(scores, flat, strict=True):
                for sc, i in zip(batch_scores, idx, strict=True):
                    results[i] = sc
        self._end_call(stats)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        super().close()
        if getattr(self, "_owns_group", False):
            self._owns_group = False
            self.group.close()

    # ---- the pipelined block ------------------------------------------------------------------------------
    def _flights(self, n: int) -> list[list[list[list[int]]]]:
        """Engine blocks (as the single-process engine forms them), `micro_batches` at a time."""
        blocks = plan_blocks(n, self.policy.block_size, self.policy.gpu_batch_size)
        return [blocks[i:i + self.micro_batches] for i in range(0, len(blocks), self.micro_batches)]

    def _guarded(self, fn, *args):  # noqa: ANN001, ANN202
        try:
            return fn(*args)
        except PipelineError:
            raise
        except Exception as exc:
            self.group.abort(f"on rank {self.group.rank} (stage {self.stage.stage}), {type(exc).__name__}: {exc}")
            self._owns_group = False
            self.group.close()  # the ranks are out of step now: drop the connections so the others stop at once
            raise

    def _run_flight(self, micro: list[list[BatchState]], blocks: list[list[list[int]]], n_tokens: int,
                    sampler: Sampler | None, stats: CallStats) -> list[int]:
        """Run the micro-batches in flight through this stage; returns tokens generated per micro-batch (last
        stage; others return placeholders)."""
        assert self.weights is not None
        g, r = self.group, self.group.rank
        last = r == g.last
        flat = [b for mb in micro for b in mb]
        index = [idx for block in blocks for idx in block]
        offsets = [sum(len(mb) for mb in micro[:m]) for m in range(len(micro))]
        if self._cache is not None:
            self._cache.begin_block([b.rows for b in flat])
        any_stops = [bool((torch.cat([b.stop_ids for b in mb]) >= 0).any()) for mb in micro] if sampler else []
        steps = [n_tokens] * len(micro)
        done: set[int] = set()
        rounds, prefilled = 0, 0
        if self.policy.overlap:
            for layer, slot in prologue(self.plan.weight_slots, len(self.plan.layers), self.plan.weight_slots):
                self.weights.prefetch(self.plan.layer_start + layer, slot)
        stats.blocks += len(micro)
        start = time.perf_counter()
        for i in range(n_tokens):
            for m, mb in enumerate(micro):
                if m in done:
                    continue
                if self._receive(i, m, mb, offsets[m]) == DONE:
                    done.add(m)
                    if not last:
                        g.send(r + 1, (i, m, DONE))
                    continue
                self._round(rounds, i, mb, offsets[m], flat, index, sampler, n_tokens)
                rounds += 1
                if not last:
                    x = torch.cat([self._hidden_in(b, offsets[m] + k, i) for k, b in enumerate(mb)])
                    g.send(r + 1, (i, m, RUN), x)
                    continue
                finished = sampler is not None and any_stops[m] and all(bool(b.finished.all()) for b in mb)
                if finished:
                    steps[m] = i + 1
                if i + 1 < n_tokens and sampler is not None:
                    g.send(0, (i, m, DONE if finished else RUN), torch.cat([b.tokens[:, i] for b in mb]))
                if i == 0:
                    prefilled += 1
                    if prefilled == len(micro):
                        self._sync()
                        stats.prefill_s += time.perf_counter() - start
                        start = time.perf_counter()
                else:
                    stats.decode_steps += 1
        g.flush()
        self._finish_block("generation")
        if last and n_tokens > 1:
            stats.decode_s += time.perf_counter() - start
        return steps

    def _receive(self, i: int, m: int, mb: list[BatchState], offset: int) -> int:
        """Inputs of round (token i, micro-batch m): sampled tokens (stage 0) or hidden states (others)."""
        g, r = self.group, self.group.rank
        if r == 0:
            if i == 0:
                return RUN
            status = g.recv_header(g.last, (i - 1, m))
            tokens = g.recv(g.last, (sum(b.rows for b in mb),), torch.long).to(self.device)
            at = 0
            for b in mb:
                b.tokens[:, i - 1] = tokens[at:at + b.rows]
                at += b.rows
            return status
        status = g.recv_header(r - 1, (i, m))
        if status == DONE:
            return DONE
        width = mb[0].prompt_len if i == 0 else 1
        x = g.recv(r - 1, (sum(b.rows for b in mb), width, self.spec.hidden_size), self.dtype).to(self.device)
        at = 0
        for k, b in enumerate(mb):
            self._hidden_out(b, offset + k, x[at:at + b.rows])
            at += b.rows
        return RUN

    def _round(self, round_index: int, i: int, mb: list[BatchState], offset: int, flat: list[BatchState],
               index: list[list[int]], sampler: Sampler | None, n_tokens: int) -> None:
        """The zig-zag schedule of this stage's layers over micro-batch `mb` for token i."""
        assert self.weights is not None
        lo, overlap = self.plan.layer_start, self.policy.overlap
        in_slot: dict[int, dict[str, torch.Tensor]] = {}  # slot -> materialized weights
        for step in stage_round(i, round_index, len(self.plan.layers), len(mb), self.plan.weight_slots):
            layer = lo + step.layer
            nxt = step.next_step
            late_acts = nxt is not None and nxt[2] == step.batch
            if overlap:
                for ahead, slot in step.prefetch:
                    self.weights.prefetch(lo + ahead, slot)
                if nxt is not None:
                    self._prefetch_inputs(flat, nxt[0], lo + nxt[1], offset + nxt[2], acts=not late_acts)
            if step.materialize:
                in_slot[step.weight_slot] = self.weights.materialize(layer, step.weight_slot)
            self._compute(i, layer, offset + step.batch, flat, index, in_slot[step.weight_slot], sampler, n_tokens,
                          slot=step.weight_slot)
            for slot in step.release:  # deferred attention steps still need their layer's weights
                self._finish_deferred(slot)
            if overlap and late_acts:
                self._prefetch_inputs(flat, nxt[0], lo + nxt[1], offset + nxt[2], cache=False)  # type: ignore[index]
            for slot in step.release:
                self.weights.release(slot)

    def _share_tokens(self, micro: list[list[BatchState]], steps: list[int], stats: CallStats) -> list[int]:
        """Broadcast the last stage's tokens, log-probs, steps and timings; every rank gets the same results."""
        g = self.group
        flat = [b for mb in micro for b in mb]
        n = flat[0].tokens.shape[1]
        rows = sum(b.rows for b in flat)
        buf = torch.zeros(len(micro) + 3 + 2 * rows * n, dtype=torch.float64)
        if g.rank == g.last:
            buf[:len(micro)] = torch.tensor(steps, dtype=torch.float64)
            buf[len(micro):len(micro) + 3] = torch.tensor([stats.prefill_s, stats.decode_s, stats.decode_steps])
            body = torch.cat([torch.cat([b.tokens.cpu().double() for b in flat]).reshape(-1),
                              torch.cat([b.logprobs.cpu().double() for b in flat]).reshape(-1)])
            buf[len(micro) + 3:] = body
        g.broadcast(buf, g.last, "sharing the generated tokens")
        if g.rank != g.last:
            stats.prefill_s, stats.decode_s, stats.decode_steps = (float(buf[len(micro)]), float(buf[len(micro) + 1]),
                                                                   int(buf[len(micro) + 2]))
            tokens, logprobs = buf[len(micro) + 3:].reshape(2, rows, n)
            at = 0
            for b in flat:
                b.tokens.copy_(tokens[at:at + b.rows].long())
                b.logprobs.copy_(logprobs[at:at + b.rows].float())
                at += b.rows
        return [int(s) for s in buf[:len(micro)].tolist()]


def stage_budget(device: torch.device, offload: OffloadDir, local_ranks: int, gpu_mem_gib: float | None,
                 cpu_mem_gib: float | None, disk_gib: float | None) -> MemoryBudget:
    """This rank's budget: the given limits, else the machine's free memory shared by its `local_ranks`."""
    b = memory_budget(device, offload, gpu_mem_gib, cpu_mem_gib, disk_gib)
    share = max(1, local_ranks)
    gpu = b.gpu_bytes if gpu_mem_gib is not None or device.type == "cuda" else b.gpu_bytes // share
    cpu = b.cpu_bytes if cpu_mem_gib is not None else b.cpu_bytes // share
    disk = b.disk_bytes if disk_gib is not None else b.disk_bytes // share
    host = None if b.host_bytes is None else b.host_bytes // share
    return MemoryBudget(gpu, cpu, disk, host)


def _shared_profile(group: StageGroup, profile: object, device: torch.device) -> HardwareProfile:
    """The hardware profile for the stages' LP: the given one, or this machine's measured once on rank 0."""
    if isinstance(profile, HardwareProfile):
        return profile
    if profile is not None:
        return resolve_profile(profile)  # type: ignore[arg-type]
    from flexgen_core.planning.auto import machine_profile

    mine = machine_profile(device.type) if group.rank == 0 else None
    return group.broadcast_object(mine, 0, "sharing the hardware profile")


def _per_stage(value, rank: int, n: int, name: str):  # noqa: ANN001, ANN202
    """`value` when it applies to every stage; rank `rank`'s entry when it is a sequence of one per stage."""
    if value is None or isinstance(value, (int, float, Policy, str)):
        return value
    values = list(value)
    if len(values) != n:
        raise PipelineConfigError(f"{name}: {len(values)} values for {n} stages; give one, or one per stage")
    return values[rank]
