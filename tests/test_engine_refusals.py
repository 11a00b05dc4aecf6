"""Bad inputs are refused before anything is allocated or written, with messages naming the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_opt
from hf_reference import hf_greedy
from safetensors.torch import load_file, save_file

from flexgen_core import Engine, Policy
from flexgen_core.plan import PlanDoesNotFit
from flexgen_core.policy import PolicyError
from flexgen_core.runtime.checkpoint import CheckpointError


def leftovers(root: Path) -> list[Path]:
    return list(root.rglob("*")) if root.exists() else []


def test_infeasible_plan_is_refused_with_tier_and_bytes(tiny_opt: Path, offload_dir: Path) -> None:
    with pytest.raises(PlanDoesNotFit) as err:
        Engine.from_pretrained(tiny_opt, policy=Policy(weights=(0.5, 0.5, 0)), device="cpu",
                               offload_dir=offload_dir, gpu_mem_gib=1e-5)
    msg = str(err.value)
    assert "gpu memory" in msg and "needs" in msg and "available" in msg and "--weights" in msg
    assert err.value.needed > err.value.available
    assert leftovers(offload_dir) == []


def test_cache_that_does_not_fit_is_refused_before_generating(tiny_opt: Path) -> None:
    with Engine.from_pretrained(tiny_opt, policy=Policy(4, 4, cache=(0, 1, 0)), device="cpu",
                                cpu_mem_gib=0.0005) as engine, pytest.raises(PlanDoesNotFit, match="cpu memory"):
        engine.generate([[5] * 50], 10)


def test_disk_budget_too_small(tiny_opt: Path, offload_dir: Path) -> None:
    with pytest.raises(PlanDoesNotFit, match="disk"):
        Engine.from_pretrained(tiny_opt, policy=Policy(weights=(0, 0, 1)), device="cpu", offload_dir=offload_dir,
                               disk_gib=1e-6)
    assert leftovers(offload_dir) == []


def test_offload_dir_not_writable(tiny_opt: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="not writable"):
        Engine.from_pretrained(tiny_opt, policy=Policy(weights=(0, 0, 1)), device="cpu",
                               offload_dir=blocker / "offload")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.parametrize("kwargs, message", [
    ({"weights": (50, 50, 0)}, "not percents"),
    ({"cache": (0.5, 0.4, 0.0)}, "sums to 0.9"),
    ({"acts": (1, 0)}, "three fractions"),
    ({"gpu_batch_size": 0}, "positive integer"),
    ({"num_gpu_batches": 2.5}, "positive integer"),
    ({"attn_topk": 0.0}, "attn_topk"),
    ({"cpu_attention": "yes"}, "True or False"),
])
def test_malformed_policy(kwargs: dict, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        Policy(**kwargs)


def test_policy_tolerates_float_rounding_and_round_trips() -> None:
    p = Policy(4, 2, weights=(0.1, 0.2, 0.7000000001), cache=(1 / 3, 1 / 3, 1 / 3))
    assert Policy.from_dict(json.loads(p.to_json())) == p


def _rewrite(model: Path, dst: Path, edit) -> Path:  # noqa: ANN001
    dst.mkdir()
    (dst / "config.json").write_text((model / "config.json").read_text())
    tensors = load_file(str(model / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_checkpoint_with_missing_tensor(tiny_opt: Path, tmp_path: Path, offload_dir: Path) -> None:
    bad = _rewrite(tiny_opt, tmp_path / "bad", lambda t: t.pop("model.decoder.layers.1.fc2.weight"))
    with pytest.raises(CheckpointError, match="missing tensor for layer 4 'fc2_w'"):
        Engine.from_pretrained(bad, policy=Policy(weights=(0, 0, 1)), device="cpu", offload_dir=offload_dir)
    assert leftovers(offload_dir) == []


def test_checkpoint_with_misshaped_tensor(tiny_opt: Path, tmp_path: Path, offload_dir: Path) -> None:
    def edit(t: dict) -> None:
        name = "model.decoder.layers.0.self_attn.q_proj.weight"
        t[name] = t[name][:, :32].contiguous()

    bad = _rewrite(tiny_opt, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=r"q_proj.weight has shape \[64, 32\], config says \[64, 64\]"):
        Engine.from_pretrained(bad, policy=Policy(weights=(0, 0, 1)), device="cpu", offload_dir=offload_dir)
    assert leftovers(offload_dir) == []


def test_unknown_model_fails_fast_with_download_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="huggingface-cli download facebook/opt-1.3b"):
        Engine.from_pretrained("facebook/opt-1.3b", device="cpu")
    with pytest.raises(CheckpointError, match="add --dummy"):
        Engine.from_pretrained("opt-1.3b", device="cpu")


def test_bad_prompts_are_refused(tiny_opt: Path) -> None:
    with Engine.from_pretrained(tiny_opt, device="cpu") as engine:
        with pytest.raises(ValueError, match="outside"):
            engine.generate([[5, 999]], 2)
        with pytest.raises(ValueError, match="empty"):
            engine.generate([[]], 2)
        with pytest.raises(ValueError, match="positions"):
            engine.generate([[5] * 60], 10)


# ---- checkpoint formats -------------------------------------------------------------------------


def test_sharded_safetensors_with_index(tmp_path: Path) -> None:
    model = make_opt(tmp_path / "sharded", seed=3)
    from transformers import OPTForCausalLM

    OPTForCausalLM.from_pretrained(model).save_pretrained(tmp_path / "sharded2", max_shard_size="60KB")
    assert (tmp_path / "sharded2" / "model.safetensors.index.json").is_file()
    with Engine.from_pretrained(tmp_path / "sharded2", policy=Policy(2, 1, weights=(0, 1, 0)), device="cpu") as e:
        gen = e.generate([[5, 6, 7]], 4)[0]
    assert gen.token_ids == hf_greedy(model, [5, 6, 7], 4)[0]


def test_pytorch_bin_checkpoint_loads_with_weights_only(tiny_opt: Path, tmp_path: Path) -> None:
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_text((tiny_opt / "config.json").read_text())
    state = {k.removeprefix("model."): v for k, v in load_file(str(tiny_opt / "model.safetensors")).items()}
    torch.save(state, d / "pytorch_model.bin")
    with Engine.from_pretrained(d, policy=Policy(1, 1, weights=(0, 0.5, 0.5)), device="cpu") as e:
        gen = e.generate([[5, 6, 7]], 4)[0]
    assert gen.token_ids == hf_greedy(tiny_opt, [5, 6, 7], 4)[0]


def test_dummy_weights_for_builtin_and_directory(tiny_opt: Path) -> None:
    with Engine.from_pretrained(tiny_opt, dummy=True, device="cpu") as e:
        a = e.generate([[5, 6]], 3)[0].token_ids
    with Engine.from_pretrained(tiny_opt, dummy=True, device="cpu") as e:
        assert e.generate([[5, 6]], 3)[0].token_ids == a  # same seed, same weights
    with Engine.from_pretrained("opt-125m", dummy=True, device="cpu", policy=Policy(1, 1, weights=(0, 1, 0))) as e:
        assert e.spec.hidden_size == 768 and len(e.generate([[5, 6]], 2)[0].token_ids) == 2


@pytest.mark.parametrize("policy", [
    Policy(compress_cache=True),
    Policy(cache=(0, 1, 0), cpu_attention=True, compress_cache=True, gpu_batch_size=2, num_gpu_batches=2),
], ids=["device-cache", "host-cache-delegated"])
def test_kv_values_beyond_fp16_are_reported_with_their_block(tiny_opt: Path, tmp_path: Path, policy: Policy) -> None:
    """The compressed cache checks its values on the device and reports at the next sync, naming the place."""
    def edit(t: dict) -> None:
        t["model.decoder.layers.1.self_attn.k_proj.bias"] = torch.full((64,), 1e6)  # K far beyond fp16's range

    bad = _rewrite(tiny_opt, tmp_path / "bad", edit)
    message = r"KV cache of transformer block 1, GPU batch \d, during prefill: the activations overflowed"
    with Engine.from_pretrained(bad, policy=policy, device="cpu") as engine, pytest.raises(ValueError, match=message):
        engine.generate([[2, 5, 6, 7]] * 4, 3)


def test_check_finite_names_the_first_layer_with_inf_or_nan(tiny_opt: Path, tmp_path: Path) -> None:
    def overflow(t: dict) -> None:  # finite weights whose sum overflows fp32 in block 1's MLP output
        t["model.decoder.layers.1.self_attn.out_proj.bias"] = torch.full((64,), 3e38)
        t["model.decoder.layers.1.fc2.bias"] = torch.full((64,), 3e38)

    bad = _rewrite(tiny_opt, tmp_path / "bad", overflow)
    with Engine.from_pretrained(bad, policy=Policy(gpu_batch_size=2, num_gpu_batches=2), device="cpu") as engine:
        engine.check_finite = True
        with pytest.raises(FloatingPointError, match=r"output of layer 4 \(mlp\), GPU batch 0, token 0"):
            engine.generate([[2, 5, 6, 7]] * 4, 3)

    fc2_b = "model.decoder.layers.1.fc2.bias"
    inf_weight = _rewrite(tiny_opt, tmp_path / "inf", lambda t: t[fc2_b].fill_(float("inf")))
    with Engine.from_pretrained(inf_weight, device="cpu") as engine:
        engine.check_finite = True
        with pytest.raises(FloatingPointError, match=r"weights \['fc2_b'\] of layer 4 \(mlp\)"):
            engine.generate([[2, 5, 6, 7]], 3)


def test_check_finite_passes_a_healthy_run_unchanged(tiny_opt: Path) -> None:
    policy = Policy(weights=(0.5, 0.5, 0), cache=(0.5, 0.5, 0), acts=(0, 1, 0), compress_weights=True,
                    compress_cache=True, gpu_batch_size=2, num_gpu_batches=2)
    prompts = [[2, 5, 6, 7], [2, 9, 8], [2, 11], [2, 4, 4, 4, 4]]
    with Engine.from_pretrained(tiny_opt, policy=policy, device="cpu") as engine:
        plain = [g.token_ids for g in engine.generate(prompts, 4)]
        engine.check_finite = True
        assert [g.token_ids for g in engine.generate(prompts, 4)] == plain
