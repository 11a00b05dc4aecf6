"""`flexgen profile` (measure this machine) and `flexgen policy` (LP policy search or evaluation)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from flexgen_core.plan import MemoryBudget, Workload
from flexgen_core.planning.hardware import GIB, resolve_profile

FULL_POLICY = ("gpu_batch_size", "num_gpu_batches", "weights", "cache", "acts")


def cmd_profile(args: argparse.Namespace) -> int:
    from flexgen_core.planning.probe import measure

    profile = measure(name=args.name, device=args.device, offload_dir=args.offload_dir,
                      log=lambda line: print(line, file=sys.stderr))
    if args.out:
        print(f"wrote {profile.save(args.out)}", file=sys.stderr)
    import yaml

    print(yaml.safe_dump(profile.to_dict(), sort_keys=False), end="")
    return 0


def policy_budget(args: argparse.Namespace, profile: Any) -> MemoryBudget:
    """The profile's capacities, overridden by --gpu-mem-gib / --cpu-mem-gib / --disk-gib, less the margin."""
    keep = 1.0 - args.memory_margin
    gpu = args.gpu_mem_gib if args.gpu_mem_gib is not None else profile.gpu_memory_gib
    cpu = args.cpu_mem_gib if args.cpu_mem_gib is not None else profile.cpu_memory_gib
    disk = args.disk_gib if args.disk_gib is not None else profile.disk_gib
    host = cpu if profile.device_type == "cpu" else None
    return MemoryBudget(int(gpu * GIB * keep), int(cpu * GIB * keep), int(disk * GIB * keep),
                        None if host is None else int(host * GIB * keep))


def cmd_policy(args: argparse.Namespace) -> int:
    from flexgen_core.cli import fixed_policy_fields
    from flexgen_core.planning.cost_model import estimate
    from flexgen_core.planning.policy_search import search_policy
    from flexgen_core.policy import Policy
    from flexgen_core.runtime import checkpoint as ckpt_io

    profile = resolve_profile(args.profile)
    spec = ckpt_io.resolve(args.model, dummy=True).spec
    workload = Workload(args.prompt_len, args.gen_len)
    fixed = fixed_policy_fields(args)
    budget = policy_budget(args, profile)
    db = 4 if args.dtype == "float32" or (args.dtype is None and profile.device_type == "cpu") else 2
    if all(f in fixed for f in FULL_POLICY):
        from flexgen_core.plan import PlanDoesNotFit, build_plan

        policy = Policy(**fixed)
        result: dict[str, Any] = estimate(spec, policy, workload, profile, db).to_dict()
        result["search"] = None
        try:
            build_plan(spec, policy, workload, db, profile.device_type).check(budget)
            result["fits"] = True
        except PlanDoesNotFit as exc:
            result["fits"] = False
            print(f"warning: this policy does not fit the budget: {exc}", file=sys.stderr)
    else:
        found = search_policy(spec, workload, profile, budget, fixed=fixed, dtype_bytes=db,
                              log=(lambda m: print(m, file=sys.stderr)) if args.verbose else None)
        result = found.to_dict()
    if args.json:
        print(json.dumps(result))
        return 0
    print(format_policy(result, spec.name, profile.name, workload))
    return 0


def format_policy(r: dict[str, Any], model: str, profile: str, w: Workload) -> str:
    from flexgen_core.cli import fmt_bytes
    from flexgen_core.policy import Policy

    pol = Policy.from_dict(r["policy"])
    p = r["predicted"]
    lines = [
        f"model {model}  profile {profile}  prompt {w.prompt_len}  gen {w.gen_len}",
        f"policy  {pol.describe()}  (block {pol.block_size})",
        f"  --gpu-batch-size {pol.gpu_batch_size} --num-gpu-batches {pol.num_gpu_batches} "
        f"--weights {','.join(f'{x:g}' for x in pol.weights)} --cache {','.join(f'{x:g}' for x in pol.cache)} "
        f"--acts {','.join(f'{x:g}' for x in pol.acts)}"
        + "".join(f" --{f.replace('_', '-')}" for f in ("cpu_attention", "compress_weights", "compress_cache")
                  if getattr(pol, f)),
        f"predicted: prefill {p['prefill_s']:.2f} s, decode {p['decode_s']:.2f} s, total {p['total_s']:.2f} s, "
        f"{p['throughput_tok_s']:.2f} tokens/s (decode {p['decode_tok_s']:.2f}; I/O-or-compute bound "
        f"{p['bound_tok_s']:.2f})",
        "peak bytes: " + ", ".join(f"{t} {fmt_bytes(b)}" for t, b in r["peak_bytes"].items()),
        "per-layer terms (seconds per layer step, all GPU batches):",
        f"  {'phase':8s} {'layer':6s} {'h2d':>8s} {'d2h':>8s} {'disk rd':>8s} {'disk wr':>8s} {'device':>8s} "
        f"{'cpu attn':>8s} {'overhead':>8s} {'step':>8s}",
    ]
    for phase, kinds in r["breakdown"].items():
        for kind, t in kinds.items():
            lines.append(f"  {phase:8s} {kind:6s} " + " ".join(
                f"{t[k]:8.4f}" for k in ("h2d", "d2h", "disk_read", "disk_write", "device", "cpu_attention",
                                         "overhead", "step")))
    return "\n".join(lines)


def register(sub: Any) -> None:
    from flexgen_core.cli import add_policy_flags

    pr = sub.add_parser("profile", help="measure this machine's bandwidths and compute rates (under 2 minutes)")
    pr.add_argument("--out", default=None, help="write the profile YAML here (e.g. profiles/mybox.yaml)")
    pr.add_argument("--name", default=None, help="profile name (default: the host name)")
    pr.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    pr.add_argument("--offload-dir", default=None, help="directory on the disk to measure (default: a temp dir)")
    pr.set_defaults(func=cmd_profile)

    po = sub.add_parser("policy", help="search the best policy with the LP (or evaluate a fully given one)")
    po.add_argument("--model", required=True, help="built-in size (opt-30b), checkpoint directory or cached name")
    po.add_argument("--profile", required=True, help="hardware profile: a YAML path or a name in profiles/")
    po.add_argument("--prompt-len", type=int, default=512)
    po.add_argument("--gen-len", type=int, default=32)
    po.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"])
    po.add_argument("--gpu-mem-gib", type=float, default=None, help="GPU budget (default: the profile's)")
    po.add_argument("--cpu-mem-gib", type=float, default=None, help="CPU RAM budget (default: the profile's)")
    po.add_argument("--disk-gib", type=float, default=None, help="disk budget (default: the profile's)")
    po.add_argument("--memory-margin", type=float, default=0.05, help="fraction of each budget kept free")
    po.add_argument("--json", action="store_true", help="print one JSON object")
    po.add_argument("--verbose", action="store_true", help="log every LP solve")
    add_policy_flags(po)
    po.set_defaults(func=cmd_policy)
