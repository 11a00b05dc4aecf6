"""Offline `word_tokenize`: NLTK's improved Treebank word tokenizer, after a data-free sentence splitter.

HELM's BLEU tokenizes with `nltk.word_tokenize`, which first splits sentences with the Punkt model (`punkt_tab`
data, downloaded at import by HELM) and then applies `NLTKWordTokenizer` to each sentence. The word tokenizer
needs no data and is re-implemented rule for rule (NLTK 3.9/3.10). Punkt is approximated by `split_sentences`:
split after `.`, `?` or `!` (plus closing quotes/brackets) and whitespace, except after a known abbreviation, a
single-letter initial, an ellipsis, or a number or initial followed by a lower-case word or punctuation. The
sentence split only decides whether a sentence-final period inside the text becomes its own token.
"""

from __future__ import annotations

import re

# Abbreviations that do not end a sentence (a small, common subset of what Punkt's English model has learned).
ABBREVIATIONS = frozenset((
    "mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "rev", "gen", "col", "lt", "sgt", "capt", "gov", "sen",
    "rep", "pres", "hon", "mt", "ft", "vs", "etc", "al", "approx", "dept", "est", "fig", "vol", "inc", "ltd", "co",
    "corp", "bros", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "e.g",
    "i.e", "u.s", "u.k", "a.m", "p.m",
))

_CLOSERS = "\"')]}»”’"
_NUMBER = re.compile(r"^-?[.,]?\d[\d,.-]*\.?$")
_INITIAL = re.compile(r"^[^\W\d]\.$")
_PUNKT_PUNCT = frozenset(";:,.!?")

_STARTING_QUOTES = [
    (re.compile(r"([«“‘„]|[`]+)"), r" \1 "),
    (re.compile(r"^\""), r"``"),
    (re.compile(r"(``)"), r" \1 "),
    (re.compile(r"([ (\[{<])(\"|'{2})"), r"\1 `` "),
    (re.compile(r"(?i)(?<!\w)(')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)"), r"\1 "),
]
_PUNCTUATION = [
    (re.compile(r"([^.])(\.)([\])}>\"'»”’ ]*+)\s*$"), r"\1 \2 \3 "),
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.{2,}"), r" \g<0> "),
    (re.compile(r"[;@#$%&]"), r" \g<0> "),
    (re.compile(r"[\u2012-\u2015]"), r" \g<0> "),
    (re.compile(r"([^.])(\.)([\])}>\"']*)\s*$"), r"\1 \2\3 "),
    (re.compile(r"[?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
    (re.compile(r"[*]"), r" \g<0> "),
]
_BRACKETS = (re.compile(r"[\]\[(){}<>]"), r" \g<0> ")
_DOUBLE_DASH = (re.compile(r"--"), r" -- ")
_ENDING_QUOTES = [
    (re.compile(r"([»”’])"), r" \1 "),
    (re.compile(r"''"), " '' "),
    (re.compile(r'"'), " '' "),
    (re.compile(r"\s+"), " "),
    (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
]
_CONTRACTIONS = [re.compile(p) for p in (
    r"(?i)\b(can)(not)\b", r"(?i)\b(d)('ye)\b", r"(?i)\b(gim)(me)\b", r"(?i)\b(gon)(na)\b",
    r"(?i)\b(got)(ta)\b", r"(?i)\b(lem)(me)\b", r"(?i)\b(more)('n)\b", r"(?i)\b(wan)(na)(?=\s)",
    r"(?i) ('t)(is)\b", r"(?i) ('t)(was)\b",
)]


def treebank_tokenize(sentence: str) -> list[str]:
    """`nltk.tokenize.NLTKWordTokenizer().tokenize(sentence)` (no parenthesis conversion)."""
    text = sentence
    for pattern, repl in (*_STARTING_QUOTES, *_PUNCTUATION, _BRACKETS, _DOUBLE_DASH):
        text = pattern.sub(repl, text)
    text = f" {text} "
    for pattern, repl in _ENDING_QUOTES:
        text = pattern.sub(repl, text)
    for pattern in _CONTRACTIONS:
        text = pattern.sub(r" \1 \2 ", text)
    return text.split()


def _ends_sentence(token: str, next_token: str) -> bool:
    core = token.rstrip(_CLOSERS)
    if not core or core[-1] not in ".?!":
        return False
    if core[-1] in "?!":
        return True
    if core.endswith(".."):
        return False
    word = core.lstrip("\"'([{«“‘")
    typ = word[:-1].lower()
    if typ in ABBREVIATIONS or typ.split("-")[-1] in ABBREVIATIONS:
        return False
    if _INITIAL.match(word) or _NUMBER.match(word):
        first = next_token[0]
        if next_token in _PUNKT_PUNCT or first.islower() or (_INITIAL.match(word) and first.isupper()):
            return False
    return True


def split_sentences(text: str) -> list[str]:
    """Split `text` into sentences (a data-free approximation of `nltk.sent_tokenize`); whitespace is kept."""
    tokens = list(re.finditer(r"\S+", text))
    sentences: list[str] = []
    start = 0
    for tok, nxt in zip(tokens, tokens[1:], strict=False):
        if _ends_sentence(tok.group(), nxt.group()):
            sentences.append(text[start:tok.end()])
            start = nxt.start()
    sentences.append(text[start:])
    return [s for s in sentences if s.strip()]


def word_tokenize(text: str) -> list[str]:
    """`nltk.word_tokenize(text)` with the data-free sentence splitter above."""
    return [token for sentence in split_sentences(text) for token in treebank_tokenize(sentence)]
