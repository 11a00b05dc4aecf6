"""Shared fixtures: tiny OPT checkpoints written with `save_pretrained` (random init, fp32), offline env."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def make_eval_model(path: Path, vocab_size: int = 400, max_positions: int = 256, **overrides: object) -> Path:
    """Tiny random OPT + tokenizer.json (byte-level BPE trained on the procedural scenarios' text): a stand-in
    for the shipped tiny model that the evaluation (which tokenizes prompts) can run."""
    from tokenizers import ByteLevelBPETokenizer

    from flexgen_core.evaluation.scenarios import get_scenario

    corpus = [inst.input.text + " " + inst.references[0].output.text
              for inst in get_scenario("synthetic_reasoning", mode="pattern_match").get_instances()[:300]]
    corpus += [f"Question: Is {n} even or odd?\nA. Even\nB. Odd\nAnswer: B" for n in range(10, 100)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False)
    make_opt(path, vocab_size=bpe.get_vocab_size(), max_position_embeddings=max_positions, **overrides)
    bpe.save(str(path / "tokenizer.json"))
    return path


# ---- Prefect (flows tests) --------------------------------------------------------------------------------------

def pytest_configure(config: pytest.Config) -> None:
    """Point Prefect at a per-session home (DB, results) before anything imports it; analytics off."""
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="flexgen-test-prefect-"))
    config._flexgen_prefect_home = home  # type: ignore[attr-defined]
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(home / "results")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
    os.environ["FLEXGEN_CACHE_DIR"] = str(home / "flexgen-cache")
    for name in ("PREFECT_API_URL", "PREFECT_PROFILE"):
        os.environ.pop(name, None)


def pytest_unconfigure(config: pytest.Config) -> None:
    import shutil

    home = getattr(config, "_flexgen_prefect_home", None)
    if home is not None:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server and database for the whole session (started on first use)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def eval_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory the evaluation can run: tiny random OPT (window 256) + tokenizer.json."""
    return make_eval_model(tmp_path_factory.mktemp("eval_model") / "tiny-eval")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny matmuls: one thread is much faster than two spinning on a 2-core box (use per module with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def without_logprobs(obj: Any, floats: list[float]) -> Any:
    """`obj` (parsed output JSON) with every "logprob" value, and the numbers of the `logprob` stat, moved out
    into `floats`: other batch shapes round the matmuls differently, so those compare with a tolerance."""
    if isinstance(obj, list):
        return [without_logprobs(v, floats) for v in obj]
    if not isinstance(obj, dict):
        return obj
    is_logprob_stat = isinstance(obj.get("name"), dict) and obj["name"].get("name") == "logprob"
    keep = {}
    for k, v in obj.items():
        if isinstance(v, float) and (k == "logprob" or (is_logprob_stat and k != "count")):
            floats.append(v)
        else:
            keep[k] = without_logprobs(v, floats)
    return keep

