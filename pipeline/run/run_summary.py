"""The pipeline's `RunSummary` as a plain dict (what reports and markers store), plus the counts exit codes need."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.run.job import RunSummary


def summary_to_dict(summary: RunSummary | dict[str, Any]) -> dict[str, Any]:
    return dict(summary) if isinstance(summary, dict) else summary.to_dict()


def summary_counts(summary: dict[str, Any]) -> tuple[int | None, int | None]:
    """(rows, error rows); None where the summary does not say (a summary read back from an older file)."""
    return summary.get("rows_total"), summary.get("rows_error")
