"""The Hugging Face Accelerate baseline (benchmarks/hf_accelerate.py) on CPU with a tiny OPT checkpoint."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

from flexgen_core.bench import synthetic_prompts

pytest.importorskip("accelerate")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "hf_accelerate.py"
KEYS = {"model", "policy_str", "block_size", "prompt_len", "gen_len", "prefill_s", "decode_s", "total_s",
        "total_tok_s", "decode_tok_s", "load_s", "device", "peak_bytes", "system", "nonfinite_logprobs"}


@pytest.fixture(scope="module")
def baseline() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hf_accelerate", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(baseline: ModuleType, model: Path, *extra: str) -> dict:
    args = baseline.parse_args(["--model", str(model), "--device", "cpu", "--batch-size", "2", "--prompt-len", "8",
                                "--gen-len", "4", *extra])
    return baseline.run_baseline(args)


def test_real_weights_match_transformers_generate(baseline: ModuleType, tiny_opt: Path) -> None:
    from transformers import OPTForCausalLM

    r = run(baseline, tiny_opt)
    assert r.keys() >= KEYS
    assert r["system"] == "hf-accelerate" and r["model"] == tiny_opt.name and r["block_size"] == 2
    assert r["total_tok_s"] > 0 and r["nonfinite_logprobs"] == 0
    assert r["total_tok_s"] == pytest.approx(2 * 4 / r["total_s"])
    assert r["decode_s"] == pytest.approx(r["total_s"] - r["prefill_s"])
    assert r["peak_bytes"]["cpu_rss"] > 0 and r["weight_bytes"]["cpu"] > 0 and r["weight_bytes"]["gpu"] == 0

    model = OPTForCausalLM.from_pretrained(tiny_opt).eval()
    ids = torch.tensor(synthetic_prompts(2, 8, model.config.vocab_size, 0))
    with torch.inference_mode():
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, min_new_tokens=4,
                             max_new_tokens=4, pad_token_id=model.config.pad_token_id)
    assert r["tokens"] == ref[:, 8:].tolist()


def test_dummy_weights(baseline: ModuleType, tiny_opt: Path) -> None:
    r = run(baseline, tiny_opt, "--dummy")
    assert r.keys() >= KEYS and r["nonfinite_logprobs"] == 0
    assert len(r["tokens"]) == 2 and all(len(t) == 4 for t in r["tokens"])
    # vocab 200 x 64 tied embedding + 64 positions + 2 layers of 4*64*64 + 2*64*128 weights, LayerNorms, biases
    n = 200 * 64 + 66 * 64 + 2 * (4 * 64 * 64 + 2 * 64 * 128 + 4 * 64 + 128 + 64 + 4 * 64) + 2 * 64
    assert r["weight_bytes"]["cpu"] == 4 * n


def test_refuses_disk_offload(baseline: ModuleType, tiny_opt: Path) -> None:
    with pytest.raises(SystemExit, match="budget too small"):
        run(baseline, tiny_opt, "--dummy", "--cpu-mem-gib", "0.00001")
