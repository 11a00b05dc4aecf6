"""Measure the machine this runs on and return a `HardwareProfile` (behind `flexgen profile`).

Every rate is measured through the engine's own code paths where one exists: disk reads through
`DiskArena` (O_DIRECT when the file system allows it, else after dropping the written pages), decode
attention through `layers.decode_attention`, dequantization through `quant.dequantize_moved`, the step
overhead through a tiny `Engine`. Each measurement is the median of a few repetitions after a warm-up.
On a CPU-only machine the "device" is the CPU and host<->device copies are memory copies. Sizes are chosen
so the whole probe takes well under two minutes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import torch

from flexgen_core.planning.hardware import GB, GIB, HardwareProfile
from flexgen_core.policy import Policy
from flexgen_core.spec import ModelSpec


def _median_time(fn: Callable[[], object], sync: Callable[[], None], reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _Prober:
    def __init__(self, device: torch.device, offload_dir: Path, quick: bool) -> None:
        self.device, self.offload_dir, self.quick = device, offload_dir, quick
        self.cuda = device.type == "cuda"
        self.dtype = torch.float16 if self.cuda else torch.float32
        self.log: list[str] = []
        self._overheads: dict[str, float] | None = None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[[], object], reps: int = 5) -> float:
        return _median_time(fn, self.sync, reps)

    # ---- links ---------------------------------------------------------------------------------
    def copy_gbps(self, to_device: bool, pinned: bool) -> float:
        nbytes = (512 << 20) if self.cuda else (64 << 20 if self.quick else 256 << 20)
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned and self.cuda)
        host.fill_(1)
        dev = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        dst, src = (dev, host) if to_device else (host, dev)
        t = self.timed(lambda: dst.copy_(src, non_blocking=pinned and self.cuda))
        return nbytes / t / GB

    def disk_gbps(self) -> tuple[float, float, str]:
        from flexgen_core.runtime.memory import DiskArena, HostArena, OffloadDir

        total = (1 << 30) if self.cuda else (32 << 20 if self.quick else 512 << 20)
        chunk = (16 << 20) if self.quick else (64 << 20)
        offload = OffloadDir(self.offload_dir)
        try:
            arena = DiskArena(offload, "probe", total)
            src = HostArena(chunk, pin=False, name="probe.src")
            src.buffer.random_()
            start = time.perf_counter()
            for off in range(0, total, chunk):
                arena.write(off, src.buffer)
            arena.finish_writes()  # fsync + drop the written pages from the page cache
            write = total / (time.perf_counter() - start) / GB
            dst = HostArena(chunk, pin=self.cuda, name="probe.dst")
            start = time.perf_counter()
            for off in range(0, total, chunk):
                arena.read_into(off, dst.buffer)
            read = total / (time.perf_counter() - start) / GB
            state = "bypassed" if arena.direct else "dropped"
            arena.close()
            dst.close()
            return read, write, state
        finally:
            offload.close()

    # ---- compute -------------------------------------------------------------------------------
    def matmul_tflops(self) -> float:
        n = 8192 if self.cuda else (768 if self.quick else 1536)
        a = torch.randn(n, n, dtype=self.dtype, device=self.device)
        b = torch.randn(n, n, dtype=self.dtype, device=self.device)
        t = self.timed(lambda: a @ b, reps=10 if self.cuda else 3)
        return 2 * n ** 3 / t / 1e12

    def bmm_tflops(self) -> float:
        from flexgen_core.runtime import layers

        b, s, nh, d = (8, 512, 32, 128) if self.cuda else (2, 128 if self.quick else 256, 4, 64)
        q, k, v = (torch.randn(b, s, nh, d, dtype=self.dtype, device=self.device) for _ in range(3))
        valid = torch.ones(b, s, dtype=torch.bool, device=self.device)
        t = self.timed(lambda: layers.prefill_attention(q, k, v, valid), reps=5)
        return 4 * b * s * s * nh * d / t / 1e12

    def device_memory_gbps(self) -> float:
        """Effective bandwidth of memory-bound kernels: weight bytes read per second by a decode-shaped
        linear layer (a few rows times a large matrix), which is what decode steps are made of."""
        import torch.nn.functional as F

        rows, out_f, in_f = (16, 16384, 8192) if self.cuda else (8, 16384 if self.quick else 32768, 1024)
        w = torch.randn(out_f, in_f, dtype=self.dtype, device=self.device)
        x = torch.randn(rows, in_f, dtype=self.dtype, device=self.device)
        t = self.timed(lambda: F.linear(x, w), reps=10)
        return w.numel() * w.element_size() / t / GB

    def elementwise_gbps(self) -> float:
        """Bytes/s of the memory-bound work around the matmuls, timed on what a layer does: a LayerNorm and
        a (batch, seq, heads, head_dim) -> (batch, heads, seq, head_dim) copy of a prefill activation."""
        import torch.nn.functional as F

        b, s, nh, d = (64, 512, 32, 128) if self.cuda else ((8 if self.quick else 64), 512, 8, 64)
        x = torch.randn(b, s, nh * d, dtype=self.dtype, device=self.device)

        def work() -> None:
            F.layer_norm(x, (nh * d,))  # read + write
            x.view(b, s, nh, d).transpose(1, 2).contiguous()  # read + write

        t = self.timed(work, reps=5)
        return 4 * x.numel() * x.element_size() / t / GB

    def dequant_gelems(self, on_cpu: bool = False) -> float:
        """4-bit dequantization rate (output elements/s) on the device, or on the CPU into fp32 as the
        delegated attention over a compressed cache does."""
        from flexgen_core.quant import dequantize_moved, quantize

        device = torch.device("cpu") if on_cpu else self.device
        big = self.cuda and not on_cpu
        rows, cols = (8192, 8192) if big else (512, 1024)
        out_dtype = torch.float32 if on_cpu else self.dtype
        w = torch.randn(rows, cols, dtype=self.dtype, device=device)
        packed = quantize(w, 4, 64, dim=0)
        out = torch.empty(cols, rows, dtype=out_dtype, device=device)
        sync = self.sync if big else (lambda: None)
        t = _median_time(lambda: dequantize_moved(packed, out_dtype, out=out), sync, reps=5)
        return rows * cols / t / 1e9

    def cpu_attention_gflops(self) -> float:
        from flexgen_core.runtime import layers
        from flexgen_core.runtime.kernels import native_module
        from flexgen_core.runtime.kv_cache import CPU_CHUNK

        # build the native kernel first (tens of seconds the first time on a machine), so the timing measures
        # the path the engine will run, and say which one it was
        self.cpu_attention_path = "native kernel" if native_module() is not None else "torch fallback (no compiler)"

        b, nh, t_len, d = (16, 32, 544, 128) if self.cuda else (4, 8, 128 if self.quick else 512, 64)
        cache_dtype = self.dtype  # the engine keeps the CPU cache in its compute dtype
        k = torch.randn(t_len, b, nh, d).to(cache_dtype)
        v = torch.randn(t_len, b, nh, d).to(cache_dtype)
        q = torch.randn(b, nh, d).to(cache_dtype)
        valid = torch.ones(b, t_len, dtype=torch.bool)
        t = _median_time(lambda: layers.host_decode_attention(q, k, v, valid, chunk=CPU_CHUNK), lambda: None, 5)
        return 4 * b * nh * t_len * d / t / 1e9

    def step_overheads_us(self) -> dict[str, float]:
        """Host microseconds per decode step of a tiny all-resident model, where compute is negligible, by
        layer kind ("attn", "mlp", "embed", "head"), with a sync after every step (which costs nothing when
        the host is the bottleneck), and "other": the mean over the non-attention steps of a token."""
        if self._overheads is None:
            self._overheads = self._tiny_steps_us(Policy(1, 2))
        return self._overheads

    def disk_acts_step_us(self) -> float:
        """Microseconds a prefill layer step of one GPU batch gains when half its sequences' activations are on
        disk (the tiny model of `step_overheads_us`, attention and MLP steps, against the same policy with them
        in RAM). Decode keeps those rows' states in RAM, so only prefill pays it."""
        gains = []
        for _ in range(3):  # disk latency is noisy: the median of three pairs
            ram = self._tiny_steps_us(Policy(2, 2, acts=(0, 1, 0)), phase="prefill")
            disk = self._tiny_steps_us(Policy(2, 2, acts=(0, 0.5, 0.5)), phase="prefill")
            gains.append(sum(disk[k] - ram[k] for k in ("attn", "mlp")) / 2)
        return max(0.0, statistics.median(gains))

    @contextlib.contextmanager
    def _engine(self, spec: ModelSpec, policy: Policy) -> Iterator[Any]:
        """An engine over a dummy-weight model of `spec`, with its offload files in the probe's directory."""
        from flexgen_core.runtime.checkpoint import Checkpoint
        from flexgen_core.runtime.engine import Engine, memory_budget
        from flexgen_core.runtime.memory import OffloadDir

        ckpt = Checkpoint(spec.name, spec, None, (), "probe")
        offload = OffloadDir(self.offload_dir)
        budget = memory_budget(self.device, offload, None, None)
        with Engine(ckpt, policy, self.device, self.dtype, offload, budget, dummy=True) as engine:
            yield engine

    def _tiny_engine(self, policy: Policy) -> contextlib.AbstractContextManager[Any]:
        """An engine over a tiny dummy model (4 blocks, hidden 64), where every step's compute is negligible."""
        spec = ModelSpec(name="probe-tiny", num_layers=4, hidden_size=64, ffn_dim=128, num_heads=2, vocab_size=128,
                         max_positions=64, word_embed_dim=64)
        return self._engine(spec, policy)

    def _tiny_steps_us(self, policy: Policy, phase: str = "decode") -> dict[str, float]:
        """Microseconds per step of each layer kind of a tiny model, in `phase` ("decode" or "prefill")."""
        batches = policy.num_gpu_batches
        with self._tiny_engine(policy) as engine:
            spec = engine.spec
            prompts = [[5, 6, 7, 8]] * policy.block_size
            engine.generate(prompts, 4)  # warm-up
            engine.step_timing = True
            if phase == "decode":
                engine.generate(prompts, 16)
                per_kind, passes = engine.last_stats.step_s["decode"], engine.last_stats.decode_steps
            else:  # prefill runs once per call: sum several calls
                per_kind, passes = {}, 8
                for _ in range(passes):
                    engine.generate(prompts, 1)
                    for kind, seconds in engine.last_stats.step_s["prefill"].items():
                        per_kind[kind] = per_kind.get(kind, 0.0) + seconds
        counts = spec.steps_per_token
        result = {kind.value: per_kind[kind] / (passes * batches * n) * 1e6 for kind, n in counts.items()}
        others = [k for k in counts if k != "attn"]
        result["other"] = sum(result[k] * counts[k] for k in others) / sum(counts[k] for k in others)
        return result

    def delegated_batch_costs_us(self) -> dict[str, float]:
        """Host microseconds per GPU batch of CPU-delegated decode as the engine pipelines it (`paired_decode`),
        the profile's `delegated_issue_us`, `delegated_job_us` and `delegated_latency_us`. Measured the way visit 11
        fitted them on OPT-30B (benchmarks/NOTES.md): two runs of a mid-size model over the same block and cache
        bytes, split into many small GPU batches and into two large ones, with weights, cache and activations in
        host RAM. "issue": the main thread's busy time (decode less its waits for host results) per GPU batch and
        (attention, MLP) pair, many-batch run; "job": the attention thread's extra compute per extra job; "latency":
        what makes the model's chain bound, (issue + job time + latency) / 2 per batch, equal the many-batch run's
        decode. On the H100 it read 2666/1171/1667 and 2611/1236/1636 us where OPT-30B's runs fitted 2680/830/2800,
        enough for the search to pick what measured best there (a tiny model with one sequence per batch read the
        issue and job costs 1.5-2x low and no latency)."""
        spec = ModelSpec(name="probe-mid", num_layers=4, hidden_size=1024, ffn_dim=4096, num_heads=8, vocab_size=128,
                         max_positions=512, word_embed_dim=1024)
        prompt, gen, repeats = (32, 4, 1) if self.quick else (128, 16, 3)
        shapes = {"many": Policy(4, 12, weights=(0, 1, 0), cache=(0, 1, 0), acts=(0, 1, 0), cpu_attention=True),
                  "few": Policy(24, 2, weights=(0, 1, 0), cache=(0, 1, 0), acts=(0, 1, 0), cpu_attention=True)}
        with self._engine(spec, shapes["many"]) as many, self._engine(spec, shapes["few"]) as few:
            engines = {"many": many, "few": few}
            prompts = [[5 + i % 100 for i in range(prompt)]] * 48  # block 48 both ways
            for engine in engines.values():
                engine.generate(prompts, 3)  # warm-up
            estimates = []
            for _ in range(repeats):  # alternating, the median of each: the job cost is a small difference
                per_job = {}
                for name, engine in engines.items():
                    engine.generate(prompts, gen)
                    st = engine.last_stats
                    jobs = st.decode_steps * spec.num_layers * engine.policy.num_gpu_batches
                    per_job[name] = (st.decode_s / jobs, st.host_attention_s.get("compute", 0.0) / jobs,
                                     st.host_attention_s.get("wait", 0.0) / jobs, jobs)
                step, compute, wait, jobs = per_job["many"]
                few_compute, few_jobs = per_job["few"][1], per_job["few"][3]
                issue = step - wait
                # the same cache bytes over `jobs` and `few_jobs` jobs: the kernel's share cancels
                job = (compute * jobs - few_compute * few_jobs) / (jobs - few_jobs)
                estimates.append((issue, job, 2 * step - issue - compute))
        issue, job, latency = (statistics.median(e[i] for e in estimates) * 1e6 for i in range(3))
        return {"issue": max(1.0, issue), "job": max(1.0, job), "latency": max(1.0, latency)}

    def step_overhead_us(self) -> float:
        """The profile's `step_overhead_us`: the mean host cost of a step of a layer other than attention."""
        return self.step_overheads_us()["other"]

    def attn_step_overhead_us(self) -> float:
        return self.step_overheads_us()["attn"]


def measure_step_overheads(device: str | torch.device, offload_dir: str | Path) -> dict[str, float]:
    """Only the step overheads of `measure` (see `_Prober.step_overheads_us`), in microseconds."""
    return _Prober(torch.device(device), Path(offload_dir), quick=False).step_overheads_us()


def measure_delegated_batch_costs(device: str | torch.device, offload_dir: str | Path) -> dict[str, float]:
    """Only the delegated per-batch costs of `measure` (`_Prober.delegated_batch_costs_us`)."""
    return _Prober(torch.device(device), Path(offload_dir), quick=False).delegated_batch_costs_us()


def measure_disk_acts_step(device: str | torch.device, offload_dir: str | Path) -> float:
    """Only `disk_acts_step_us` of `measure` (see `_Prober.disk_acts_step_us`), with offload files in `offload_dir`."""
    return _Prober(torch.device(device), Path(offload_dir), quick=False).disk_acts_step_us()


def measure(name: str | None = None, device: str | torch.device | None = None, offload_dir: str | Path | None = None,
            quick: bool = False, log: Callable[[str], None] | None = None) -> HardwareProfile:
    """Measure this machine. `quick` uses smaller sizes (for tests); the full probe stays under two minutes."""
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    say = log or (lambda _msg: None)
    tmp = tempfile.TemporaryDirectory(prefix="flexgen-probe-") if offload_dir is None else None
    root = Path(offload_dir) if offload_dir is not None else Path(tmp.name)  # type: ignore[union-attr]
    p = _Prober(dev, root, quick)
    try:
        results: dict[str, float] = {}
        steps: list[tuple[str, Callable[[], float]]] = [
            ("h2d_pinned_gbps", lambda: p.copy_gbps(True, True)),
            ("h2d_pageable_gbps", lambda: p.copy_gbps(True, False) if p.cuda else results["h2d_pinned_gbps"]),
            ("d2h_pinned_gbps", lambda: p.copy_gbps(False, True)),
            ("d2h_pageable_gbps", lambda: p.copy_gbps(False, False) if p.cuda else results["d2h_pinned_gbps"]),
            ("device_matmul_tflops", p.matmul_tflops),
            ("device_bmm_tflops", p.bmm_tflops),
            ("device_memory_gbps", p.device_memory_gbps),
            ("device_elementwise_gbps", p.elementwise_gbps),
            ("device_dequant_gelems_per_s", p.dequant_gelems),
            ("cpu_attention_gflops", p.cpu_attention_gflops),
            ("cpu_dequant_gelems_per_s", lambda: p.dequant_gelems(on_cpu=True)),
            ("step_overhead_us", p.step_overhead_us),
            ("attn_step_overhead_us", p.attn_step_overhead_us),
            ("disk_acts_step_us", p.disk_acts_step_us),
        ]
        if p.cuda:  # the cost model credits CPU-delegated decode's pipeline on CUDA only
            delegated = functools.cache(p.delegated_batch_costs_us)
            steps += [("delegated_issue_us", lambda: delegated()["issue"]),
                      ("delegated_job_us", lambda: delegated()["job"]),
                      ("delegated_latency_us", lambda: delegated()["latency"])]
        for key, fn in steps:
            start = time.perf_counter()
            results[key] = float(fn())
            say(f"{key:28s} {results[key]:12.3f}   ({time.perf_counter() - start:.1f} s)")
        start = time.perf_counter()
        read, write, state = p.disk_gbps()
        say(f"{'disk_read_gbps':28s} {read:12.3f}   ({time.perf_counter() - start:.1f} s, page cache {state})")
        say(f"{'disk_write_gbps':28s} {write:12.3f}")
        if p.cuda:
            gpu_total = torch.cuda.get_device_properties(dev).total_memory / GIB
            device_name = torch.cuda.get_device_name(dev)
        else:
            gpu_total = psutil.virtual_memory().total / GIB
            device_name = f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"
        disk_free = psutil.disk_usage(str(root)).free / GIB
        return HardwareProfile(
            name=name or platform.node() or "this-machine", device_type=dev.type, device_name=device_name,
            gpu_memory_gib=round(gpu_total, 2), cpu_memory_gib=round(psutil.virtual_memory().total / GIB, 2),
            disk_gib=round(disk_free, 1), disk_read_gbps=round(read, 3), disk_write_gbps=round(write, 3),
            disk_page_cache=state, notes=f"measured by flexgen profile on {time.strftime('%Y-%m-%d')}, "
                                         f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
                                         f"CPU attention: {getattr(p, 'cpu_attention_path', 'unknown')}",
            **{k: round(v, 3) for k, v in results.items()})
    finally:
        if tmp is not None:
            tmp.cleanup()
