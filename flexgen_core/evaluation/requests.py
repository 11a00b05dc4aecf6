"""Bridge between text requests and the id-level engine: stop tokens, completion truncation, scoring pairs.

The engine stops a sequence when it emits one of its stop token ids. `stop_token_ids` picks every vocabulary
id whose text contains a stop sequence, so the engine stops no later than the text would; the text is then
cut at the first stop sequence by `truncate_completion` (HELM's `truncate_sequence`). A stop sequence that
only appears across a token boundary does not stop the engine early, but is still cut from the text.
"""

from __future__ import annotations

from collections.abc import Sequence

from flexgen_core.evaluation.schema import GeneratedOutput, RequestState, Token
from flexgen_core.evaluation.tokenizer import TokenCounter, Vocabulary


def stop_token_ids(tokenizer: Vocabulary, stop_sequences: Sequence[str]) -> list[int]:
    """Ids of every token whose decoded text contains any of `stop_sequences` (sorted)."""
    if any(stop == "" for stop in stop_sequences):
        raise ValueError("an empty stop sequence would stop every completion at once; remove it")
    if not stop_sequences:
        return []
    return [i for i, text in enumerate(tokenizer.token_texts()) if any(stop in text for stop in stop_sequences)]


def truncate_completion(text: str, tokens: Sequence[Token], stop_sequences: Sequence[str], max_tokens: int,
                        finish_reason: str | None = None) -> GeneratedOutput:
    """HELM's `truncate_sequence`: cut `text` before the first stop sequence and keep the tokens that start
    before the cut (a token that starts with the stop sequence is dropped, one that merely contains it is
    kept), then keep at most `max_tokens` tokens. The logprob is the sum over the kept tokens.
    finish_reason becomes "stop" when a stop sequence was cut, "length" when tokens were cut, else it is
    passed through."""
    cut = min((i for i in (text.find(stop) for stop in stop_sequences) if i >= 0), default=-1)
    kept = list(tokens)
    if cut >= 0:
        text = text[:cut]
        starts = _token_starts(tokens)
        kept = [t for t, start in zip(tokens, starts, strict=True) if start < cut]
        finish_reason = "stop"
    if len(kept) > max_tokens:
        kept = kept[:max_tokens]
        text = "".join(t.text for t in kept)
        finish_reason = "length"
    reason = {"reason": finish_reason} if finish_reason is not None else None
    return GeneratedOutput(text=text, logprob=sum(t.logprob for t in kept), tokens=tuple(kept), finish_reason=reason)


def _token_starts(tokens: Sequence[Token]) -> list[int]:
    """Character offset where each token's text starts in the concatenated completion."""
    starts, offset = [], 0
    for token in tokens:
        starts.append(offset)
        offset += len(token.text)
    return starts


def scoring_texts(state: RequestState) -> tuple[str, str]:
    """(context, continuation) of a multiple_choice_separate request: the continuation is the scored choice
    text; whitespace that ends the context moves to the continuation (" Paris", not "Paris"), as lm-eval does."""
    if state.reference_index is None:
        raise ValueError("not a scoring request: it has no reference_index (use multiple_choice_separate_original)")
    choice = state.instance.references[state.reference_index].output.text
    prompt = state.request.prompt
    if not prompt.endswith(choice):
        raise ValueError(f"scoring prompt does not end with its choice {choice!r}; was it built by the adapter?")
    context = prompt[: len(prompt) - len(choice)]
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + choice


def scoring_token_ids(tokenizer: TokenCounter, state: RequestState) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) for `engine.score`: the continuation ids are what encoding the whole
    prompt adds after the context's ids, so token merges across the boundary are handled."""
    context, continuation = scoring_texts(state)
    context_ids = tokenizer.encode(context)
    whole_ids = tokenizer.encode(context + continuation)
    if whole_ids[: len(context_ids)] != context_ids:  # a merge across the boundary: split the texts apart
        return context_ids, tokenizer.encode(continuation)
    return context_ids, whole_ids[len(context_ids):]
