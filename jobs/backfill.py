"""Entry point for partitioned backfills: `python -m jobs.backfill --config job.yaml --partition-column date
--partitions 2025-01-01..2025-01-07`.

Each partition not yet committed in the output is embedded into a staging area, then committed all at once
(`_SUCCESS` written last). Partitions are leased, so concurrent backfills over the same output never both write
one. See docs/backfill.md for the protocol and `jobs.exit_codes` for the exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from jobs import exit_codes
from jobs.cli_common import configure_logging, write_report
from jobs.job_config import add_config_arguments, load_job_config
from jobs.native_stderr import NativeStderrFilter
from pipeline.backfill.lease import DEFAULT_TTL_S
from pipeline.backfill.partitions import discover_partition_values, parse_partition_values, validate_column
from pipeline.backfill.runner import Backfill, BackfillOptions, BackfillReport, render_report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.backfill",
        allow_abbrev=False,
        description="Embed every partition of a partitioned input that is not yet committed in the output.",
        epilog="exit codes: 0 ok, 1 a partition failed, 2 usage or config error, 3 a partition committed with error "
        "rows above output.max_error_fraction, 4 some partitions held by another backfill, 130 interrupted",
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--partition-column",
        required=True,
        type=_column,
        metavar="NAME",
        help="the column the input is partitioned by (directories NAME=VALUE, or {NAME} in input.uri)",
    )
    parser.add_argument(
        "--partitions",
        nargs="+",
        metavar="SPEC",
        help="values to cover: 2025-01-01..2025-01-07, a,b,c, 1..12, today-3..today-1 (UTC); "
        "default: every partition found in the input",
    )
    parser.add_argument("--overwrite", action="store_true", help="redo partitions that are already committed")
    parser.add_argument(
        "--incremental",
        action="store_true",
        help="a committed partition gets only its new input rows (docs/incremental.md), instead of being skipped",
    )
    parser.add_argument(
        "--lease-ttl",
        type=_positive_seconds,
        default=DEFAULT_TTL_S,
        metavar="SECONDS",
        help=f"a partition lease not renewed for this long is free to take over (default {DEFAULT_TTL_S:.0f})",
    )
    parser.add_argument("--run-id", help="name this backfill run (recorded in each partition's _SUCCESS)")
    parser.add_argument("--report", metavar="PATH_OR_URI", help="also write the report as JSON here")
    parser.add_argument("--dry-run", action="store_true", help="list the partitions and their state, run nothing")
    parser.add_argument(
        "--random-weights", action="store_true", help="run without a checkpoint (model.random_weights: true)"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, and Ray's own progress blocks and log lines"
    )
    return parser


def _column(text: str) -> str:
    try:
        return validate_column(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _positive_seconds(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        config = load_job_config(args.config, args.overrides)
        if args.run_id:
            config.run_id = args.run_id
        if args.random_weights:
            config.model.random_weights = True
        if args.partitions:
            values = parse_partition_values(args.partitions)
        else:
            values = discover_partition_values(config.input.uri, args.partition_column, config.storage_options())
        options = BackfillOptions(
            column=args.partition_column,
            values=values,
            overwrite=args.overwrite,
            lease_ttl_s=args.lease_ttl,
            incremental=args.incremental,
        )
        if not values:
            print(f"no {args.partition_column}=... partitions found under {config.input.uri}", file=sys.stderr)
            return exit_codes.USAGE
        from pipeline import run_job
        from pipeline.run import console
        from pipeline.run.preflight import check_settings

        console.set_verbose(args.verbose)
        backfill = Backfill(config, options, run_job)
        # Mistakes common to every partition (settings, checkpoint) stop the backfill before Ray starts; each
        # partition's input and output are checked when its turn comes (a mistake there fails that partition).
        if not args.dry_run:
            check_settings(config)
    except (OSError, ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return exit_codes.USAGE

    if args.dry_run:
        for result in backfill.state():
            print(f"{args.partition_column}={result.partition}\t{result.status}\t{result.message}")
        return exit_codes.OK
    import ray

    started_here = not ray.is_initialized()  # not a caller's cluster (a test's, a notebook's): that one stays up
    try:
        with contextlib.nullcontext() if args.verbose else NativeStderrFilter():
            report = backfill.run()
            if started_here:
                console.stop_ray()  # faster than the stop at exit; a cluster in RAY_ADDRESS is only disconnected
    except KeyboardInterrupt:
        print("backfill interrupted; leases expire or are released, rerun to continue", file=sys.stderr)
        return exit_codes.INTERRUPTED
    return _finish(report, args.report)


def _finish(report: BackfillReport, report_path: str | None) -> int:
    code = exit_codes.exit_code(report.outcome())
    print(f"{render_report(report)}; exit code {code} ({exit_codes.describe(code)})", flush=True)
    if report_path:
        write_report(report_path, json.dumps({**report.to_dict(), "exit_code": code}, indent=1, sort_keys=True))
    return code


if __name__ == "__main__":
    sys.exit(main())
