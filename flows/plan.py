"""The `plan` flow: hardware profile + model + workload -> LP policy JSON and predicted throughput.

The JSON it writes is what `--policy FILE` (and the evaluate flow's `engine.policy`) reads.

    python flows/plan.py               # opt-30b on the paper's T4 box (prompt 512, gen 32)
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.params import EngineParams, PlanParams
from flows.reporting import artifact_key
from tasks.planning import plan_for_profile, save_policy, this_machine_profile


@flow(name="plan")
def plan(workload: PlanParams = PlanParams.model_construct(),
         engine: EngineParams = EngineParams.model_construct()) -> dict[str, Any]:
    """Search the best offloading policy with the LP for the profiled machine (this one, measured once and
    cached, when no profile is given); budgets are the profile's capacities unless limits are given."""
    profile = engine.hardware_profile() or this_machine_profile(engine.device)
    result = plan_for_profile(workload.model, (workload.prompt_len, workload.gen_len), profile,
                              engine.fixed_fields(), engine.dtype, engine.budget_kwargs(), engine.memory_margin)
    name = f"{result['model'].split('/')[-1]}-{profile.name}-p{workload.prompt_len}-g{workload.gen_len}"
    path = save_policy(result, workload.output or f"policies/{name}.json")
    p, pred = result["policy"], result["predicted"]
    create_markdown_artifact(key=artifact_key("plan", name), markdown=(
        f"# Policy for {result['model']} on {profile.name}\n\nWorkload: prompt {workload.prompt_len}, gen "
        f"{workload.gen_len}. Written to `{path}` (use it as `--policy {path}`).\n\n"
        f"- gpu_batch_size {p['gpu_batch_size']}, num_gpu_batches {p['num_gpu_batches']}\n"
        f"- weights {p['weights']}, cache {p['cache']}, acts {p['acts']}\n"
        f"- cpu_attention {p['cpu_attention']}, compress_weights {p['compress_weights']}, "
        f"compress_cache {p['compress_cache']}\n"
        f"- predicted {pred['throughput_tok_s']:.2f} tok/s (prefill {pred['prefill_s']:.2f} s, decode "
        f"{pred['decode_s']:.2f} s; I/O-or-compute bound {pred['bound_tok_s']:.2f} tok/s)\n"))
    return {"path": path, **result}


if __name__ == "__main__":
    plan(PlanParams(model="opt-30b", prompt_len=512, gen_len=32), EngineParams(profile="t4-paper"))
