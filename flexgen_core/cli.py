"""The `flexgen` command: generate, bench (and the planning and evaluation subcommands).

    flexgen generate --model DIR --prompt "Hello" --max-new-tokens 16
    flexgen bench --model opt-30b --dummy --prompt-len 512 --gen-len 32 --gpu-batch-size 48 \\
        --num-gpu-batches 4 --weights 0.2,0.8,0 --cache 0,1,0 --acts 0,1,0 --gpu-mem-gib 16
    flexgen bench --nproc 2 ...        (pipeline over 2 processes, one per GPU; spawns torchrun)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flexgen_core.plan import GIB
from flexgen_core.policy import TIERS, Policy, PolicyError


def parse_split(text: str) -> tuple[float, float, float]:
    """'0.2,0.8,0' -> (0.2, 0.8, 0.0) (gpu, cpu, disk fractions)."""
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected fractions like 0.2,0.8,0, got {text!r}") from exc
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three fractions (gpu,cpu,disk), got {text!r}")
    return parts  # type: ignore[return-value]


def add_policy_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("policy (fractions are 0..1: gpu,cpu,disk)")
    g.add_argument("--policy", default=None, help="'auto' to search the policy with the LP, or a policy JSON file")
    g.add_argument("--gpu-batch-size", type=int, default=None)
    g.add_argument("--num-gpu-batches", type=int, default=None)
    g.add_argument("--weights", type=parse_split, default=None, help="weight placement, e.g. 0.2,0.8,0")
    g.add_argument("--cache", type=parse_split, default=None, help="KV cache placement, e.g. 0,1,0")
    g.add_argument("--acts", type=parse_split, default=None, help="activation placement, e.g. 1,0,0")
    g.add_argument("--cpu-attention", action="store_true", default=None, help="delegate decode attention to the CPU")
    g.add_argument("--no-cpu-attention", dest="cpu_attention", action="store_false", default=None,
                   help="keep decode attention on the compute device (fixes the field for --policy auto)")
    g.add_argument("--compress-weights", action="store_true", default=None, help="4-bit group-wise weights")
    g.add_argument("--compress-cache", action="store_true", default=None, help="4-bit group-wise KV cache")
    g.add_argument("--attn-topk", type=float, default=None, help="fraction of past positions kept (sparse V)")
    g.add_argument("--no-overlap", dest="overlap", action="store_false", default=None)
    g.add_argument("--no-pin-weights", dest="pin_weights", action="store_false", default=None)


def add_auto_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("automatic policy (--policy auto)")
    g.add_argument("--profile", default=None,
                   help="hardware profile YAML or name in profiles/ (default: measure this machine once, cached)")
    g.add_argument("--memory-margin", type=float, default=0.05, help="fraction of each memory budget kept free")


POLICY_FIELDS = ("gpu_batch_size", "num_gpu_batches", "weights", "cache", "acts", "cpu_attention",
                 "compress_weights", "compress_cache", "attn_topk", "overlap", "pin_weights")


def fixed_policy_fields(args: argparse.Namespace) -> dict[str, Any]:
    """Policy fields given on the command line."""
    return {f: getattr(args, f) for f in POLICY_FIELDS if getattr(args, f, None) is not None}


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory, cached hub name, or built-in size")
    p.add_argument("--dummy", action="store_true", help="random weights (no checkpoint needed for built-in sizes)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"])
    p.add_argument("--offload-dir", default=None, help="directory for disk-tier files (default: a temp dir)")
    p.add_argument("--gpu-mem-gib", type=float, default=None, help="compute-device memory budget")
    p.add_argument("--cpu-mem-gib", type=float, default=None, help="CPU RAM budget")
    p.add_argument("--disk-gib", type=float, default=None, help="disk budget in the offload directory")
    p.add_argument("--seed", type=int, default=0)


def build_engine(args: argparse.Namespace, prompt_len: int, gen_len: int) -> Any:
    import torch

    from flexgen_core.runtime.engine import Engine

    if getattr(args, "nproc", 1) > 1:
        return build_pipeline_engine(args, prompt_len, gen_len)

    policy = resolve_policy(args, prompt_len, gen_len)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return Engine.from_pretrained(args.model, policy=policy, device=args.device, offload_dir=args.offload_dir,
                                  dummy=args.dummy, dtype=dtype, gpu_mem_gib=args.gpu_mem_gib,
                                  cpu_mem_gib=args.cpu_mem_gib, disk_gib=args.disk_gib, seed=args.seed)


def build_pipeline_engine(args: argparse.Namespace, prompt_len: int, gen_len: int) -> Any:
    """This rank's stage (run under torchrun with WORLD_SIZE = --nproc); the budgets are per rank."""
    import torch

    from flexgen_core.pipeline_plan import AutoPolicy
    from flexgen_core.plan import Workload
    from flexgen_core.runtime.pipeline import PipelineEngine

    world = int(os.environ.get("WORLD_SIZE", "0"))
    if world != args.nproc:
        raise ValueError(f"--nproc {args.nproc} but WORLD_SIZE is {world or 'not set'}: run `flexgen bench --nproc N` "
                         "(it starts the ranks) or `torchrun --nproc-per-node N -m flexgen_core.cli bench --nproc N`")
    fixed = fixed_policy_fields(args)
    if args.policy == "auto":
        policy: Any = AutoPolicy(Workload(prompt_len, gen_len), getattr(args, "profile", None), fixed,
                                 getattr(args, "memory_margin", 0.05))
    elif args.policy:
        data = json.loads(Path(args.policy).read_text())
        policy = Policy.from_dict(data.get("policy", data)).with_(**fixed)
    else:
        policy = Policy(**fixed)
    return PipelineEngine.from_pretrained(
        args.model, policy=policy, device=args.device, offload_dir=args.offload_dir, dummy=args.dummy,
        dtype=getattr(torch, args.dtype) if args.dtype else None, gpu_mem_gib=args.gpu_mem_gib,
        cpu_mem_gib=args.cpu_mem_gib, disk_gib=args.disk_gib, seed=args.seed, micro_batches=args.micro_batches,
        timeout_s=args.timeout_s)


def launch_ranks(nproc: int, argv: Sequence[str]) -> int:
    """Run this command as `nproc` ranks under torchrun on this machine (rank 0 prints)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "--", "flexgen_core.cli", *argv]  # "--": torchrun must not parse our --nproc
    return subprocess.run(cmd, check=False).returncode


def resolve_policy(args: argparse.Namespace, prompt_len: int, gen_len: int) -> Policy:
    fixed = fixed_policy_fields(args)
    if args.policy == "auto":
        from flexgen_core.planning.auto import auto_policy

        return auto_policy(args, prompt_len, gen_len, fixed)
    if args.policy:
        data = json.loads(Path(args.policy).read_text())
        base = Policy.from_dict(data.get("policy", data))
        return base.with_(**fixed)
    return Policy(**fixed)


# ---------------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    tokenizer = None
    if args.prompt is not None:
        tokenizer = load_tokenizer(args.model)
        prompts = [tokenizer.encode(p).ids for p in args.prompt]
    else:
        prompts = [[int(t) for t in p.split(",") if t.strip()] for p in args.prompt_ids]
    max_len = max(len(p) for p in prompts)
    with build_engine(args, max_len, args.max_new_tokens) as engine:
        gens = engine.generate(prompts, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                               seed=args.seed, stop_token_ids=args.stop_ids or (), return_logprobs=args.logprobs)
    for n, g in enumerate(gens):
        row: dict[str, Any] = {"prompt": n, "token_ids": g.token_ids, "finish_reason": g.finish_reason}
        if g.logprobs is not None:
            row["logprobs"] = [round(x, 5) for x in g.logprobs]
        if tokenizer is not None:
            row["text"] = tokenizer.decode(g.token_ids)
        print(json.dumps(row))
    return 0


def load_tokenizer(model: str) -> Any:
    from tokenizers import Tokenizer

    path = Path(model) / "tokenizer.json"
    if not path.is_file():
        raise SystemExit(f"--prompt needs a tokenizer: {path} does not exist; pass token ids with --prompt-ids")
    return Tokenizer.from_file(str(path))


def cmd_bench(args: argparse.Namespace) -> int:
    from flexgen_core.bench import run_bench

    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return launch_ranks(args.nproc, args.argv)
    result = run_bench(args)
    if result.get("rank", 0) != 0:
        return 0
    if args.json:
        print(json.dumps(result))
        return 0
    print(format_bench(result))
    return 0


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_bench(r: dict[str, Any]) -> str:
    lines = [
        f"model {r['model']}  policy {r['policy_str']}  block {r['block_size']}  prompt {r['prompt_len']}  "
        f"gen {r['gen_len']}  device {r['device']}",
        f"prefill   {r['prefill_s']:9.3f} s   {r['prefill_tok_s']:10.1f} prompt tokens/s",
        f"decode    {r['decode_s']:9.3f} s   {r['decode_tok_s']:10.2f} tokens/s",
        f"total     {r['total_s']:9.3f} s   {r['total_tok_s']:10.2f} tokens/s (generation throughput)",
        "peak memory: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in r["peak_bytes"].items()),
        ("planned bytes per tier (all stages): " if r.get("stages") else "planned bytes per tier: ")
        + ", ".join(f"{t} {fmt_bytes(r['plan_bytes'][t])}" for t in ("gpu", "cpu", "disk")),
        "weights placed: " + ", ".join(f"{t.value} {fmt_bytes(r['weight_bytes'][t.value])} "
                                       f"({r['weight_fractions'][i]:.1%})" for i, t in enumerate(TIERS)),
        f"disk reads bypass the page cache: {r['disk_direct']}",
    ]
    if r.get("nonfinite_logprobs"):
        lines.append(f"WARNING: {r['nonfinite_logprobs']} generated tokens have inf/NaN log-probabilities: the "
                     "outputs are invalid (rerun with --check-finite to find the first layer)")
    for st in r.get("stages", []):
        lines.append(f"  stage {st['stage']} (rank {st['stage']}): {st['slice']}; policy {st['policy_str']}; planned "
                     + ", ".join(f"{t} {fmt_bytes(st['plan_bytes'][t])}" for t in ("gpu", "cpu", "disk"))
                     + "; peak " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in st["peak_bytes"].items()))
    if r.get("host_attention_s"):
        h = r["host_attention_s"]
        lines.append(f"CPU-delegated attention, host seconds: computing {h['compute']:.3f}, its thread waiting for "
                     f"q/k/v {h['inputs']:.3f}, the main thread waiting for results {h['wait']:.3f}")
    if r.get("measured_step_s"):
        pred = r.get("predicted_breakdown", {})
        lines.append("measured seconds per layer step (predicted):")
        for phase, kinds in r["measured_step_s"].items():
            lines.append(f"  {phase:8s} " + "  ".join(
                f"{k} {v:.5f}" + (f" ({pred[phase][k]['step']:.5f})" if pred.get(phase, {}).get(k) else "")
                for k, v in kinds.items()))
    if r.get("predicted_tok_s"):
        lines.append(f"cost model ({r['profile']}): predicted {r['predicted_tok_s']:.2f} tokens/s, I/O-or-compute "
                     f"bound {r['bound_tok_s']:.2f}; measured/predicted {r['measured_over_predicted']:.2f}, "
                     f"measured/bound {r['measured_over_bound']:.2f}")
    if r.get("shortfall"):
        lines.append(r["shortfall"])
    for tokens in r.get("tokens", []):
        lines.append("tokens: " + " ".join(str(t) for t in tokens))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------

Register = Callable[[Any], None]


def _register_core(sub: Any) -> None:
    g = sub.add_parser("generate", help="generate from token ids or text")
    add_model_flags(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-ids", nargs="+", help="one prompt per argument: comma-separated token ids")
    src.add_argument("--prompt", nargs="+", help="prompt text (needs tokenizer.json in the model directory)")
    g.add_argument("--max-new-tokens", type=int, default=16)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--stop-ids", type=int, nargs="*", default=None)
    g.add_argument("--logprobs", action="store_true")
    add_policy_flags(g)
    add_auto_flags(g)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="measure generation throughput on a synthetic workload")
    add_model_flags(b)
    b.add_argument("--prompt-len", type=int, default=512)
    b.add_argument("--gen-len", type=int, default=32)
    b.add_argument("--num-blocks", type=int, default=1, help="blocks of gpu_batch_size*num_gpu_batches prompts")
    b.add_argument("--warmup", type=int, default=1, help="warm-up generate calls before measuring")
    b.add_argument("--print-tokens", action="store_true", help="print generated ids, one 'tokens:' line per sequence")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--nproc", type=int, default=1,
                   help="pipeline stages, one process each (one per GPU); > 1 starts the ranks with torchrun")
    b.add_argument("--micro-batches", type=int, default=None,
                   help="pipeline: blocks in flight (default: --nproc)")
    b.add_argument("--timeout-s", type=float, default=600.0,
                   help="pipeline: longest wait for another rank before every rank stops with an error")
    b.add_argument("--step-timing", action="store_true",
                   help="diagnostic: synchronize and time every layer step (slower; compare with the cost model)")
    b.add_argument("--torch-profile", default=None, metavar="FILE",
                   help="diagnostic: run the measured call under torch.profiler and write its busiest operators "
                        "(self device time and self host time) to FILE (slower; use a short --gen-len)")
    b.add_argument("--check-finite", action="store_true",
                   help="diagnostic: stop at the first layer output with inf/NaN, naming layer, batch and token")
    add_policy_flags(b)
    add_auto_flags(b)
    b.set_defaults(func=cmd_bench)


def registered() -> list[Register]:
    """Subcommand registrars: the core ones, then plugins of the `flexgen.commands` entry-point group (the
    Prefect-backed `flexgen eval` lives in `flows/` and registers itself there, so this package never imports
    Prefect)."""
    from importlib.metadata import entry_points

    from flexgen_core.evaluation.commands import register as register_evaluation
    from flexgen_core.planning.commands import register as register_planning

    regs: list[Register] = [_register_core, register_planning, register_evaluation]
    regs += [ep.load() for ep in entry_points(group="flexgen.commands")]
    return regs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for register in registered():
        register(sub)
    for action in sub.choices.values():
        action.allow_abbrev = False
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    started = time.perf_counter()
    try:
        code = args.func(args)
    except (PolicyError, ValueError, RuntimeError, FileNotFoundError, PermissionError) as exc:
        print(f"flexgen {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "verbose", False):
        print(f"({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return int(code or 0)


if __name__ == "__main__":
    raise SystemExit(main())
