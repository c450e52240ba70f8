"""Read the pipeline's `RunSummary` the same way in every entry point: as a plain dict, plus its row counts."""

from __future__ import annotations

import dataclasses
from typing import Any

# Field names for the two counts the exit code depends on; the first present one wins.
_ROW_KEYS = ("rows_total", "rows", "rows_written", "num_rows")
_ERROR_KEYS = ("rows_error", "error_rows", "rows_failed", "num_error_rows")


def summary_to_dict(summary: Any) -> dict[str, Any]:
    if summary is None:
        return {}
    if isinstance(summary, dict):
        return dict(summary)
    if hasattr(summary, "to_dict"):
        return dict(summary.to_dict())
    if dataclasses.is_dataclass(summary) and not isinstance(summary, type):
        return dataclasses.asdict(summary)
    raise TypeError(f"cannot read a run summary of type {type(summary).__name__}")


def summary_counts(summary: dict[str, Any]) -> tuple[int | None, int | None]:
    """(rows, error rows) as the pipeline reported them; None where it did not say."""
    return _first_int(summary, _ROW_KEYS), _first_int(summary, _ERROR_KEYS)


def _first_int(summary: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = summary.get(key)
        if isinstance(value, int):
            return value
    return None
