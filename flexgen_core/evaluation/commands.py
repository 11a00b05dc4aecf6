"""`flexgen score PATH [--suite S]`: rebuild runs' outputs from their run stores (no model) and print the summary.

PATH is a run directory (holding run_spec.json), a suite directory (`<output>/runs/<suite>`) or an output
path (`benchmark_output`, with `--suite`). Every run directory with a run manifest is rescored; the suite's
summary table is printed and written as `runs/<suite>/summary.csv`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from flexgen_core.evaluation.outputs import MANIFEST_FILE, RUN_SPEC_FILE, run_dirs


def locate_runs(path: Path, suite: str) -> tuple[list[Path], Path, str]:
    """(run directories to score, output path, suite) for a run, suite or output directory."""
    if (path / RUN_SPEC_FILE).is_file():
        return [path], path.parent.parent.parent, path.parent.name
    if path.parent.name == "runs" and not (path / "runs").is_dir():
        output_path, suite = path.parent.parent, path.name
    else:
        output_path = path
    runs = [d for d in run_dirs(output_path, suite) if (d / MANIFEST_FILE).is_file()]
    if not runs:
        raise FileNotFoundError(f"no runs to score under {output_path / 'runs' / suite} (run directories with "
                                f"{RUN_SPEC_FILE} and {MANIFEST_FILE}); check PATH and --suite")
    return runs, output_path, suite


def cmd_score(args: argparse.Namespace) -> int:
    import pandas

    from flexgen_core.evaluation.runner import score_run_dir
    from flexgen_core.evaluation.summary import summary_table

    runs, output_path, suite = locate_runs(Path(args.path), args.suite)
    for run_dir in runs:
        score_run_dir(run_dir)
        print(f"scored {run_dir}", file=sys.stderr)
    table = summary_table(output_path, suite, all_stats=args.all_stats)
    if len(runs) == 1:
        table = table[table["run"] == runs[0].name]
    with pandas.option_context("display.max_rows", None, "display.width", 200, "display.max_colwidth", 80):
        print(table.to_string(index=False))
    return 0


def register(sub: Any) -> None:
    """Add `score` (and the internal `eval-worker`, one rank of `flexgen eval --nproc N`) to a `flexgen`
    subcommand parser (argparse `add_subparsers()` result)."""
    from flexgen_core.evaluation.pipeline_worker import register as register_worker

    p = sub.add_parser("score", help="rebuild a run's HELM outputs from its run store (no model) and print scores",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="RUN_DIR_OR_OUTPUT_PATH",
                   help="a run directory, a suite directory (OUTPUT/runs/SUITE) or an output path")
    p.add_argument("--suite", default="default", help="suite under OUTPUT/runs when PATH is an output path")
    p.add_argument("--all-stats", action="store_true", help="list every stat, not only each run's metrics")
    p.set_defaults(func=cmd_score)
    register_worker(sub)
