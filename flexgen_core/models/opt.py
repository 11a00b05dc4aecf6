"""OPT (Zhang et al., 2022): spec from a Hugging Face config, built-in sizes, and the weight-name map.

OPT is pre-LayerNorm except OPT-350m (post-LayerNorm, no final LayerNorm, 512-wide word embeddings
projected to the 1024-wide hidden size). Positions are learned with an offset of 2; the MLP is ReLU;
the LM head is tied to the token embedding.
"""

from __future__ import annotations

import re
from typing import Any

from flexgen_core.spec import LayerKind, ModelSpec

ARCHITECTURE = "OPTForCausalLM"

# name: (layers, hidden, heads, ffn, word_embed_dim, pre_layer_norm)
_SIZES: dict[str, tuple[int, int, int, int, int, bool]] = {
    "opt-125m": (12, 768, 12, 3072, 768, True),
    "opt-350m": (24, 1024, 16, 4096, 512, False),
    "opt-1.3b": (24, 2048, 32, 8192, 2048, True),
    "opt-2.7b": (32, 2560, 32, 10240, 2560, True),
    "opt-6.7b": (32, 4096, 32, 16384, 4096, True),
    "opt-13b": (40, 5120, 40, 20480, 5120, True),
    "opt-30b": (48, 7168, 56, 28672, 7168, True),
    "opt-66b": (64, 9216, 72, 36864, 9216, True),
    "opt-175b": (96, 12288, 96, 49152, 12288, True),
}
BUILTIN_NAMES = tuple(_SIZES)


def builtin_spec(name: str) -> ModelSpec:
    """Spec of a released OPT size, by name (`opt-30b` or `facebook/opt-30b`), with no download."""
    key = name.split("/")[-1].lower()
    if key not in _SIZES:
        raise KeyError(f"unknown built-in OPT size {name!r}; known: {', '.join(BUILTIN_NAMES)}")
    layers, hidden, heads, ffn, embed, pre_ln = _SIZES[key]
    return ModelSpec(name=key, num_layers=layers, hidden_size=hidden, ffn_dim=ffn, num_heads=heads,
                     vocab_size=50272, max_positions=2048, word_embed_dim=embed, pre_layer_norm=pre_ln,
                     final_layer_norm=pre_ln, architecture=ARCHITECTURE)


def spec_from_hf_config(cfg: dict[str, Any], name: str = "opt") -> ModelSpec:
    """Build a spec from a `config.json` dict; refuses OPT variants the engine does not implement."""
    if cfg.get("activation_function", "relu") != "relu":
        raise ValueError(f"OPT with activation {cfg['activation_function']!r} is not supported (relu only)")
    if not cfg.get("enable_bias", True) or not cfg.get("layer_norm_elementwise_affine", True):
        raise ValueError("OPT without biases or without LayerNorm affine parameters is not supported")
    hidden = cfg["hidden_size"]
    pre_ln = bool(cfg.get("do_layer_norm_before", True))
    return ModelSpec(
        name=name,
        num_layers=cfg["num_hidden_layers"],
        hidden_size=hidden,
        ffn_dim=cfg["ffn_dim"],
        num_heads=cfg["num_attention_heads"],
        vocab_size=cfg["vocab_size"],
        max_positions=cfg["max_position_embeddings"],
        word_embed_dim=cfg.get("word_embed_proj_dim") or hidden,
        pre_layer_norm=pre_ln,
        final_layer_norm=pre_ln and not cfg.get("_remove_final_layer_norm", False),
        pad_token_id=cfg.get("pad_token_id", 1) if cfg.get("pad_token_id") is not None else 1,
        bos_token_id=cfg.get("bos_token_id", 2) if cfg.get("bos_token_id") is not None else 2,
        eos_token_id=_first(cfg.get("eos_token_id", 2)),
        architecture=ARCHITECTURE,
    )


def _first(value: Any) -> int:
    if isinstance(value, list):
        return int(value[0])
    return int(value) if value is not None else 2


# HF parameter name (after stripping "model." and "decoder.") -> (layer kind, tensor name)
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_BLOCK_MAP: dict[str, tuple[LayerKind, str]] = {
    "self_attn_layer_norm.weight": (LayerKind.ATTN, "ln_w"),
    "self_attn_layer_norm.bias": (LayerKind.ATTN, "ln_b"),
    "self_attn.q_proj.weight": (LayerKind.ATTN, "q_w"),
    "self_attn.q_proj.bias": (LayerKind.ATTN, "q_b"),
    "self_attn.k_proj.weight": (LayerKind.ATTN, "k_w"),
    "self_attn.k_proj.bias": (LayerKind.ATTN, "k_b"),
    "self_attn.v_proj.weight": (LayerKind.ATTN, "v_w"),
    "self_attn.v_proj.bias": (LayerKind.ATTN, "v_b"),
    "self_attn.out_proj.weight": (LayerKind.ATTN, "o_w"),
    "self_attn.out_proj.bias": (LayerKind.ATTN, "o_b"),
    "final_layer_norm.weight": (LayerKind.MLP, "ln_w"),
    "final_layer_norm.bias": (LayerKind.MLP, "ln_b"),
    "fc1.weight": (LayerKind.MLP, "fc1_w"),
    "fc1.bias": (LayerKind.MLP, "fc1_b"),
    "fc2.weight": (LayerKind.MLP, "fc2_w"),
    "fc2.bias": (LayerKind.MLP, "fc2_b"),
}
_TOP_MAP: dict[str, tuple[LayerKind, str]] = {
    "embed_tokens.weight": (LayerKind.EMBED, "tok"),
    "embed_positions.weight": (LayerKind.EMBED, "pos"),
    "project_in.weight": (LayerKind.EMBED, "proj_in"),
    "project_out.weight": (LayerKind.HEAD, "proj_out"),
    "final_layer_norm.weight": (LayerKind.HEAD, "ln_w"),
    "final_layer_norm.bias": (LayerKind.HEAD, "ln_b"),
}
_SKIPPED = {"lm_head.weight"}  # tied to embed_tokens, stored once


def map_weight_name(spec: ModelSpec, hf_name: str) -> tuple[int, str] | None:
    """Map a checkpoint tensor name to (schedule layer index, tensor name); None for tied copies.

    Raises KeyError for a name the OPT layout does not have.
    """
    if hf_name in _SKIPPED:
        return None
    name = hf_name
    for prefix in ("model.", "decoder."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    m = _LAYER_RE.match(name)
    if m:
        block, rest = int(m.group(1)), m.group(2)
        if rest not in _BLOCK_MAP or block >= spec.num_layers:
            raise KeyError(f"unexpected OPT tensor {hf_name!r}")
        kind, tensor = _BLOCK_MAP[rest]
        return (1 + 2 * block + (kind == LayerKind.MLP), tensor)
    if name in _TOP_MAP:
        kind, tensor = _TOP_MAP[name]
        return (0 if kind == LayerKind.EMBED else spec.num_schedule_layers - 1, tensor)
    raise KeyError(f"unexpected OPT tensor {hf_name!r}")
