"""HELM's reference metrics (`evaluate_reference_metrics.py`), re-implemented offline with HELM's names and quirks.

Every metric is `name(gold, pred) -> float`. Quirks kept on purpose (see `reference/helm.md` §2.1):
- most metrics score 0 for an empty prediction, even against an empty gold;
- `f1_score` compares the *sets* of normalised words (a repeated word counts once);
- `bleu_4` is the 4-gram precision alone times the brevity penalty (weights (0, 0, 0, 1)), NLTK's `sentence_bleu`
  without smoothing: no matching 4-gram gives `sys.float_info.min * bp`, not an exact 0;
- `exact_match_indicator` compares only what follows the last indicator (default " "), so for Dyck sequences
  only the final bracket is compared.
Nothing here imports nltk or rouge_score: the Porter stemmer and the NLTK word tokenizer are re-implemented in
`porter.py` and `word_tokenize.py`. Corpus-level classification F1 and efficiency stats are at the end.
"""

from __future__ import annotations

import math
import re
import string
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from flexgen_core.evaluation.porter import stem
from flexgen_core.evaluation.stats import MetricName, Stat
from flexgen_core.evaluation.word_tokenize import word_tokenize

MetricFn = Callable[[str, str], float]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_text(text: str, remove_articles: bool = True) -> str:
    """HELM/QuAC normalisation: lower-case, drop ASCII punctuation, drop a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    if remove_articles:
        text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


# --- exact-match family ----------------------------------------------------------------------------------------

def exact_match(gold: str, pred: str) -> float:
    """1 iff gold and pred are equal after stripping surrounding whitespace (case-sensitive)."""
    return float(bool(pred) and gold.strip() == pred.strip())


def quasi_exact_match(gold: str, pred: str) -> float:
    """1 iff gold and pred are equal after `normalize_text`."""
    return float(bool(pred) and normalize_text(gold) == normalize_text(pred))


def quasi_leave_articles_exact_match(gold: str, pred: str) -> float:
    """As quasi_exact_match, but articles are kept."""
    return float(bool(pred) and normalize_text(gold, False) == normalize_text(pred, False))


def prefix_exact_match(gold: str, pred: str) -> float:
    """1 iff the stripped pred starts with the stripped gold (for answers that run on: "Yes, because ...")."""
    return float(bool(pred) and pred.strip().startswith(gold.strip()))


def quasi_prefix_exact_match(gold: str, pred: str) -> float:
    """1 iff the normalised pred starts with the normalised gold."""
    return float(bool(pred) and normalize_text(pred).startswith(normalize_text(gold)))


def exact_match_indicator(gold: str, pred: str, indicator: str = " ") -> float:
    """exact_match of what follows the last `indicator` on each side (HELM's Dyck metric: the last token only)."""
    return exact_match(gold.split(indicator)[-1].strip(), pred.split(indicator)[-1].strip())


def final_number_exact_match(gold: str, pred: str) -> float:
    """exact_match of the last number on each side, commas removed (HELM's regex: its `.` matches any character)."""
    def final_number(text: str) -> str:
        found = re.findall(r"-?[\d,]+(?:.\d+)?", text)
        return found[-1].replace(",", "") if found else ""

    return exact_match(final_number(gold), final_number(pred))


# --- set metrics (synthetic_reasoning_natural) -------------------------------------------------------------------

def _extract_set(text: str) -> set[str]:
    """HELM's parsing: "Nothing." is empty; drop ".", keep what follows the last " is ", split on " and "."""
    if text == "Nothing.":
        return set()
    return set(text.replace(".", "").split(" is ")[-1].split(" and "))


def _gold_pred_sets(gold: str, pred: str) -> tuple[set[str], set[str]]:
    return _extract_set(gold), _extract_set(pred.split("\n")[0])


def exact_set_match(gold: str, pred: str) -> float:
    g, p = _gold_pred_sets(gold, pred)
    return float(g == p)


def iou_set_match(gold: str, pred: str) -> float:
    g, p = _gold_pred_sets(gold, pred)
    return float(g == p) if not g else len(g & p) / len(g | p)


def f1_set_match(gold: str, pred: str) -> float:
    g, p = _gold_pred_sets(gold, pred)
    return float(g == p) if not g else 2 * len(g & p) / (len(g) + len(p))


def absolute_value_difference(gold: str, pred: str) -> float:
    """|int(gold) - int(pred)| with commas removed; a side that is not an integer counts as 0."""
    def as_int(text: str) -> float:
        try:
            return int(text.replace(",", ""))
        except ValueError:
            return 0.0

    return float(abs(as_int(gold) - as_int(pred)))


# --- overlap metrics -------------------------------------------------------------------------------------------

def f1_score(gold: str, pred: str) -> float:
    """F1 (alpha 0.5) between the SETS of words of the normalised gold and pred; 0 if either is empty."""
    g, p = set(normalize_text(gold).split()), set(normalize_text(pred).split())
    if not g or not p:
        return 0.0
    common = len(g & p)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 1.0 / (0.5 / precision + 0.5 / recall)


def rouge_tokenize(text: str) -> list[str]:
    """rouge_score's tokenizer with use_stemmer=True: lower-case, non-[a-z0-9] to spaces, Porter-stem words > 3."""
    tokens = re.split(r"\s+", re.sub(r"[^a-z0-9]+", " ", text.lower()))
    return [t for t in (stem(t) if len(t) > 3 else t for t in tokens) if re.fullmatch(r"[a-z0-9]+", t)]


def _fmeasure(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _rouge_n(gold: str, pred: str, n: int) -> float:
    def ngrams(tokens: list[str]) -> Counter[tuple[str, ...]]:
        return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))

    g, p = ngrams(rouge_tokenize(gold)), ngrams(rouge_tokenize(pred))
    overlap = sum(min(c, p[k]) for k, c in g.items())
    return _fmeasure(overlap / max(sum(p.values()), 1), overlap / max(sum(g.values()), 1))


def rouge_1(gold: str, pred: str) -> float:
    """ROUGE-1 F-measure (rouge_score, stemmed), as HELM's `rouge_1`."""
    return _rouge_n(gold, pred, 1)


def rouge_2(gold: str, pred: str) -> float:
    """ROUGE-2 F-measure (rouge_score, stemmed), as HELM's `rouge_2`."""
    return _rouge_n(gold, pred, 2)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(gold: str, pred: str) -> float:
    """ROUGE-L F-measure: longest common subsequence of rouge tokens, P = lcs/|pred|, R = lcs/|gold|."""
    g, p = rouge_tokenize(gold), rouge_tokenize(pred)
    if not g or not p:
        return 0.0
    lcs = _lcs_length(g, p)
    return _fmeasure(lcs / len(p), lcs / len(g))


def sentence_bleu(reference: Sequence[str], hypothesis: Sequence[str], weights: Sequence[float]) -> float:
    """NLTK's `sentence_bleu([reference], hypothesis, weights)` with no smoothing (method0), one reference."""
    if not hypothesis:
        return 0.0
    precisions: list[float] = []
    for n in range(1, len(weights) + 1):
        hyp = Counter(tuple(hypothesis[i:i + n]) for i in range(len(hypothesis) - n + 1))
        ref = Counter(tuple(reference[i:i + n]) for i in range(len(reference) - n + 1))
        matches = sum(min(c, ref[k]) for k, c in hyp.items())
        if n == 1 and matches == 0:
            return 0.0
        precisions.append(matches / max(1, sum(hyp.values())) if matches else sys.float_info.min)
    r, c = len(reference), len(hypothesis)
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return bp * math.exp(math.fsum(w * math.log(p) for w, p in zip(weights, precisions, strict=True)))


def bleu_1(gold: str, pred: str) -> float:
    """Clipped unigram precision times the brevity penalty, on `word_tokenize` tokens."""
    return sentence_bleu(word_tokenize(gold), word_tokenize(pred), (1, 0, 0, 0))


def bleu_4(gold: str, pred: str) -> float:
    """HELM's bleu_4: the 4-gram precision ONLY (weights (0, 0, 0, 1)) times the brevity penalty."""
    return sentence_bleu(word_tokenize(gold), word_tokenize(pred), (0, 0, 0, 1))


# --- registry and multi-reference scoring ----------------------------------------------------------------------

METRICS: Mapping[str, MetricFn] = MappingProxyType({fn.__name__: fn for fn in (
    exact_match, quasi_exact_match, quasi_leave_articles_exact_match, prefix_exact_match,
    quasi_prefix_exact_match, exact_match_indicator, final_number_exact_match, exact_set_match, iou_set_match,
    f1_set_match, absolute_value_difference, f1_score, rouge_1, rouge_2, rouge_l, bleu_1, bleu_4,
)})

# HELM's metric bundles (common_metric_specs.py).
EXACT_MATCH_METRICS = ("exact_match", "quasi_exact_match", "prefix_exact_match", "quasi_prefix_exact_match")
F1_METRICS = ("exact_match", "quasi_exact_match", "f1_score")
OPEN_ENDED_GENERATION_METRICS = ("exact_match", "quasi_exact_match", "f1_score", "rouge_l", "bleu_1", "bleu_4")
SET_MATCH_METRICS = ("f1_set_match", "iou_set_match", "exact_set_match")


def get_metric(name: str) -> MetricFn:
    """The metric registered under `name`; ValueError listing the known names otherwise."""
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; known metrics: {', '.join(sorted(METRICS))}") from None


def _resolve(metric: str | MetricFn) -> MetricFn:
    return get_metric(metric) if isinstance(metric, str) else metric


def score_references(metric: str | MetricFn, golds: Sequence[str], pred: str | None) -> float:
    """HELM's per-instance score: max over the correct references of metric(gold, pred.strip()).

    `pred` is None when a multiple-choice letter maps to no choice; that scores 0.
    """
    if not golds:
        raise ValueError("an instance needs at least one correct reference to be scored")
    if pred is None:
        return 0.0
    fn = _resolve(metric)
    return max(fn(gold, pred.strip()) for gold in golds)


def score_at_k(metric: str | MetricFn, golds: Sequence[str], preds: Sequence[str | None]) -> float:
    """HELM's `<metric>@k`: max over correct references and all k predictions."""
    if not preds:
        raise ValueError("score_at_k needs at least one prediction")
    return max(score_references(metric, golds, p) for p in preds)


def classification_f1(golds: Sequence[str], preds: Sequence[str], labels: Iterable[str] | None = None
                      ) -> dict[str, float]:
    """HELM's ClassificationMetric (single-label): macro and micro F1 over normalised labels.

    Labels are normalised without removing articles; `labels` defaults to the set of golds. A prediction that
    is not a known label is a negative for every class; a class with no support and no prediction scores 0.
    """
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} golds but {len(preds)} predictions")
    y_true = [normalize_text(g, False) for g in golds]
    y_pred = [normalize_text(p, False) if p else None for p in preds]
    classes = sorted({normalize_text(x, False) for x in labels} if labels is not None else set(y_true))
    tp = Counter(t for t, p in zip(y_true, y_pred, strict=True) if t == p)
    fp = Counter(p for t, p in zip(y_true, y_pred, strict=True) if p != t)
    fn = Counter(t for t, p in zip(y_true, y_pred, strict=True) if p != t)

    def f1(tp_: int, fp_: int, fn_: int) -> float:
        return 2 * tp_ / (2 * tp_ + fp_ + fn_) if tp_ + fp_ + fn_ else 0.0

    per_class = [f1(tp[c], fp[c], fn[c]) for c in classes]
    micro = f1(sum(tp[c] for c in classes), sum(fp[c] for c in classes), sum(fn[c] for c in classes))
    return {"classification_macro_f1": sum(per_class) / len(per_class) if per_class else 0.0,
            "classification_micro_f1": micro}


# --- efficiency ------------------------------------------------------------------------------------------------

def request_efficiency_stats(num_prompt_tokens: int, completion_tokens: Sequence[int], *,
                             batch_request_time: float | None = None, batch_size: int | None = None,
                             request_time: float | None = None, echo_prompt: bool = False) -> list[Stat]:
    """HELM's per-request efficiency stats (BasicGenerationMetric), with HELM's names.

    `completion_tokens` holds the token count of each completion. For batched (offline) inference pass the
    chunk's wall time as `batch_request_time` and its number of requests as `batch_size`: HELM then reports the
    batch time as `inference_runtime` and batch time / batch size as `inference_denoised_runtime`.
    """
    num_completion = sum(completion_tokens)
    num_output = num_completion
    if echo_prompt:
        num_output = num_completion - num_prompt_tokens if num_prompt_tokens <= num_completion else 0
    stats = [Stat(MetricName("num_prompt_tokens")).add(num_prompt_tokens),
             Stat(MetricName("num_completion_tokens")).add(num_completion),
             Stat(MetricName("num_output_tokens")).add(num_output)]
    runtime, size = (request_time, 1) if request_time is not None else (None, None)
    if batch_request_time is not None and batch_size is not None:
        runtime, size = batch_request_time, batch_size
    if runtime is not None:
        stats.append(Stat(MetricName("inference_runtime")).add(runtime))
        stats.append(Stat(MetricName("batch_size")).add(size))
        if batch_size is not None:
            stats.append(Stat(MetricName("inference_denoised_runtime")).add(runtime / batch_size))
    return stats


@dataclass(frozen=True)
class ChunkEfficiency:
    """Measured totals of one engine call (one chunk). Padded prompt tokens include left padding."""

    num_requests: int
    prompt_tokens: int
    padded_prompt_tokens: int
    output_tokens: int
    prefill_s: float
    decode_s: float


def efficiency_summary(chunks: Sequence[ChunkEfficiency]) -> dict[str, float]:
    """Run-level throughput for `efficiency.json`: HELM-style token counts and runtime plus our rates.

    tokens_per_s = (prompt + output tokens) / runtime; output_tokens_per_s is FlexGen's generation throughput;
    padding_efficiency = real / padded prompt tokens; batch_size = mean requests per chunk.
    """
    runtime = sum(c.prefill_s + c.decode_s for c in chunks)
    requests = sum(c.num_requests for c in chunks)
    prompt = sum(c.prompt_tokens for c in chunks)
    padded = sum(c.padded_prompt_tokens for c in chunks)
    output = sum(c.output_tokens for c in chunks)

    def rate(n: float) -> float:
        return n / runtime if runtime > 0 else 0.0

    return {
        "num_requests": requests, "num_chunks": len(chunks), "num_prompt_tokens": prompt,
        "num_padded_prompt_tokens": padded, "num_output_tokens": output, "inference_runtime": runtime,
        "prefill_runtime": sum(c.prefill_s for c in chunks), "decode_runtime": sum(c.decode_s for c in chunks),
        "tokens_per_s": rate(prompt + output), "prompt_tokens_per_s": rate(prompt),
        "output_tokens_per_s": rate(output), "padding_efficiency": prompt / padded if padded else 1.0,
        "batch_size": requests / len(chunks) if chunks else 0.0,
    }
