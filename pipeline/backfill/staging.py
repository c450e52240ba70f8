"""The staging area of one partition: where the pipeline writes before the commit makes anything visible.

Layout under the output root (underscore prefixes keep readers away):

    _staging/date=2025-01-01/_STARTED.json   config fingerprint of the attempt that owns this area
    _staging/date=2025-01-01/data/           the pipeline's output; its `_SUCCESS` means the run finished
    _staging/date=2025-01-01/checkpoint/     Ray Data checkpoint (ids of finished rows) for resuming
    _staging/date=2025-01-01/_STAGED.json    the run summary, written after the pipeline returned

The path depends only on the partition, not on the run: an attempt that crashed mid-partition leaves data and
checkpoint behind, and the next attempt (which holds the lease, so it is alone) resumes from them. A leftover is
reused only when it was made with the same settings (fingerprint); otherwise it is wiped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pipeline.backfill.commit import SUCCESS_MARKER
from pipeline.config import JobConfig
from pipeline.storage import Location

logger = logging.getLogger(__name__)

STAGING_DIR = "_staging"
_STARTED = "_STARTED.json"
_STAGED = "_STAGED.json"
_PIPELINE_SUMMARY = "_summary.json"


class StagingState(Enum):
    FRESH = "fresh"  # nothing usable: run the partition from the start
    RESUME = "resume"  # a previous attempt left rows and a checkpoint: run again, finished rows are skipped
    STAGED = "staged"  # a previous attempt finished the run but did not commit: commit what is there


@dataclass(frozen=True)
class StagingArea:
    root: Location
    checkpoint: Location

    @classmethod
    def for_partition(cls, output: Location, dirname: str, resume_root: Location | None = None) -> StagingArea:
        root = output.join(STAGING_DIR, dirname)
        checkpoint = resume_root.join(dirname) if resume_root is not None else root.join("checkpoint")
        return cls(root=root, checkpoint=checkpoint)

    @property
    def data(self) -> Location:
        return self.root.join("data")

    def prepare(self, fingerprint: str, run_id: str) -> StagingState:
        started = self._read_json(self.root.join(_STARTED))
        if started is None or started.get("fingerprint") != fingerprint:
            if started is not None:
                logger.info("staging %s was made with other settings; starting over", self.root.uri)
            self.clear()
            self.root.join(_STARTED).write_text(
                json.dumps({"fingerprint": fingerprint, "run_id": run_id, "started_at": time.time()})
            )
            return StagingState.FRESH
        if self.data.join(SUCCESS_MARKER).exists():
            return StagingState.STAGED
        if self.data.files() and not self.checkpoint.files():
            # Rows without a checkpoint cannot be told apart from half-written ones: redo them all.
            logger.info("staging %s has rows but no checkpoint; starting over", self.root.uri)
            self.data.remove()
            return StagingState.FRESH
        return StagingState.RESUME

    def mark_staged(self, summary: dict[str, Any]) -> None:
        self.root.join(_STAGED).write_text(json.dumps(summary, sort_keys=True, default=str))

    def staged_summary(self) -> dict[str, Any]:
        """The summary of the run that filled `data/`; the pipeline's own summary if ours was never written."""
        return self._read_json(self.root.join(_STAGED)) or self._read_json(self.data.join(_PIPELINE_SUMMARY)) or {}

    def clear(self) -> None:
        self.root.remove()
        self.checkpoint.remove()

    @staticmethod
    def _read_json(location: Location) -> dict[str, Any] | None:
        try:
            value = json.loads(location.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            logger.warning("unreadable %s; ignoring it", location.uri)
            return None
        return value if isinstance(value, dict) else None


def config_fingerprint(config: JobConfig) -> str:
    """Hash of everything that changes the rows a partition produces (not where they go, nor how fast)."""
    data = config.to_dict()
    for volatile in ("run_id", "resume_path", "compute"):
        data.pop(volatile, None)
    data["output"].pop("uri", None)
    data["output"].pop("min_rows_per_file", None)
    data["output"].pop("max_error_fraction", None)  # judges the rows, does not change them
    canonical = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
