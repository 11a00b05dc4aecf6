"""Porter stemmer, NLTK_EXTENSIONS variant: the stemmer `rouge_score` applies when HELM asks for `use_stemmer=True`.

Re-implemented from Porter (1980) plus the documented NLTK extensions (irregular forms, `ies`/`ied` on short
words, `y -> i` only after a consonant, `alli`/`fulli`/`logi` in step 2, `bli -> ble`, two-letter `*o`). No data,
no NLTK import. `tests/test_eval_metrics.py` pins its output on words that exercise every step.
"""

from __future__ import annotations

from collections.abc import Callable

_VOWELS = frozenset("aeiou")
_IRREGULAR = {
    "skies": "sky", "sky": "sky", "dying": "die", "lying": "lie", "tying": "tie", "news": "news",
    "innings": "inning", "inning": "inning", "outings": "outing", "outing": "outing",
    "cannings": "canning", "canning": "canning", "howe": "howe", "proceed": "proceed",
    "exceed": "exceed", "succeed": "succeed",
}

Condition = Callable[[str], bool] | None


def _consonants(word: str) -> list[bool]:
    """True where word[i] is a consonant; `y` is a consonant at the start or after a vowel."""
    flags: list[bool] = []
    for i, ch in enumerate(word):
        if ch in _VOWELS:
            flags.append(False)
        elif ch == "y":
            flags.append(i == 0 or not flags[i - 1])
        else:
            flags.append(True)
    return flags


def _measure(stem: str) -> int:
    """m in [C](VC)^m[V]: the number of vowel-to-consonant transitions."""
    flags = _consonants(stem)
    return sum(1 for a, b in zip(flags, flags[1:], strict=False) if not a and b)


def _positive(stem: str) -> bool:
    return _measure(stem) > 0


def _above_one(stem: str) -> bool:
    return _measure(stem) > 1


def _has_vowel(stem: str) -> bool:
    return not all(_consonants(stem))


def _double_consonant(word: str) -> bool:
    return len(word) >= 2 and word[-1] == word[-2] and _consonants(word)[-1]


def _cvc(word: str) -> bool:
    """*o: ends consonant-vowel-consonant, last not w/x/y; NLTK also accepts a two-letter vowel-consonant word."""
    c = _consonants(word)
    if len(word) >= 3:
        return c[-3] and not c[-2] and c[-1] and word[-1] not in "wxy"
    return len(word) == 2 and not c[0] and c[1]


def _apply(word: str, rules: list[tuple[str, str, Condition]]) -> str:
    """The first rule whose suffix matches decides: replace if its condition holds on the stem, else keep word."""
    for suffix, replacement, condition in rules:
        if suffix == "*d":
            if _double_consonant(word):
                stem = word[:-2]
                return stem + replacement if condition is None or condition(stem) else word
            continue
        if word.endswith(suffix):
            stem = word[: len(word) - len(suffix)]
            return stem + replacement if condition is None or condition(stem) else word
    return word


def _step1a(word: str) -> str:
    if word.endswith("ies") and len(word) == 4:
        return word[:-3] + "ie"
    return _apply(word, [("sses", "ss", None), ("ies", "i", None), ("ss", "ss", None), ("s", "", None)])


def _step1b(word: str) -> str:
    if word.endswith("ied"):
        return word[:-3] + ("ie" if len(word) == 4 else "i")
    if word.endswith("eed"):
        stem = word[:-3]
        return stem + "ee" if _measure(stem) > 0 else word
    for suffix in ("ed", "ing"):
        if word.endswith(suffix) and _has_vowel(word[: -len(suffix)]):
            stem = word[: -len(suffix)]
            break
    else:
        return word
    return _apply(stem, [
        ("at", "ate", None), ("bl", "ble", None), ("iz", "ize", None),
        ("*d", stem[-1], lambda _: stem[-1] not in "lsz"),
        ("", "e", lambda s: _measure(s) == 1 and _cvc(s)),
    ])


def _step1c(word: str) -> str:
    return _apply(word, [("y", "i", lambda s: len(s) > 1 and _consonants(s)[-1])])


_STEP2 = [(suffix, repl, _positive) for suffix, repl in [
    ("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"), ("izer", "ize"), ("bli", "ble"),
    ("alli", "al"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous"), ("ization", "ize"), ("ation", "ate"),
    ("ator", "ate"), ("alism", "al"), ("iveness", "ive"), ("fulness", "ful"), ("ousness", "ous"), ("aliti", "al"),
    ("iviti", "ive"), ("biliti", "ble"), ("fulli", "ful"),
]]
_STEP3 = [(suffix, repl, _positive) for suffix, repl in [
    ("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"), ("ical", "ic"), ("ful", ""), ("ness", ""),
]]
_STEP4: list[tuple[str, str, Condition]] = [(suffix, "", _above_one) for suffix in [
    "al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent",
]]
_STEP4.append(("ion", "", lambda s: _measure(s) > 1 and s[-1] in "st"))
_STEP4 += [(suffix, "", _above_one) for suffix in ["ou", "ism", "ate", "iti", "ous", "ive", "ize"]]


def _step2(word: str) -> str:
    if word.endswith("alli") and _positive(word[:-4]):
        return _step2(word[:-4] + "al")
    # "logi -> log" tests the measure of the word without "ogi" (an NLTK extension).
    return _apply(word, [*_STEP2, ("logi", "log", lambda _: _positive(word[:-3]))])


def _step5a(word: str) -> str:
    if word.endswith("e"):
        stem = word[:-1]
        m = _measure(stem)
        if m > 1 or (m == 1 and not _cvc(stem)):
            return stem
    return word


def _step5b(word: str) -> str:
    return _apply(word, [("ll", "l", lambda _: _measure(word[:-1]) > 1)])


def stem(word: str) -> str:
    """Stem one word (lower-cased first), as `nltk.stem.porter.PorterStemmer().stem(word)` does."""
    word = word.lower()
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) <= 2:
        return word
    for step in (_step1a, _step1b, _step1c, _step2):
        word = step(word)
    word = _apply(word, _STEP3)
    word = _apply(word, _STEP4)
    return _step5b(_step5a(word))
