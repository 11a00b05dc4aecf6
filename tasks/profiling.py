"""Hardware profiling stage: measure this machine (`flexgen_core.planning.probe.measure`) and save the YAML."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from flexgen_core.planning.hardware import HardwareProfile


@task(name="measure-machine")
def measure_machine(name: str | None, device: str | None, offload_dir: str | None, quick: bool) -> HardwareProfile:
    """Measure bandwidths and compute rates through the engine's own code paths (under two minutes)."""
    from flexgen_core.planning.probe import measure

    log = get_run_logger()
    return measure(name=name, device=device, offload_dir=offload_dir, quick=quick, log=log.info)


@task(name="save-profile")
def save_profile(profile: HardwareProfile, path: str) -> str:
    """Write the profile YAML atomically; returns its path."""
    return str(profile.save(Path(path)))
