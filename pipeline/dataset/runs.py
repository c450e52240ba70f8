"""The dataset record, `_dataset.json` at the output root: the model identity and every committed run.

One JSON object, replaced in one write (a single PUT on object stores, a rename locally), so a reader sees the
record before a run or after it. A run is appended by the last step of its commit (see `replacement`); appending is
idempotent (keyed by the commit id), so a commit finished twice (a killed one, then its successor) records it once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pipeline.dataset.identity import ModelIdentity
from pipeline.storage import Location

DATASET_FILE = "_dataset.json"
RECORD_VERSION = 1


@dataclass
class DatasetRecord:
    identity: ModelIdentity
    runs: list[dict[str, Any]] = field(default_factory=list)  # oldest first; see `run_entry` for the keys
    version: int = RECORD_VERSION

    def to_json(self) -> str:
        return json.dumps(
            {"version": self.version, "identity": self.identity.to_dict(), "runs": self.runs}, indent=1, sort_keys=True
        )

    @classmethod
    def from_json(cls, text: str) -> DatasetRecord:
        data = json.loads(text)
        return cls(
            identity=ModelIdentity.from_dict(data["identity"]),
            runs=list(data.get("runs") or []),
            version=int(data.get("version", RECORD_VERSION)),
        )

    @property
    def last_commit_id(self) -> str | None:
        return self.runs[-1].get("commit_id") if self.runs else None

    def with_run(self, entry: dict[str, Any]) -> DatasetRecord:
        if any(run.get("commit_id") == entry.get("commit_id") for run in self.runs):
            return self
        return DatasetRecord(identity=self.identity, runs=[*self.runs, entry], version=self.version)


def read_record(output: Location) -> DatasetRecord | None:
    try:
        return DatasetRecord.from_json(output.join(DATASET_FILE).read_text())
    except FileNotFoundError:
        return None


def write_record(output: Location, record: DatasetRecord) -> None:
    output.join(DATASET_FILE).write_text(record.to_json())
