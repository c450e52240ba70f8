"""Process exit codes shared by `jobs.embed` and `jobs.backfill`, so schedulers and scripts can tell outcomes apart.

`ray job submit` reports a job as FAILED for any non-zero code; the code itself is in the job's logs and in the
driver's exit status when the entry point runs directly.
"""

from __future__ import annotations

OK = 0  # every row embedded (backfill: every requested partition committed, now or before)
FAILED = 1  # the job (or at least one partition) failed; nothing partial became visible
USAGE = 2  # bad command line or job config (argparse uses 2 as well)
FINISHED_WITH_ERROR_ROWS = 3  # output committed, but some rows are error rows (unreadable image, bad caption)
PARTITIONS_BUSY = 4  # backfill only: some partitions are leased by another backfill that is still running
INTERRUPTED = 130  # Ctrl-C / SIGINT, the shell convention

DESCRIPTIONS = {
    OK: "ok",
    FAILED: "failed",
    USAGE: "usage error",
    FINISHED_WITH_ERROR_ROWS: "finished with error rows",
    PARTITIONS_BUSY: "some partitions held by another backfill",
    INTERRUPTED: "interrupted",
}


def describe(code: int) -> str:
    return DESCRIPTIONS.get(code, f"exit code {code}")


# for --help of the entry points that run one job
RUN_EPILOG = "exit codes: 0 ok, 1 failed, 2 usage or config error, 3 finished with error rows, 130 interrupted"
