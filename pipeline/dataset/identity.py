"""The model identity a dataset is bound to: rows embedded by another model must never join it.

Five things make two runs' features comparable: the model configuration, the checkpoint (its SHA-256), the image
size, the stored features and their dtype. A dataset records them once (`_dataset.json`, see `runs`); a dataset
written before that record existed is read from the Parquet key-value metadata of one of its files, which every
run writes. A run whose identity differs is refused before Ray starts, naming both values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pipeline.config import FEATURES_DEFAULT, JobConfig
from pipeline.storage import parse_uri


@dataclass(frozen=True)
class ModelIdentity:
    config: str
    checkpoint: str | None  # the checkpoint as named (path, URI or hub spec); None for random weights
    checkpoint_sha256: str | None  # None when not known without downloading (remote checkpoints, hub specs)
    image_size: int
    features: tuple[str, ...]  # sorted, the two pooled embeddings included
    feature_dtype: str

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["features"] = list(self.features)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelIdentity:
        return cls(
            config=str(data.get("config")),
            checkpoint=data.get("checkpoint"),
            checkpoint_sha256=data.get("checkpoint_sha256"),
            image_size=int(data.get("image_size") or 0),
            features=tuple(sorted(data.get("features") or ())),
            feature_dtype=str(data.get("feature_dtype")),
        )

    @classmethod
    def from_file_metadata(cls, metadata: dict[str, Any]) -> ModelIdentity:
        """From the `sam3_embed` key-value metadata every data file carries (see docs/schema.md)."""
        model = metadata.get("model") or {}
        return cls(
            config=str(model.get("config")),
            checkpoint=model.get("checkpoint"),
            checkpoint_sha256=model.get("checkpoint_sha256"),
            image_size=int(metadata.get("image_size") or 0),
            features=tuple(sorted(metadata.get("features") or ())),
            feature_dtype=str(metadata.get("feature_dtype")),
        )

    def differences(self, other: ModelIdentity) -> list[str]:
        """What differs, as 'name: ours vs theirs' phrases (empty when the two may share a dataset)."""
        found = []
        for name in ("config", "image_size", "features", "feature_dtype"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                found.append(f"{name} {_show(mine)} vs {_show(theirs)}")
        if self.checkpoint_sha256 and other.checkpoint_sha256:
            if self.checkpoint_sha256 != other.checkpoint_sha256:
                found.append(f"checkpoint sha256 {self.checkpoint_sha256[:16]}… vs {other.checkpoint_sha256[:16]}…")
        elif self.checkpoint != other.checkpoint:
            # A digest is missing on one side: the names decide (random weights never match a checkpoint).
            found.append(f"checkpoint {_show(self.checkpoint)} vs {_show(other.checkpoint)}")
        return found


def _show(value: Any) -> str:
    if value is None:
        return "none (random weights)"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def identity_of_config(config: JobConfig) -> ModelIdentity:
    """The identity a run of `config` would write. A local checkpoint is hashed here (cached per node, as the model
    actors do); a remote one is named only, so the driver never downloads gigabytes before the run."""
    checkpoint = config.model.checkpoint
    digest = None
    if checkpoint is not None and not checkpoint.startswith("hf://") and parse_uri(checkpoint).is_local:
        from pipeline.model.model_cache import local_checkpoint

        digest = local_checkpoint(checkpoint, config.storage_options()).sha256
    features = tuple(sorted(dict.fromkeys([*FEATURES_DEFAULT, *config.output.features])))
    return ModelIdentity(
        config=config.model.config,
        checkpoint=checkpoint,
        checkpoint_sha256=digest,
        image_size=config.model.imgsz,
        features=features,
        feature_dtype=config.output.feature_dtype,
    )


def mismatch_message(output_uri: str, dataset: ModelIdentity, run: ModelIdentity) -> str | None:
    """One line naming both values of everything that differs, or None when the run may join the dataset."""
    differences = dataset.differences(run)
    if not differences:
        return None
    return (
        f"{output_uri} holds embeddings of another model identity than this run ({'; '.join(differences)}; "
        "the dataset's value first): write to another --output, or run with the dataset's settings"
    )
