"""Job configuration: one YAML file (or dict) describing input, model, compute and output.

Credentials never live here: S3 access keys come from the environment, the instance profile or a named profile
in `~/.aws`, as botocore finds them. Only connection options (endpoint, region, anonymous access, profile name) do.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

InputFormat = Literal["manifest", "images", "webdataset"]
FEATURES_DEFAULT = ("image_embedding", "text_embedding")
# Everything a user may ask to store; the two pooled embeddings are always written.
FEATURES_OPTIONAL = (
    "trunk",
    "vision_features",
    "backbone_fpn",
    "language_features",
    "language_embeds",
    "sam2_backbone_fpn",
    "interactive_backbone_fpn",  # SAM 3.1 checkpoints only (pipeline/model/neck_heads.py)
)


@dataclass
class S3Options:
    endpoint_url: str | None = None
    region: str | None = None
    anonymous: bool = False
    profile: str | None = None

    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for `fsspec` / `s3fs.S3FileSystem`."""
        options: dict[str, Any] = {}
        if self.anonymous:
            options["anon"] = True
        if self.profile:
            options["profile"] = self.profile
        client_kwargs: dict[str, Any] = {}
        if self.endpoint_url:
            client_kwargs["endpoint_url"] = self.endpoint_url
        if self.region:
            client_kwargs["region_name"] = self.region
        if client_kwargs:
            options["client_kwargs"] = client_kwargs
        return options


@dataclass
class InputConfig:
    uri: str | list[str] = ""
    format: InputFormat = "manifest"
    # Manifest columns; None (the default) means "recognise the common names" (pipeline/input/columns.py), and "" for
    # a caption column means "no caption". The id column is optional in the data: without one, ids derive from
    # the source. For WebDataset, caption_column / captions_column are keys of each sample's .json member.
    id_column: str | None = None
    image_column: str | None = None
    caption_column: str | None = None
    captions_column: str | None = None


@dataclass
class ModelConfig:
    checkpoint: str | None = None  # local path, fsspec URI or hf://facebook/sam3
    random_weights: bool = False  # no checkpoint is refused unless this says random weights are meant
    # auto: the official configuration of the checkpoint's generation (sam3 or sam3.1, read from its keys); a name
    # (sam3, sam3.1, tiny, tiny-sam3.1) overrides it and a checkpoint of the other generation is refused
    config: str = "auto"
    imgsz: int = 1008
    # auto: bfloat16 on CUDA and on CPUs with native bfloat16 (AVX-512 BF16, AMX), float32 on other CPUs
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # auto: per device, as sam3core.compile decides (measured on CPU): inductor + freezing for bfloat16 on CPU,
    # max-autotune on CUDA, eager for float32 on CPU, and eager on a CPU when the input is too small for compiling
    # to pay (under 20 TFLOP of trunk work per actor); falls back to eager with a warning if compiling fails
    compile: Literal["auto", "on", "off"] = "auto"
    # Where compiled code is shared between actors and nodes (pipeline/model/compile_share.py): any fsspec URI; None:
    # `<output>/_compile_cache`; "off": every actor compiles for itself. `sam3-embed compile` fills it ahead.
    compile_cache: str | None = None
    compile_wait_s: float = 1800.0  # how long an actor waits for another's compilation before compiling itself
    bpe_path: str | None = None


@dataclass
class ComputeConfig:
    batch_size: int = 8
    num_actors: int = 1
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else the actor runs on CPU
    cpus_per_actor: float = 1.0
    # torch threads in each model actor. None: on a CPU-only cluster, the node's CPUs shared among its model
    # actors, decoding taking its share from them (sam3 at 336 px: ~1.2 s per image on 2 cores, decoding a
    # 12-megapixel JPEG ~0.12 s on one core), else Ray's default (one per CPU the actor reserves)
    threads_per_actor: int | None = None
    decode_concurrency: int | None = None  # None: let Ray Data size the CPU pool


@dataclass
class OutputConfig:
    uri: str = ""
    partition_by: list[str] = field(default_factory=list)
    features: list[str] = field(default_factory=lambda: list(FEATURES_DEFAULT))
    feature_dtype: Literal["float16", "float32"] = "float16"
    min_rows_per_file: int = 1024
    compression: str = "zstd"
    # The error budget: a run whose share of error rows is at most this exits 0, above it 3 (see pipeline/outcome)
    max_error_fraction: float = 0.05
    # new: the output must be empty (or the run resumes itself); incremental: the output is one dataset that grows,
    # each run adds the input rows whose id it does not hold yet (docs/incremental.md)
    mode: Literal["new", "incremental"] = "new"
    retry_errors: bool = False  # re-embed the dataset's error rows (alone, or with mode incremental)
    refresh: Literal["none", "changed"] = "none"  # changed: re-hash present images, re-embed those that changed
    # where incremental runs stage their rows before the commit; None: beside the output, `<output>.staging`
    staging_uri: str | None = None


@dataclass
class JobConfig:
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    s3: S3Options = field(default_factory=S3Options)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    # Where Ray Data keeps the ids of finished rows so a crashed or cancelled run resumes without redoing them.
    resume_path: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobConfig:
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(data) - set(sections)
        if unknown:
            raise ValueError(f"unknown job config keys: {sorted(unknown)}; expected {sorted(sections)}")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            default = getattr(cls(), name)
            if dataclasses.is_dataclass(default):
                kwargs[name] = _section(type(default), value or {}, name)
            else:
                kwargs[name] = value
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | Path) -> JobConfig:
        with open(path) as f:
            return cls.from_dict(yaml.safe_load(f) or {})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def storage_options(self) -> dict[str, Any]:
        return self.s3.storage_options()


def uses_dataset_protocol(config: JobConfig) -> bool:
    """Whether the run joins an existing dataset (incremental, retry, refresh) rather than writing a fresh one."""
    output = config.output
    return output.mode == "incremental" or output.retry_errors or output.refresh == "changed"


def _section(kind: type, values: dict[str, Any], name: str) -> Any:
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown keys in job config section {name!r}: {sorted(unknown)}; expected {sorted(known)}")
    return kind(**values)
