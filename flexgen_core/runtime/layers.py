"""Layer math of an OPT-style decoder, as pure functions of weights and activations.

Shape legend: b GPU batch, s query length (prompt length at prefill, 1 at decode), t cached length,
h hidden, nh heads, d head dim (h = nh * d), e word-embedding dim, f FFN dim, v vocab, k kept positions.
Weights are dicts of device tensors named as in `spec.layer_specs`; matrices are (out, in) (possibly a
transposed view of a dequantized buffer). Nothing here knows about tiers, streams or caches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from flexgen_core.spec import ModelSpec

Weights = dict[str, torch.Tensor]


def embed(w: Weights, ids: torch.Tensor, positions: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Token + learned position embeddings. ids, positions: (b, s) -> (b, s, h)."""
    x = F.embedding(ids, w["tok"])  # (b, s, e)
    if "proj_in" in w:
        x = F.linear(x, w["proj_in"])  # (b, s, e) -> (b, s, h)
    return x + F.embedding(positions + spec.position_offset, w["pos"])


def _norm(x: torch.Tensor, w: Weights, spec: ModelSpec) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), w["ln_w"], w["ln_b"], spec.layer_norm_eps)


def qkv(w: Weights, x: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Projections of the (pre-normed) input. x: (b, s, h) -> q, k, v each (b, s, nh, d); q is not scaled."""
    b, s, _ = x.shape
    xn = _norm(x, w, spec) if spec.pre_layer_norm else x
    shape = (b, s, spec.num_heads, spec.head_dim)
    q = F.linear(xn, w["q_w"], w["q_b"]).view(shape)
    k = F.linear(xn, w["k_w"], w["k_b"]).view(shape)
    v = F.linear(xn, w["v_w"], w["v_b"]).view(shape)
    return q, k, v


def attention_output(w: Weights, x: torch.Tensor, attn: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Output projection and residual. x: (b, s, h) residual, attn: (b, s, nh, d) -> (b, s, h)."""
    out = x + F.linear(attn.reshape(x.shape), w["o_w"], w["o_b"])
    return out if spec.pre_layer_norm else _norm(out, w, spec)


def mlp(w: Weights, x: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """x: (b, s, h) -> (b, s, h), with residual (ReLU FFN of width f)."""
    xn = _norm(x, w, spec) if spec.pre_layer_norm else x
    y = F.relu(F.linear(xn, w["fc1_w"], w["fc1_b"]), inplace=True)  # (b, s, f)
    out = x + F.linear(y, w["fc2_w"], w["fc2_b"])
    return out if spec.pre_layer_norm else _norm(out, w, spec)


def logits(w: Weights, x: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """LM head on selected positions. x: (b, n, h) -> (b, n, v) float32."""
    if "ln_w" in w:
        x = _norm(x, w, spec)
    if "proj_out" in w:
        x = F.linear(x, w["proj_out"])  # (b, n, h) -> (b, n, e)
    return F.linear(x, w["tok"]).float()


# ---- attention cores -------------------------------------------------------------------------


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Causal self-attention over the prompt. q, k, v: (b, s, nh, d); valid: (b, s) bool (False = pad).

    Returns (b, s, nh, d). Pad queries attend only to themselves (their outputs are never used).
    """
    s = q.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril_()
    mask = causal[None, None] & valid[:, None, None, :]  # (b, 1, s, s)
    mask |= torch.eye(s, dtype=torch.bool, device=q.device)[None, None]
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    if q.is_cuda:  # never cuDNN, which builds a plan per shape (see decode_attention)
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            out = F.scaled_dot_product_attention(*args, attn_mask=mask)
    else:
        out = F.scaled_dot_product_attention(*args, attn_mask=mask)
    return out.transpose(1, 2)  # (b, nh, s, d) -> (b, s, nh, d)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                     chunk: int = 0) -> torch.Tensor:
    """One query per sequence over its cache. q: (b, nh, d); k, v: (t, b, nh, d) sequence-major;
    valid: (b, t) bool. Returns (b, nh, d).

    With `chunk` > 0 (CPU path for a low-precision cache), K and V are read in chunks of positions and
    upcast to float32 chunk by chunk, instead of converting the whole cache.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    t = k.shape[0]
    if (chunk <= 0 or k.dtype == torch.float32) and not q.is_cuda:
        # CPU: one fused kernel over the strided (b, nh, t, d) view of the cache, in the cache's dtype (fp32 when a
        # compressed cache was dequantized on the host); every row has its current token valid
        out = F.scaled_dot_product_attention(q.to(k.dtype)[:, :, None], k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3),
                                             attn_mask=valid[:, None, None, :])  # (b, nh, 1, d)
        return out[:, :, 0].to(q.dtype)
    if chunk <= 0 or k.dtype == torch.float32:
        # CUDA: the memory-efficient SDPA kernel on the strided cache (H100: 239 us vs 518 us for batched matmuls
        # on the OPT-30B decode shape). Never the default backend choice: it picks cuDNN, which builds a new
        # plan for every cache length (131 ms per call; benchmarks/gpu_kernels.py). Falls back to the matmuls.
        try:
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                out = F.scaled_dot_product_attention(q.to(k.dtype)[:, :, None], k.permute(1, 2, 0, 3),
                                                     v.permute(1, 2, 0, 3), attn_mask=valid[:, None, None, :])
            return out[:, :, 0].to(q.dtype)
        except RuntimeError:  # no efficient kernel for these strides/dtypes
            scores = torch.einsum("bhd,tbhd->bht", q.to(k.dtype) * scale, k)  # (b, nh, t)
            scores = scores.float().masked_fill_(~valid[:, None, :], float("-inf"))
            p = torch.softmax(scores, dim=-1).to(v.dtype)
            return torch.einsum("bht,tbhd->bhd", p, v).to(q.dtype)
    qf = (q.float() * scale)
    scores = torch.empty(q.shape[0], q.shape[1], t, dtype=torch.float32, device=q.device)
    for a in range(0, t, chunk):
        scores[..., a:a + chunk] = torch.einsum("bhd,tbhd->bht", qf, k[a:a + chunk].float())
    scores.masked_fill_(~valid[:, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for a in range(0, t, chunk):
        out += torch.einsum("bht,tbhd->bhd", p[..., a:a + chunk], v[a:a + chunk].float())
    return out.to(q.dtype)


def host_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                          chunk: int = 64) -> torch.Tensor:
    """Decode attention on the CPU over a cache in place: the native kernel when it is available (streams the
    low-precision cache once), else `decode_attention` with chunked upcasting. Shapes as `decode_attention`."""
    from flexgen_core.runtime.kernels import cpu_decode_attention

    out = cpu_decode_attention(q, k, v, valid)
    return out if out is not None else decode_attention(q, k, v, valid, chunk=chunk)


def topk_scores(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, keep: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse decode attention, step 1: full scores against K, top-`keep` past positions.

    q: (b, nh, d); k: (t, b, nh, d) with the current token last; valid: (b, t).
    Returns (indices (b, nh, keep) into [0, t-1), their scores (b, nh, keep), current score (b, nh)), fp32.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bhd,tbhd->bht", q.float() * scale, k.float())  # (b, nh, t)
    scores.masked_fill_(~valid[:, None, :], float("-inf"))
    past = scores[..., :-1]
    top, idx = past.topk(keep, dim=-1, sorted=False)  # (b, nh, keep)
    return idx, top, scores[..., -1]


def topk_combine(top: torch.Tensor, current: torch.Tensor, v_top: torch.Tensor, v_cur: torch.Tensor) -> torch.Tensor:
    """Sparse decode attention, step 2: softmax over the kept scores (renormalized) and the current token.

    top: (b, nh, k), current: (b, nh), v_top: (b, nh, k, d) gathered V rows, v_cur: (b, nh, d) -> (b, nh, d).
    """
    p = torch.softmax(torch.cat([top, current[..., None]], dim=-1), dim=-1)  # (b, nh, k+1)
    out = torch.einsum("bhk,bhkd->bhd", p[..., :-1], v_top.float()) + p[..., -1:] * v_cur.float()
    return out.to(v_cur.dtype)


def gather_rows(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """V rows at per-(sequence, head) positions. v: (t, b, nh, d), idx: (b, nh, k) -> (b, nh, k, d)."""
    b, nh, _ = idx.shape
    bi = torch.arange(b, device=idx.device)[:, None, None]
    hi = torch.arange(nh, device=idx.device)[None, :, None]
    return v[idx.to(v.device), bi.to(v.device), hi.to(v.device)]
