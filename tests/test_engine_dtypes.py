"""Low-precision engines on the CPU: the mixed-dtype paths CUDA takes (fp16 activations, a compressed
cache dequantized to fp32 for CPU-delegated attention) must run and agree with the fp32 engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flexgen_core import Engine, Policy
from flexgen_core.runtime.layers import decode_attention

PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22]]


def test_decode_attention_mixed_dtypes_returns_query_dtype() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 16, generator=g).half()
    k, v = torch.randn(9, 2, 4, 16, generator=g), torch.randn(9, 2, 4, 16, generator=g)
    valid = torch.ones(2, 9, dtype=torch.bool)
    out = decode_attention(q, k, v, valid)
    ref = decode_attention(q.double(), k.double(), v.double(), valid)
    assert out.dtype == torch.float16
    assert (out.double() - ref).abs().max() < 2e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("policy", [
    Policy(2, 2, cache=(0, 0.5, 0.5), compress_cache=True, cpu_attention=True),
    Policy(2, 2, weights=(0.3, 0.4, 0.3), cache=(0.5, 0.5, 0), acts=(0, 1, 0), compress_weights=True),
    Policy(2, 2, cache=(0, 1, 0), cpu_attention=True, attn_topk=0.5),
])
def test_low_precision_engine_agrees_with_fp32(tiny_opt: Path, tmp_path: Path, dtype: torch.dtype,
                                               policy: Policy) -> None:
    with Engine.from_pretrained(tiny_opt, policy=policy, device="cpu", offload_dir=tmp_path) as engine:
        ref = engine.generate(PROMPTS, 4)
    with Engine.from_pretrained(tiny_opt, policy=policy, device="cpu", dtype=dtype, offload_dir=tmp_path) as engine:
        low = engine.generate(PROMPTS, 4, return_logprobs=True)
    assert all(len(g.token_ids) == 4 for g in low)
    assert all(all(x == x for x in g.logprobs) for g in low)  # no NaN
    first = sum(a.token_ids[0] == b.token_ids[0] for a, b in zip(ref, low, strict=True))
    assert first >= 2  # random tiny weights: low precision may flip a near tie, not every first token


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 12])  # vectorized path and the scalar tail path
def test_native_cpu_attention_matches_reference(dtype: torch.dtype, head_dim: int) -> None:
    from flexgen_core.runtime.kernels import cpu_decode_attention, native_module

    if native_module() is None:
        pytest.skip("no C++ toolchain: the engine uses the torch path (covered by the parity tests)")
    g = torch.Generator().manual_seed(1)
    t, b, nh = 37, 3, 5
    k = torch.randn(t, b, nh, head_dim, generator=g).to(dtype)
    v = torch.randn(t, b, nh, head_dim, generator=g).to(dtype)
    q = torch.randn(b, nh, head_dim, generator=g).to(dtype)
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[0, :10] = False  # left padding
    valid[2, 5:7] = False
    out = cpu_decode_attention(q, k, v, valid)
    ref = decode_attention(q.double(), k.double(), v.double(), valid)
    assert out is not None and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((out.double() - ref).norm() / ref.norm()) < tol
    # a cache view that is not contiguous within a position is declined (the caller falls back)
    assert cpu_decode_attention(q, k.transpose(1, 2), v.transpose(1, 2), valid) is None


def test_native_cpu_attention_releases_the_gil() -> None:
    """The engine runs CPU attention on its own thread; the main thread must keep running Python meanwhile."""
    import threading
    import time

    from flexgen_core.runtime.kernels import cpu_decode_attention, native_module

    if native_module() is None:
        pytest.skip("no C++ toolchain: the engine uses the torch path (torch ops release the GIL)")
    t, b, nh, d = 8192, 8, 16, 64  # a call of a few tens of ms: OS jitter on a busy runner stays well below half
    k = torch.randn(t, b, nh, d, dtype=torch.float16)
    v = torch.randn(t, b, nh, d, dtype=torch.float16)
    q = torch.randn(b, nh, d, dtype=torch.float16)
    valid = torch.ones(b, t, dtype=torch.bool)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # leave a core to the main thread
    try:
        start = time.perf_counter()
        cpu_decode_attention(q, k, v, valid)
        call_s = time.perf_counter() - start
        worker = threading.Thread(target=lambda: [cpu_decode_attention(q, k, v, valid) for _ in range(3)])
        ticks = []
        worker.start()
        while worker.is_alive():
            ticks.append(time.perf_counter())
        worker.join()
    finally:
        torch.set_num_threads(threads)
    largest_gap = max(b - a for a, b in zip(ticks, ticks[1:], strict=False))
    assert largest_gap < call_s / 2, f"the main thread stalled {largest_gap * 1e3:.0f} ms (a call takes " \
                                     f"{call_s * 1e3:.0f} ms): the kernel holds the GIL"
