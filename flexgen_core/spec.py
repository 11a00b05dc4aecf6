"""Model specification and exact size functions.

`ModelSpec` describes a decoder-only transformer by the few numbers the engine needs. The functions
here list every weight tensor of every schedule layer and count bytes and FLOPs; the allocator
(`runtime/`), the placement `Plan` (`policy.py`) and the cost model (`planning/`) all use them, so
what is predicted is what is allocated. Nothing here touches a tensor.

Schedule layers: ``[embed, attn_0, mlp_0, ..., attn_{l-1}, mlp_{l-1}, head]`` (attention and MLP are
separate layers, as FlexGen's ``sep_layer``, so the next MLP's weights load while attention computes).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class LayerKind(str, Enum):
    EMBED = "embed"
    ATTN = "attn"
    MLP = "mlp"
    HEAD = "head"


@dataclass(frozen=True)
class ModelSpec:
    """Architecture numbers of an OPT-style decoder (learned positions, LayerNorm, ReLU MLP, tied head)."""

    name: str
    num_layers: int
    hidden_size: int
    ffn_dim: int
    num_heads: int
    vocab_size: int
    max_positions: int
    word_embed_dim: int
    pre_layer_norm: bool = True
    final_layer_norm: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2
    position_offset: int = 2
    layer_norm_eps: float = 1e-5
    architecture: str = "OPTForCausalLM"

    def __post_init__(self) -> None:
        for field in ("num_layers", "hidden_size", "ffn_dim", "num_heads", "vocab_size", "max_positions",
                      "word_embed_dim"):
            if getattr(self, field) < 1:
                raise ValueError(f"ModelSpec.{field} must be >= 1, got {getattr(self, field)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_schedule_layers(self) -> int:
        return 2 * self.num_layers + 2

    @property
    def steps_per_token(self) -> dict[LayerKind, int]:
        """Schedule steps of each layer kind per token (keys also match the kinds' string values)."""
        return steps_per_token(self.num_layers)


def steps_per_token(num_layers: int) -> dict[LayerKind, int]:
    """One embedding and one head step, and an attention and an MLP step per transformer block."""
    return {LayerKind.EMBED: 1, LayerKind.ATTN: num_layers, LayerKind.MLP: num_layers, LayerKind.HEAD: 1}


@dataclass(frozen=True)
class TensorSpec:
    """One weight tensor of a schedule layer. `shared_from` names the layer that stores a tied tensor;
    `copy_of` marks a pipeline stage's own copy of a tensor tied to a layer on another stage."""

    name: str
    shape: tuple[int, ...]
    shared_from: int | None = None
    copy_of: int | None = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) == 2


@dataclass(frozen=True)
class LayerSpec:
    index: int
    kind: LayerKind
    block: int  # transformer block index for attn/mlp, -1 for embed/head
    tensors: tuple[TensorSpec, ...]

    @property
    def owned(self) -> tuple[TensorSpec, ...]:
        """Tensors this layer stores (tied tensors are stored once, by the layer that owns them)."""
        return tuple(t for t in self.tensors if t.shared_from is None)


def layer_specs(spec: ModelSpec) -> list[LayerSpec]:
    """Every schedule layer with its weight tensors, in schedule order."""
    h, f, e, v = spec.hidden_size, spec.ffn_dim, spec.word_embed_dim, spec.vocab_size
    embed = [TensorSpec("tok", (v, e)), TensorSpec("pos", (spec.max_positions + spec.position_offset, h))]
    if e != h:
        embed.append(TensorSpec("proj_in", (h, e)))
    layers = [LayerSpec(0, LayerKind.EMBED, -1, tuple(embed))]
    for b in range(spec.num_layers):
        attn = (TensorSpec("ln_w", (h,)), TensorSpec("ln_b", (h,)),
                TensorSpec("q_w", (h, h)), TensorSpec("q_b", (h,)),
                TensorSpec("k_w", (h, h)), TensorSpec("k_b", (h,)),
                TensorSpec("v_w", (h, h)), TensorSpec("v_b", (h,)),
                TensorSpec("o_w", (h, h)), TensorSpec("o_b", (h,)))
        mlp = (TensorSpec("ln_w", (h,)), TensorSpec("ln_b", (h,)),
               TensorSpec("fc1_w", (f, h)), TensorSpec("fc1_b", (f,)),
               TensorSpec("fc2_w", (h, f)), TensorSpec("fc2_b", (h,)))
        layers.append(LayerSpec(1 + 2 * b, LayerKind.ATTN, b, attn))
        layers.append(LayerSpec(2 + 2 * b, LayerKind.MLP, b, mlp))
    head: list[TensorSpec] = []
    if spec.final_layer_norm:
        head += [TensorSpec("ln_w", (h,)), TensorSpec("ln_b", (h,))]
    if e != h:
        head.append(TensorSpec("proj_out", (e, h)))
    head.append(TensorSpec("tok", (v, e), shared_from=0))
    layers.append(LayerSpec(len(layers), LayerKind.HEAD, -1, tuple(head)))
    return layers


def block_layers(spec: ModelSpec, first_block: int, stop_block: int) -> tuple[int, int]:
    """Schedule layers [start, stop) of transformer blocks [first_block, stop_block), with the embed when the
    range starts at block 0 and the head when it ends at the last block (a pipeline stage's slice)."""
    if not 0 <= first_block < stop_block <= spec.num_layers:
        raise ValueError(f"block range [{first_block}, {stop_block}) is not within the {spec.num_layers} blocks")
    start = 0 if first_block == 0 else 1 + 2 * first_block
    stop = spec.num_schedule_layers if stop_block == spec.num_layers else 1 + 2 * stop_block
    return start, stop


def stage_layer_specs(spec: ModelSpec, start: int, stop: int) -> list[LayerSpec]:
    """Schedule layers [start, stop). A tensor tied to a layer outside the range becomes the range's own
    copy (`shared_from=None`, `copy_of` the layer it mirrors): the last pipeline stage stores the embedding."""
    out = []
    for lay in layer_specs(spec)[start:stop]:
        tensors = tuple(TensorSpec(t.name, t.shape, copy_of=t.shared_from)
                        if t.shared_from is not None and not start <= t.shared_from < stop else t
                        for t in lay.tensors)
        out.append(LayerSpec(lay.index, lay.kind, lay.block, tensors))
    return out


# ---------------------------------------------------------------------------------------------
# Byte counts (dtype_bytes: 2 for fp16/bf16, 4 for fp32)


def weight_bytes(spec: ModelSpec, dtype_bytes: int = 2) -> int:
    """Bytes of all stored weights (tied embedding counted once), uncompressed."""
    return sum(t.numel for layer in layer_specs(spec) for t in layer.owned) * dtype_bytes


def block_weight_bytes(spec: ModelSpec, dtype_bytes: int = 2) -> int:
    """Bytes of one transformer block (attention + MLP), the cost model's `wi`."""
    layers = layer_specs(spec)
    return sum(t.numel for layer in layers[1:3] for t in layer.owned) * dtype_bytes


def kv_bytes_per_token(spec: ModelSpec, dtype_bytes: int = 2) -> int:
    """Bytes of K and V for one token of one sequence in one transformer block (uncompressed)."""
    return 2 * spec.hidden_size * dtype_bytes


def cache_len(prompt_len: int, gen_len: int) -> int:
    """Positions the KV cache must hold: the prompt plus every generated token but the last."""
    return max(1, prompt_len + gen_len - 1)


def hidden_bytes(spec: ModelSpec, batch: int, seq_len: int, dtype_bytes: int = 2) -> int:
    return batch * seq_len * spec.hidden_size * dtype_bytes


# ---------------------------------------------------------------------------------------------
# FLOPs


def block_matmul_flops(spec: ModelSpec, tokens: int) -> int:
    """FLOPs of the dense projections of one transformer block for `tokens` tokens."""
    h, f = spec.hidden_size, spec.ffn_dim
    return 2 * tokens * (4 * h * h + 2 * h * f)


def attention_flops(spec: ModelSpec, batch: int, query_len: int, key_len: int) -> int:
    """FLOPs of scores and weighted sum of one block (q.K^T and p.V)."""
    return 4 * batch * query_len * key_len * spec.hidden_size
