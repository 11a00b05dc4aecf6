"""Blocks of sequences: left padding, masks, positions, sampling and stop handling per GPU batch.

The engine cuts any number of prompts of any lengths into blocks of at most gpu_batch_size *
num_gpu_batches sequences (in the order given) and each block into GPU batches of near-equal size. Each
block is left-padded to its own longest prompt. Nothing here knows about tiers or weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def plan_blocks(num_prompts: int, block_size: int, gpu_batch_size: int) -> list[list[list[int]]]:
    """Prompt indices per block, per GPU batch: [[batch0 indices, batch1 indices, ...], ...]."""
    blocks = []
    for start in range(0, num_prompts, block_size):
        idx = list(range(start, min(start + block_size, num_prompts)))
        n_batches = -(-len(idx) // gpu_batch_size)
        base, extra = divmod(len(idx), n_batches)
        batches, at = [], 0
        for b in range(n_batches):
            size = base + (b < extra)
            batches.append(idx[at:at + size])
            at += size
        blocks.append(batches)
    return blocks


@dataclass
class BatchState:
    """One GPU batch of a block. Shapes: rows sequences, s padded prompt length, n new tokens."""

    rows: int
    prompt_len: int  # s
    ids: torch.Tensor  # (rows, s) long, left-padded
    valid: torch.Tensor  # (rows, s + n) bool: real prompt tokens and every generated position
    valid_host: torch.Tensor  # the same on the CPU (CPU-delegated attention reads it there)
    real_len: torch.Tensor  # (rows,) long, unpadded prompt lengths
    stop_ids: torch.Tensor  # (rows, m) long, -1 = none
    tokens: torch.Tensor  # (rows, n) long, generated ids
    logprobs: torch.Tensor  # (rows, n) float32
    finished: torch.Tensor  # (rows,) bool
    hidden: torch.Tensor | None = None  # (rows, w, h) while on the device between layers
    top_ids: torch.Tensor | None = None  # (rows, n, k) long: the k most likely tokens at each step (if asked)
    top_logprobs: torch.Tensor | None = None  # (rows, n, k) float32: their log-probabilities

    def prefill_positions(self) -> torch.Tensor:
        """OPT position ids (before the offset of 2): cumsum(mask) - 1, pads at -1. (rows, s)."""
        mask = self.valid[:, :self.prompt_len].long()
        return torch.cumsum(mask, dim=1) * mask - 1

    def decode_positions(self, step: int) -> torch.Tensor:
        """Position id of the token fed at decode step `step` (1-based): real_len + step - 1. (rows, 1)."""
        return (self.real_len + step - 1)[:, None]

    def last_tokens(self, step: int) -> torch.Tensor:
        return self.tokens[:, step - 1:step]


def make_batch(prompts: Sequence[Sequence[int]], prompt_len: int, gen_len: int, pad_id: int,
               stop_ids: Sequence[Sequence[int]], device: torch.device, top_k: int = 0) -> BatchState:
    rows = len(prompts)
    ids = torch.full((rows, prompt_len), pad_id, dtype=torch.long)
    valid = torch.zeros(rows, prompt_len + gen_len, dtype=torch.bool)
    for r, p in enumerate(prompts):
        if p:
            ids[r, prompt_len - len(p):] = torch.tensor(list(p), dtype=torch.long)
        valid[r, prompt_len - len(p):] = True
    m = max((len(s) for s in stop_ids), default=0) or 1
    stops = torch.full((rows, m), -1, dtype=torch.long)
    for r, s in enumerate(stop_ids):
        if s:
            stops[r, :len(s)] = torch.tensor(list(s), dtype=torch.long)
    return BatchState(
        rows=rows, prompt_len=prompt_len, ids=ids.to(device), valid=valid.to(device), valid_host=valid,
        real_len=torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device),
        stop_ids=stops.to(device), tokens=torch.zeros(rows, gen_len, dtype=torch.long, device=device),
        logprobs=torch.zeros(rows, gen_len, dtype=torch.float32, device=device),
        finished=torch.zeros(rows, dtype=torch.bool, device=device),
        top_ids=torch.zeros(rows, gen_len, top_k, dtype=torch.long, device=device) if top_k else None,
        top_logprobs=torch.zeros(rows, gen_len, top_k, dtype=torch.float32, device=device) if top_k else None)


class Sampler:
    """Greedy or temperature/top-p sampling, reproducible per sequence from (seed, prompt index)."""

    def __init__(self, temperature: float, top_p: float, seed: int | None, device: torch.device) -> None:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.temperature, self.top_p, self.device = temperature, top_p, device
        self.seed = 0 if seed is None else int(seed)
        self._generators: dict[int, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, prompt_index: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """logits: (rows, v) float32 -> (token ids (rows,), their log-probabilities (rows,))."""
        logp = torch.log_softmax(logits, dim=-1)
        if self.temperature == 0:
            tokens = logits.argmax(dim=-1)
        else:
            probs = torch.softmax(logits / self.temperature, dim=-1)
            if self.top_p < 1:
                sorted_p, order = probs.sort(dim=-1, descending=True)
                drop = sorted_p.cumsum(dim=-1) - sorted_p > self.top_p  # keep the smallest nucleus >= top_p
                sorted_p[drop] = 0
                probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
            tokens = torch.stack([torch.multinomial(probs[r], 1, generator=self._gen(i))[0]
                                  for r, i in enumerate(prompt_index)])
        return tokens, logp.gather(-1, tokens[:, None])[:, 0]

    def _gen(self, prompt_index: int) -> torch.Generator:
        g = self._generators.get(prompt_index)
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(self.seed * 1_000_003 + prompt_index)
            self._generators[prompt_index] = g
        return g


def normalize_stop_ids(stop_token_ids: Sequence[int] | Sequence[Sequence[int]], n: int) -> list[list[int]]:
    """A flat list applies to every prompt; a list of lists gives each prompt its own stop ids."""
    items = list(stop_token_ids)
    if not items:
        return [[] for _ in range(n)]
    if all(isinstance(x, int) for x in items):
        return [[int(x) for x in items] for _ in range(n)]
    if len(items) != n or not all(isinstance(x, (list, tuple)) for x in items):
        raise ValueError("stop_token_ids must be a list of ids, or one list of ids per prompt")
    return [[int(t) for t in x] for x in items]
