"""Scenarios: registry, golden first instances (equal to HELM 0.5.16's), split sizes, determinism,
user data in JSONL/CSV/Parquet with every malformed row reported, and fast failure for hub names offline."""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flexgen_core.evaluation.scenarios import (
    DataValidationError,
    HubUnavailableError,
    Scenario,
    create_scenario,
    downsample_eval_instances,
    get_scenario,
    register_scenario,
    scenario_names,
    scenario_spec,
    with_instance_ids,
)
from flexgen_core.evaluation.scenarios.hub import probe_hub
from flexgen_core.evaluation.schema import Instance


@pytest.fixture(scope="module")
def generated() -> dict[tuple[str, str], list[Instance]]:
    """Full instance lists for one case per family, train splits only for the others (fast)."""
    train_only = {"num_valid_instances": 0, "num_test_instances": 0}
    cases = {("synthetic_reasoning", "pattern_match"): {"mode": "pattern_match"},
             ("synthetic_reasoning", "variable_substitution"): {"mode": "variable_substitution", **train_only},
             ("synthetic_reasoning", "induction"): {"mode": "induction", **train_only},
             ("synthetic_reasoning_natural", "easy"): {"difficulty": "easy"},
             ("synthetic_reasoning_natural", "hard"): {"difficulty": "hard", **train_only},
             ("dyck_language", "2"): {"num_parenthesis_pairs": 2},
             ("dyck_language", "4"): {"num_parenthesis_pairs": 4, "num_test_instances": 0},
             ("simple_copy", ""): {}, ("simple_arithmetic", ""): {}, ("simple_mcqa", ""): {}}
    return {key: get_scenario(key[0], **args).get_instances() for key, args in cases.items()}


def _pairs(instances: list[Instance], n: int = 3) -> list[tuple[str, str, str | None]]:
    return [(i.input.text, i.references[0].output.text, i.split) for i in instances[:n]]


# Golden values at the default seeds; HELM 0.5.16's generators produce the same (checked once, all 11000).
GOLDEN = {
    ("synthetic_reasoning", "pattern_match"): [
        ("Rules: + = X Z | X = Z + | + Z = X | X = Z + | Result: + blueberry = horse", "+ Z = X", "train"),
        ("Rules: Z = = = | Z Z = = = | = = Z = | = = = Z | Result: stork shark stork shark = = =", "Z Z = = =",
         "train"),
        ("Rules: * Z X * - | * X Z * - | - * Z X * | - X * Z * Z | Result: - blackberry eagle * blackberry kiwi * "
         "blackberry kiwi", "- X * Z * Z", "train")],
    ("synthetic_reasoning", "variable_substitution"): [
        ('Rules: + Z = X | Substitutions: X by " horse " , Z by " blueberry "', "+ blueberry = horse", "train"),
        ('Rules: Y + Y + Y = | Substitutions: Y by " grape "', "grape + grape + grape =", "train"),
        ('Rules: Y * Z Y - | Substitutions: Y by " pear " , Z by " blueberry "', "pear * blueberry pear -",
         "train")],
    ("synthetic_reasoning", "induction"): [
        ("Two results: + blueberry = horse | + blueberry cobra = whale stork", "Rule: + Z = X", "train"),
        ("Two results: grape + grape + grape = | eagle + eagle + eagle =", "Rule: Y + Y + Y =", "train"),
        ("Two results: pear * blueberry pear - | buffalo * penguin peach buffalo -", "Rule: Y * Z Y -", "train")],
    ("synthetic_reasoning_natural", "easy"): [
        ("If a poppy is boring and red, then the poppy is big.\nIf a poppy is fast, then the poppy is weak.\n"
         "If a poppy is smart or hot, then the poppy is good.\nIf a poppy is purple, then the poppy is bad.\n"
         "If a poppy is beautiful and strong, then the poppy is soft.\nFact:\nThe poppy is beautiful and hot.\n"
         "The following can be determined about the poppy:", "The poppy is good.", "train"),
        ("If Frank is red, then Frank is beautiful.\nIf Frank is blue, then Frank is big.\nIf Frank is happy or "
         "green, then Frank is soft.\nIf Frank is young, then Frank is purple.\nIf Frank is scary, then Frank is "
         "round.\nFact:\nFrank is happy and old.\nThe following can be determined about Frank:", "Frank is soft.",
         "train")],
    ("synthetic_reasoning_natural", "hard"): [
        ("If a poppy is boring, then the poppy is red.\nIf a poppy is big or fast, then the poppy is weak.\nIf a "
         "plant is smart, then the plant is hot.\nIf a plant is good, then the plant is purple.\nIf a plant is bad "
         "or beautiful, then the plant is strong.\nFact:\nThe poppy is fragile and beautiful.\nThe following can be "
         "determined about the poppy:", "The poppy is strong.", "train")],
    ("dyck_language", "2"): [
        ("[ [ [ [ [ [ ] ] ] ]", " ] ]", "train"),
        ("( [ ( [ [ ( [ ( [ ] ) ] ) [ ( [ ] ) ] ( ) ] ] ) ] [ ( ( ) ) ] [ ] [ ] ( [ ]", " ) )", "train"),
        ("( ( [ ( )", " ] ) )", "train")],
    ("dyck_language", "4"): [
        ("< [ [ [ < [ ] > ] ]", " ] >", "train"),
        ("{ < { < [ { < ( [ ] ) > } < ( < > ) > ( ) ] > } > [ { { } } ] < > [ ] { < >", " } }", "train"),
        ("( { [ ( )", " ] } )", "train")],
    ("simple_copy", ""): [("red river tree", "red river tree", "train"),
                          ("dog cat leaf green", "dog cat leaf green", "train")],
    ("simple_arithmetic", ""): [("81 + 14 =", "95", "train"), ("3 + 94 =", "97", "train")],
}


@pytest.mark.parametrize("key", list(GOLDEN), ids=lambda k: ":".join(k).strip(":"))
def test_first_instances_are_fixed(generated, key) -> None:
    expected = GOLDEN[key]
    assert _pairs(generated[key], len(expected)) == expected


def test_first_test_instances_are_fixed(generated) -> None:
    first_test = {k: next((i for i in v if i.split == "test"), None) for k, v in generated.items()}
    assert first_test[("synthetic_reasoning", "pattern_match")].input.text == (
        "Rules: = Z + - X | - + = X Z | Z - X + = | + - = Z X | Result: = watermelon lion + - zebra")
    assert first_test[("synthetic_reasoning_natural", "easy")].references[0].output.text == "Nothing."
    dyck = first_test[("dyck_language", "2")]
    assert (dyck.input.text[:20], dyck.references[0].output.text) == ("[ [ ( ) [ ( [ ( [ [ ", " ] ] ]")


@pytest.mark.parametrize("key, sizes", [
    (("synthetic_reasoning", "pattern_match"), {"train": 1000, "valid": 5000, "test": 5000}),
    (("synthetic_reasoning_natural", "easy"), {"train": 1000, "valid": 5000, "test": 5000}),
    (("dyck_language", "2"), {"train": 3, "test": 500}),
    (("simple_mcqa", ""), {"train": 11, "test": 79}),
    (("simple_copy", ""), {"train": 1000, "test": 500}),
])
def test_helm_split_sizes(generated, key, sizes) -> None:
    assert Counter(i.split for i in generated[key]) == sizes


def test_generation_is_deterministic_and_seeded(generated) -> None:
    assert get_scenario("dyck_language", num_parenthesis_pairs=2).get_instances() == generated[("dyck_language", "2")]
    other = get_scenario("dyck_language", num_parenthesis_pairs=2, seed=7, num_test_instances=0).get_instances()
    assert _pairs(other) != _pairs(generated[("dyck_language", "2")])
    small = get_scenario("synthetic_reasoning", mode="pattern_match", num_train_instances=3, num_valid_instances=0,
                         num_test_instances=2).get_instances()
    full = generated[("synthetic_reasoning", "pattern_match")]
    assert _pairs(small, 5) == [(text, ref, "test" if i >= 3 else "train") for i, (text, ref, _) in
                                enumerate(_pairs(full, 5))]  # the same stream, cut into other splits


def test_dyck_targets_close_their_inputs_and_test_inputs_are_new(generated) -> None:
    instances = generated[("dyck_language", "2")]
    pairs = dict(zip("([{<", ")]}>", strict=True))
    for inst in instances:
        stack = []
        for symbol in inst.input.text.split():
            if symbol in pairs:
                stack.append(pairs[symbol])
            else:
                assert stack.pop() == symbol
        assert inst.references[0].output.text == " " + " ".join(reversed(stack))
        assert 1 <= len(stack) <= 3
    train_inputs = {i.input.text for i in instances if i.split == "train"}
    test_inputs = [i.input.text for i in instances if i.split == "test"]
    assert not train_inputs & set(test_inputs) and len(set(test_inputs)) == len(test_inputs)


def test_registry() -> None:
    assert {"synthetic_reasoning", "synthetic_reasoning_natural", "dyck_language", "simple_mcqa", "simple_copy",
            "simple_arithmetic", "custom", "hub"} <= set(scenario_names())
    with pytest.raises(ValueError, match="already registered"):
        @register_scenario
        class Duplicate(Scenario):  # noqa: F841
            name = "dyck_language"
    with pytest.raises(ValueError, match="unknown scenario 'nope'"):
        get_scenario("nope")
    with pytest.raises(ValueError, match="has no argument 'mod'; its arguments are: .*mode"):
        get_scenario("synthetic_reasoning", mod="induction")
    spec = scenario_spec("synthetic_reasoning_natural", difficulty="hard")
    assert spec.class_name.endswith("SyntheticReasoningNaturalScenario")
    assert create_scenario(spec).difficulty == "hard"  # type: ignore[attr-defined]
    meta = get_scenario("dyck_language", num_parenthesis_pairs=3).metadata()
    assert meta["name"] == "dyck_language" and meta["definition_path"].endswith("scenarios/dyck_language.py")


def test_ids_and_helm_downsampling(generated) -> None:
    instances = generated[("synthetic_reasoning", "pattern_match")]
    picked = downsample_eval_instances(instances, 10)
    evals = [i for i in instances if i.split != "train"]
    np.random.seed(0)  # HELM's draw, on the global state it uses
    helm = list(np.random.choice(evals, 10, replace=False))  # type: ignore[arg-type]
    assert picked[:1000] == instances[:1000] and all(a is b for a, b in zip(picked[1000:], helm, strict=True))
    assert downsample_eval_instances(instances[:1003], 10) == instances[:1003]
    with_ids = with_instance_ids(picked[:3])
    assert [i.id for i in with_ids] == ["id0", "id1", "id2"] and with_instance_ids(with_ids) == with_ids


# ---- user data ---------------------------------------------------------------------------------------------
def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_custom_jsonl_generation_and_choices(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "qa.jsonl", [
        json.dumps({"question": "Capital of France?", "answer": "Paris", "split": "train"}),
        json.dumps({"question": "2+2?", "answer": ["4", "four"], "split": "test"}),
    ])
    scenario = get_scenario("custom", path=str(path), input_column="question", output_column="answer",
                            split_column="split")
    first, second = scenario.get_instances(output_dir=tmp_path)
    assert (first.input.text, first.split, first.references[0].output.text) == ("Capital of France?", "train", "Paris")
    assert [r.output.text for r in second.all_correct_references] == ["4", "four"]

    mc = _jsonl(tmp_path / "mc.jsonl", [json.dumps({"q": "Largest?", "options": ["cat", "whale"], "gold": 1}),
                                        json.dumps({"q": "Smallest?", "options": ["ant", "cow"], "gold": "ant"}),
                                        json.dumps({"q": "Wet?", "options": ["fire", "water"], "gold": "B"})])
    instances = get_scenario("custom", path=str(mc), input_column="q", output_column="gold",
                             choices_column="options").get_instances(output_dir=tmp_path)
    assert [[r.is_correct for r in i.references] for i in instances] == [[False, True], [True, False], [False, True]]
    assert {i.split for i in instances} == {"test"}


def test_custom_csv_and_parquet(tmp_path: Path) -> None:
    csv_path = tmp_path / "data.csv"
    csv_path.write_text('question,answer,choices\nWhich is red?,1,"[""sky"", ""apple""]"\n'
                        'Which is 42?,42,"[""42"", ""7""]"\n')
    instances = get_scenario("custom", path=str(csv_path), input_column="question", output_column="answer",
                             choices_column="choices").get_instances(output_dir=tmp_path)
    assert [[r.is_correct for r in i.references] for i in instances] == [[False, True], [True, False]]
    parquet_path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"input": ["a?", "b?"], "output": ["A", "B"]}), parquet_path)
    instances = get_scenario("custom", path=str(parquet_path), split="valid").get_instances(output_dir=tmp_path)
    assert [(i.input.text, i.references[0].output.text, i.split) for i in instances] == [
        ("a?", "A", "valid"), ("b?", "B", "valid")]


def test_malformed_jsonl_reports_every_row_with_its_line(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "bad.jsonl", [
        json.dumps({"q": "fine", "a": "yes"}),
        json.dumps({"q": None, "a": "yes"}),          # line 2: missing input
        "",                                            # blank line: skipped, later line numbers still exact
        json.dumps({"q": "no answer", "a": None}),    # line 4: no reference
        json.dumps({"q": 5, "a": 7}),                  # line 5: wrong types (both problems)
        json.dumps({"q": "   ", "a": "x"}),            # line 6: blank input
    ])
    with pytest.raises(DataValidationError) as info:
        get_scenario("custom", path=str(path), input_column="q", output_column="a").get_instances(output_dir=tmp_path)
    problems = [(p.location, p.message) for p in info.value.problems]
    assert [loc for loc, _ in problems] == ["line 2", "line 4", "line 5", "line 5", "line 6"]
    message = str(info.value)
    assert f"5 problem(s) in {path}" in message and "does not start" in message
    assert f"{path} line 2: missing input (column 'q' is empty)" in message
    assert "line 4: no reference (column 'a' is empty)" in message
    assert "line 5: input column 'q' must be text, got int 5" in message
    assert "write numbers as strings" in message


def test_malformed_csv_parquet_and_files(tmp_path: Path) -> None:
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text('q,a,c\nok,0,"[""x"", ""y""]"\n,0,"[""x"", ""y""]"\n\nfine,Z,"[""x"", ""y""]"\n'
                        'also,0,not json\n')
    with pytest.raises(DataValidationError) as info:
        get_scenario("custom", path=str(csv_path), input_column="q", output_column="a",
                     choices_column="c").get_instances(output_dir=tmp_path)
    assert [p.location for p in info.value.problems] == ["line 3", "line 5", "line 6"]
    assert "answer 'Z' is not one of the 2 choices" in str(info.value)
    assert "must be a list of texts (in CSV a JSON array" in str(info.value)

    parquet_path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"input": ["a", None, "c"], "output": ["A", "B", None]}), parquet_path)
    with pytest.raises(DataValidationError) as info:
        get_scenario("custom", path=str(parquet_path)).get_instances(output_dir=tmp_path)
    assert [p.location for p in info.value.problems] == ["row 2", "row 3"]

    cases = {"empty.jsonl": "", "blank.csv": "\n\n", "header.csv": "input,output\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataValidationError, match="empty|no rows"):
            get_scenario("custom", path=str(tmp_path / name)).get_instances(output_dir=tmp_path)
    broken = _jsonl(tmp_path / "broken.jsonl", ['{"input": "a", "output": "b"}', '{"input": "c", "output":', "[1, 2]"])
    with pytest.raises(DataValidationError) as info:
        get_scenario("custom", path=str(broken)).get_instances(output_dir=tmp_path)
    assert [p.location for p in info.value.problems] == ["line 2", "line 3"]
    assert "invalid JSON" in info.value.problems[0].message
    columns = _jsonl(tmp_path / "cols.jsonl", ['{"input": "a", "output": "b"}'])
    with pytest.raises(DataValidationError, match="no column 'question' \\(set input_column=...\\); the columns"):
        get_scenario("custom", path=str(columns), input_column="question").get_instances(output_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_scenario("custom", path=str(tmp_path / "missing.jsonl")).get_instances()


# ---- hub --------------------------------------------------------------------------------------------------
def test_hub_name_fails_fast_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # conftest.py sets it already; be sure
    for scenario in (get_scenario("hub", dataset="no-such-org/no-such-dataset"),
                     get_scenario("custom", dataset="no-such-org/no-such-dataset")):
        start = time.monotonic()
        with pytest.raises(HubUnavailableError) as info:
            scenario.get_instances(output_dir=tmp_path)
        assert time.monotonic() - start < 5.0
        assert "OFFLINE is set" in str(info.value) and "custom:path=FILE" in str(info.value)


def test_hub_probe_fails_fast_when_unreachable() -> None:
    with socket.socket() as closed:  # a port nothing listens on: connection refused at once
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(HubUnavailableError, match="cannot reach .* looks offline"):
        probe_hub("org/name", endpoint=f"http://127.0.0.1:{port}", timeout_s=1.0)
    assert time.monotonic() - start < 5.0
    with socket.socket() as silent:  # accepts connections but never answers: the timeout must end the wait
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        start = time.monotonic()
        with pytest.raises(HubUnavailableError):
            probe_hub("org/name", endpoint=f"http://127.0.0.1:{silent.getsockname()[1]}", timeout_s=0.5)
        assert time.monotonic() - start < 3.0
