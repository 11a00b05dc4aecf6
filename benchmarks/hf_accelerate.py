"""Baseline: Hugging Face Accelerate offloading on the engine's benchmark (`flexgen_core.hf_baseline`): OPT built
from its config with dummy weights (or a checkpoint's), placed by `infer_auto_device_map` under the engine's GPU
budget, greedy `generate` of exactly `gen_len` tokens on the engine's prompts, prefill timed separately. With
`--json` the last line is one JSON object in the suite's row format (suite cases prefixed `hf:` run it).

    python benchmarks/hf_accelerate.py --model opt-30b --prompt-len 512 --gen-len 32 --batch-size 8 \\
        --gpu-mem-gib 16 --json
    python benchmarks/hf_accelerate.py --model ./models/opt-1.3b            # real weights from the directory
    python benchmarks/hf_accelerate.py --model opt-125m --device cpu --batch-size 2 --prompt-len 16 --gen-len 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

import torch

from flexgen_core.hf_baseline import GIB, BaselineConfig
from flexgen_core.hf_baseline import run_baseline as run_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="OPT size (opt-30b) or checkpoint directory with config.json")
    p.add_argument("--dummy", action="store_true", help="random weights for a checkpoint directory too")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--gpu-mem-gib", type=float, default=None, help="GPU weight budget (default: free memory)")
    p.add_argument("--cpu-mem-gib", type=float, default=None, help="host weight budget (default: available)")
    p.add_argument("--reserve-kv", action="store_true", help="take the fp KV cache out of the GPU budget")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="default: float16 on cuda, float32 on cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--print-tokens", action="store_true", help="include the generated token ids in the JSON")
    p.add_argument("--json", action="store_true", help="print one JSON line at the end")
    return p.parse_args(argv)


def run_baseline(args: argparse.Namespace) -> dict[str, Any]:
    """The measurement for parsed arguments (`flexgen_core.hf_baseline.run_baseline`); SystemExit if the budget
    would put weights on disk."""
    fields = {f.name for f in dataclasses.fields(BaselineConfig)}
    try:
        return run_config(BaselineConfig(**{k: v for k, v in vars(args).items() if k in fields}))
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    r = run_baseline(args)
    if not args.print_tokens:
        r.pop("tokens")
    if args.json:
        print(json.dumps(r))
        return
    print(f"{r['model']} on {r['device']} ({r['dtype']}), {r['policy_str']}\n"
          f"batch {r['block_size']}, prompt {r['prompt_len']}, gen {r['gen_len']}: load {r['load_s']:.1f} s, "
          f"prefill {r['prefill_s']:.2f} s, decode {r['decode_s']:.2f} s, total {r['total_s']:.2f} s\n"
          f"throughput {r['total_tok_s']:.2f} tok/s (decode {r['decode_tok_s']:.2f} tok/s); peak GPU "
          f"{r['peak_bytes']['gpu'] / GIB:.2f} GiB, host RSS {r['peak_bytes']['cpu_rss'] / GIB:.2f} GiB"
          + (f"; INVALID: {r['nonfinite_logprobs']} inf/NaN log-probs" if r["nonfinite_logprobs"] else ""))


if __name__ == "__main__":
    main()
