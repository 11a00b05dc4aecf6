"""Run store: keys, round trip, resume, chunk atomicity, SIGKILL crash safety, writer lock, offline guard."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import flexgen_core
from flexgen_core.evaluation.store import (
    LOCK_FILENAME,
    STORE_FILENAME,
    DuplicateResultError,
    RunStore,
    StoreLockedError,
    plan_chunks,
    request_key,
)

PAYLOAD = {"model": "facebook/opt-125m", "weights_revision": "27dcfa74", "prompt": "Input: 2+2\nOutput:",
           "generation": {"max_tokens": 5, "temperature": 0.0, "stop": ["\n"], "num_completions": 1},
           "compression": {"weights": None, "cache": None}}


def _result(key: str) -> dict[str, Any]:
    return {"completions": [{"text": f"out-{key}", "tokens": [1, 2], "logprob": -0.5}], "success": True}


def _run_child(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, child: subprocess.Popen[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if child.poll() is not None:
            raise AssertionError(f"child exited early: {child.stderr.read() if child.stderr else ''}")
        if time.monotonic() > deadline:
            child.kill()
            raise AssertionError("child never reached the checkpoint")
        time.sleep(0.02)


# --- keys --------------------------------------------------------------------------------------------------------


def test_request_key_is_sha256_of_canonical_json() -> None:
    doc = {"key_version": 1, **PAYLOAD, "generation": {**PAYLOAD["generation"], "temperature": 0}}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert request_key(PAYLOAD) == hashlib.sha256(text.encode()).hexdigest()


def test_request_key_is_stable_and_sensitive_to_what_changes_outputs() -> None:
    key = request_key(PAYLOAD)
    reordered = dict(reversed(list(PAYLOAD.items())))
    reordered["generation"] = {**PAYLOAD["generation"], "temperature": 0, "stop": ("\n",)}
    assert request_key(reordered) == key  # key order, 0 vs 0.0, tuple vs list do not matter
    for field, value in [("weights_revision", "other"), ("prompt", "Input: 2+3\nOutput:"), ("model", "opt-350m"),
                         ("compression", {"weights": "4bit-g64", "cache": None}),
                         ("generation", {**PAYLOAD["generation"], "max_tokens": 6})]:
        assert request_key({**PAYLOAD, field: value}) != key, field
    assert request_key({**PAYLOAD, "prompt": [2, 100, 7]}) != request_key({**PAYLOAD, "prompt": [2, 100, 8]})


def test_request_key_refuses_incomplete_or_non_json_payloads() -> None:
    with pytest.raises(ValueError, match="lacks \\['compression'\\]"):
        request_key({k: v for k, v in PAYLOAD.items() if k != "compression"})
    with pytest.raises(ValueError, match="weights_revision"):
        request_key({**PAYLOAD, "weights_revision": None})
    with pytest.raises(ValueError, match="finite"):
        request_key({**PAYLOAD, "generation": {"temperature": float("nan")}})
    with pytest.raises(TypeError, match="set"):
        request_key({**PAYLOAD, "generation": {"stop": {"\n"}}})


# --- planning ----------------------------------------------------------------------------------------------------


def test_plan_chunks_sorts_by_group_and_length_and_cuts_blocks() -> None:
    pending = [(f"k{i}", length, group) for i, (length, group) in enumerate(
        [(5, "a"), (9, "b"), (1, "a"), (7, "a"), (3, "b"), (8, "a"), (2, "a")])]
    chunks = plan_chunks(pending, 2)
    assert chunks == [["k5", "k3"], ["k0", "k6"], ["k2"], ["k1", "k4"]]
    assert plan_chunks(pending, 3, longest_first=False)[0] == ["k2", "k6", "k0"]
    for _ in range(5):  # deterministic whatever the input order; duplicates planned once
        shuffled = random.Random(_).sample(pending, len(pending)) + pending[:2]
        assert plan_chunks(shuffled, 2) == chunks


def test_plan_chunks_refuses_conflicts_and_bad_sizes() -> None:
    with pytest.raises(ValueError, match="different lengths or groups"):
        plan_chunks([("k", 3, "a"), ("k", 4, "a")], 2)
    with pytest.raises(ValueError, match="chunk_size"):
        plan_chunks([("k", 3, "a")], 0)
    assert plan_chunks([], 4) == []


# --- round trip and resume ---------------------------------------------------------------------------------------


def test_round_trip_and_chunk_metadata(tmp_path: Path) -> None:
    meta = {"policy": {"gpu_batch_size": 2}, "prefill_s": 1.5, "decode_s": 3.0, "engine": {"blocks": 1}}
    with RunStore(tmp_path / "run") as store:
        assert store.put_chunk({"k1": _result("k1"), "k2": _result("k2")}, meta) == 1
        assert store.put_chunk({"k3": _result("k3")}) == 2
        assert store.has("k1") and "k3" in store and not store.has("k4") and len(store) == 3
    with RunStore(tmp_path / "run", readonly=True) as reader:
        assert reader.completed_keys() == {"k1", "k2", "k3"}
        assert reader.get("k2") == _result("k2")
        assert [k for k, _ in reader.items()] == ["k1", "k2", "k3"]
        chunks = reader.chunks()
        assert [(c["chunk_id"], c["num_results"], c["metadata"]) for c in chunks] == [(1, 2, meta), (2, 1, {})]
        with pytest.raises(KeyError, match="k9"):
            reader.get("k9")
        with pytest.raises(PermissionError):
            reader.put_chunk({"k4": _result("k4")})
    with pytest.raises(FileNotFoundError, match="generate first"):
        RunStore(tmp_path / "nowhere", readonly=True)


def _generate(run_dir: Path, keys: list[str], fail_after: int | None = None) -> list[str]:
    """A minimal resumable generation loop: plan the missing keys, 'generate' chunk by chunk, store each."""
    generated: list[str] = []
    with RunStore(run_dir) as store:
        pending = [(k, len(k), "g") for k in keys if not store.has(k)]
        for i, chunk in enumerate(plan_chunks(pending, 3)):
            if fail_after is not None and i == fail_after:
                raise RuntimeError("simulated crash")
            generated += chunk
            store.put_chunk({k: _result(k) for k in chunk}, {"chunk": i})
    return generated


def test_rerun_skips_stored_keys_and_generates_each_request_once(tmp_path: Path) -> None:
    keys = [f"key{i:02d}" for i in range(10)]
    with pytest.raises(RuntimeError, match="simulated crash"):
        _generate(tmp_path, keys, fail_after=2)
    with RunStore(tmp_path, readonly=True) as reader:
        first = reader.completed_keys()
    assert len(first) == 6
    second = _generate(tmp_path, keys)
    assert set(second) == set(keys) - first
    assert _generate(tmp_path, keys) == []
    with RunStore(tmp_path, readonly=True) as reader:
        assert reader.completed_keys() == set(keys)
        assert all(reader.write_count(k) == 1 for k in keys)


def test_duplicates_are_refused_unless_overwriting(tmp_path: Path) -> None:
    with RunStore(tmp_path) as store:
        store.put_chunk({"a": _result("a")})
        with pytest.raises(DuplicateResultError, match="already stored"):
            store.put_chunk({"b": _result("b"), "a": {"text": "again"}})
        assert not store.has("b") and store.write_count("a") == 1 and len(store.chunks()) == 1
        store.put_chunk({"a": {"text": "again"}}, overwrite=True)
        assert store.get("a") == {"text": "again"} and store.write_count("a") == 2


@pytest.mark.parametrize("bad", [{"logits": object()}, {"success": False, "error": "timeout"}, ["not", "a", "dict"]])
def test_a_failing_chunk_leaves_nothing(tmp_path: Path, bad: Any) -> None:
    with RunStore(tmp_path) as store:
        store.put_chunk({"a": _result("a")})
        with pytest.raises((TypeError, ValueError), match="result for d"):
            store.put_chunk({"b": _result("b"), "c": _result("c"), "d": bad}, {"chunk": 2})
        assert store.completed_keys() == {"a"}
        assert [c["chunk_id"] for c in store.chunks()] == [1]
        assert store.write_count("b") == 0 and store.integrity_check() == "ok"


# --- crash safety and the writer lock ----------------------------------------------------------------------------

CRASHING_WRITER = """
    import os, sys, time
    from flexgen_core.evaluation.store import RunStore

    run_dir, marker = sys.argv[1], sys.argv[2]
    store = RunStore(run_dir)
    store.put_chunk({f"a{i}": {"text": f"A{i}"} for i in range(3)}, {"chunk": 1})

    class SlowResults(dict):
        # Yields two large results (spilling dirty pages into the database file), then stops inside the
        # transaction until the test kills this process.
        def items(self):
            for i, item in enumerate(super().items()):
                if i == 2:
                    with open(marker, "w") as f:
                        f.write(str(os.getpid()))
                    time.sleep(120)
                yield item

    store.put_chunk(SlowResults({f"b{i}": {"text": "x" * 3_000_000} for i in range(4)}), {"chunk": 2})
"""


def test_sigkill_mid_chunk_leaves_previous_chunks_and_no_trace_of_the_killed_one(tmp_path: Path) -> None:
    run_dir, marker = tmp_path / "run", tmp_path / "inside-transaction"
    child = _run_child(CRASHING_WRITER, str(run_dir), str(marker))
    _wait_for(marker, child)
    journal = run_dir / f"{STORE_FILENAME}-journal"
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=10) == -signal.SIGKILL
    assert journal.stat().st_size > 0  # killed inside a write transaction: a hot journal is left behind
    assert (run_dir / STORE_FILENAME).stat().st_size > 1_000_000  # and chunk 2's pages were spilled to the file

    with RunStore(run_dir, readonly=True) as reader:  # a reader recovers the hot journal
        assert reader.completed_keys() == {"a0", "a1", "a2"}
        assert [c["metadata"] for c in reader.chunks()] == [{"chunk": 1}]
        assert all(reader.write_count(k) == 1 for k in ("a0", "a1", "a2"))
        assert reader.write_count("b0") == 0 and reader.get("a1") == {"text": "A1"}
        assert reader.integrity_check() == "ok"
    assert not journal.exists()
    with RunStore(run_dir) as store:  # the dead writer's lock is gone; the missing chunk can be redone
        store.put_chunk({f"b{i}": {"text": "B"} for i in range(4)}, {"chunk": 2})
        assert len(store) == 7 and all(store.write_count(k) == 1 for k in store.completed_keys())
        assert store.integrity_check() == "ok"


LOCK_HOLDER = """
    import sys, time
    from flexgen_core.evaluation.store import RunStore

    store = RunStore(sys.argv[1])
    store.put_chunk({"held": {"text": "x"}})
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    child = _run_child(LOCK_HOLDER, str(tmp_path))
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError) as err:
            RunStore(tmp_path)
        msg = str(err.value)
        assert f"run directory {tmp_path} is being written by process {child.pid}" in msg
        assert "wait for it or use another --output-path" in msg
        with RunStore(tmp_path, readonly=True) as reader:  # readers need no lock
            assert reader.completed_keys() == {"held"}
    finally:
        child.kill()
        child.wait(timeout=10)
    with RunStore(tmp_path) as store:
        assert store.has("held")
    assert (tmp_path / LOCK_FILENAME).read_text().strip() == str(os.getpid())


def test_a_second_writer_in_the_same_process_is_refused(tmp_path: Path) -> None:
    with RunStore(tmp_path), pytest.raises(StoreLockedError, match=f"process {os.getpid()}"):
        RunStore(tmp_path)
    RunStore(tmp_path).close()  # released on close


# --- offline guard -----------------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Make every outgoing connection (and DNS lookup) raise; yield the list of attempts."""
    attempts: list[str] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(repr(args[1:] or args))
        raise OSError("network access attempted during an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts


def test_metrics_and_store_never_touch_the_network(no_network: list[str], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(OSError):
        socket.create_connection(("example.com", 80))  # the guard itself works
    no_network.clear()
    monkeypatch.setattr(flexgen_core, "evaluation", flexgen_core.evaluation)  # restored after the fresh import
    for name in [m for m in sys.modules if m.startswith("flexgen_core.evaluation")]:
        monkeypatch.delitem(sys.modules, name)  # import afresh under the guard
    metrics = importlib.import_module("flexgen_core.evaluation.metrics")
    store_mod = importlib.import_module("flexgen_core.evaluation.store")
    importlib.import_module("flexgen_core.evaluation.stats")
    gold, pred = "The cat sat on the mat. It slept.", "the cat is on the mat, sleeping."
    scores = {name: fn(gold, pred) for name, fn in metrics.METRICS.items()}
    assert scores["rouge_l"] > 0 and scores["bleu_1"] > 0 and scores["f1_score"] > 0
    metrics.classification_f1(["a"], ["a"])
    with store_mod.RunStore(tmp_path) as store:
        key = store_mod.request_key(PAYLOAD)
        store.put_chunk({key: _result(key)})
        assert store.get(key) == _result(key)
    assert no_network == []
    assert not {"nltk", "rouge_score"} & set(sys.modules)


def test_a_file_that_is_not_a_run_store_is_refused(tmp_path: Path) -> None:
    (tmp_path / STORE_FILENAME).write_bytes(b"")  # created by a writer that died before initialising it
    with pytest.raises(RuntimeError, match="not a run store"):
        RunStore(tmp_path, readonly=True)
    with RunStore(tmp_path) as store:  # a writer initialises it
        assert len(store) == 0
    (tmp_path / STORE_FILENAME).write_bytes(b"garbage" * 100)
    for _ in range(2):  # the failed open released the writer lock: the second attempt is not StoreLockedError
        with pytest.raises(RuntimeError, match="not a run store"):
            RunStore(tmp_path)


def test_nan_results_are_refused_and_nothing_of_the_chunk_is_stored(tmp_path: Path) -> None:
    with RunStore(tmp_path) as store:
        with pytest.raises(ValueError, match="NaN or infinity"):
            store.put_chunk({"a": {"success": True, "logprob": -1.0}, "b": {"success": True, "logprob": float("nan")}})
        assert len(store) == 0 and not store.has("a")
