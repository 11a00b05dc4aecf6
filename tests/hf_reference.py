"""Reference outputs from Hugging Face transformers on the same checkpoint (the correctness oracle)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=8)
def hf_model(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):  # noqa: ANN201
    from transformers import OPTForCausalLM

    return OPTForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def hf_greedy(path: Path, prompt: list[int], n: int, dtype: torch.dtype = torch.float32,
              device: str = "cpu") -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probabilities, prompt run alone (no padding)."""
    model = hf_model(str(path), dtype, device)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt], device=device), max_new_tokens=n, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=1)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, tokens, strict=True)]
    return tokens, logprobs


def hf_continuation_logprobs(path: Path, context: list[int], continuation: list[int]) -> tuple[list[float], bool]:
    model = hf_model(str(path))
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    c = len(context)
    lps = [logp[c - 1 + j, tok].item() for j, tok in enumerate(continuation)]
    greedy = all(logp[c - 1 + j].argmax().item() == tok for j, tok in enumerate(continuation))
    return lps, greedy
