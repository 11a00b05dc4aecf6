"""The Triton kernels against the torch reference: on CUDA (the GPU machine's test stage), or on the CPU under
Triton's interpreter where triton is installed: `TRITON_INTERPRET=1 pytest tests/test_triton_kernels.py`.
Skipped where triton is missing (CI's CPU-only torch does not bring it)."""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("triton")

from flexgen_core.quant import PackedTensor, dequantize_moved, quantize  # noqa: E402
from flexgen_core.runtime.kernels import attention_cuda  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs CUDA, or TRITON_INTERPRET=1 to run the kernels on the CPU")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 3, 4, 128), (5, 2, 3, 72), (2, 4, 2, 64), (1, 1, 1, 16), (3, 2, 2, 130)])
def test_fused_quantize_is_bit_identical_to_torch(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    x[0, 0, 0, : min(64, shape[-1])] = 2.25  # a constant group
    ref = quantize(x, 4, 64, dim=-1)  # the torch path (no invalid flag)
    # a strided source (positions not adjacent), as the engine's (s, b, nh, d) transposed K/V
    src = x.to(DEVICE).transpose(0, 1).contiguous().transpose(0, 1)
    flag = torch.zeros((), dtype=torch.bool, device=DEVICE)
    fused = quantize(src, 4, 64, dim=-1, invalid=flag)
    assert torch.equal(fused.codes.cpu(), ref.codes) and torch.equal(fused.scales.cpu(), ref.scales)
    assert not bool(flag)
    # straight into one position of a larger buffer
    buf = PackedTensor(torch.zeros(4, *ref.codes.shape[1:], dtype=torch.uint8, device=DEVICE),
                       torch.zeros(4, *ref.scales.shape[1:], dtype=torch.float16, device=DEVICE),
                       (4, *shape[1:]), 3, ref.config, dtype)
    quantize(src[:1], 4, 64, dim=-1, invalid=flag, out=buf.narrow(0, 2, 1))
    assert torch.equal(buf.codes[2].cpu(), ref.codes[0]) and not buf.codes[1].any() and not buf.codes[3].any()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e5])
def test_fused_quantize_flags_values_it_cannot_encode(bad: float) -> None:
    x = torch.randn(2, 2, 2, 64, device=DEVICE)
    flag = torch.zeros((), dtype=torch.bool, device=DEVICE)
    quantize(x, 4, 64, dim=-1, invalid=flag)
    assert not bool(flag)
    x[1, 0, 1, 7] = bad
    quantize(x, 4, 64, dim=-1, invalid=flag)
    assert bool(flag)


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    scores = torch.einsum("bhd,tbhd->bht", q.double(), k.double()) / math.sqrt(q.shape[-1])
    p = torch.softmax(scores.masked_fill(~valid[:, None, :], float("-inf")), dim=-1)
    return torch.einsum("bht,tbhd->bhd", p, v.double())


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("t, b, h, d, programs", [(7, 2, 3, 64, 1024), (200, 3, 2, 128, 1024), (300, 1, 1, 72, 1024),
                                                  (200, 3, 2, 128, 1), (65, 2, 2, 16, 1024)])
def test_fused_decode_attention_matches_reference(t: int, b: int, h: int, d: int, programs: int,
                                                  packed: bool) -> None:
    tile = (16, 4, programs)  # programs=1: one chunk per row, no combine step
    g = torch.Generator().manual_seed(t + d)
    cap = t + 5  # a view of the first t positions of a longer buffer, as the engine reads a home or slot
    k_buf, v_buf = (torch.randn(cap, b, h, d, generator=g).to(torch.float16) for _ in range(2))
    q = torch.randn(b, h, d, generator=g).to(torch.float16)
    valid = torch.rand(b, t, generator=g) > 0.3
    valid[:, -1] = True
    valid[0, : t - 1] = False  # a row that attends to its current token only
    if packed:
        pk, pv = (quantize(x, 4, 64, dim=-1).narrow(0, 0, t) for x in (k_buf, v_buf))
        k_ref, v_ref = dequantize_moved(pk, torch.float32), dequantize_moved(pv, torch.float32)
        k_in, v_in = pk.to(DEVICE), pv.to(DEVICE)
    else:
        k_ref, v_ref = k_buf[:t], v_buf[:t]
        k_in, v_in = k_buf.to(DEVICE)[:t], v_buf.to(DEVICE)[:t]
    out = attention_cuda.decode_attention(q.to(DEVICE), k_in, v_in, valid.to(DEVICE), tile=tile)
    assert out is not None and out.dtype == torch.float16 and out.shape == (b, h, d)
    ref = _reference(q, k_ref, v_ref, valid)
    torch.testing.assert_close(out.cpu().double(), ref, atol=2e-3, rtol=2e-3)
