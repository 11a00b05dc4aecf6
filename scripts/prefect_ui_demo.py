"""End to end against a local Prefect server: deploy the flows, run the evaluate deployment on a worker, fan out
one child run per run entry over two workers, and screenshot the flow run pages with headless Chromium.

Everything listens on 127.0.0.1. Steps (README "Running from the Prefect UI" does the same by hand):
  1. `prefect server start --host 127.0.0.1 --port PORT` with its own PREFECT_HOME (a temp dir by default)
  2. `prefect work-pool create flexgen-local --type process`, `prefect --no-prompt deploy --all` (prefect.yaml)
  3. WORKERS x `prefect worker start --pool flexgen-local --limit 1`
  4. run `evaluate/local` (one entry), wait, check its artifacts through the API, screenshot its Artifacts tab
  5. scale-out: an `evaluate` run with `fan_out_deployment=evaluate/local` over two entries; each worker runs
     one child; screenshot the parent's Subflow Runs tab
  6. crash and retry: SIGKILL a deployment run's flow process after some chunks landed (the worker reports it
     Crashed), retry it as the UI's Retry button does, and check that no request was generated twice
Then every process started here is stopped (process groups), unless --keep-running.

    .venv/bin/python scripts/prefect_ui_demo.py --out build/prefect-ui
    .venv/bin/python scripts/prefect_ui_demo.py --model DIR --profile cpu-2core --engine '{"gpu_batch_size": 2}'
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
POOL = "flexgen-local"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                  "--window-size=1400,1600", "--virtual-time-budget=20000")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def chromium() -> str | None:
    """The Chromium executable, if installed (Debian's `chromium`)."""
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


class Processes:
    """Long-running processes, each in its own process group; `stop()` ends them all (SIGINT, then SIGKILL)."""

    def __init__(self, logs: Path) -> None:
        self.logs, self.procs = logs, []

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for sig in (signal.SIGINT, signal.SIGINT):  # a worker exits on the second SIGINT (prefect.md)
            for proc in self.procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
            deadline = time.monotonic() + 10
            while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
                time.sleep(0.2)
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group: also the flow-run subprocesses of workers
            proc.wait()


def wait_healthy(api: str, server: subprocess.Popen[bytes], timeout_s: float = 120) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if server.poll() is not None:
            raise RuntimeError(f"prefect server exited with {server.returncode}; see its log")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{api}/health", timeout=2) as r:
            if r.read().strip() == b"true":
                return time.monotonic() - start
        time.sleep(0.5)
    raise TimeoutError(f"prefect server at {api} not healthy after {timeout_s} s")


def prefect_cli(args: list[str], env: dict[str, str]) -> str:
    cmd = [str(Path(sys.executable).parent / "prefect"), *args]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "already exists" not in done.stdout + done.stderr:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def browse(url: str, path: Path) -> str:
    """Headless Chromium: screenshot `url` to `path` and return the rendered DOM (the page's scripts get 20 s
    of virtual time to load their data)."""
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("chromium is not installed (apt-get install -y chromium)")
    dom = ""
    for action in (f"--screenshot={path}", "--dump-dom"):
        with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
            done = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", action, url],
                                  capture_output=True, text=True, timeout=120, check=True)
            dom = done.stdout or dom
    return dom


def page_check(url: str, path: Path, expected: list[str]) -> dict[str, Any]:
    """Screenshot a UI page and check that its rendered DOM shows each expected text."""
    dom = browse(url, path)
    return {"url": url, "path": str(path), "shows": {text: text in dom for text in expected},
            "server_unreachable": "Unable to connect" in dom}


def artifacts_of(flow_run_id: Any) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    return {str(a.key): str(a.type) for a in arts}


def deployments() -> dict[str, list[dict[str, Any]]]:
    """Each deployment ("flow/name") with its schedules (cron, active)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows()}
        return {f"{flows[d.flow_id]}/{d.name}": [{"cron": getattr(s.schedule, "cron", None), "active": s.active}
                                                for s in d.schedules]
                for d in client.read_deployments()}


def worker_of(flow_run_id: Any, logs: Path, workers: int) -> str | None:
    for i in range(workers):
        if str(flow_run_id) in (logs / f"worker-{i}.log").read_text(errors="replace"):
            return f"worker-{i}"
    return None


def run_demo(args: argparse.Namespace, env: dict[str, str], procs: Processes) -> dict[str, Any]:
    api = f"http://127.0.0.1:{args.port}/api"
    server = procs.start("server", [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host",
                                    "127.0.0.1", "--port", str(args.port)], {**env, "PREFECT_UI_API_URL": api})
    report: dict[str, Any] = {"ui": f"http://127.0.0.1:{args.port}", "server_start_s": wait_healthy(api, server)}
    env = {**env, "PREFECT_API_URL": api}
    os.environ.update(env)  # this process's client (prefect is imported below, after this)
    prefect_cli(["work-pool", "create", POOL, "--type", "process"], env)
    prefect_cli(["--no-prompt", "deploy", "--all"], {**env, "PWD": str(REPO)})
    for i in range(args.workers):  # polling every 2 s instead of 10 s: a snappier demo
        procs.start(f"worker-{i}", [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", POOL,
                                    "--limit", "1", "--name", f"worker-{i}"],
                    {**env, "PREFECT_WORKER_QUERY_SECONDS": "2"})
    from prefect.deployments import run_deployment

    report["deployments"] = deployments()
    evaluation = {"run_entries": args.entries[:1], "model": str(args.model), "output_path": str(args.out / "results"),
                  "max_eval_instances": args.max_eval_instances}
    engine = {"policy": "auto", **({"profile": args.profile} if args.profile else {}), **json.loads(args.engine)}
    start = time.monotonic()
    run = run_deployment("evaluate/local", parameters={"evaluation": evaluation, "engine": engine},
                         flow_run_name="ui-demo-evaluate", timeout=args.timeout, poll_interval=2)
    report["deployment_run"] = {"id": str(run.id), "state": run.state_name, "wall_s": time.monotonic() - start,
                                "artifacts": artifacts_of(run.id), "worker": worker_of(run.id, args.out, args.workers)}
    artifacts = sorted(report["deployment_run"]["artifacts"])
    report["screenshot"] = page_check(f"{report['ui']}/v2/runs/flow-run/{run.id}?tab=Artifacts",
                                      args.out / "flow-run-artifacts.png", artifacts)
    if args.workers >= 2 and len(args.entries) >= 2:
        report["fan_out"] = fan_out(args, evaluation, engine, report["ui"])
    if args.retry_instances:
        report["crash_retry"] = crash_and_retry(args, evaluation, engine)
    return report


def fan_out(args: argparse.Namespace, evaluation: dict[str, Any], engine: dict[str, Any], ui: str) -> dict[str, Any]:
    """The parent runs here (any process can orchestrate); each worker picks one child run per run entry."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from flows.evaluate import evaluate
    from flows.params import EngineParams, EvaluateParams

    start = time.monotonic()
    state = evaluate(EvaluateParams(**{**evaluation, "run_entries": args.entries[:2], "suite": "fan-out",
                                       "fan_out_deployment": "evaluate/local"}),
                     EngineParams(**engine), return_state=True)
    parent = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])))
    names = sorted(c.name for c in children)
    return {"parent": str(parent), "state": state.name, "wall_s": time.monotonic() - start,
            "children": {c.name: {"state": c.state_name, "worker": worker_of(c.id, args.out, args.workers)}
                         for c in children},
            "screenshot": page_check(f"{ui}/v2/runs/flow-run/{parent}?tab=SubflowRuns",
                                     args.out / "fan-out-subflows.png", names)}


def _committed_chunks(run_root: Path) -> int:
    from flexgen_core.evaluation.store import STORE_FILENAME, RunStore

    for path in run_root.glob(f"*/{STORE_FILENAME}"):
        with contextlib.suppress(Exception), RunStore(path.parent, readonly=True) as store:
            return len(store.chunks())
    return 0


def _wait_state(flow_run_id: Any, timeout_s: float, until: Any) -> Any:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and until(run.state):
                return run
            time.sleep(0.5)
    raise TimeoutError(f"flow run {flow_run_id} did not reach the expected state in {timeout_s} s")


def crash_and_retry(args: argparse.Namespace, evaluation: dict[str, Any], engine: dict[str, Any]) -> dict[str, Any]:
    """SIGKILL the flow process of a deployment run mid-run, then retry the Crashed run like the UI button
    (state Scheduled/AwaitingRetry, forced): the worker reruns the same flow run, which finds the finished
    chunks in the run store and generates only the rest."""
    import psutil
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.states import State

    from flexgen_core.evaluation.outputs import MANIFEST_FILE, read_json
    from flexgen_core.evaluation.store import RunStore

    params = {"evaluation": {**evaluation, "suite": "retry", "max_eval_instances": args.retry_instances},
              "engine": engine}
    run = run_deployment("evaluate/local", parameters=params, flow_run_name="ui-demo-crash-retry", timeout=0)
    run_root = Path(evaluation["output_path"]) / "runs" / "retry"
    deadline = time.monotonic() + args.timeout
    while _committed_chunks(run_root) < 2:
        if time.monotonic() > deadline:
            raise TimeoutError("no chunks landed in the crash-and-retry run")
        time.sleep(0.1)
    victims = [p for p in psutil.process_iter()
               if _environ(p).get("PREFECT__FLOW_RUN_ID") == str(run.id)]
    for proc in victims:
        proc.kill()
    landed = _committed_chunks(run_root)
    crashed = _wait_state(run.id, 120, lambda s: s.is_final())
    with get_client(sync_client=True) as client:  # what the UI's Retry button sends
        client.set_flow_run_state(run.id, State(type=StateType.SCHEDULED, name="AwaitingRetry",
                                                message="Retry from the UI"), force=True)
    done = _wait_state(run.id, args.timeout, lambda s: s.is_final() and s.name != "AwaitingRetry")
    (run_dir,) = [p for p in run_root.iterdir() if p.is_dir()]
    keys = {r["key"] for r in read_json(run_dir / MANIFEST_FILE)["requests"]}
    with RunStore(run_dir, readonly=True) as store:
        writes = {store.write_count(k) for k in keys}
        stored = len(store.completed_keys() & keys)
    return {"id": str(run.id), "killed_pids": [p.pid for p in victims], "chunks_before_kill": landed,
            "state_after_kill": crashed.state_name, "state_after_retry": done.state_name,
            "run_count": done.run_count, "requests": len(keys), "stored": stored, "write_counts": sorted(writes)}


def _environ(proc: Any) -> dict[str, str]:
    try:
        return dict(proc.environ())
    except Exception:  # gone, or not ours
        return {}


def main(argv: list[str] | None = None) -> int:
    from flexgen_core.assets import TINY_MODEL_DIR

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "build" / "prefect-ui", help="logs, results, screenshots")
    p.add_argument("--model", type=Path, default=TINY_MODEL_DIR)
    p.add_argument("--entries", nargs="+", default=["synthetic_reasoning:mode=pattern_match",
                                                    "synthetic_reasoning:mode=induction"])
    p.add_argument("--max-eval-instances", type=int, default=10)
    p.add_argument("--profile", default=None, help="hardware profile for the auto policy (default: measure)")
    p.add_argument("--engine", default="{}", help="extra engine parameters as JSON, e.g. '{\"gpu_batch_size\": 2}'")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--port", type=int, default=None, help="server port on 127.0.0.1 (default: a free one)")
    p.add_argument("--home", type=Path, default=None, help="PREFECT_HOME of the server (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the deployment run")
    p.add_argument("--retry-instances", type=int, default=40,
                   help="instances of the crash-and-retry run (0: skip that step)")
    p.add_argument("--keep-running", action="store_true", help="leave the server and workers up (Ctrl-C stops)")
    args = p.parse_args(argv)
    args.out = args.out.absolute()
    args.out.mkdir(parents=True, exist_ok=True)
    args.port = args.port or free_port()
    with contextlib.ExitStack() as stack:
        home = args.home or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="prefect-ui-home-")))
        env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
        env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
        procs = Processes(args.out)
        try:
            report = run_demo(args, env, procs)
            (args.out / "report.json").write_text(json.dumps(report, indent=2))
            print(json.dumps(report, indent=2))
            if args.keep_running:
                print(f"UI at {report['ui']} (Ctrl-C to stop)", file=sys.stderr)
                with contextlib.suppress(KeyboardInterrupt):
                    signal.pause()
        finally:
            procs.stop()
    ok = report["deployment_run"]["state"] == "Completed" and all(report["screenshot"]["shows"].values())
    retry = report.get("crash_retry")
    ok = ok and (retry is None or (retry["state_after_retry"] == "Completed" and retry["write_counts"] == [1]))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
