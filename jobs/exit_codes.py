"""Process exit codes shared by `jobs.embed` and `jobs.backfill`, so schedulers and scripts can tell outcomes apart.

The pipeline reports an `Outcome`; this module is the one place that maps outcomes to numbers.
`ray job submit` reports a job as FAILED for any non-zero code; the code itself is in the job's logs and in the
driver's exit status when the entry point runs directly.
"""

from __future__ import annotations

from pipeline.run.outcome import Outcome

OK = 0  # every row embedded, or error rows within output.max_error_fraction (backfill: every partition committed)
FAILED = 1  # the job (or at least one partition) failed; nothing partial became visible
USAGE = 2  # bad command line, job config or input, refused before Ray starts (argparse uses 2 as well)
FINISHED_WITH_ERROR_ROWS = 3  # output committed, but the share of error rows is above output.max_error_fraction
PARTITIONS_BUSY = 4  # backfill only: some partitions are leased by another backfill that is still running
INTERRUPTED = 130  # Ctrl-C / SIGINT, the shell convention (SIGTERM: 143, 128 + the signal, jobs/interrupts.py)

CODES = {
    Outcome.OK: OK,
    Outcome.FAILED: FAILED,
    Outcome.USAGE: USAGE,
    Outcome.ERROR_ROWS_OVER_BUDGET: FINISHED_WITH_ERROR_ROWS,
    Outcome.PARTITIONS_BUSY: PARTITIONS_BUSY,
    Outcome.INTERRUPTED: INTERRUPTED,
}

DESCRIPTIONS = {
    OK: "ok",
    FAILED: "failed",
    USAGE: "usage error",
    FINISHED_WITH_ERROR_ROWS: "error rows above output.max_error_fraction",
    PARTITIONS_BUSY: "some partitions held by another backfill",
    INTERRUPTED: "interrupted",
}


def exit_code(outcome: Outcome) -> int:
    return CODES[outcome]


def describe(code: int) -> str:
    return DESCRIPTIONS.get(code, f"exit code {code}")


# for --help of the entry points that run one job
RUN_EPILOG = (
    "exit codes: 0 ok (error rows, if any, within output.max_error_fraction), 1 failed, 2 usage, config or input "
    "error (refused before Ray starts), 3 error rows above output.max_error_fraction, 130 interrupted"
)
