"""Prompt text assembly and fitting a prompt into the model's context window (HELM's rules).

Text = global_prefix + instance_prefix.join([instructions] + train blocks + [eval block]) + global_suffix,
then the regex substitutions. To fit, train blocks are dropped from the end one at a time; if the prompt
still does not fit, its text is cut to the window (HELM cuts from the right, keeping the beginning; scoring
prompts are cut from the left so the answer being scored survives).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from flexgen_core.evaluation.schema import Substitution
from flexgen_core.evaluation.tokenizer import TokenCounter


@dataclass(frozen=True)
class Prompt:
    """A prompt as blocks, so in-context examples can be dropped to fit; `text` is the final string."""

    global_prefix: str
    global_suffix: str
    instance_prefix: str
    substitutions: tuple[Substitution, ...]
    instructions_block: str
    train_instance_blocks: tuple[str, ...]
    eval_instance_block: str
    truncated_text: str | None = None

    @property
    def text(self) -> str:
        if self.truncated_text is not None:
            return self.truncated_text
        blocks = ([self.instructions_block] if self.instructions_block else []) + list(self.train_instance_blocks)
        text = self.global_prefix + self.instance_prefix.join([*blocks, self.eval_instance_block]) + self.global_suffix
        for sub in self.substitutions:
            text = re.sub(sub.source, sub.target, text)
        return text

    @property
    def truncated(self) -> bool:
        return self.truncated_text is not None

    @property
    def num_train_instances(self) -> int:
        return len(self.train_instance_blocks)


@dataclass(frozen=True)
class ContextWindow:
    """The model's token budget: prompt + `reserved_tokens` (e.g. a BOS the runner adds) + completion."""

    tokenizer: TokenCounter
    max_sequence_tokens: int
    reserved_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_sequence_tokens <= self.reserved_tokens:
            raise ValueError(f"a context window of {self.max_sequence_tokens} tokens leaves no room after "
                             f"{self.reserved_tokens} reserved token(s)")

    def num_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def fits(self, text: str, completion_tokens: int) -> bool:
        return self.num_tokens(text) + self.reserved_tokens + completion_tokens <= self.max_sequence_tokens

    def prompt_budget(self, completion_tokens: int) -> int:
        budget = self.max_sequence_tokens - self.reserved_tokens - completion_tokens
        if budget <= 0:
            raise ValueError(f"max_tokens={completion_tokens} leaves no room for a prompt in a context window of "
                             f"{self.max_sequence_tokens} tokens ({self.reserved_tokens} reserved); lower max_tokens")
        return budget

    def truncate_from_right(self, text: str, completion_tokens: int) -> str:
        """Keep the beginning of `text` (HELM's truncation), shortening further until it re-encodes short enough."""
        ids = self.tokenizer.encode(text)[: self.prompt_budget(completion_tokens)]
        result = self.tokenizer.decode(ids)
        while result and not self.fits(result, completion_tokens):
            result = result[:-1]
        return result

    def truncate_from_left(self, text: str, completion_tokens: int) -> str:
        """Keep the end of `text` (used for scoring prompts, whose end is the answer being scored)."""
        budget = self.prompt_budget(completion_tokens)
        ids = self.tokenizer.encode(text)
        result = self.tokenizer.decode(ids[len(ids) - budget:]) if len(ids) > budget else text
        while result and not self.fits(result, completion_tokens):
            result = result[1:]
        return result


def fit_prompt(prompt: Prompt, window: ContextWindow, completion_tokens: int, keep_end: bool = False) -> Prompt:
    """Drop train blocks from the end until the prompt fits; then cut its text (from the right, or the left
    when `keep_end`)."""
    while prompt.num_train_instances > 0:
        if window.fits(prompt.text, completion_tokens):
            return prompt
        prompt = dataclasses.replace(prompt, train_instance_blocks=prompt.train_instance_blocks[:-1])
    text = prompt.text
    if window.fits(text, completion_tokens):
        return prompt
    cut = window.truncate_from_left if keep_end else window.truncate_from_right
    return dataclasses.replace(prompt, truncated_text=cut(text, completion_tokens))
