"""Tokenizers at the evaluation edge: the engine works on ids, adapters and metrics on text.

`TokenCounter` is all an adapter needs to fit prompts into a context window; `Vocabulary` adds what the
request bridge needs to turn stop strings into stop token ids. `HFTokenizer` wraps a `tokenizer.json`
(HF `tokenizers`, no network); `ByteTokenizer` is a dependency-free byte-level tokenizer for tests and
for models trained on raw bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

BYTE_VOCAB_SIZE = 256
ENCODE_MEMO_SIZE = 1 << 14  # prompts remembered by HFTokenizer.encode (cleared when full)


@runtime_checkable
class TokenCounter(Protocol):
    """Text <-> token ids, without special tokens."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@runtime_checkable
class Vocabulary(TokenCounter, Protocol):
    """A TokenCounter that can also list the decoded text of every token id."""

    @property
    def vocab_size(self) -> int: ...

    def token_texts(self) -> list[str]:
        """Decoded text of each id 0..vocab_size-1 (special tokens decode to "")."""
        ...


class HFTokenizer:
    """A HF `tokenizers` tokenizer loaded from `tokenizer.json` (a file, or a model directory holding one)."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer  # light, but only needed when a real tokenizer is used

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json at {file}. Save one next to the weights, e.g. "
                f"`transformers.AutoTokenizer.from_pretrained(DIR).backend_tokenizer.save('{file}')`, "
                f"or evaluate with ByteTokenizer for byte-level models.")
        self.path = file
        self._tok = Tokenizer.from_file(str(file))
        self._token_texts: list[str] | None = None
        self._memo: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, memoized: the adapter counts a prompt's tokens and the runner then encodes the
        same prompt again (a copy is returned, so callers may modify it)."""
        ids = self._memo.get(text)
        if ids is None:
            ids = self._tok.encode(text, add_special_tokens=False).ids
            if len(self._memo) >= ENCODE_MEMO_SIZE:
                self._memo.clear()
            self._memo[text] = ids
        return list(ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_texts(self) -> list[str]:
        if self._token_texts is None:
            self._token_texts = self._tok.decode_batch([[i] for i in range(self.vocab_size)],
                                                       skip_special_tokens=True)
        return self._token_texts

    def token_id(self, token: str) -> int | None:
        """Id of a token string such as "</s>", or None if the vocabulary has no such token."""
        return self._tok.token_to_id(token)


class ByteTokenizer:
    """One token per UTF-8 byte (ids 0..255); decoding replaces invalid byte sequences with U+FFFD."""

    vocab_size = BYTE_VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def token_texts(self) -> list[str]:
        return [self.decode([i]) for i in range(BYTE_VOCAB_SIZE)]
