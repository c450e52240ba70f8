"""Which partitions a backfill covers, and where each one's input lives.

Partition values come from the command line (`2025-01-01..2025-01-07`, `a,b,c`, `today-3..today-1`) or, when none
are given, from the input itself (every `date=...` directory found). A partition's input is the job's input URI
with `{date}` (the column name in braces) replaced by the value, or, without a placeholder, the input URI with
`date=<value>/` appended: the Hive-style layout Spark, Ray and Athena write.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pipeline.storage import Location

_SAFE_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]*$")
_SAFE_COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RELATIVE_DAY = re.compile(r"^today(?:([+-])(\d+))?$")
_INTEGER = re.compile(r"^-?\d+$")
_MAX_RANGE = 100_000


@dataclass(frozen=True, order=True)
class Partition:
    column: str
    value: str

    def __post_init__(self) -> None:
        validate_column(self.column)
        if not _SAFE_VALUE.match(self.value):
            raise ValueError(
                f"partition value {self.value!r} is not a safe path segment (letters, digits, '_.:+-', no '/')"
            )

    @property
    def dirname(self) -> str:
        return f"{self.column}={self.value}"

    def as_dict(self) -> dict[str, str]:
        return {self.column: self.value}


def validate_column(column: str) -> str:
    if not _SAFE_COLUMN.match(column):
        raise ValueError(f"partition column {column!r} must be an identifier (letters, digits, underscore)")
    return column


def parse_partition_values(specs: Iterable[str], today: dt.date | None = None) -> list[str]:
    """Expand partition specs into values, in the order given, without repeats.

    Each spec is a comma-separated list of items; an item is a single value or an inclusive range `start..end`
    of ISO dates (one value per day) or of integers (zero padding kept). `today`, `today-N`, `today+N` stand for
    UTC dates, so a nightly schedule can say `today-3..today-1`.
    """
    today = today or dt.datetime.now(dt.timezone.utc).date()
    values: list[str] = []
    for spec in specs:
        for item in (part.strip() for part in spec.split(",")):
            if not item:
                continue
            if ".." in item:
                start, _, end = item.partition("..")
                values.extend(_expand_range(start.strip(), end.strip(), today))
            else:
                values.append(_resolve_single(item, today))
    unique = list(dict.fromkeys(values))
    for value in unique:
        Partition("column", value)  # validates the value
    if not unique:
        raise ValueError("no partitions given")
    return unique


def _resolve_single(item: str, today: dt.date) -> str:
    relative = _relative_day(item, today)
    return relative.isoformat() if relative else item


def _relative_day(item: str, today: dt.date) -> dt.date | None:
    match = _RELATIVE_DAY.match(item)
    if not match:
        return None
    sign, amount = match.groups()
    days = int(amount or 0) * (-1 if sign == "-" else 1)
    return today + dt.timedelta(days=days)


def _as_date(item: str, today: dt.date) -> dt.date | None:
    relative = _relative_day(item, today)
    if relative:
        return relative
    try:
        return dt.date.fromisoformat(item)
    except ValueError:
        return None


def _expand_range(start: str, end: str, today: dt.date) -> list[str]:
    first_day, last_day = _as_date(start, today), _as_date(end, today)
    if first_day and last_day:
        count = (last_day - first_day).days + 1
        _check_range_size(start, end, count)
        return [(first_day + dt.timedelta(days=offset)).isoformat() for offset in range(count)]
    if _INTEGER.match(start) and _INTEGER.match(end):
        first, last = int(start), int(end)
        count = last - first + 1
        _check_range_size(start, end, count)
        width = len(start) if start.startswith("0") and len(start) == len(end) else 0
        return [str(number).zfill(width) for number in range(first, last + 1)]
    raise ValueError(f"range {start}..{end}: both ends must be ISO dates (or today-N) or both integers")


def _check_range_size(start: str, end: str, count: int) -> None:
    if count <= 0:
        raise ValueError(f"range {start}..{end} is empty: the start comes after the end")
    if count > _MAX_RANGE:
        raise ValueError(f"range {start}..{end} has {count} values; more than {_MAX_RANGE} is surely a typo")


def placeholder(column: str) -> str:
    return "{" + column + "}"


def input_uri_for(template: str, partition: Partition) -> str:
    marker = placeholder(partition.column)
    if marker in template:
        return template.replace(marker, partition.value)
    return f"{template.rstrip('/')}/{partition.dirname}/"


def partition_input(uri: str | list[str], partition: Partition) -> str | list[str]:
    if isinstance(uri, list):
        return [input_uri_for(item, partition) for item in uri]
    return input_uri_for(uri, partition)


def discover_partition_values(
    uri: str | list[str], column: str, storage_options: dict[str, Any] | None = None
) -> list[str]:
    """Partition values present in the input: what `{column}` matches, or the `column=*` directories."""
    validate_column(column)
    templates = uri if isinstance(uri, list) else [uri]
    found: set[str] = set()
    for template in templates:
        found.update(_discover_one(template, column, storage_options))
    return sorted(found)


def _discover_one(template: str, column: str, storage_options: dict[str, Any] | None) -> set[str]:
    marker = placeholder(column)
    if marker not in template:
        template = f"{template.rstrip('/')}/{column}={marker}"
    sentinel = "SAM3PARTITIONVALUE"
    parsed = Location.parse(template.rstrip("/").replace(marker, sentinel), storage_options)
    prefix_path, suffix_path = parsed.path.split(sentinel, 1)
    pattern = re.compile(re.escape(prefix_path) + r"(?P<value>[^/]+)" + re.escape(suffix_path) + "$")
    values = set()
    for name in parsed.fs.glob(prefix_path + "*" + suffix_path):
        match = pattern.match(name.rstrip("/"))
        if match and _SAFE_VALUE.match(match.group("value")):
            values.add(match.group("value"))
    return values
