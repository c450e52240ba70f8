"""sam3-embed pipeline: Ray Data job that embeds images and captions with SAM 3's backbone into partitioned Parquet.

Public API: `run_job(JobConfig) -> RunSummary` (checked first by `preflight`, which raises `PreflightError`), and
for consumers `read_embeddings`, `read_embeddings_numpy`, `embeddings_to_numpy`, `read_run_metadata`,
`list_committed_files`, `open_embeddings`; the feature cache
(`pipeline.feature_cache.FeatureCache`, adapters in `pipeline.heads`) imports torch and is imported on its own.
"""

from pipeline.config import (
    ComputeConfig,
    InputConfig,
    JobConfig,
    ModelConfig,
    OutputConfig,
    S3Options,
)
from pipeline.job import RunSummary, run_job
from pipeline.outcome import Outcome
from pipeline.preflight import Plan, PreflightError, preflight
from pipeline.reader import (
    embeddings_to_numpy,
    list_committed_files,
    open_embeddings,
    read_embeddings,
    read_embeddings_numpy,
    read_run_metadata,
)

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
