"""4-bit group-wise quantization: packing, storage formula, round-trip bound."""

from __future__ import annotations

import pytest
import torch

from flexgen_core.quant import QuantConfig, dequantize, packed_nbytes, quantize

CASES = {
    "random": lambda: torch.randn(130, 70),
    "constant": lambda: torch.full((64, 5), 3.3),
    "tiny": lambda: torch.randn(100, 3) * 1e-6,
    "huge": lambda: torch.randn(100, 3) * 1e4,
    "negative": lambda: -torch.rand(77, 9) - 5,
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dim", [0, 1])
def test_round_trip_within_half_a_step(case: str, dtype: torch.dtype, dim: int) -> None:
    torch.manual_seed(0)
    x = CASES[case]().to(dtype)
    p = quantize(x, bits=4, group_size=64, dim=dim)
    y = dequantize(p, torch.float32)
    assert y.shape == x.shape and torch.isfinite(y).all()
    err = (y - x.float()).abs().movedim(dim, -1)  # (*rest, n)
    n, groups = x.shape[dim], p.codes.shape[-2]
    err = torch.nn.functional.pad(err, (0, groups * 64 - n)).reshape(*err.shape[:-1], groups, 64).amax(-1)
    step = p.step.float()
    assert (err <= step / 2 * (1 + 1e-3) + 1e-12).all(), f"max err {err.max()} vs step {step.max()}"
    assert dequantize(p).dtype == dtype


def test_storage_is_028_of_fp16() -> None:
    # per 64 values: 64 * 4 bits = 32 code bytes + fp16 step and minimum = 4 bytes -> 36 / (64 * 2) = 0.28125
    shape = (4096, 4096)
    codes, scales = packed_nbytes(shape, 0, QuantConfig(4, 64))
    assert codes + scales == 4096 * 4096 // 64 * 36
    assert (codes + scales) / (4096 * 4096 * 2) == 0.28125
    p = quantize(torch.randn(256, 128), 4, 64, dim=0)
    assert p.nbytes == 256 * 128 // 64 * 36


def test_partial_group_is_padded_and_two_codes_per_byte() -> None:
    x = torch.arange(70, dtype=torch.float32)
    p = quantize(x, 4, 64, dim=0)
    assert p.codes.shape == (2, 32) and p.codes.dtype == torch.uint8  # 2 groups, 64 codes packed in 32 bytes
    assert p.scales.shape == (2, 2) and p.scales.dtype == torch.float16
    assert (dequantize(p) - x).abs().max() <= p.step.float().max() / 2


def test_slicing_along_other_dims_matches_slicing_the_dequantized() -> None:
    x = torch.randn(10, 3, 4, 128)
    p = quantize(x, 4, 64, dim=-1)
    assert torch.equal(dequantize(p.narrow(0, 2, 5)), dequantize(p)[2:7])
    idx = torch.tensor([4, 0, 9])
    assert torch.equal(dequantize(p.index_select(0, idx)), dequantize(p)[idx])
    with pytest.raises(ValueError):
        p.narrow(3, 0, 64)


@pytest.mark.parametrize("bits", [2, 8])
def test_other_bit_widths(bits: int) -> None:
    x = torch.randn(64, 64)
    p = quantize(x, bits, 64, dim=1)
    assert ((dequantize(p) - x).abs() <= p.step.float() / 2 * (1 + 1e-3)).all()


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.randn(4, 4), bits=3)
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize(torch.tensor([1.0, float("nan")]))
    with pytest.raises(TypeError):
        quantize(torch.arange(4))
    with pytest.raises(ValueError, match="fp16"):
        quantize(torch.tensor([1e6, 0.0]))


def test_deferred_check_sets_the_flag_instead_of_raising() -> None:
    """With `invalid`, bad values are recorded on the tensor's device (no host sync) and clean ones are not."""
    flag = torch.zeros((), dtype=torch.bool)
    quantize(torch.randn(4, 128), invalid=flag)
    assert not flag
    for bad in (float("inf"), float("nan"), 1e6):
        flag = torch.zeros((), dtype=torch.bool)
        x = torch.randn(4, 128)
        x[2, 70] = bad
        quantize(x, invalid=flag)
        assert flag, bad
