"""Hugging Face baseline: transformers `generate` with Accelerate placement (`device_map` + `dispatch_model`),
on the prompts `flexgen bench` uses, for comparisons measured in the same run.

The OPT model is built on the meta device, placed with `infer_auto_device_map` under the same GPU budget as the
engine's `--gpu-mem-gib` (whole layers, `OPTDecoderLayer` never split), and either loaded from its checkpoint or
filled with dummy weights tensor by tensor on its assigned device (no full fp32 copy ever exists) and
dispatched: layers placed on the CPU are copied to the GPU at every forward, as Accelerate does. Greedy
`generate` of exactly `gen_len` tokens; prefill is timed as a separate 1-token `generate` on the same batch and
decode_s = total_s - prefill_s. Accelerate's `max_memory` only budgets weights (plus room to stream the largest
offloaded layer): the KV cache and activations come on top unless `reserve_kv` subtracts the cache.
Used by `benchmarks/hf_accelerate.py` (and the benchmark suite's `hf:` cases) and by the `benchmark` flow.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import OPTConfig, OPTForCausalLM

from flexgen_core.bench import synthetic_prompts
from flexgen_core.models.opt import builtin_spec
from flexgen_core.plan import GIB

CHUNK = 1 << 26  # elements per normal_ call when generating on the GPU for a CPU-placed tensor


@dataclass(frozen=True)
class BaselineConfig:
    """One baseline measurement. model: a released OPT size (dummy weights) or a checkpoint directory (its
    weights, or dummy ones with `dummy`); budgets in GiB (None: what the device or host has free)."""

    model: str
    prompt_len: int = 512
    gen_len: int = 32
    batch_size: int = 8
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str | None = None  # default: float16 on cuda, float32 on cpu
    gpu_mem_gib: float | None = None
    cpu_mem_gib: float | None = None
    reserve_kv: bool = False
    dummy: bool = False
    seed: int = 0


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


def load_model(args: BaselineConfig, dtype: torch.dtype) -> tuple[str, OPTForCausalLM, dict[str, Any],
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
        raise ValueError(f"budget too small: Accelerate would put {weight_bytes['disk'] / GIB:.1f} GiB of weights on "
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


def run_baseline(args: BaselineConfig) -> dict[str, Any]:
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
