"""How a run or a backfill ended, as the pipeline sees it; `jobs.exit_codes` turns each outcome into a process code.

The error budget lives here because it decides between two outcomes: a run whose share of error rows is within
`output.max_error_fraction` is `OK` (a nightly job over millions of images must not fail for a few broken JPEGs),
one above it is `ERROR_ROWS_OVER_BUDGET` (a wrong column or wrong credentials make most rows errors, and that
must not pass as success).
"""

from __future__ import annotations

import enum
from typing import Any


class Outcome(enum.Enum):
    OK = "ok"  # every row embedded, or error rows within the budget (backfill: every partition committed)
    FAILED = "failed"  # the job (or a partition) failed; nothing partial became visible
    USAGE = "usage"  # a mistake in the command line, job config or input, refused before any work
    ERROR_ROWS_OVER_BUDGET = "error rows over budget"  # output committed, but too many rows are error rows
    PARTITIONS_BUSY = "partitions busy"  # backfill: some partitions are leased by another running backfill
    INTERRUPTED = "interrupted"  # Ctrl-C


def error_fraction(rows: int | None, error_rows: int | None) -> float | None:
    """Share of error rows; None when the counts are unknown, 0.0 for an empty output."""
    if rows is None or error_rows is None:
        return None
    return error_rows / rows if rows else 0.0


def within_budget(rows: int | None, error_rows: int | None, max_error_fraction: float) -> bool:
    """True when the error rows fit the budget. Unknown counts with error rows reported are over it."""
    fraction = error_fraction(rows, error_rows)
    if fraction is None:
        return not error_rows
    return fraction <= max_error_fraction


def run_outcome(summary: dict[str, Any], max_error_fraction: float) -> Outcome:
    """The outcome of a finished run from its summary (a `RunSummary` as a dict, or one read back)."""
    ok = within_budget(summary.get("rows_total"), summary.get("rows_error"), max_error_fraction)
    return Outcome.OK if ok else Outcome.ERROR_ROWS_OVER_BUDGET
