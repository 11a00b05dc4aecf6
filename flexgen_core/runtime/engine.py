"""The engine: loads a model into the tiers its policy assigns and runs the zig-zag schedule.

One execution loop walks the schedule's steps; overlap on or off, CPU or CUDA, every placement and
compression setting run through it. The model's weights stay resident from `from_pretrained` until
`close()`; KV cache and activation homes are allocated on the first call that needs them and reused by
later calls of the same or smaller size.
"""

from __future__ import annotations

import contextlib
import resource
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from torch.profiler import record_function

from flexgen_core.outputs import CallStats, Generation, Score
from flexgen_core.plan import GIB, MemoryBudget, Plan, Workload, build_plan
from flexgen_core.policy import Policy, Tier
from flexgen_core.runtime import checkpoint as ckpt_io
from flexgen_core.runtime import layers
from flexgen_core.runtime.activations import ActivationStore
from flexgen_core.runtime.block import BatchState, Sampler, make_batch, normalize_stop_ids, plan_blocks
from flexgen_core.runtime.checkpoint import Checkpoint
from flexgen_core.runtime.kv_cache import KVCache, PendingAttention
from flexgen_core.runtime.memory import OffloadDir
from flexgen_core.runtime.schedule import paired_decode, prologue, zigzag
from flexgen_core.runtime.transfer import Transfer
from flexgen_core.runtime.weights import WeightStore
from flexgen_core.spec import LayerKind, ModelSpec

GPU_RESERVE_BYTES = 1 << 30  # CUDA context, cuBLAS workspaces, allocator slack
HOST_RESERVE_BYTES = 4 << 30
HOST_RESERVE_FRACTION = 0.05


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def host_reserve_bytes() -> int:
    """Host memory the plan never hands out: the process itself (Python, torch, the CUDA context), transient
    tensors and the page cache. Pinned memory cannot be reclaimed, so overcommitting it hangs a machine."""
    return max(HOST_RESERVE_BYTES, int(psutil.virtual_memory().total * HOST_RESERVE_FRACTION))


def memory_budget(device: torch.device, offload: OffloadDir, gpu_mem_gib: float | None,
                  cpu_mem_gib: float | None, disk_gib: float | None = None) -> MemoryBudget:
    """Budgets per tier: the given limits, else what the machine has free now (less a host reserve)."""
    host_free = max(0, psutil.virtual_memory().available - host_reserve_bytes())
    if gpu_mem_gib is not None:
        gpu = int(gpu_mem_gib * GIB)
    elif device.type == "cuda":
        gpu = torch.cuda.mem_get_info(device)[0] - GPU_RESERVE_BYTES
    else:
        gpu = host_free
    cpu = int(cpu_mem_gib * GIB) if cpu_mem_gib is not None else host_free
    disk = int(disk_gib * GIB) if disk_gib is not None else offload.free_bytes()
    return MemoryBudget(gpu, cpu, disk, host_bytes=host_free if device.type == "cpu" else None)


@dataclass(eq=False)  # compared by identity (its fields hold tensors)
class DeferredAttention:
    """A decode attention step of one GPU batch waiting for its CPU-delegated part (see `Engine._compute`)."""

    state: BatchState
    batch: int
    x: torch.Tensor  # (rows, 1, h) the layer's input (residual)
    weights: dict[str, torch.Tensor]
    slot: int  # the weight slot holding `weights`
    pending: PendingAttention
    where: tuple[int, int]  # (token, layer)


class Engine:
    """FlexGen-style offloading generation engine (see `from_pretrained`, `generate`, `score`)."""

    def __init__(self, checkpoint: Checkpoint, policy: Policy, device: torch.device, dtype: torch.dtype,
                 offload: OffloadDir, budget: MemoryBudget, seed: int = 0, dummy: bool = False) -> None:
        self.checkpoint, self.policy, self.device, self.dtype = checkpoint, policy, device, dtype
        self.dummy = dummy or not checkpoint.files
        self.spec: ModelSpec = checkpoint.spec
        self.offload, self.budget = offload, budget
        self.last_stats = CallStats()
        self.step_timing = False  # diagnostic: synchronize after every step and time it (slows runs down)
        self.check_finite = False  # diagnostic: after every step, raise at the first layer output with inf/NaN
        self.plan: Plan = self._build_plan(None)
        self._check_plan(self.plan)
        self._cache: KVCache | None = None
        self._acts: ActivationStore | None = None
        self._run_plan: Plan | None = None
        self._deferred: list[DeferredAttention] = []  # decode attention steps whose host part is still running
        self._acts_wanted: dict[int, tuple[int, int]] = {}  # GPU batch -> (rows, width) to prefetch once finished
        self.transfer = Transfer(device, policy.overlap)
        self.weights: WeightStore | None = None
        try:
            if self.plan.weight_arena_bytes[Tier.DISK]:
                offload.check_writable()
            self.weights = WeightStore(self.plan, device, dtype, self.transfer, offload)
            self._load_weights(seed)
        except BaseException:
            self.close()
            raise

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: str | Path, policy: Policy | None = None, device: str | torch.device | None = None,
                        offload_dir: str | Path | None = None, dummy: bool = False, dtype: torch.dtype | None = None,
                        gpu_mem_gib: float | None = None, cpu_mem_gib: float | None = None, seed: int = 0,
                        disk_gib: float | None = None) -> Engine:
        """Load `model` (checkpoint directory, cached hub name, or built-in size with dummy=True).

        device defaults to CUDA when available, else CPU (the "gpu" tier is the compute device's memory);
        dtype to fp16 on CUDA and fp32 on CPU; budgets to what the machine has free (disk_gib caps the
        offload directory's use). Nothing is allocated or written before the plan is checked.
        """
        dev = torch.device(device) if device is not None else default_device()
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was requested but CUDA is not available; use device='cpu'")
        dtype = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
        ckpt = ckpt_io.resolve(model, dummy=dummy)
        if not dummy:
            ckpt_io.validate(ckpt)
        offload = OffloadDir(offload_dir)
        budget = memory_budget(dev, offload, gpu_mem_gib, cpu_mem_gib, disk_gib)
        return cls(ckpt, policy or Policy(), dev, dtype, offload, budget, seed, dummy)

    def _load_weights(self, seed: int) -> None:
        assert self.weights is not None
        if not self.dummy:
            stored = self.plan.storage_map()  # a pipeline stage reads only its slice's tensors
            for layer, name, tensor in ckpt_io.iter_tensors(self.checkpoint, keep=lambda j, n: (j, n) in stored):
                for target in stored[(layer, name)]:
                    self.weights.write_tensor(target, name, tensor)
                del tensor
        else:
            self._write_dummy(seed)
        missing = self.weights.missing()
        if missing:
            raise ckpt_io.CheckpointError(f"checkpoint lacks tensors for {missing[:5]}")
        self.weights.finish_writes()

    def _write_dummy(self, seed: int) -> None:
        """Small random weights from `seed`, generated on the compute device, tensor by tensor."""
        assert self.weights is not None
        for lay in self.plan.layers:
            for t in lay.spec.owned:
                g = torch.Generator(device=self.device)
                origin = lay.spec.index if t.copy_of is None else t.copy_of  # a tied copy gets the owner's values
                g.manual_seed(seed * 1_000_003 + origin * 7919 + zlib.crc32(t.name.encode()))
                x = torch.randn(t.shape, generator=g, device=self.device, dtype=self.dtype).mul_(0.02)
                if t.name == "ln_w":
                    x.add_(1.0)
                self.weights.write_tensor(lay.spec.index, t.name, x)

    @property
    def identity(self) -> dict[str, str]:
        """What determines this engine's outputs (for result keys): model, weights revision, numerics."""
        p = self.policy
        return {"model": self.checkpoint.name, "revision": self.checkpoint.revision, "dtype": str(self.dtype),
                "compress_weights": str(p.compress_weights), "compress_cache": str(p.compress_cache),
                "attn_topk": str(p.attn_topk)}

    # ---- public API -----------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop_token_ids: Sequence[int] | Sequence[Sequence[int]] = (),
                 return_logprobs: bool = False, top_logprobs: int = 0) -> list[Generation]:
        """Generate up to `max_new_tokens` for each prompt (token ids). Returns one Generation per prompt.

        top_logprobs: also return, per generated token, the `top_logprobs` most likely tokens and their
        log-probabilities (HELM's top_logprobs; the full distribution with top_logprobs = vocab size).
        """
        if not 0 <= top_logprobs <= self.spec.vocab_size:
            raise ValueError(f"top_logprobs must be in [0, {self.spec.vocab_size}], got {top_logprobs}")
        stops, sampler, stats = self._begin_generate(prompts, max_new_tokens, temperature, top_p, seed,
                                                     stop_token_ids)
        results: list[Generation | None] = [None] * len(prompts)
        for block in plan_blocks(len(prompts), self.policy.block_size, self.policy.gpu_batch_size):
            s = max(len(prompts[i]) for batch in block for i in batch)
            batches = [make_batch([prompts[i] for i in b], s, max_new_tokens, self.spec.pad_token_id,
                                  [stops[i] for i in b], self.device, top_logprobs) for b in block]
            steps = self._run_block(batches, block, max_new_tokens, sampler, stats)
            for b, idx in zip(batches, block, strict=True):
                for r, i in enumerate(idx):
                    results[i] = _generation(b, r, steps, return_logprobs or top_logprobs > 0)
                    stats.generated_tokens += len(results[i].token_ids)  # type: ignore[union-attr]
            stats.padded_prompt_tokens += s * len([i for b in block for i in b])
        self._end_call(stats)
        return results  # type: ignore[return-value]

    def _begin_generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                        seed: int | None, stop_token_ids: Sequence[int] | Sequence[Sequence[int]]
                        ) -> tuple[list[list[int]], Sampler, CallStats]:
        """Validate a generate call and prepare the engine for it: (stop ids per prompt, sampler, call stats)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self._check_prompts(prompts, max_new_tokens)
        stops = normalize_stop_ids(stop_token_ids, len(prompts))
        sampler = Sampler(temperature, top_p, seed, self.device)
        stats = self._begin_call(prompts)
        self._prepare(Workload(max(len(p) for p in prompts), max_new_tokens), need_cache=max_new_tokens > 1)
        return stops, sampler, stats

    def _score_sequences(self, contexts: list[list[int]], continuations: list[list[int]]) -> list[list[int]]:
        """Validated context + continuation token lists (an empty context becomes BOS)."""
        if len(contexts) != len(continuations):
            raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
        if any(len(c) == 0 for c in continuations):
            raise ValueError("every continuation needs at least one token")
        contexts = [list(c) if c else [self.spec.bos_token_id] for c in contexts]
        seqs = [c + list(x) for c, x in zip(contexts, continuations, strict=True)]
        self._check_prompts(seqs, 0)
        return seqs

    def score(self, contexts: list[list[int]], continuations: list[list[int]]) -> list[Score]:
        """Log-likelihood of each continuation given its context (one prefill pass, no sampling)."""
        seqs = self._score_sequences(contexts, continuations)
        results: list[Score | None] = [None] * len(seqs)
        stats = self._begin_call(seqs)
        self._prepare(Workload(max(len(x) for x in seqs), 1), need_cache=False)
        for block in plan_blocks(len(seqs), self.policy.block_size, self.policy.gpu_batch_size):
            s = max(len(seqs[i]) for batch in block for i in batch)
            batches = [make_batch([seqs[i] for i in b], s, 1, self.spec.pad_token_id, [[] for _ in b], self.device)
                       for b in block]
            self._score_targets = [[continuations[i] for i in b] for b in block]
            self._score_results: list[list[Score]] = [[] for _ in block]
            self._run_block(batches, block, 1, None, stats)
            for batch_scores, idx in zip(self._score_results, block, strict=True):
                for sc, i in zip(batch_scores, idx, strict=True):
                    results[i] = sc
            stats.padded_prompt_tokens += s * len([i for b in block for i in b])
        self._end_call(stats)
        return results  # type: ignore[return-value]

    def reserve(self, prompt_len: int, gen_len: int) -> None:
        """Allocate cache and activation homes for prompts up to `prompt_len` and `gen_len` new tokens now."""
        self._prepare(Workload(prompt_len, gen_len), need_cache=gen_len > 1)

    @property
    def run_plan(self) -> Plan:
        """The plan of the current allocations (weights plus cache and activations once a call ran)."""
        return self._run_plan or self.plan

    @property
    def disk_direct(self) -> bool:
        """Whether disk-tier weight reads bypass the page cache (O_DIRECT)."""
        disk = self.weights.homes.get(Tier.DISK) if self.weights else None
        return bool(disk is not None and getattr(disk, "direct", False))

    def close(self) -> None:
        """Free every tier and remove the offload files."""
        for part in (self._cache, self._acts, self.weights):
            if part is not None:
                part.close()
        self._cache = self._acts = self.weights = None
        if getattr(self, "transfer", None) is not None:
            self.transfer.close()
        self.offload.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals ------------------------------------------------------------------------------
    def _check_prompts(self, prompts: Sequence[Sequence[int]], new_tokens: int) -> None:
        if self.weights is None:
            raise RuntimeError("this engine was closed")
        if not prompts:
            raise ValueError("no prompts given")
        v, limit = self.spec.vocab_size, self.spec.max_positions
        for n, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {n} is empty; every prompt needs at least one token")
            if len(p) + new_tokens > limit:
                raise ValueError(f"prompt {n} has {len(p)} tokens + {new_tokens} new > the model's {limit} positions")
            bad = [t for t in p if not isinstance(t, int) or not 0 <= t < v]
            if bad:
                raise ValueError(f"prompt {n} has token ids outside [0, {v}): {bad[:5]}")

    def _prepare(self, workload: Workload, need_cache: bool) -> None:
        """Make sure cache and activation homes fit `workload` (allocate on first use, grow if needed)."""
        current = self._run_plan
        if current is not None and current.workload is not None and (
                current.workload.prompt_len >= workload.prompt_len
                and (not need_cache or (self._cache is not None and current.workload.cache_len >= workload.cache_len))):
            return
        if current is not None and current.workload is not None:
            workload = Workload(max(workload.prompt_len, current.workload.prompt_len),
                                max(workload.gen_len, current.workload.gen_len))
        plan = self._build_plan(workload)
        self._check_plan(plan)
        for part in (self._cache, self._acts):
            if part is not None:
                part.close()
        self._cache = self._acts = None
        if plan.usage[Tier.DISK].get("cache.home") or plan.usage[Tier.DISK].get("acts.home"):
            self.offload.check_writable()
        if need_cache:
            self._cache = KVCache(plan, self.device, self.dtype, self.transfer, self.offload)
        if plan.act_split.gpu < self.policy.gpu_batch_size:
            self._acts = ActivationStore(plan, self.device, self.dtype, self.transfer, self.offload)
        self._run_plan = plan

    def _build_plan(self, workload: Workload | None) -> Plan:
        """The plan of this engine's allocations for `workload` (None: weights only)."""
        return build_plan(self.spec, self.policy, workload, self.dtype.itemsize, self.device.type)

    def _check_plan(self, plan: Plan) -> None:
        """Refuse a plan that exceeds the budget (PlanDoesNotFit), before anything is allocated."""
        plan.check(self.budget)

    def _begin_call(self, prompts: Sequence[Sequence[int]]) -> CallStats:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return CallStats(block_size=self.policy.block_size, sequences=len(prompts),
                         prompt_tokens=sum(len(p) for p in prompts))

    def _end_call(self, stats: CallStats) -> None:
        peak = {"cpu_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        if self.device.type == "cuda":
            peak["gpu"] = torch.cuda.max_memory_allocated(self.device)
        stats.peak_bytes = peak
        self.last_stats = stats

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _run_block(self, batches: list[BatchState], index: list[list[int]], n_tokens: int, sampler: Sampler | None,
                   stats: CallStats) -> int:
        """Run the schedule over one block; returns the number of tokens generated."""
        assert self.weights is not None
        num_layers = self.spec.num_schedule_layers
        if self._cache is not None:
            self._cache.begin_block([b.rows for b in batches])
            self._cache.check_finite = self.check_finite
        overlap = self.policy.overlap
        any_stops = bool((torch.cat([b.stop_ids for b in batches]) >= 0).any()) if sampler else False
        stats.blocks += 1
        self._deferred, self._acts_wanted = [], {}
        start = time.perf_counter()
        slots = self.plan.weight_slots
        paired = self._paired_decode(len(batches), slots)
        if overlap and not paired:  # paired_decode requests the first layers at its first step
            for layer, slot in prologue(n_tokens, num_layers, slots):
                self.weights.prefetch(layer, slot)
        schedule = (paired_decode if paired else zigzag)(n_tokens, num_layers, len(batches), slots)
        in_slot: dict[int, dict[str, torch.Tensor]] = {}  # slot -> materialized weights
        done_tokens = n_tokens
        timing = self.step_timing
        profiled = torch.autograd.profiler._is_profiler_enabled
        mark = time.perf_counter()
        for step in schedule:
            # the next step's activations come from this step when it is the same GPU batch (one batch per
            # block): request them after this step's compute, not before
            late_acts = step.next_step is not None and step.next_step[2] == step.batch
            if overlap:
                for layer, slot in step.prefetch:
                    self.weights.prefetch(layer, slot)
                if step.next_step is not None:
                    self._prefetch_inputs(batches, *step.next_step, acts=not late_acts)
            if step.materialize:
                in_slot[step.weight_slot] = self.weights.materialize(step.layer, step.weight_slot)
                if self.check_finite:
                    self._check_weights(step.layer, step.token, in_slot[step.weight_slot])
            # a profiler range costs ~5 us per step even with no profiler running: only name steps under one
            with (record_function(f"flexgen::step t{step.token} L{step.layer} b{step.batch}") if profiled
                  else contextlib.nullcontext()):
                self._compute(step.token, step.layer, step.batch, batches, index, in_slot[step.weight_slot], sampler,
                              n_tokens, slot=step.weight_slot)
                for slot in step.release:  # deferred attention steps still need their layer's weights
                    self._finish_deferred(slot)
            if overlap and late_acts:
                self._prefetch_inputs(batches, *step.next_step, cache=False)  # type: ignore[misc]
            if timing:
                self._sync()
                now = time.perf_counter()
                phase = stats.step_s.setdefault("prefill" if step.token == 0 else "decode", {})
                kind = self.plan.layer(step.layer).spec.kind.value
                phase[kind] = phase.get(kind, 0.0) + now - mark
                mark = now
            for slot in step.release:
                self.weights.release(slot)
            if step.last_batch and step.layer == num_layers - 1:
                if step.token == 0:
                    self._sync()
                    if self._cache is not None:
                        self._cache.check_values("prefill")
                    stats.prefill_s += time.perf_counter() - start
                    start = time.perf_counter()
                else:
                    stats.decode_steps += 1
                if any_stops and all(bool(b.finished.all()) for b in batches):
                    done_tokens = step.token + 1
                    break
        self._finish_deferred()  # after an early stop
        self._finish_block("decode")
        if n_tokens > 1:
            stats.decode_s += time.perf_counter() - start
        if self._cache is not None and any(self._cache.host_seconds.values()):
            for part, seconds in self._cache.host_seconds.items():
                stats.host_attention_s[part] = stats.host_attention_s.get(part, 0.0) + seconds
                self._cache.host_seconds[part] = 0.0
        return done_tokens

    def _paired_decode(self, num_batches: int, slots: int) -> bool:
        """Whether decode runs `paired_decode`'s order: CPU-delegated attention with overlap, two or more GPU
        batches, three weight slots and the [embed, (attention, MLP)..., head] layout."""
        if not (self.policy.overlap and self._cache is not None and self._cache.delegates and num_batches >= 2
                and slots >= 3):
            return False
        kinds = [lay.spec.kind for lay in self.plan.layers]
        body = kinds[1:-1]
        return (len(kinds) >= 4 and kinds[0] == LayerKind.EMBED and kinds[-1] == LayerKind.HEAD
                and body == [LayerKind.ATTN, LayerKind.MLP] * (len(body) // 2))

    def _finish_block(self, phase: str) -> None:
        """After a block's last step: wait for its copies, check the compressed cache's deferred flag (`phase`
        names where in the error), and let the cache and activations release the block's buffers."""
        self.transfer.synchronize()
        if self._cache is not None:
            self._cache.check_values(phase)
        for part in (self._cache, self._acts):
            if part is not None:
                part.finish_block()

    def _prefetch_inputs(self, batches: list[BatchState], token: int, layer: int, batch: int, cache: bool = True,
                         acts: bool = True) -> None:
        kind = self.plan.layer(layer).spec.kind
        b = batches[batch]
        if cache and kind == LayerKind.ATTN and token > 0 and self._cache is not None:
            self._cache.prefetch((layer - 1) // 2, batch, b.prompt_len + token - 1)
        if acts and kind != LayerKind.EMBED and self._acts is not None:
            width = b.prompt_len if token == 0 else 1
            if any(d.batch == batch for d in self._deferred):  # its input is still being computed
                self._acts_wanted[batch] = (b.rows, width)
            else:
                self._acts.prefetch(batch, b.rows, width)

    def _hidden_in(self, b: BatchState, batch: int, token: int) -> torch.Tensor:
        for item in [d for d in self._deferred if d.batch == batch]:  # its input is a deferred step's output
            self._deferred.remove(item)
            self._finish_attention(item)
        if self._acts is None:
            assert b.hidden is not None
            return b.hidden
        return self._acts.load(batch, b.rows, b.prompt_len if token == 0 else 1)

    def _check_weights(self, layer: int, token: int, w: dict[str, torch.Tensor]) -> None:
        bad = [name for name, x in w.items() if x.is_floating_point() and not bool(torch.isfinite(x).all())]
        if bad:
            kind = self.plan.layer(layer).spec.kind.value
            raise FloatingPointError(f"inf/NaN in the weights {bad} of layer {layer} ({kind}) as materialized for "
                                     f"token {token}")

    def _hidden_out(self, b: BatchState, batch: int, x: torch.Tensor, where: tuple[int, int] | None = None) -> None:
        """Store layer output x; `where` = (token, layer) names it for the `check_finite` diagnostic."""
        if self.check_finite and where is not None and not bool(torch.isfinite(x).all()):
            token, layer = where
            kind = self.plan.layer(layer).spec.kind.value
            finite = x[torch.isfinite(x)]
            largest = f"{finite.abs().max().item():.4g}" if finite.numel() else "none"
            raise FloatingPointError(f"inf/NaN in the output of layer {layer} ({kind}), GPU batch {batch}, token "
                                     f"{token} (largest finite |value| {largest}, dtype {x.dtype})")
        if self._acts is None:
            b.hidden = x
        else:
            self._acts.store(batch, x)
            b.hidden = None

    def _compute(self, token: int, layer: int, batch: int, batches: list[BatchState], index: list[list[int]],
                 w: dict[str, torch.Tensor], sampler: Sampler | None, n_tokens: int, slot: int) -> None:
        """One step. `slot` holds `w` (a deferred attention step keeps it until it is finished)."""
        spec, b = self.spec, batches[batch]
        kind = self.plan.layer(layer).spec.kind
        if kind == LayerKind.EMBED:
            if token == 0:
                x = layers.embed(w, b.ids, b.prefill_positions(), spec)
            else:
                x = layers.embed(w, b.last_tokens(token), b.decode_positions(token), spec)
            self._hidden_out(b, batch, x.to(self.dtype), (token, layer))
            return
        x = self._hidden_in(b, batch, token)
        if kind == LayerKind.ATTN:
            q, k, v = layers.qkv(w, x, spec)  # (rows, w, nh, d)
            block_idx = (layer - 1) // 2
            if token == 0:
                attn = layers.prefill_attention(q, k, v, b.valid[:, :b.prompt_len])
                if self._cache is not None and n_tokens > 1:
                    self._cache.store(block_idx, batch, 0, k.transpose(0, 1), v.transpose(0, 1))
            else:
                assert self._cache is not None
                t = b.prompt_len + token - 1
                pending = self._cache.begin_decode(block_idx, batch, q[:, 0], k[:, 0], v[:, 0], b.valid[:, :t + 1],
                                                   t, b.valid_host[:, :t + 1])
                earlier, self._deferred = self._deferred, []
                item = DeferredAttention(b, batch, x, w, slot, pending, (token, layer))
                if pending.on_host:  # finish it after the next GPU batch's attention has been issued
                    self._deferred.append(item)
                else:
                    self._finish_attention(item)
                for d in earlier:
                    self._finish_attention(d)
                return
            self._hidden_out(b, batch, layers.attention_output(w, x, attn, spec), (token, layer))
        elif kind == LayerKind.MLP:
            self._hidden_out(b, batch, layers.mlp(w, x, spec), (token, layer))
        elif sampler is not None:
            logits = layers.logits(w, x[:, -1:], spec)[:, 0]  # (rows, v)
            tokens, logp = sampler.sample(logits, index[batch])
            b.tokens[:, token] = tokens
            b.logprobs[:, token] = logp
            if b.top_ids is not None and b.top_logprobs is not None:
                values, ids = torch.log_softmax(logits, dim=-1).topk(b.top_ids.shape[-1], dim=-1)
                b.top_ids[:, token], b.top_logprobs[:, token] = ids, values
            b.finished |= (tokens[:, None] == b.stop_ids).any(dim=1)
        else:
            self._score_batch(w, x, b, batch)

    def _finish_attention(self, item: DeferredAttention) -> None:
        """Output projection of a decode attention step once its attention is complete."""
        attn = item.pending.result()[:, None]  # (rows, 1, nh, d)
        self._hidden_out(item.state, item.batch, layers.attention_output(item.weights, item.x, attn, self.spec),
                         item.where)
        wanted = self._acts_wanted.pop(item.batch, None)
        if wanted is not None and self._acts is not None:  # its next input could not be requested before
            self._acts.prefetch(item.batch, *wanted)

    def _finish_deferred(self, slot: int | None = None) -> None:
        """Finish the deferred attention steps whose weights are in `slot` (before it is released), or all."""
        done = [d for d in self._deferred if slot is None or d.slot == slot]
        self._deferred = [d for d in self._deferred if not (slot is None or d.slot == slot)]
        for item in done:
            self._finish_attention(item)

    def _score_batch(self, w: dict[str, torch.Tensor], x: torch.Tensor, b: BatchState, batch: int) -> None:
        targets = self._score_targets[batch]
        c_max = max(len(t) for t in targets)
        logp = torch.log_softmax(layers.logits(w, x[:, -(c_max + 1):-1], self.spec), dim=-1)  # (rows, c_max, v)
        greedy = logp.argmax(dim=-1).cpu()
        logp_cpu = logp.cpu()
        scores = []
        for r, cont in enumerate(targets):
            c = len(cont)
            pos = torch.arange(c_max - c, c_max)
            tok = torch.tensor(cont)
            lp = logp_cpu[r, pos, tok]
            scores.append(Score(float(lp.sum()), [float(v) for v in lp], bool((greedy[r, pos] == tok).all())))
        self._score_results[batch] = scores


def _generation(b: BatchState, r: int, steps: int, with_logprobs: bool) -> Generation:
    tokens = b.tokens[r, :steps].tolist()
    stops = {int(s) for s in b.stop_ids[r].tolist() if s >= 0}
    end, reason = len(tokens), "length"
    for n, tok in enumerate(tokens):
        if tok in stops:
            end, reason = n + 1, "stop"
            break
    logprobs = b.logprobs[r, :end].tolist() if with_logprobs else None
    top = None
    if b.top_ids is not None and b.top_logprobs is not None:
        ids, values = b.top_ids[r, :end].tolist(), b.top_logprobs[r, :end].tolist()
        top = [dict(zip(i, v, strict=True)) for i, v in zip(ids, values, strict=True)]
    return Generation(tokens[:end], reason, logprobs, top)
