"""The `profile` flow: measure this machine's bandwidths, compute rates and capacities -> profiles/<name>.yaml.

    python flows/profile.py            # quick measurement (seconds), written to profiles/<host>.yaml
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flexgen_core.planning.hardware import default_profiles_dir
from flows.params import ProfileParams
from tasks.profiling import measure_machine, save_profile


@flow(name="profile")
def profile(params: ProfileParams = ProfileParams.model_construct()) -> dict[str, Any]:
    """Measure the machine through the engine's own code paths and save the hardware profile YAML that the
    planner's cost model reads."""
    measured = measure_machine(params.name, params.device, params.offload_dir, params.quick)
    path = save_profile(measured, params.output or str(default_profiles_dir() / f"{measured.name}.yaml"))
    rows = "\n".join(f"| {k} | {v} |" for k, v in measured.to_dict().items() if k != "notes")
    create_markdown_artifact(key="hardware-profile", markdown=f"# Hardware profile `{measured.name}`\n\nWritten to "
                             f"`{path}`.\n\n| field | value |\n|---|---|\n{rows}\n")
    return {"path": path, "profile": measured.to_dict()}


if __name__ == "__main__":
    profile(ProfileParams(quick=True))
