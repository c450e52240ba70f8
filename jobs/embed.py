"""Entry point for one embedding job: `python -m jobs.embed --config job.yaml`.

Meant for `ray job submit --working-dir . -- python -m jobs.embed --config job.yaml` (the driver then connects to
the cluster through RAY_ADDRESS, which Ray sets for submitted jobs) and equally for a local run, where Ray starts
in-process. All work happens in `pipeline.run_job`; this module loads the config, prints the summary and turns the
outcome into an exit code (see `jobs.exit_codes`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import traceback
from typing import Any

from jobs import exit_codes, interrupts
from jobs.cli_common import configure_logging, write_report
from jobs.job_config import add_config_arguments, load_job_config
from jobs.native_stderr import NativeStderrFilter
from pipeline.config import JobConfig
from pipeline.run.outcome import error_fraction, run_outcome
from pipeline.run.run_summary import summary_counts, summary_to_dict

logger = logging.getLogger("jobs.embed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.embed",
        allow_abbrev=False,
        description="Embed images and captions with SAM 3's backbone into Parquet, as described by a job file.",
        epilog=exit_codes.RUN_EPILOG,
    )
    add_config_arguments(parser)
    parser.add_argument("--run-id", help="name this run (default: the config's run_id, else a random one)")
    parser.add_argument(
        "--resume-path",
        metavar="URI",
        help="checkpoint location shared by the cluster: a rerun with the same value skips rows already written",
    )
    parser.add_argument("--report", metavar="PATH_OR_URI", help="also write the run summary as JSON here")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="run without a checkpoint, on random weights (model.random_weights: true); for tests and demos",
    )
    add_dataset_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of runs that grow one dataset (docs/incremental.md); shared with `sam3-embed run`."""
    parser.add_argument(
        "--incremental",
        action="store_true",
        help="add to the dataset at --output only the input rows whose id it does not hold (output.mode: incremental)",
    )
    parser.add_argument(
        "--retry-errors",
        action="store_true",
        help="re-embed exactly the dataset's rows whose status is error (output.retry_errors: true)",
    )
    parser.add_argument(
        "--refresh",
        choices=["none", "changed"],
        help="changed: re-hash the images of rows already present, re-embed those that changed (output.refresh)",
    )


def apply_dataset_arguments(config: JobConfig, args: argparse.Namespace) -> None:
    if args.incremental:
        config.output.mode = "incremental"
    if args.retry_errors:
        config.output.retry_errors = True
    if args.refresh:
        config.output.refresh = args.refresh


def resolve_config(args: argparse.Namespace) -> JobConfig:
    config = load_job_config(args.config, args.overrides)
    if args.run_id:
        config.run_id = args.run_id
    if args.resume_path:
        config.resume_path = args.resume_path
    apply_dataset_arguments(config, args)
    return config


def exit_code_for(summary: dict[str, Any], max_error_fraction: float) -> int:
    return exit_codes.exit_code(run_outcome(summary, max_error_fraction))


def render_summary(config: JobConfig, summary: dict[str, Any], code: int) -> str:
    """A few lines for the job log; the whole summary (config included) goes to --report and `_summary.json`."""
    rows, error_rows = summary_counts(summary)
    fraction = error_fraction(rows, error_rows)
    budget = config.output.max_error_fraction
    lines = [
        f"run {config.run_id}: {_count(rows)} rows, {_count(error_rows)} error rows",
        f"  output:       {summary.get('output_uri', config.output.uri)}",
    ]
    if fraction is not None:
        verdict = "within" if fraction <= budget else "ABOVE"
        lines.append(
            f"  error rows:   {fraction:.2%}, {verdict} the budget of {budget:.2%} (output.max_error_fraction)"
        )
    if summary.get("random_weights"):
        lines.append(
            f"  model:        {config.model.config}, RANDOM WEIGHTS (no checkpoint): the embeddings mean nothing"
        )
    for reason in summary.get("compile_fallbacks") or []:
        lines.append(f"  compile:      FAILED, the model ran eagerly (slower): {reason}")
    this_attempt = summary.get("rows_this_run")
    if isinstance(this_attempt, int) and rows is not None and this_attempt < rows and "rows_added" not in summary:
        lines.append(f"  resumed:      {rows - this_attempt} rows were already written by an earlier attempt")
    if "elapsed_s" in summary:
        rate = f"{summary['elapsed_s']:.1f}s, {summary.get('rows_per_s', 0):.2f} rows/s"
        if summary.get("steady_rows_per_s"):
            rate += f" ({summary['steady_rows_per_s']:.2f} rows/s after the first batch)"
        lines.append(f"  elapsed:      {rate}")
    if "files" in summary:
        lines.append(f"  files:        {summary['files']}")
    if "rows_added" in summary:  # a run that joined a dataset (docs/incremental.md)
        lines.append(
            f"  this run:     {summary['rows_added']} rows added, {summary['rows_retried']} retried "
            f"({summary['rows_retried_ok']} now ok), {summary['rows_refreshed']} refreshed; {summary['rows_computed']} "
            f"computed by the model, {summary['rows_copied']} copied, {summary['rows_skipped_present']} skipped as "
            f"present, {summary['rows_unchanged']} unchanged"
        )
    elif "rows_computed" in summary:
        lines.append(
            f"  this run:     {summary['rows_computed']} computed by the model, {summary['rows_copied']} copied "
            "(same image bytes as a computed row)"
        )
    lines.append(f"exit code {code} ({exit_codes.describe(code)})")
    return "\n".join(lines)


def _count(value: int | None) -> str:
    return "?" if value is None else str(value)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        config = resolve_config(args)
        if args.random_weights:
            config.model.random_weights = True
    except (OSError, ValueError, TypeError) as error:
        print(f"error: cannot load job config {args.config}: {error}", file=sys.stderr)
        return exit_codes.USAGE
    if args.dry_run:
        print(json.dumps(config.to_dict(), indent=1, sort_keys=True))
        return exit_codes.OK

    return execute(config, report=args.report, verbose=args.verbose)


def execute(config: JobConfig, report: str | None = None, verbose: bool = False) -> int:
    """Check the job (exit 2 on a mistake, before Ray starts), run it, print its summary, optionally write it as
    JSON; the exit code says how it went."""
    from pipeline.run import console
    from pipeline.run.preflight import PreflightError, preflight

    console.set_verbose(verbose)
    interrupted = f"run {config.run_id}: interrupted"
    if config.resume_path:
        interrupted += f"; rerun with --resume-path {config.resume_path} to continue"
    with interrupts.stop_on_signals(interrupted) as signals:
        try:
            plan = preflight(config)
        except PreflightError as error:
            print(f"error: {error}", file=sys.stderr)
            return exit_codes.USAGE
        except KeyboardInterrupt as error:
            print(interrupted, file=sys.stderr)
            return interrupts.exit_code_for(error)
        import ray

        from pipeline import run_job  # imported late: loading the pipeline pulls in Ray and torch

        started_here = not ray.is_initialized()
        # Ray starts inside run_job (an incremental run takes the dataset's lease first, so a run refused there
        # never starts a cluster); ray.init installs its own SIGTERM handler, so the signals are ours again after.
        console.after_ray_start(signals.rearm)
        with contextlib.nullcontext() if verbose else NativeStderrFilter():
            try:
                summary = summary_to_dict(run_job(config, plan))
                if started_here:
                    # The local cluster stops while the signals are still ours: a Ctrl-C during its shutdown is
                    # then cut short like any other, instead of raising inside Ray's shutdown at exit.
                    console.stop_ray()
            except PreflightError as error:  # found under the dataset's lease (a run holds it, another identity)
                if started_here:
                    console.stop_ray()
                print(f"error: {error}", file=sys.stderr)
                return exit_codes.USAGE
            except KeyboardInterrupt as error:
                # Ray Data has stopped its executor; a local cluster and anything it left go too, so no process
                # of the run outlives it (jobs/interrupts.py forces this if it takes more than a few seconds).
                interrupts.shut_down_ray()
                print(interrupted, file=sys.stderr)
                return interrupts.exit_code_for(error)
            except Exception as error:
                traceback.print_exc()
                print(f"run {config.run_id}: FAILED: {type(error).__name__}: {error}", file=sys.stderr)
                return exit_codes.FAILED
            finally:
                console.after_ray_start(None)
    code = exit_code_for(summary, config.output.max_error_fraction)
    print(render_summary(config, summary, code), flush=True)
    if report:
        write_report(report, json.dumps({**summary, "exit_code": code}, indent=1, sort_keys=True, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
