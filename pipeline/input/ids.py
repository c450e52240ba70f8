"""Row ids derived from the source when the input carries none.

The rule must be row-local (it sees one row, never its position in a file or block): Ray Data's checkpoint filter
recomputes ids on freshly read blocks and compares them with the ids already written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

DERIVED_ID_HEX_CHARS = 32


def derive_id(source: str, captions: Sequence[str] | None = None) -> str:
    """Hex digest of the source string (and of the captions when a manifest repeats an image per caption)."""
    digest = hashlib.sha256(source.encode("utf-8"))
    for caption in captions or ():
        digest.update(b"\x00")
        digest.update(caption.encode("utf-8"))
    return digest.hexdigest()[:DERIVED_ID_HEX_CHARS]


def derive_id_from_row(row: dict[str, Any]) -> str:
    """Last resort for a row with neither an id nor an image URI: its whole content identifies it."""
    return derive_id(json.dumps(row, sort_keys=True, default=str))


def id_to_string(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN from a pandas block
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    text = str(value)
    return text if text else None
