"""CUDA checks (run on the GPU machine: `pytest -m gpu tests/test_cuda.py`): fp16 parity with transformers,
pinned host arenas, overlap on and off, every tier and compression path on the device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_opt
from hf_reference import hf_greedy

from flexgen_core import Engine, Policy
from flexgen_core.policy import Tier

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [11, 12], [20], [30, 31, 32, 33, 34, 35, 36], [40, 41, 42], [50, 51]]
NEW = 12
POLICIES = {
    "all_gpu": Policy(2, 3),
    "weights_cpu_pinned": Policy(2, 3, weights=(0, 1, 0)),
    "mixed": Policy(2, 3, weights=(0.3, 0.5, 0.2), cache=(0.3, 0.5, 0.2), acts=(0.3, 0.5, 0.2)),
    "cache_cpu_delegated": Policy(3, 2, weights=(0.5, 0.5, 0), cache=(0, 0.7, 0.3), cpu_attention=True),
    "no_overlap": Policy(2, 3, weights=(0.2, 0.6, 0.2), cache=(0, 1, 0), acts=(0, 1, 0), overlap=False),
}


@pytest.fixture(scope="module")
def small_opt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_opt(tmp_path_factory.mktemp("cuda") / "model", seed=4, std=0.08, hidden_size=256, ffn_dim=1024,
                    num_attention_heads=4, num_hidden_layers=4, vocab_size=512, max_position_embeddings=128)


@pytest.mark.parametrize("name", list(POLICIES))
def test_fp16_parity_with_transformers(name: str, small_opt: Path, tmp_path: Path) -> None:
    with Engine.from_pretrained(small_opt, policy=POLICIES[name], device="cuda", offload_dir=tmp_path) as engine:
        if POLICIES[name].weights[1] > 0:
            assert engine.weights.homes[Tier.CPU].pinned, "CPU weights must be pinned on CUDA"
        gens = engine.generate(PROMPTS, NEW, return_logprobs=True)
    same = total = 0
    worst = 0.0
    for prompt, gen in zip(PROMPTS, gens, strict=True):
        ref_tokens, ref_lp = hf_greedy(small_opt, prompt, NEW, dtype=torch.float16, device="cuda")
        for a, b, la, lb in zip(gen.token_ids, ref_tokens, gen.logprobs, ref_lp, strict=True):
            total += 1
            same += a == b
            if a == b:
                worst = max(worst, abs(la - lb))
            else:
                break  # after a divergence the continuations differ legitimately
    assert same / total >= 0.95, f"{same}/{total} tokens equal"
    assert worst < 0.05


@pytest.mark.parametrize("policy", [
    Policy(2, 2, weights=(0.3, 0.4, 0.3), compress_weights=True),
    Policy(2, 2, cache=(0.3, 0.4, 0.3), compress_cache=True, attn_topk=0.5),
    Policy(2, 2, cache=(0, 0.5, 0.5), compress_cache=True, cpu_attention=True),
])
def test_compressed_and_sparse_paths_run_on_cuda(policy: Policy, small_opt: Path, tmp_path: Path) -> None:
    with Engine.from_pretrained(small_opt, policy=policy, device="cuda", offload_dir=tmp_path) as engine:
        cuda = engine.generate(PROMPTS, NEW, return_logprobs=True)
    assert all(len(g.token_ids) == NEW for g in cuda)


def test_score_on_cuda(small_opt: Path) -> None:
    with Engine.from_pretrained(small_opt, policy=Policy(2, 2, weights=(0, 1, 0)), device="cuda") as engine:
        gen = engine.generate([PROMPTS[0]], 4, return_logprobs=True)[0]
        sc = engine.score([PROMPTS[0]], [gen.token_ids])[0]
    assert sc.is_greedy and abs(sc.logprob - sum(gen.logprobs)) < 0.05


@pytest.mark.parametrize("shape, dim", [((200, 130), 0), ((64, 4096), 0), ((9, 3, 7, 128), 3), ((5, 2, 4, 72), 3)])
def test_triton_dequant_matches_torch_bit_for_bit(shape: tuple[int, ...], dim: int) -> None:
    from flexgen_core.quant import dequantize_moved, quantize
    from flexgen_core.runtime.kernels.dequant_cuda import available

    assert available(), "triton must be importable on the GPU machine"
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 3
    packed = quantize(x, 4, 64, dim=dim)
    ref = dequantize_moved(packed, torch.float16)  # torch path on the CPU, fp32 math, one rounding
    gpu = dequantize_moved(packed.to("cuda"), torch.float16)
    assert torch.equal(gpu.cpu(), ref)
    # into a column slice of a wider buffer, as the weight store does
    wide = torch.zeros(*ref.shape[:-1], ref.shape[-1] + 64, dtype=torch.float16, device="cuda")
    dequantize_moved(packed.to("cuda"), torch.float16, out=wide[..., 32:32 + ref.shape[-1]])
    assert torch.equal(wide[..., 32:32 + ref.shape[-1]].cpu(), ref) and not wide[..., :32].any()


@pytest.mark.parametrize("policy", [
    Policy(2, 3, compress_cache=True),  # the cache on the GPU, attended in place
    Policy(2, 3, weights=(0.5, 0.5, 0), cache=(0.5, 0.5, 0), compress_cache=True),  # half streamed through slots
])
def test_fused_4bit_cache_attention_matches_the_dequantize_path(policy: Policy, small_opt: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from flexgen_core.runtime.kernels import attention_cuda

    with Engine.from_pretrained(small_opt, policy=policy, device="cuda", offload_dir=tmp_path) as engine:
        calls = []
        fused_fn = attention_cuda.decode_attention
        monkeypatch.setattr(attention_cuda, "decode_attention", lambda *a: calls.append(1) or fused_fn(*a))
        fused = engine.generate(PROMPTS, NEW, return_logprobs=True)
        assert calls, "the 4-bit cache must take the fused kernel on CUDA"
        assert engine._cache is not None and engine._cache.dequant is None  # noqa: SLF001 (no buffer planned)
        monkeypatch.setattr(attention_cuda, "decode_attention", lambda *a: None)  # dequantize + SDPA instead
        unfused = engine.generate(PROMPTS, NEW, return_logprobs=True)
    for a, b in zip(fused, unfused, strict=True):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 0.05
