"""Scale-out stage: one child flow run per run entry through a deployment, so workers on its pool share them."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE


@task(name="launch-child", task_run_name="launch {run_name}", cache_policy=NO_CACHE)
def launch_child(deployment: str, parameters: Mapping[str, Any], run_name: str) -> str:
    """Create the child flow run (scheduled now, linked to this flow run) and return its id without waiting."""
    from prefect.deployments import run_deployment

    child = run_deployment(deployment, parameters=dict(parameters), timeout=0, flow_run_name=run_name[:100])
    get_run_logger().info(f"child run {child.name} ({child.id}) for {run_name} on {deployment}")
    return str(child.id)


@task(name="wait-children", cache_policy=NO_CACHE)
def wait_children(flow_run_ids: Sequence[str], poll_s: float = 5.0) -> dict[str, str]:
    """Wait until every child run is final; {id: state name}. Raises naming the children that did not complete."""
    from uuid import UUID

    from prefect.client.orchestration import get_client

    log = get_run_logger()
    states: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        while len(states) < len(flow_run_ids):
            for run_id in flow_run_ids:
                if run_id in states:
                    continue
                run = client.read_flow_run(UUID(run_id))
                if run.state is not None and run.state.is_final():
                    states[run_id] = run.state.name
                    log.info(f"child {run.name}: {run.state.name}")
            if len(states) < len(flow_run_ids):
                time.sleep(poll_s)
    failed = {k: v for k, v in states.items() if v != "Completed"}
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(states)} child runs did not complete: {failed}; retry them "
                           "from the UI (their finished chunks are kept)")
    return states
