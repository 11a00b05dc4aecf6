"""Baseline: Hugging Face Accelerate offloading (`device_map` + `dispatch_model`) on the engine's benchmark.

The OPT model is built on the meta device, placed with `infer_auto_device_map` under the same GPU budget as
the engine's `--gpu-mem-gib` (whole layers, `OPTDecoderLayer` never split), filled with dummy weights tensor by
tensor on its assigned device (no full fp32 copy ever exists) and dispatched: layers placed on the CPU are
copied to the GPU at every forward, as Accelerate does. Greedy `generate` of exactly `gen_len` tokens on the
engine's synthetic prompts; prefill is timed as a separate 1-token `generate` on the same batch and
decode_s = total_s - prefill_s. With `--json` the last line is one JSON object in the suite's row format.

    python benchmarks/hf_accelerate.py --model opt-30b --prompt-len 512 --gen-len 32 --batch-size 8 \\
        --gpu-mem-gib 16 --json
    python benchmarks/hf_accelerate.py --model ./models/opt-1.3b            # real weights from the directory
    python benchmarks/hf_accelerate.py --model opt-125m --device cpu --batch-size 2 --prompt-len 16 --gen-len 4

`--model` is a released OPT size (dummy weights) or a checkpoint directory (its weights, or dummy ones with
`--dummy`). Accelerate's `max_memory` only budgets weights (plus room to stream the largest offloaded layer):
the KV cache and activations come on top unless `--reserve-kv` subtracts the cache from the budget.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import OPTConfig, OPTForCausalLM

from flexgen_core.bench import synthetic_prompts
from flexgen_core.models.opt import builtin_spec

GIB = 2**30
CHUNK = 1 << 26  # elements per normal_ call when generating on the GPU for a CPU-placed tensor


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


def opt_config(model: str) -> tuple[str, OPTConfig]:
    """(name, config) of a checkpoint directory or a released OPT size."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.name, OPTConfig.from_pretrained(path)
    s = builtin_spec(model)
    return s.name, OPTConfig(vocab_size=s.vocab_size, hidden_size=s.hidden_size, num_hidden_layers=s.num_layers,
                             ffn_dim=s.ffn_dim, num_attention_heads=s.num_heads,
                             max_position_embeddings=s.max_positions, word_embed_proj_dim=s.word_embed_dim,
                             do_layer_norm_before=s.pre_layer_norm, pad_token_id=s.pad_token_id,
                             bos_token_id=s.bos_token_id, eos_token_id=s.eos_token_id)


def placement(device_map: dict[str, Any], name: str) -> Any:
    """Device of a parameter: the device_map entry of its longest module prefix."""
    while name not in device_map:
        if not name:
            raise KeyError("device_map has no entry for the tensor")
        name = name.rpartition(".")[0]
    return device_map[name]


def tier(device: Any) -> str:
    return "disk" if device == "disk" else "cpu" if device == "cpu" else "gpu"


def fill_dummy(model: torch.nn.Module, device_map: dict[str, Any], dtype: torch.dtype, gen_device: torch.device,
               seed: int) -> None:
    """Materialize every meta parameter on its device: N(0, 0.02) matrices/embeddings, LayerNorm 1/0, biases 0.

    Values are drawn on `gen_device` (the GPU when there is one: CPU normal_ of tens of GB is slow), in chunks,
    and copied to CPU-placed tensors."""
    from accelerate.utils import set_module_tensor_to_device

    g = torch.Generator(device=gen_device).manual_seed(seed)
    norms = {n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    for name, param in list(model.named_parameters()):  # tied lm_head.weight is listed once
        dev = placement(device_map, name)
        target = torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
        owner, _, kind = name.rpartition(".")
        if owner in norms or kind == "bias":
            value = (torch.ones if owner in norms and kind == "weight" else torch.zeros)(
                param.shape, dtype=dtype, device=target)
        else:
            value = torch.empty(param.shape, dtype=dtype, device=target)
            flat = value.view(-1)
            for start in range(0, flat.numel(), CHUNK):
                chunk = flat[start:start + CHUNK]
                chunk.copy_(torch.empty(chunk.numel(), dtype=dtype, device=gen_device).normal_(0, 0.02, generator=g))
        set_module_tensor_to_device(model, name, target, value=value)
    for name, buf in model.named_buffers():
        if buf.is_meta:
            raise ValueError(f"unexpected meta buffer {name}")
    model.tie_weights()  # set_module_tensor_to_device replaced embed_tokens.weight: re-tie lm_head to it


def load_model(args: argparse.Namespace, dtype: torch.dtype) -> tuple[str, OPTForCausalLM, dict[str, Any],
                                                                       dict[str, int]]:
    """(name, dispatched model, device_map, weight bytes per tier)."""
    import accelerate

    name, config = opt_config(args.model)
    with accelerate.init_empty_weights():
        model = OPTForCausalLM(config)
    model.tie_weights()
    model.to(dtype)
    if args.device == "cuda":
        gpu_index = torch.cuda.current_device()
        gpu = int(args.gpu_mem_gib * GIB) if args.gpu_mem_gib is not None else torch.cuda.mem_get_info(gpu_index)[0]
        if args.reserve_kv:
            gpu -= (2 * config.num_hidden_layers * args.batch_size * (args.prompt_len + args.gen_len)
                    * config.hidden_size * dtype.itemsize)
        max_memory: dict[Any, int] = {gpu_index: max(gpu, 0)}
    else:
        max_memory = {}
    max_memory["cpu"] = (int(args.cpu_mem_gib * GIB) if args.cpu_mem_gib is not None
                         else psutil.virtual_memory().available)
    device_map = accelerate.infer_auto_device_map(model, max_memory=max_memory, dtype=dtype,
                                                  no_split_module_classes=["OPTDecoderLayer"])
    weight_bytes = {"gpu": 0, "cpu": 0, "disk": 0}
    for pname, param in model.named_parameters():
        weight_bytes[tier(placement(device_map, pname))] += param.numel() * dtype.itemsize
    if weight_bytes["disk"]:
        raise SystemExit(f"budget too small: Accelerate would put {weight_bytes['disk'] / GIB:.1f} GiB of weights on "
                         f"disk (max_memory {', '.join(f'{k}: {v / GIB:.1f} GiB' for k, v in max_memory.items())}); "
                         "raise --gpu-mem-gib / --cpu-mem-gib")
    del weight_bytes["disk"]
    if Path(args.model).expanduser().is_dir() and not args.dummy:
        model = OPTForCausalLM.from_pretrained(args.model, device_map=device_map, dtype=dtype)
    else:
        fill_dummy(model, device_map, dtype, torch.device(args.device), args.seed)
        model = accelerate.dispatch_model(model, device_map=device_map)
        model.hf_device_map = device_map
    model.eval()
    return name, model, device_map, weight_bytes


def run_baseline(args: argparse.Namespace) -> dict[str, Any]:
    """Load, warm up, time prefill and the full generate; the suite's row (plus `tokens`)."""
    dtype = getattr(torch, args.dtype or ("float16" if args.device == "cuda" else "float32"))
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    name, model, device_map, weight_bytes = load_model(args, dtype)
    sync()
    load_s = time.perf_counter() - t0

    main_device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    ids = torch.tensor(synthetic_prompts(args.batch_size, args.prompt_len, model.config.vocab_size, args.seed),
                       device=main_device)

    def generate(input_ids: torch.Tensor, n: int, **kw: Any) -> Any:
        with torch.inference_mode():
            return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                  min_new_tokens=n, max_new_tokens=n, pad_token_id=model.config.pad_token_id, **kw)

    def timed(n: int, **kw: Any) -> tuple[float, Any]:
        sync()
        start = time.perf_counter()
        out = generate(ids, n, **kw)
        sync()
        return time.perf_counter() - start, out

    generate(ids[:, :min(8, args.prompt_len)], 2)  # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    prefill_s, _ = timed(1)
    total_s, out = timed(args.gen_len, output_logits=True, return_dict_in_generate=True)
    decode_s = total_s - prefill_s
    tokens = out.sequences[:, args.prompt_len:]
    assert tokens.shape == (args.batch_size, args.gen_len), tokens.shape
    logprobs = torch.stack(out.logits, 1).float().log_softmax(-1).gather(-1, tokens[..., None].to(torch.long))
    n_new = args.batch_size * args.gen_len
    peak = {"gpu": torch.cuda.max_memory_allocated() if cuda else 0,
            "cpu_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # as the engine reports it
    budget = f"gpu {args.gpu_mem_gib:g} GiB" if cuda and args.gpu_mem_gib is not None else args.device
    return {
        "model": name, "system": "hf-accelerate", "device": str(main_device), "dtype": str(dtype).replace("torch.", ""),
        "policy_str": (f"accelerate device_map {budget}: {weight_bytes['gpu'] / GIB:.1f} GiB GPU / "
                       f"{weight_bytes['cpu'] / GIB:.1f} GiB CPU weights"),
        "block_size": args.batch_size, "blocks": 1, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
        "load_s": load_s, "prefill_s": prefill_s, "decode_s": decode_s, "total_s": total_s,
        "prefill_tok_s": args.batch_size * args.prompt_len / prefill_s,
        "decode_tok_s": args.batch_size * (args.gen_len - 1) / decode_s if decode_s > 0 else 0.0,
        "total_tok_s": n_new / total_s,
        "peak_bytes": peak, "weight_bytes": weight_bytes,
        "device_map_modules": {t: sum(tier(d) == t for d in device_map.values()) for t in weight_bytes},
        "nonfinite_logprobs": int((~torch.isfinite(logprobs)).sum()),
        "tokens": tokens.tolist(),
    }


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
