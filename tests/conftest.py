"""Shared fixtures: tiny OPT checkpoints written with `save_pretrained` (random init, fp32), offline env."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_opt(path: Path, seed: int = 0, std: float = 0.3, **overrides: object) -> Path:
    """Save a tiny random OPTForCausalLM (non-degenerate weights) and return its directory."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    cfg = dict(vocab_size=200, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
               max_position_embeddings=64, word_embed_proj_dim=64, pad_token_id=1, bos_token_id=2,
               eos_token_id=2, do_layer_norm_before=True)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = OPTForCausalLM(OPTConfig(**cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pre-LayerNorm OPT: 2 layers, hidden 64, 4 heads, vocab 200."""
    return make_opt(tmp_path_factory.mktemp("tiny_opt") / "model")


@pytest.fixture(scope="session")
def tiny_opt_wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hidden 128 / FFN 256 so that 4-bit weight groups of 64 rows can split across tiers."""
    return make_opt(tmp_path_factory.mktemp("tiny_opt_wide") / "model", seed=1, std=0.15, hidden_size=128,
                    ffn_dim=256, num_attention_heads=4)


@pytest.fixture(scope="session")
def post_ln_opt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OPT-350m-style: post-LayerNorm, no final LayerNorm, word_embed_proj_dim (32) != hidden (64), one head."""
    return make_opt(tmp_path_factory.mktemp("post_ln_opt") / "model", seed=2, do_layer_norm_before=False,
                    word_embed_proj_dim=32, num_attention_heads=1)


@pytest.fixture
def offload_dir(tmp_path: Path) -> Path:
    d = tmp_path / "offload"
    d.mkdir()
    return d
