"""What the engine returns: generations, scores, and the measured statistics of a call."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Generation:
    """Generated continuation of one prompt.

    token_ids: generated tokens only (a stop token that ended the sequence is included, as in HF).
    finish_reason: "stop" (a stop token was generated) or "length" (max_new_tokens reached).
    logprobs: log-probability of each generated token under the model (natural log), or None.
    top_logprobs: per generated token, {token id: log-probability} of the most likely tokens, when asked.
    """

    token_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None


@dataclass(frozen=True)
class Score:
    """Log-likelihood of a continuation given a context."""

    logprob: float
    token_logprobs: list[float]
    is_greedy: bool


@dataclass
class CallStats:
    """Measured timings and token counts of the last generate()/score() call (wall clock, seconds)."""

    blocks: int = 0
    block_size: int = 0
    sequences: int = 0
    prompt_tokens: int = 0  # real (unpadded) prompt tokens
    padded_prompt_tokens: int = 0  # prompt positions computed, padding included
    generated_tokens: int = 0  # real generated tokens (up to each sequence's stop)
    decode_steps: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    peak_bytes: dict[str, int] = field(default_factory=dict)
    # with Engine.step_timing on: seconds per (phase, layer kind), device-synchronized after every step
    step_s: dict[str, dict[str, float]] = field(default_factory=dict)
    # CPU-delegated decode attention, host seconds: "compute" on its thread, "inputs" that thread waiting for q/k/v
    # from the device (which wait for the layer's inputs and weights), "wait" the main thread waiting for results
    host_attention_s: dict[str, float] = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def padding_efficiency(self) -> float:
        return self.prompt_tokens / self.padded_prompt_tokens if self.padded_prompt_tokens else 1.0

    @property
    def generation_tokens_per_s(self) -> float:
        return self.generated_tokens / self.total_s if self.total_s > 0 else 0.0
