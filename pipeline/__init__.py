"""sam3-embed pipeline: Ray Data job that embeds images and captions with SAM 3's backbone into partitioned Parquet.

The subpackages follow the data: `input` (manifest to prepared records), `model` (the model actor), `dataset` (what
a committed output holds), `cache` (stored maps back for SAM 3's heads, with adapters in `heads`), `run` (preflight,
the job, progress, summary) and `backfill` (a dataset built partition by partition). `config`, `storage` and
`version` are the ground they all stand on.

Public API: `run_job(JobConfig) -> RunSummary` (checked first by `preflight`, which raises `PreflightError`), and
for consumers `read_embeddings`, `read_embeddings_numpy`, `embeddings_to_numpy`, `read_run_metadata`,
`list_committed_files`, `open_embeddings`; the feature cache (`pipeline.cache.feature_cache.FeatureCache`) imports
torch and is imported on its own.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Every Ray worker that runs a step of the pipeline imports this package first: the public names are imported on
# first use, so such a worker does not pay for the job, the reader and pandas (about 0.4 s of CPU).
_PUBLIC = {
    "ComputeConfig": "pipeline.config",
    "InputConfig": "pipeline.config",
    "JobConfig": "pipeline.config",
    "ModelConfig": "pipeline.config",
    "OutputConfig": "pipeline.config",
    "S3Options": "pipeline.config",
    "embeddings_to_numpy": "pipeline.dataset.reader",
    "list_committed_files": "pipeline.dataset.reader",
    "open_embeddings": "pipeline.dataset.reader",
    "read_embeddings": "pipeline.dataset.reader",
    "read_embeddings_numpy": "pipeline.dataset.reader",
    "read_run_metadata": "pipeline.dataset.reader",
    "RunSummary": "pipeline.run.job",
    "run_job": "pipeline.run.job",
    "Outcome": "pipeline.run.outcome",
    "Plan": "pipeline.run.preflight",
    "PreflightError": "pipeline.run.preflight",
    "preflight": "pipeline.run.preflight",
}

if TYPE_CHECKING:
    from pipeline.config import ComputeConfig, InputConfig, JobConfig, ModelConfig, OutputConfig, S3Options
    from pipeline.dataset.reader import (
        embeddings_to_numpy,
        list_committed_files,
        open_embeddings,
        read_embeddings,
        read_embeddings_numpy,
        read_run_metadata,
    )
    from pipeline.run.job import RunSummary, run_job
    from pipeline.run.outcome import Outcome
    from pipeline.run.preflight import Plan, PreflightError, preflight


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


__all__ = [
    "ComputeConfig",
    "InputConfig",
    "JobConfig",
    "ModelConfig",
    "Outcome",
    "OutputConfig",
    "Plan",
    "PreflightError",
    "RunSummary",
    "S3Options",
    "embeddings_to_numpy",
    "list_committed_files",
    "open_embeddings",
    "preflight",
    "read_embeddings",
    "read_embeddings_numpy",
    "read_run_metadata",
    "run_job",
]
