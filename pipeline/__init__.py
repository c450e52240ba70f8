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

from pipeline.config import (
    ComputeConfig,
    InputConfig,
    JobConfig,
    ModelConfig,
    OutputConfig,
    S3Options,
)
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
