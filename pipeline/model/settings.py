"""What a model actor is built from: the model half of a job's configuration, and what the driver decides per actor.

Torch-free, like everything a run's driver imports: the driver builds these settings and names the actor class
(`pipeline.model.actor`), and only the actor process imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.config import FEATURES_DEFAULT, JobConfig
from pipeline.model.compile_share import compile_cache_uri


@dataclass(frozen=True)
class EmbedSettings:
    checkpoint: str | None
    model_config: str
    imgsz: int
    dtype: str  # auto | float32 | bfloat16 | float16
    compile: str  # auto | on | off
    bpe_path: str | None
    features: tuple[str, ...]
    feature_dtype: str  # float16 | float32
    multi_caption: bool
    batch_size: int = 8
    threads: int | None = None  # torch threads; None: as Ray set them (one per reserved CPU)
    # GPUs the actor reserved from Ray. None: not scheduled by Ray (a direct call, a benchmark): CUDA when visible.
    # 0: the CPU, even on a node whose GPUs are visible (Ray leaves CUDA_VISIBLE_DEVICES as it was for an actor that
    # reserves none, so every such actor would share GPU 0 with the actors that did). > 0: CUDA or a loud failure.
    num_gpus: float | None = None
    storage_options: dict[str, Any] | None = None
    run_id: str = ""
    package_version: str = ""
    extra_metadata: dict[str, Any] = field(default_factory=dict)
    compile_cache: str | None = None  # URI of the shared compile artifacts (pipeline.model.compile_share); None: off
    compile_wait_s: float = 1800.0
    # The most rows this actor can embed (the input's rows over the actors), when the driver knows them: with
    # `compile: auto` on a CPU, a run too small to pay for compiling runs eagerly (`sam3core.compile_pays_off`).
    expected_rows: int | None = None
    # Whether any input row can carry a caption; False (a manifest without a caption column): the actors do not build
    # the text encoder (`sam3core.deferred`; made on the first caption should one come after all).
    captions: bool = True

    @classmethod
    def from_job(cls, config: JobConfig, *, multi_caption: bool, **per_actor: Any) -> EmbedSettings:
        """The model half of a job's configuration, as every actor of the job (and `sam3-embed compile`, which must
        compute the same compile key) sees it; `per_actor` adds what the caller decides (threads, GPUs, ...)."""
        return cls(
            checkpoint=config.model.checkpoint,
            model_config=config.model.config,
            imgsz=config.model.imgsz,
            dtype=config.model.dtype,
            compile=config.model.compile,
            bpe_path=config.model.bpe_path,
            features=tuple(dict.fromkeys([*FEATURES_DEFAULT, *config.output.features])),
            feature_dtype=config.output.feature_dtype,
            multi_caption=multi_caption,
            batch_size=config.compute.batch_size,
            compile_cache=compile_cache_uri(config.model.compile_cache, config.output.uri),
            compile_wait_s=config.model.compile_wait_s,
            **per_actor,
        )
