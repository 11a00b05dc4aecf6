"""Choose a policy for a model on this machine: the profile, the budget the engine will enforce, the LP.

`choose_policy` is what `--policy auto` and the evaluation flow call. The hardware profile is a given file,
or this machine's, measured once and cached under `$FLEXGEN_CACHE_DIR` (default `~/.cache/flexgen`). The
memory budget is computed exactly as `Engine.from_pretrained` computes it (free memory, or the given
limits), less a safety margin, so the chosen policy passes the engine's own check.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path
from typing import Any

from flexgen_core.plan import MemoryBudget, Workload
from flexgen_core.planning.hardware import GIB, HardwareProfile, resolve_profile
from flexgen_core.planning.policy_search import SearchResult, search_policy
from flexgen_core.policy import Policy

DEFAULT_MARGIN = 0.05


def cache_dir() -> Path:
    return Path(os.environ.get("FLEXGEN_CACHE_DIR", Path.home() / ".cache" / "flexgen"))


def machine_profile(device: str, refresh: bool = False) -> HardwareProfile:
    """This machine's profile for `device` ("cuda"/"cpu"): measured once, then read from the cache."""
    path = cache_dir() / "profiles" / f"{platform.node() or 'machine'}-{device}.yaml"
    if path.is_file() and not refresh:
        return HardwareProfile.load(path)
    from flexgen_core.planning.probe import measure

    profile = measure(name=path.stem, device=device)
    profile.save(path)
    return profile


def _shrink(budget: MemoryBudget, margin: float) -> MemoryBudget:
    keep = 1.0 - margin
    return MemoryBudget(int(budget.gpu_bytes * keep), int(budget.cpu_bytes * keep), int(budget.disk_bytes * keep),
                        None if budget.host_bytes is None else int(budget.host_bytes * keep))


def choose_policy(model: str | Path, prompt_len: int, gen_len: int, *, device: str | None = None,
                  dummy: bool = False, dtype: Any = None, profile: str | Path | HardwareProfile | None = None,
                  offload_dir: str | Path | None = None, gpu_mem_gib: float | None = None,
                  cpu_mem_gib: float | None = None, disk_gib: float | None = None,
                  fixed: dict[str, Any] | None = None, margin: float = DEFAULT_MARGIN,
                  max_block_size: int | None = None) -> SearchResult:
    """The LP's best policy for `model` on this machine, for prompts up to `prompt_len` and `gen_len` new tokens."""
    import torch

    from flexgen_core.runtime import checkpoint as ckpt_io
    from flexgen_core.runtime.engine import default_device, memory_budget
    from flexgen_core.runtime.memory import OffloadDir

    if not 0 <= margin < 0.9:
        raise ValueError(f"memory margin must be a fraction in [0, 0.9), got {margin}")
    dev = torch.device(device) if device is not None else default_device()
    if isinstance(profile, HardwareProfile):
        prof = profile
    elif profile is not None:
        prof = resolve_profile(profile)
    else:
        prof = machine_profile(dev.type)
    if prof.device_type != dev.type:
        raise ValueError(f"profile {prof.name!r} describes a {prof.device_type} device but the engine runs on "
                         f"{dev.type}; pass a {dev.type} profile or omit --profile to measure this machine")
    spec = ckpt_io.resolve(model, dummy=dummy).spec
    dtype = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
    budget = _shrink(memory_budget(dev, OffloadDir(offload_dir), gpu_mem_gib, cpu_mem_gib, disk_gib), margin)
    return search_policy(spec, Workload(prompt_len, gen_len), prof, budget, fixed=fixed,
                         max_block_size=max_block_size, dtype_bytes=dtype.itemsize)


def auto_policy(args: argparse.Namespace, prompt_len: int, gen_len: int, fixed: dict[str, Any]) -> Policy:
    """`--policy auto` for `flexgen generate` / `flexgen bench`: prints the choice to stderr."""
    import sys

    import torch

    result = choose_policy(args.model, prompt_len, gen_len, device=args.device, dummy=args.dummy,
                           dtype=getattr(torch, args.dtype) if args.dtype else None,
                           profile=getattr(args, "profile", None), offload_dir=args.offload_dir,
                           gpu_mem_gib=args.gpu_mem_gib, cpu_mem_gib=args.cpu_mem_gib, disk_gib=args.disk_gib,
                           fixed=fixed, margin=getattr(args, "memory_margin", DEFAULT_MARGIN))
    e, b = result.estimate, result.budget
    fits = "" if b is None else (f"; budget gpu {b.gpu_bytes / GIB:.1f} GiB, cpu {b.cpu_bytes / GIB:.1f} GiB, "
                                 f"disk {b.disk_bytes / GIB:.1f} GiB")
    print(f"auto policy: {result.policy.describe()} (predicted {e.throughput_tok_s:.2f} tok/s; "
          f"{result.lp_solves} LP solves with {result.solver} in {result.elapsed_s:.1f} s{fits})", file=sys.stderr)
    args.auto_estimate = e
    return result.policy
