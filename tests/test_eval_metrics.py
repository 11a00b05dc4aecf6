"""HELM reference metrics on hand-computed cases and HELM's quirks; Stat aggregation and JSON shapes."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass

import pytest

from flexgen_core.evaluation import metrics as M
from flexgen_core.evaluation.porter import stem
from flexgen_core.evaluation.stats import (
    MetricName,
    PerInstanceStats,
    Stat,
    add_context,
    aggregate_per_instance,
    remove_nans,
)
from flexgen_core.evaluation.word_tokenize import split_sentences, word_tokenize

# --- normalisation and the exact-match family --------------------------------------------------------------------


def test_normalize_text_drops_case_punctuation_articles_and_extra_space() -> None:
    assert M.normalize_text("  The Cat,  sat!\ton a   MAT. ") == "cat sat on mat"
    assert M.normalize_text("The Cat, an apple", remove_articles=False) == "the cat an apple"
    assert M.normalize_text("theater another") == "theater another"  # articles only as whole words


@pytest.mark.parametrize(("fn", "gold", "pred", "want"), [
    (M.exact_match, " Paris ", "Paris\n", 1.0),
    (M.exact_match, "paris", "Paris", 0.0),
    (M.exact_match, "", "", 0.0),  # empty prediction scores 0 even against an empty gold
    (M.quasi_exact_match, "The Paris!", "paris", 1.0),
    (M.quasi_exact_match, "Paris", "Paris, France", 0.0),
    (M.quasi_leave_articles_exact_match, "The Paris", "paris", 0.0),
    (M.quasi_leave_articles_exact_match, "The Paris!", "the  paris", 1.0),
    (M.prefix_exact_match, "Yes", " Yes, because it is.", 1.0),
    (M.prefix_exact_match, "yes", "Yes, because it is.", 0.0),
    (M.quasi_prefix_exact_match, "yes", "Yes, because it is.", 1.0),
    (M.quasi_prefix_exact_match, "no", "", 0.0),
])
def test_exact_match_family(fn: M.MetricFn, gold: str, pred: str, want: float) -> None:
    assert fn(gold, pred) == want


def test_exact_match_indicator_compares_only_the_last_token() -> None:
    # HELM's Dyck quirk: only the final whitespace-separated token counts.
    assert M.exact_match_indicator("] ) )", "} } )") == 1.0
    assert M.exact_match("] ) )", "} } )") == 0.0
    assert M.exact_match_indicator("] ) )", "] ) ]") == 0.0
    assert M.exact_match_indicator("because x ## 42", "since y ## 42", indicator="## ") == 1.0
    assert M.exact_match_indicator(")", "") == 0.0


def test_final_number_exact_match() -> None:
    assert M.final_number_exact_match("The answer is 15.", "The answer is 15 eggs.") == 1.0
    assert M.final_number_exact_match("1,000", "so 1000") == 1.0
    assert M.final_number_exact_match("12", "no number") == 0.0


def test_set_metrics_parse_like_helm() -> None:
    gold = "The dog is big and red."
    assert M.exact_set_match(gold, "The dog is red and big.\nignored line") == 1.0
    assert M.iou_set_match(gold, "The dog is red.") == pytest.approx(1 / 2)
    assert M.f1_set_match(gold, "The dog is red.") == pytest.approx(2 / 3)
    assert M.exact_set_match(gold, "The dog is red.") == 0.0
    assert M.iou_set_match("Nothing.", "Nothing.") == 1.0
    assert M.f1_set_match("Nothing.", "It is red.") == 0.0


def test_absolute_value_difference() -> None:
    assert M.absolute_value_difference("1,000", "998") == 2.0
    assert M.absolute_value_difference("7", "seven") == 7.0


# --- f1, ROUGE, BLEU ---------------------------------------------------------------------------------------------


def test_f1_score_uses_word_sets_not_bags() -> None:
    # sets {cat, dog} vs {cat}: P=1, R=1/2 -> 2/3. SQuAD's bag of words would give 0.8 here.
    assert M.f1_score("cat cat dog", "cat cat") == pytest.approx(2 / 3)
    assert M.f1_score("New York City", "the new york!") == pytest.approx(0.8)
    assert M.f1_score("the", "a cat") == 0.0  # gold empty after normalisation
    assert M.f1_score("cat", ".") == 0.0
    assert M.f1_score("cat", "dog") == 0.0


def test_rouge_tokenizer_lowercases_splits_on_non_alphanumerics_and_stems() -> None:
    assert M.rouge_tokenize("Running, DOGS! can't 3.5x") == ["run", "dog", "can", "t", "3", "5x"]


def test_rouge_l_is_lcs_f_measure() -> None:
    # LCS(the cat sat on the mat, the cat lay on a mat) = the cat on mat = 4; P = R = 4/6.
    assert M.rouge_l("the cat sat on the mat", "the cat lay on a mat") == pytest.approx(4 / 6)
    assert M.rouge_l("running dogs", "The dog runs") == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert M.rouge_l("Running dogs", "runs, dog.") == 1.0  # stemming
    assert M.rouge_l("", "cat") == 0.0
    assert M.rouge_l("cat", "!!") == 0.0


def test_rouge_1_and_2() -> None:
    assert M.rouge_1("a b c d", "a b d") == pytest.approx(2 * 1 * 0.75 / 1.75)
    assert M.rouge_2("a b c d", "a b d") == pytest.approx(0.4)  # bigrams ab,bc,cd vs ab,bd


def test_bleu_1_is_clipped_unigram_precision_times_brevity_penalty() -> None:
    assert M.bleu_1("the cat is on the mat", "the the the the the the the") == pytest.approx(2 / 7)
    assert M.bleu_1("the cat is on the mat", "the cat") == pytest.approx(math.exp(1 - 6 / 2))
    assert M.bleu_1("the cat", "dog") == 0.0
    assert M.bleu_1("the cat", "") == 0.0


def test_bleu_4_uses_only_the_4gram_precision() -> None:
    gold, pred = "the cat is on the mat", "the cat is on a mat"
    assert M.bleu_4(gold, gold) == pytest.approx(1.0)
    assert M.bleu_4(gold, pred) == pytest.approx(1 / 3)  # 4-grams: 1 of 3 match; bp = 1
    assert M.bleu_1(gold, pred) == pytest.approx(5 / 6)
    geometric_bleu4 = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert M.bleu_4(gold, pred) != pytest.approx(geometric_bleu4)
    # NLTK without smoothing: no 4-gram match leaves sys.float_info.min, not 0 (unless no unigram matches).
    short = M.bleu_4("Paris", "Paris")
    assert 0.0 < short <= sys.float_info.min * 1.0001
    assert M.bleu_4("Paris", "London") == 0.0


def test_word_tokenize_follows_nltk() -> None:
    assert word_tokenize("Hello, world.") == ["Hello", ",", "world", "."]
    assert word_tokenize("They'll go; don't cry!") == ["They", "'ll", "go", ";", "do", "n't", "cry", "!"]
    assert word_tokenize('He said "hi" (twice) -- $3.50...') == [
        "He", "said", "``", "hi", "''", "(", "twice", ")", "--", "$", "3.50", "..."]
    assert word_tokenize("I cannot wait.") == ["I", "can", "not", "wait", "."]


def test_sentence_split_separates_inner_periods_but_not_abbreviations() -> None:
    text = "Mr. Smith went home. He slept at 9 p.m. today. J. K. wrote it."
    assert split_sentences(text) == ["Mr. Smith went home.", "He slept at 9 p.m. today.", "J. K. wrote it."]
    assert word_tokenize("The cat sat. The dog ran.") == ["The", "cat", "sat", ".", "The", "dog", "ran", "."]
    assert word_tokenize("Is it? Yes.") == ["Is", "it", "?", "Yes", "."]


PORTER = {
    "caresses": "caress", "ponies": "poni", "ties": "tie", "cats": "cat", "feed": "feed", "agreed": "agre",
    "plastered": "plaster", "motoring": "motor", "sing": "sing", "conflated": "conflat", "troubled": "troubl",
    "sized": "size", "hopping": "hop", "falling": "fall", "hissing": "hiss", "filing": "file", "happy": "happi",
    "enjoy": "enjoy", "skies": "sky", "dying": "die", "relational": "relat", "conditional": "condit",
    "rational": "ration", "valenci": "valenc", "digitizer": "digit", "radically": "radic",
    "differently": "differ", "analogously": "analog", "vietnamization": "vietnam", "predication": "predic",
    "operator": "oper", "feudalism": "feudal", "decisiveness": "decis", "hopefulness": "hope",
    "callousness": "callous", "formality": "formal", "sensitivity": "sensit", "sensibility": "sensibl",
    "triplicate": "triplic", "formative": "form", "formalize": "formal", "electricity": "electr",
    "electrical": "electr", "hopeful": "hope", "goodness": "good", "revival": "reviv", "allowance": "allow",
    "inference": "infer", "airliner": "airlin", "gyroscopic": "gyroscop", "adjustable": "adjust",
    "defensible": "defens", "irritant": "irrit", "replacement": "replac", "adjustment": "adjust",
    "dependent": "depend", "adoption": "adopt", "communism": "commun", "activate": "activ",
    "angularity": "angular", "homologous": "homolog", "effective": "effect", "bowdlerize": "bowdler",
    "probate": "probat", "rate": "rate", "cease": "ceas", "controlling": "control", "roll": "roll",
    "generously": "gener", "analogies": "analog",
}


def test_porter_stemmer_matches_nltk_extensions() -> None:
    # Expected values are NLTK 3.10 PorterStemmer() outputs (the stemmer rouge_score uses).
    assert {w: stem(w) for w in PORTER} == PORTER


# --- registry and multi-reference scoring ------------------------------------------------------------------------


def test_registry_has_helm_names_and_rejects_unknown() -> None:
    for name in (*M.OPEN_ENDED_GENERATION_METRICS, *M.EXACT_MATCH_METRICS, *M.SET_MATCH_METRICS,
                 "exact_match_indicator", "rouge_1", "rouge_2"):
        assert M.get_metric(name).__name__ == name
    for fn in M.METRICS.values():
        assert isinstance(fn("a b c", "a b c"), float)
    with pytest.raises(ValueError, match=r"unknown metric 'bleu'.*bleu_1.*exact_match"):
        M.get_metric("bleu")


def test_score_references_takes_the_max_over_golds_of_the_stripped_pred() -> None:
    golds = ["NYC", "New York City"]
    assert M.score_references("exact_match", golds, " New York City\n") == 1.0
    assert M.score_references(M.f1_score, golds, "new york") == pytest.approx(0.8)
    assert M.score_references("exact_match_indicator", [") )"], "} )  ") == 1.0  # stripped before the split
    assert M.score_references("exact_match", golds, None) == 0.0  # unmapped multiple-choice letter
    assert M.score_at_k("exact_match", golds, ["LA", "NYC"]) == 1.0
    with pytest.raises(ValueError, match="correct reference"):
        M.score_references("exact_match", [], "x")


def test_classification_f1_macro_and_micro() -> None:
    golds, preds = ["Even", "Odd", "Even", "Odd"], ["even", "even", "Maybe", ""]
    # even: tp 1, fp 1, fn 1 -> 0.5; odd: tp 0, fn 2 -> 0; micro: tp 1, fp 1, fn 3 -> 1/3.
    got = M.classification_f1(golds, preds)
    assert got["classification_macro_f1"] == pytest.approx(0.25)
    assert got["classification_micro_f1"] == pytest.approx(1 / 3)
    assert M.classification_f1(golds, golds)["classification_macro_f1"] == 1.0


# --- efficiency --------------------------------------------------------------------------------------------------


def _values(stats: list[Stat]) -> dict[str, float]:
    return {s.name.name: s.sum for s in stats}


def test_request_efficiency_stats_use_helm_names() -> None:
    batched = M.request_efficiency_stats(10, [3, 4], batch_request_time=2.0, batch_size=4)
    assert _values(batched) == {"num_prompt_tokens": 10, "num_completion_tokens": 7, "num_output_tokens": 7,
                                "inference_runtime": 2.0, "batch_size": 4, "inference_denoised_runtime": 0.5}
    single = _values(M.request_efficiency_stats(5, [2], request_time=0.25))
    assert single["batch_size"] == 1 and "inference_denoised_runtime" not in single
    echoed = _values(M.request_efficiency_stats(5, [8], echo_prompt=True))
    assert echoed["num_output_tokens"] == 3 and "inference_runtime" not in echoed


def test_efficiency_summary() -> None:
    chunks = [M.ChunkEfficiency(4, 40, 64, 20, 1.0, 3.0), M.ChunkEfficiency(2, 20, 20, 10, 0.5, 0.5)]
    s = M.efficiency_summary(chunks)
    assert s["inference_runtime"] == 5.0 and s["num_requests"] == 6 and s["batch_size"] == 3.0
    assert s["tokens_per_s"] == pytest.approx(90 / 5) and s["output_tokens_per_s"] == pytest.approx(6.0)
    assert s["padding_efficiency"] == pytest.approx(60 / 84)
    assert M.efficiency_summary([])["tokens_per_s"] == 0.0


# --- Stat, PerInstanceStats, aggregation -------------------------------------------------------------------------


def test_stat_add_computes_population_moments() -> None:
    s = Stat(MetricName("exact_match", split="test"))
    for x in (1, 2, 3, 4, None):
        s.add(x)
    assert (s.count, s.sum, s.sum_squared, s.min, s.max, s.mean) == (4, 10, 30, 1, 4, 2.5)
    assert s.variance == pytest.approx(1.25) and s.stddev == pytest.approx(math.sqrt(1.25))
    assert Stat(MetricName("x")).add(True).add(False).mean == 0.5


def test_stat_merge_equals_adding_all_values() -> None:
    a, b = Stat(MetricName("m")).add(1).add(2), Stat(MetricName("other")).add(3).add(4)
    a.merge(b).merge(Stat(MetricName("m")))
    assert a.name.name == "m" and (a.count, a.sum, a.min, a.max, a.mean) == (4, 10, 1, 4, 2.5)
    assert a.variance == pytest.approx(1.25)


def test_stat_json_shape_and_round_trip() -> None:
    s = Stat(MetricName("quasi_exact_match", split="test", perturbation={"name": "typos", "robustness": True}))
    s.add(1).add(0)
    d = json.loads(json.dumps(s.to_dict()))
    assert d == {"name": {"name": "quasi_exact_match", "split": "test",
                          "perturbation": {"name": "typos", "robustness": True}},
                 "count": 2, "sum": 1, "sum_squared": 1, "min": 0, "max": 1, "mean": 0.5, "variance": 0.25,
                 "stddev": 0.5}
    assert Stat.from_dict(d) == s
    assert Stat(MetricName("empty")).to_dict() == {"name": {"name": "empty"}, "count": 0, "sum": 0,
                                                   "sum_squared": 0}


def test_metric_name_is_hashable_and_accepts_perturbation_dataclasses() -> None:
    @dataclass(frozen=True)
    class PerturbationDescription:
        name: str
        robustness: bool = False
        seed: int | None = None

    a = MetricName("em", "test", None, PerturbationDescription("typos", True))
    b = MetricName("em", "test", None, {"robustness": True, "name": "typos"})
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    with pytest.raises(TypeError, match="perturbation"):
        MetricName("em", perturbation="typos")  # type: ignore[arg-type]


def test_per_instance_stats_json_shape_and_round_trip() -> None:
    p = PerInstanceStats("id7", 0, [Stat(MetricName("exact_match", "test")).add(1)])
    d = p.to_dict()
    assert list(d) == ["instance_id", "train_trial_index", "stats"]
    assert PerInstanceStats.from_dict(json.loads(json.dumps(d))) == p
    q = PerInstanceStats("id7", 1, [], perturbation={"name": "typos"})
    assert list(q.to_dict()) == ["instance_id", "perturbation", "train_trial_index", "stats"]


def test_aggregation_takes_trial_means_then_merges_trials() -> None:
    def pis(inst: str, trial: int, em: float, split: str = "test") -> PerInstanceStats:
        return PerInstanceStats(inst, trial, [Stat(MetricName("exact_match", split)).add(em)])

    per_instance = [pis("a", 0, 1), pis("b", 0, 0), pis("c", 0, 1), pis("a", 1, 0), pis("b", 1, 0),
                    pis("c", 1, 1), pis("v", 0, 1, split="valid")]
    test_stat, valid_stat = aggregate_per_instance(per_instance)
    assert test_stat.name == MetricName("exact_match", "test")
    assert test_stat.count == 2  # HELM: one value per train trial, not per instance
    assert test_stat.mean == pytest.approx(0.5) and test_stat.min == pytest.approx(1 / 3)
    assert test_stat.max == pytest.approx(2 / 3) and test_stat.variance == pytest.approx(1 / 36)
    assert valid_stat.count == 1 and valid_stat.mean == 1


def test_add_context_and_nan_removal() -> None:
    s = add_context(Stat(MetricName("em")).add(1), "test", "hard")
    assert s.name == MetricName("em", "test", "hard") and s.count == 1
    bad = Stat(MetricName("ppl")).add(float("nan"))
    assert remove_nans([s, bad]) == [s]
    assert aggregate_per_instance([PerInstanceStats("a", 0, [bad, s])]) == [s]
