"""Pipeline mode on CPU: stages as processes over gloo (tests/pipeline_worker.py), against the single-process
engine and transformers; bad configurations end with a clear error on every rank, in bounded time."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import make_opt
from hf_reference import hf_continuation_logprobs, hf_greedy
from pipeline_worker import PROMPTS, STOPS

from flexgen_core import Engine, Policy
from flexgen_core.models.opt import builtin_spec
from flexgen_core.pipeline_plan import PipelineConfigError, partition, pick_shape
from flexgen_core.plan import Workload, build_plan
from flexgen_core.policy import Tier
from flexgen_core.spec import block_layers, weight_bytes

WORKER = Path(__file__).with_name("pipeline_worker.py")
TOL = 1e-4


@pytest.fixture(scope="module")
def opt3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three blocks (so two stages split them unevenly), outputs that vary between prompts and steps."""
    return make_opt(tmp_path_factory.mktemp("pipe") / "opt3", seed=5, std=0.2, num_hidden_layers=3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, model: Path, out: Path, world: int, **env_extra: str) -> list[subprocess.Popen]:
    """Start `world` ranks of `scenario` with torchrun's environment contract."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(WORKER.parent), *sys.path]), **env_extra}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), scenario, str(model), str(out)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    return procs


def results(procs: list[subprocess.Popen], out: Path, timeout_s: float) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"ranks still running after {timeout_s} s (a hang)")
    return [json.loads((out / f"rank{r}.json").read_text()) if (out / f"rank{r}.json").exists()
            else {"error": f"no result; stderr: {p.stderr.read()[-2000:] if p.stderr else ''}"}
            for r, p in enumerate(procs)]


# ---- partition (no processes) -------------------------------------------------------------------------------

def test_partition_balances_bytes_and_compute_with_embed_first_and_head_last() -> None:
    spec = builtin_spec("opt-125m")
    parts = partition(spec, 2)
    first, last = parts.stages
    assert first.blocks[0] == 0 and last.blocks[1] == spec.num_layers and first.blocks[1] == last.blocks[0]
    assert first.layers == (0, block_layers(spec, 0, first.blocks[1])[1])
    # the head's FLOPs (and its copy of the 77 MB embedding) weigh like several blocks: not a half/half count split
    assert last.blocks[1] - last.blocks[0] < spec.num_layers // 2
    # the stored bytes: the model once, plus the last stage's copy of the tied embedding
    tok = spec.vocab_size * spec.word_embed_dim * 2
    assert first.weight_bytes + last.weight_bytes == weight_bytes(spec, 2) + tok
    big = partition(builtin_spec("opt-30b"), 4)
    assert [s.blocks[1] - s.blocks[0] for s in big.stages] == [12, 12, 12, 12]


def test_more_stages_than_layers_is_refused() -> None:
    with pytest.raises(PipelineConfigError, match="5 pipeline stages but .* only 4 transformer layers"):
        partition(replace(builtin_spec("opt-125m"), num_layers=4), 5)


def test_stage_plan_holds_only_its_slice_and_copies_the_tied_embedding() -> None:
    spec = builtin_spec("opt-1.3b")
    parts = partition(spec, 2)
    policy = Policy(4, 2, weights=(0.5, 0.5, 0))
    plans = [build_plan(spec, policy, Workload(64, 8), 2, "cuda", layers=s.layers) for s in parts.stages]
    head = plans[1].layer(spec.num_schedule_layers - 1).tensor("tok")
    assert head.spec.shared_from is None and head.spec.copy_of == 0
    assert plans[1].storage_map()[(0, "tok")] == [spec.num_schedule_layers - 1]
    whole = build_plan(spec, policy, Workload(64, 8), 2, "cuda")
    cache = [p.usage[Tier.GPU]["cache.home"] + p.usage[Tier.CPU]["cache.home"] for p in (*plans, whole)]
    assert cache[0] + cache[1] == cache[2]  # the KV cache is split by blocks
    assert [len(p.blocks) for p in plans] == [s.blocks[1] - s.blocks[0] for s in parts.stages]


def test_stage_rounds_continue_slots_and_prefetch_the_next_round() -> None:
    from flexgen_core.runtime.schedule import stage_round

    steps = [st for r in range(3) for st in stage_round(0, r, num_layers=3, num_batches=2, slots=2)]
    assert [(st.layer, st.batch) for st in steps[:6]] == [(j, k) for j in range(3) for k in range(2)]
    firsts = [st for st in steps if st.batch == 0]
    assert [st.weight_slot for st in firsts] == [g % 2 for g in range(9)]  # slot use runs on across rounds
    assert firsts[2].prefetch == ((0, 1),)  # the last layer asks for the next round's first layer
    assert steps[5].next_step is None and steps[5].last_batch  # inputs of the next round arrive by message


def test_pick_shape_maximises_the_slowest_stage() -> None:
    table = [{(8, 2): 10.0, (16, 1): 30.0, (4, 4): 5.0}, {(8, 2): 12.0, (16, 1): None, (4, 4): 50.0}]
    assert pick_shape(table) == (8, 2)
    with pytest.raises(PipelineConfigError, match="no micro-batch shape fits every stage"):
        pick_shape([{(8, 2): None}, {(8, 2): 1.0}])


# ---- two stages as processes ----------------------------------------------------------------------------------

def test_two_stages_match_single_process_and_transformers(opt3: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    ranks = results(launch("parity", opt3, tmp_path, 2), tmp_path, 120)
    assert all("error" not in r for r in ranks), [r.get("trace", r.get("error")) for r in ranks]
    assert ranks[0]["layers"][0] == 0 and ranks[1]["layers"][1] == 2 * 3 + 2
    assert ranks[0]["offload_left"] == [] and ranks[1]["offload_left"] == []
    for key in ("stopped", "plain", "small", "scores"):
        assert ranks[0][key] == ranks[1][key], f"{key}: every rank returns the same results"
    out = ranks[0]
    with Engine.from_pretrained(opt3, policy=Policy(2, 1), device="cpu") as engine:
        single = {"stopped": engine.generate(PROMPTS, 8, stop_token_ids=STOPS, return_logprobs=True),
                  "plain": engine.generate(PROMPTS, 8, return_logprobs=True),
                  "small": engine.generate(PROMPTS[:3], 5, return_logprobs=True)}
    for key, gens in single.items():
        for (tokens, logprobs, reason), ref in zip(out[key], gens, strict=True):
            assert tokens == ref.token_ids and reason == ref.finish_reason, key
            assert max(abs(a - b) for a, b in zip(logprobs, ref.logprobs, strict=True)) < 1e-5
    refs = [hf_greedy(opt3, p, 8) for p in PROMPTS]
    for (tokens, logprobs, reason), (ref, ref_lp) in zip(out["plain"], refs, strict=True):
        assert tokens == ref and reason == "length"
        assert max(abs(a - b) for a, b in zip(logprobs, ref_lp, strict=True)) < TOL
    ends = []
    for (tokens, _, reason), (ref, _), stop in zip(out["stopped"], refs, STOPS, strict=True):
        end = ref.index(stop[0]) + 1 if stop[0] in ref else len(ref)
        assert tokens == ref[:end] and reason == ("stop" if stop[0] in ref else "length")
        ends.append(end)
    assert len(set(ends)) >= 3, f"stops should hit at different steps: {ends}"
    for (lps, greedy), ctx, cont in zip(out["scores"], [[5, 6, 7], [9], [3, 4, 5, 6, 7, 8]],
                                        [[8, 9], [10, 11, 12], [13]], strict=True):
        ref_lps, ref_greedy = hf_continuation_logprobs(opt3, ctx, cont)
        assert max(abs(a - b) for a, b in zip(lps, ref_lps, strict=True)) < TOL and greedy == ref_greedy
    assert time.monotonic() - started < 60


# ---- bad configurations: an error on every rank, in bounded time -----------------------------------------------

def test_more_stages_than_layers_fails_on_every_rank(tmp_path: Path) -> None:
    model = make_opt(tmp_path / "opt1", num_hidden_layers=1)
    ranks = results(launch("stages", model, tmp_path / "run", 2), tmp_path / "run", 60)
    for r in ranks:
        assert "2 pipeline stages but" in r["error"] and "only 1 transformer layers" in r["error"]


def test_stage_that_does_not_fit_fails_on_every_rank_naming_it(opt3: Path, tmp_path: Path) -> None:
    ranks = results(launch("budget", opt3, tmp_path, 2), tmp_path, 60)
    for r in ranks:
        err = r["error"]
        assert err.startswith("StageDoesNotFit") and "stage 1 (rank 1" in err and "gpu memory" in err, err
        assert "stage 0" not in err and "bytes" in err and "available" in err


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_lost_rank_ends_every_other_rank_with_an_error(opt3: Path, tmp_path: Path, how: str) -> None:
    """Rank 1 of 3 dies (SIGKILL) or hangs (SIGSTOP) mid-generation: ranks 0 and 2 exit with an error naming it."""
    procs = launch("loop", opt3, tmp_path, 3, PIPELINE_TEST_TIMEOUT_S="60" if how == "killed" else "5")
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready{r}").exists() for r in range(3)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "ranks did not start"
            time.sleep(0.1)
        time.sleep(0.3)
        os.kill(procs[1].pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        killed_at = time.monotonic()
        for p in (procs[0], procs[2]):
            p.wait(timeout=30)  # a hang is noticed after the ranks' timeout (5 s here)
        elapsed = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert elapsed < (10 if how == "killed" else 20)
    for r in (0, 2):
        err = json.loads((tmp_path / f"rank{r}.json").read_text())["error"]
        assert err.startswith("PipelineError") and "rank 1" in err, err
        assert ("is gone" if how == "killed" else "did not answer") in err, err


# ---- the CLI ---------------------------------------------------------------------------------------------------

def bench(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "flexgen_core.cli", "bench", "--device", "cpu", "--prompt-len", "6",
                           "--gen-len", "5", "--print-tokens", "--warmup", "0", *args], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def tokens(stdout: str) -> list[list[int]]:
    return [[int(t) for t in line.split()[1:]] for line in stdout.splitlines() if line.startswith("tokens:")]


def test_bench_nproc_prints_the_single_process_tokens(opt3: Path) -> None:
    """`flexgen bench --nproc 2` starts two ranks with torchrun; rank 0 alone prints the report."""
    piped = bench("--model", str(opt3), "--nproc", "2", "--gpu-batch-size", "2", "--weights", "0,1,0")
    single = bench("--model", str(opt3), "--gpu-batch-size", "2", "--num-blocks", "2")
    assert len(tokens(piped)) == 4 and tokens(piped) == tokens(single)
    assert piped.count("generation throughput") == 1 and "stage 1 (rank 1): blocks 2..2 + head" in piped


def test_bench_nproc_auto_policy_chooses_one_shape_for_every_stage(opt3: Path) -> None:
    from flexgen_core.bench import synthetic_prompts

    out = bench("--model", str(opt3), "--nproc", "2", "--policy", "auto", "--profile", "cpu-2core",
                "--cpu-mem-gib", "0.5")
    stage_lines = [line for line in out.splitlines() if line.startswith("  stage ")]
    shapes = {line.split("policy ")[1].split()[0] for line in stage_lines}
    assert len(stage_lines) == 2 and len(shapes) == 1
    got = tokens(out)
    prompts = synthetic_prompts(len(got), 6, 200, 0)[:3]
    with Engine.from_pretrained(opt3, policy=Policy(3, 1), device="cpu") as engine:
        assert [g.token_ids for g in engine.generate(prompts, 5)] == got[:3]
