"""One rank of a pipeline test, run as a process by tests/test_pipeline.py with torchrun's environment.

    python pipeline_worker.py SCENARIO MODEL OUT_DIR

Writes OUT_DIR/rank<R>.json: what the scenario returned, or {"error": ...} (and exits 3) when it raised.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from flexgen_core import Policy
from flexgen_core.runtime.pipeline import PipelineEngine
from flexgen_core.runtime.stage_link import StageGroup

PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [20], [30, 31, 32, 33, 34, 35, 36], [40, 41, 42]]
STOPS = [[61], [61], [144], [144], [199]]  # per prompt: stop ids hit at different steps (see the test)
# per-stage policies with one micro-batch shape (2 x 1): stage 0 streams weights from CPU, the next stage keeps
# its KV cache on CPU and disk and its activations on CPU
POLICIES = [Policy(2, 1, weights=(0, 1, 0)), Policy(2, 1, cache=(0, 0.5, 0.5), acts=(0, 1, 0)), Policy(2, 1)]


def parity(model: str, out: Path) -> dict:
    n = int(os.environ["WORLD_SIZE"])
    group = StageGroup.from_env(torch.device("cpu"), timeout_s=30)  # one group, two engines
    with PipelineEngine.from_pretrained(model, policy=POLICIES[:n], device="cpu", offload_dir=out / "offload",
                                        group=group) as engine:
        stopped = engine.generate(PROMPTS, 8, stop_token_ids=STOPS, return_logprobs=True)
        plain = engine.generate(PROMPTS, 8, return_logprobs=True)
        decode_steps = engine.last_stats.decode_steps
        scores = engine.score([[5, 6, 7], [9], [3, 4, 5, 6, 7, 8]], [[8, 9], [10, 11, 12], [13]])
        layers = list(engine.stage.layers)
    with PipelineEngine.from_pretrained(model, policy=Policy(4, 2), device="cpu", group=group) as engine:
        small = engine.generate(PROMPTS[:3], 5, return_logprobs=True)  # one micro-batch larger than the prompts
    group.close()
    gen = lambda gs: [[g.token_ids, g.logprobs, g.finish_reason] for g in gs]  # noqa: E731
    return {"stopped": gen(stopped), "plain": gen(plain), "small": gen(small), "layers": layers,
            "scores": [[s.token_logprobs, s.is_greedy] for s in scores], "decode_steps": decode_steps,
            "offload_left": sorted(p.name for p in (out / "offload").rglob("*"))}


def budget(model: str, out: Path) -> dict:
    PipelineEngine.from_pretrained(model, policy=Policy(2, 1), device="cpu", gpu_mem_gib=[1.0, 1e-5], timeout_s=30)
    return {}


def stages(model: str, out: Path) -> dict:
    PipelineEngine.from_pretrained(model, device="cpu", timeout_s=30)
    return {}


def loop(model: str, out: Path) -> dict:
    """Generate until killed; announce when generating."""
    timeout_s = float(os.environ.get("PIPELINE_TEST_TIMEOUT_S", "60"))
    with PipelineEngine.from_pretrained(model, policy=Policy(1, 1), device="cpu", timeout_s=timeout_s) as engine:
        engine.generate(PROMPTS[:2], 4)
        (out / f"ready{os.environ['RANK']}").touch()
        while True:
            engine.generate(PROMPTS, 40)


def main() -> None:
    torch.set_num_threads(1)
    scenario, model, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    rank = os.environ["RANK"]
    started = time.perf_counter()
    try:
        result = globals()[scenario](model, out)
        code = 0
    except Exception as exc:  # the test checks the message every rank ends with
        result = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
        code = 3
    result["seconds"] = time.perf_counter() - started
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    sys.exit(code)


if __name__ == "__main__":
    main()
