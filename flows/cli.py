"""`flexgen eval RUN_ENTRY...`: the `evaluate` flow run in this process (Prefect's embedded server, SQLite).

Prefect's embedded server is started first, in a child process, so that its start-up overlaps the imports
(`flows.embedded_server`); with PREFECT_API_URL set, the flow uses that server instead.
Registered as a `flexgen` subcommand through the `flexgen.commands` entry point. Parameters are validated
before Prefect starts; Prefect's console logs are hidden unless --verbose (they still reach the server, and
the UI); a progress bar is drawn from the flow's progress log records; the summary table is printed at the end.
Rerunning the same command (same suite and output path) resumes. `--nproc N` runs the generation step as an
N-stage pipeline (N processes started with torchrun; Prefect, scoring and outputs stay in this process).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any, TextIO

PREFECT_DEFAULTS = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
                    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false"}
ENGINE_ARGS = ("gpu_batch_size", "num_gpu_batches", "weights", "cache", "acts", "cpu_attention", "compress_weights",
               "compress_cache", "attn_topk", "overlap", "pin_weights", "profile", "memory_margin", "device", "dtype",
               "offload_dir", "gpu_mem_gib", "cpu_mem_gib", "disk_gib", "micro_batches", "timeout_s")
BAR_WIDTH = 30


def validation_message(exc: Any) -> str:
    """A pydantic ValidationError as one 'field: problem' line per error."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "parameters"
        lines.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(lines)


def params_from_args(args: argparse.Namespace) -> tuple[Any, Any]:
    """(EvaluateParams, EngineParams) from the command line; ValueError with a readable message if invalid."""
    from pydantic import ValidationError

    from flows.params import DEFAULT_MODEL, EngineParams, EvaluateParams

    try:
        engine = EngineParams(policy=args.policy or "auto", pipeline_stages=getattr(args, "nproc", 1),
                              **{k: getattr(args, k) for k in ENGINE_ARGS if getattr(args, k, None) is not None})
        evaluation = EvaluateParams(run_entries=args.run_entries, suite=args.suite, output_path=args.output_path,
                                    max_eval_instances=args.max_eval_instances, model=args.model or DEFAULT_MODEL,
                                    skip_completed_runs=args.skip_completed_runs, metrics=args.metrics)
    except ValidationError as exc:
        raise ValueError(validation_message(exc)) from None
    engine.check_pipeline(evaluation.model)
    return evaluation, engine


class ProgressBar(logging.Handler):
    """Draws the flow's progress log records (`flows.reporting.PROGRESS_ATTR`) as a bar on a terminal, or as
    a line per 10% elsewhere."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(logging.INFO)
        self.stream, self.tty = stream, stream.isatty()
        self.last_decile, self.open_line = -1, False

    def emit(self, record: logging.LogRecord) -> None:
        from flows.reporting import PROGRESS_ATTR, format_eta

        data = getattr(record, PROGRESS_ATTR, None)
        if data is None:
            return
        frac = data["done"] / data["total"] if data["total"] else 1.0
        filled = int(round(frac * BAR_WIDTH))
        line = (f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {100 * frac:5.1f}%  {data['done']}/{data['total']} "
                f"requests  {data['tok_s']:.1f} tok/s  ETA {format_eta(data['eta_s'])}")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if frac >= 1 else ""))
            self.open_line = frac < 1
        elif int(frac * 10) > self.last_decile:
            self.last_decile = int(frac * 10)
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.open_line:
            self.stream.write("\n")
            self.open_line = False
        super().close()


@contextlib.contextmanager
def progress_bar(stream: TextIO = sys.stderr) -> Iterator[None]:
    logger = logging.getLogger("prefect.flow_runs")
    handler = ProgressBar(stream)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


def cmd_eval(args: argparse.Namespace) -> int:
    evaluation, engine = params_from_args(args)
    for name, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if not args.verbose:  # the embedded server's shutdown can log cosmetic errors (prefect.md): hidden too
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
    from flows.embedded_server import EmbeddedServer

    with EmbeddedServer() as server:  # boots while the imports below run (they are needed anyway)
        import pandas
        import torch  # noqa: F401

        import flexgen_core.runtime.engine  # noqa: F401
        from flows.evaluate import evaluate

        server.wait()
        with progress_bar():
            result = evaluate(evaluation=evaluation, engine=engine)
    table = pandas.DataFrame(result["scores"], columns=["run", "scenario", "metric", "split", "mean", "count"])
    with pandas.option_context("display.max_rows", None, "display.width", 200, "display.max_colwidth", 80):
        print(table.to_string(index=False))
    print(f"results: {evaluation.output_path}/runs/{evaluation.suite}", file=sys.stderr)
    return 0


def register(sub: Any) -> None:
    """Add `eval` to a `flexgen` subcommand parser (the `flexgen.commands` entry point)."""
    from flexgen_core.cli import add_auto_flags, add_policy_flags

    p = sub.add_parser("eval", help="evaluate HELM run entries with the Prefect evaluate flow (resumable)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_entries", nargs="+", metavar="RUN_ENTRY", help="e.g. synthetic_reasoning:mode=pattern_match")
    p.add_argument("--suite", default="default", help="results go to OUTPUT_PATH/runs/SUITE")
    p.add_argument("--output-path", default="benchmark_output", help="output directory (rerunning resumes)")
    p.add_argument("--max-eval-instances", type=int, default=None, help="evaluation instances per run entry")
    p.add_argument("--model", default=None, help="checkpoint directory with tokenizer.json (default: shipped tiny OPT)")
    p.add_argument("--skip-completed-runs", action="store_true", help="skip runs whose outputs already exist")
    p.add_argument("--metrics", nargs="+", default=None, help="reference metrics instead of the run specs' own")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None)
    p.add_argument("--offload-dir", default=None, help="directory for disk-tier files (default: a temp dir)")
    p.add_argument("--gpu-mem-gib", type=float, default=None, help="compute-device memory budget")
    p.add_argument("--cpu-mem-gib", type=float, default=None, help="CPU RAM budget")
    p.add_argument("--disk-gib", type=float, default=None, help="disk budget in the offload directory")
    p.add_argument("--nproc", type=int, default=1,
                   help="pipeline stages, one process each (one per GPU): > 1 runs generation on that many ranks "
                        "started with torchrun (budgets are per rank)")
    p.add_argument("--micro-batches", type=int, default=None, help="pipeline: blocks in flight (default: --nproc)")
    p.add_argument("--timeout-s", type=float, default=None,
                   help="pipeline: longest wait for another rank before every rank stops with an error (600)")
    p.add_argument("--verbose", action="store_true", help="show Prefect's logs on the console")
    add_policy_flags(p)
    add_auto_flags(p)
    p.set_defaults(func=cmd_eval)
