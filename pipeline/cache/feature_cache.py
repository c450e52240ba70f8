"""Reading a run's stored trunk maps back as SAM 3's `backbone_out` dictionaries: the feature cache's read side.

A run with the `trunk` feature stores the ViT trunk's last map per row, [width, g, g]. Every output of
`forward_image` (the pyramid levels of every neck head and their position encodings) is computed from that map
alone, so `FeatureCache` rebuilds them on load with the same backbone's neck, `forward_image_from_trunk`: the
dictionary is the one `forward_image` gives for the image, without paying for the trunk again. The backbone must be
the run's own: the checkpoint's SHA-256 is compared with the one recorded in the Parquet metadata, and so is the
model generation (SAM 3's dual neck or SAM 3.1's three heads; a run of either stores the same `trunk` column).
A SAM 3.1 run's dictionary is `SAM3VLBackboneTri.forward_image`'s: the detector head's keys, `interactive` and
`sam2_backbone_out` (the propagation head); `heads=` limits the heads rebuilt.

    cache = FeatureCache("s3://bucket/embeddings", checkpoint="s3://models/sam3.pt", device="cuda")
    for images in cache.iter_batches(filter=pc.field("split") == "val", batch_size=8):
        images.ids, images.backbone_out["backbone_fpn"], images.original_sizes
    prompts = cache.text(["a red car"])  # language_features / language_mask from the same backbone
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.dataset import schema
from pipeline.dataset.reader import Filters, as_expression, open_embeddings
from pipeline.model.model_cache import local_checkpoint

logger = logging.getLogger(__name__)

COLUMNS = [schema.ID, schema.TRUNK, schema.IMAGE_HEIGHT, schema.IMAGE_WIDTH]


class CheckpointMismatchError(ValueError):
    """The checkpoint offered to rebuild the features is not the one the run used."""


@dataclass
class CachedImages:
    """One batch of cached rows: ids, trunk maps on the cache's device and dtype, and their `backbone_out`."""

    ids: list[str]
    original_sizes: list[tuple[int, int]]  # (height, width) of each image as decoded, before resizing
    trunk: torch.Tensor  # [B, width, g, g]
    backbone: Any = field(repr=False)  # the SAM3VLBackbone whose neck rebuilds the levels
    options: dict[str, bool] = field(default_factory=dict, repr=False)  # SAM 3.1: the need_* switches

    @cached_property
    def backbone_out(self) -> dict[str, Any]:
        """`forward_image`'s dictionary for these images, batch-first in `ids` order (built on first access)."""
        with torch.inference_mode():
            return self.backbone.forward_image_from_trunk(self.trunk, **self.options)

    def __len__(self) -> int:
        return len(self.ids)


class FeatureCache:
    """The stored trunk maps of one output, and a backbone built from the run's checkpoint to rebuild the rest.

    uri: the run's output URI (only committed files are read, as `read_embeddings` does).
    checkpoint: the checkpoint the run used (local path, fsspec URI or hf:// spec); None only for a run with random
      weights, which are rebuilt from the pipeline's seed. Its SHA-256 must equal the recorded one.
    device, dtype: where and in which dtype the dictionaries are built (stored float16 maps are cast on the way in).
    sam2: SAM 3 runs: also build `sam2_backbone_out` (the checkpoint must hold the SAM 2 neck).
    heads: SAM 3.1 runs: the heads to rebuild, among "detector", "interactive" and "propagation" (default: all).
    """

    def __init__(
        self,
        uri: str,
        *,
        checkpoint: str | None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        sam2: bool = False,
        heads: Sequence[str] | None = None,
        bpe_path: str | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        from sam3core import build_sam3_vl_backbone, get_config

        self.uri = uri
        self.dataset = open_embeddings(uri, storage_options=storage_options)
        raw = (self.dataset.schema.metadata or {}).get(schema.METADATA_KEY)
        if raw is None:
            raise ValueError(f"{uri} has no {schema.METADATA_KEY.decode()} metadata: not written by sam3-embed")
        self.metadata: dict[str, Any] = json.loads(raw)
        if schema.TRUNK not in self.metadata.get("features", []) or schema.TRUNK not in self.dataset.schema.names:
            raise ValueError(
                f"{uri} stores no trunk maps (features: {self.metadata.get('features')}); "
                "run the job with output.features including 'trunk'"
            )
        model = self.metadata["model"]
        # refused before anything is built: the recorded generation against the recorded configuration's
        generation = model.get("generation", model["architecture"].get("generation", "sam3"))  # older runs: SAM 3
        built = get_config(model["config"]).generation
        if generation != built:
            raise ValueError(
                f"{uri} was written by a {generation} model, but {model['config']!r} builds {built}: "
                "its necks would not rebuild the run's features"
            )
        self.options = _head_options(generation, heads)
        resolved = local_checkpoint(checkpoint, storage_options)
        check_checkpoint(uri, model, checkpoint, resolved.sha256)
        if resolved.path is None:
            from pipeline.model.embed import RANDOM_WEIGHTS_SEED

            logger.warning("%s was written with random weights: rebuilding them from the pipeline's seed", uri)
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
        self.backbone = build_sam3_vl_backbone(
            resolved.path,
            config=model["config"],
            imgsz=self.metadata["image_size"],
            device=device,
            dtype=dtype,
            add_sam2_neck=sam2,
            bpe_path=bpe_path,
        )
        architecture = json.loads(json.dumps(self.backbone.config.to_dict()))
        recorded = {"generation": "sam3", **model["architecture"]}  # runs written before SAM 3.1 were all SAM 3
        if architecture != recorded:
            raise ValueError(f"{uri} was written by another architecture than the {model['config']!r} configuration")
        self.device = torch.device(device)
        self.dtype = dtype

    def iter_batches(
        self, ids: Sequence[str] | None = None, *, filter: Filters | None = None, batch_size: int = 8
    ) -> Iterator[CachedImages]:
        """Batches of at most `batch_size` ok rows, in storage order, read lazily (only the columns needed).

        ids: only these rows; filter: a pyarrow expression or DNF tuples on any column, partition columns included.
        """
        expression = pc.field(schema.STATUS) == schema.STATUS_OK
        if ids is not None:
            expression = expression & pc.field(schema.ID).isin(pa.array(list(ids), pa.string()))
        user = as_expression(filter)
        if user is not None:
            expression = expression & user
        pending: list[pa.RecordBatch] = []
        count = 0
        for record_batch in self.dataset.to_batches(columns=COLUMNS, filter=expression, batch_size=batch_size):
            pending.append(record_batch)
            count += record_batch.num_rows
            while count >= batch_size:
                table = pa.Table.from_batches(pending)
                yield self._images(table.slice(0, batch_size))
                rest = table.slice(batch_size)
                pending, count = rest.to_batches(), rest.num_rows
        if count:
            yield self._images(pa.Table.from_batches(pending))

    def load(self, ids: Sequence[str]) -> CachedImages:
        """Exactly these rows, in this order; a missing id or a row without a trunk map is an error naming it."""
        table = self.dataset.to_table(
            columns=[*COLUMNS, schema.STATUS], filter=pc.field(schema.ID).isin(pa.array(list(ids), pa.string()))
        )
        position = {row_id: i for i, row_id in enumerate(table.column(schema.ID).to_pylist())}
        missing = [row_id for row_id in ids if row_id not in position]
        if missing:
            raise KeyError(f"{len(missing)} ids not in {self.uri}: {missing[:5]}")
        statuses = table.column(schema.STATUS).to_pylist()
        failed = [row_id for row_id in ids if statuses[position[row_id]] != schema.STATUS_OK]
        if failed:
            raise ValueError(f"rows with status 'error' have no trunk map: {failed[:5]}")
        return self._images(table.take(pa.array([position[row_id] for row_id in ids])))

    def text(self, captions: list[str] | torch.Tensor) -> dict[str, torch.Tensor]:
        """`forward_text` of the same backbone: language_features [32, N, d], language_mask [N, 32] (True = padding)."""
        with torch.inference_mode():
            return self.backbone.forward_text(captions)

    def _images(self, table: pa.Table) -> CachedImages:
        column = table.column(schema.TRUNK).combine_chunks()
        maps = torch.from_numpy(np.array(column.to_numpy_ndarray()))  # [B, width, g, g]; Arrow's view is read-only
        heights, widths = table.column(schema.IMAGE_HEIGHT).to_pylist(), table.column(schema.IMAGE_WIDTH).to_pylist()
        sizes = zip(heights, widths, strict=True)
        return CachedImages(
            ids=table.column(schema.ID).to_pylist(),
            original_sizes=[(int(h), int(w)) for h, w in sizes],
            trunk=maps.to(device=self.device, dtype=self.dtype),
            backbone=self.backbone,
            options=self.options,
        )


_HEAD_SWITCHES = {
    "detector": "need_sam3_out",
    "interactive": "need_interactive_out",
    "propagation": "need_propagation_out",
}


def _head_options(generation: str, heads: Sequence[str] | None) -> dict[str, bool]:
    if heads is None:
        return {}
    if generation != "sam3.1":
        raise ValueError("heads= selects SAM 3.1's neck heads; this run was written by a SAM 3 model (use sam2=)")
    unknown = sorted(set(heads) - set(_HEAD_SWITCHES))
    if unknown:
        raise ValueError(f"unknown heads {unknown}; choose from {sorted(_HEAD_SWITCHES)}")
    return {switch: head in heads for head, switch in _HEAD_SWITCHES.items()}


def check_checkpoint(uri: str, model: dict[str, Any], checkpoint: str | None, sha256: str | None) -> None:
    """Refuses a checkpoint other than the run's: by SHA-256, or by name where neither side has a digest."""
    recorded, recorded_sha = model.get("checkpoint"), model.get("checkpoint_sha256")
    if recorded_sha is None and sha256 is None:
        if recorded == checkpoint:
            return
    elif recorded_sha == sha256:
        return
    raise CheckpointMismatchError(
        f"{uri} was written with checkpoint {recorded or 'none (random weights)'} (sha256 {recorded_sha or '-'}), "
        f"but {checkpoint or 'none (random weights)'} has sha256 {sha256 or '-'}: its neck would not rebuild the "
        "run's features; pass the checkpoint the run used"
    )
