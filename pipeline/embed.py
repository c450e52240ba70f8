"""The model stage: a Ray Data actor that builds the backbone once and embeds batches of prepared records.

On a GPU the backbone runs in bfloat16 with the vision trunk compiled (both configurable); without one the same
class runs on the CPU in float32 (eager; bfloat16 there is compiled by default), so a laptop runs the exact code a
cluster runs. Compilation is paid in the constructor, on a padded batch of the real batch size.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from pipeline import arrow_features, schema
from pipeline.model_cache import local_checkpoint
from sam3core.compile import is_compiled

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS_SEED = 0  # every actor must build the same random model when no checkpoint is given
MAX_CAPTIONS_PER_FORWARD = 256


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
    storage_options: dict[str, Any] | None = None
    run_id: str = ""
    package_version: str = ""
    extra_metadata: dict[str, Any] = field(default_factory=dict)


def compute_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]


class EmbedWorker:
    """Callable class for `Dataset.map_batches(EmbedWorker, compute=ActorPoolStrategy(...), ...)`."""

    def __init__(self, settings: EmbedSettings, progress: Any = None) -> None:
        from sam3core import build_sam3_vl_backbone

        started = time.monotonic()
        _log_to_stderr_in_workers()
        self.settings = settings
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        self.progress = progress
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = compute_dtype(settings.dtype, self.device)
        self.output_dtype = np.dtype(settings.feature_dtype)
        resolved = local_checkpoint(settings.checkpoint, settings.storage_options)
        if resolved.path is None:
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
        self.backbone = build_sam3_vl_backbone(
            resolved.path,
            config=settings.model_config,
            imgsz=settings.imgsz,
            device=self.device,
            dtype=self.dtype,
            compile_visual=settings.compile,
            add_sam2_neck="sam2_backbone_fpn" in settings.features,
            bpe_path=settings.bpe_path,
            storage_options=None,  # the checkpoint is a local file by now (or a hub spec sam3core resolves)
        )
        self.d_model = self.backbone.config.d_model
        # Only the pooled embedding and vision_features wanted: the neck's other levels are skipped.
        wanted = set(settings.features)
        self.vision_only = not ({"backbone_fpn", "sam2_backbone_fpn", schema.TRUNK} & wanted)
        built = time.monotonic() - started
        # Compilation (lazy) is paid here, on a padded batch of the real batch size, not by the first real batch.
        self.warm_up_seconds = self.backbone.warm_up(settings.batch_size, vision_features_only=self.vision_only)
        compiled = is_compiled(self.backbone.vision_backbone)
        self.compiled = compiled
        self.metadata = {
            schema.METADATA_KEY: json.dumps(
                {
                    "run_id": settings.run_id,
                    "package_version": settings.package_version,
                    "model": {
                        "config": settings.model_config,
                        "architecture": self.backbone.config.to_dict(),
                        "checkpoint": settings.checkpoint,
                        "checkpoint_sha256": resolved.sha256,
                        "compute_dtype": str(self.dtype).removeprefix("torch."),
                        "compiled_vision": compiled,
                        "compile": self.backbone.compile_plan.describe() if compiled else "eager",
                        "device": self.device.type,
                    },
                    "image_size": settings.imgsz,
                    "feature_dtype": settings.feature_dtype,
                    "features": list(settings.features),
                    "pooling": schema.POOLING,
                    **settings.extra_metadata,
                },
                sort_keys=True,
            ).encode()
        }
        logger.info(
            "model ready on %s with %d threads (%s, %s): built in %.1fs, warm-up%s %.1fs on a padded batch of %d",
            self.device,
            torch.get_num_threads(),
            self.dtype,
            self.backbone.compile_plan.describe() if compiled else "eager",
            built,
            " and compilation" if compiled else "",
            self.warm_up_seconds,
            settings.batch_size,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = np.array([s == schema.STATUS_OK for s in batch.column(schema.STATUS).to_pylist()], dtype=bool)
        with torch.inference_mode():
            image_columns, failures = self._image_columns(batch.column(schema.PIXELS), ok)
            if failures:
                ok = ok.copy()
                ok[list(failures)] = False
            text_columns, text_failures = self._text_columns(batch.column(schema.TOKENS), ok)
        features = {**image_columns, **text_columns}
        if text_failures:  # a caption that embeds to NaN fails its row: its image columns go null too
            ok = ok.copy()
            ok[list(text_failures)] = False
            failures = {**failures, **text_failures}
            features = {name: arrow_features.null_rows(column, text_failures) for name, column in features.items()}
        out = batch.drop_columns([schema.PIXELS, schema.TOKENS])
        if failures:
            out = _mark_failed(out, failures)
        # The two pooled embeddings first, then the optional dense features in a fixed order.
        for name in sorted(features, key=lambda n: n not in (schema.IMAGE_EMBEDDING, schema.TEXT_EMBEDDING)):
            out = out.append_column(name, features[name])
        if self.progress is not None:
            self.progress.add.remote(int(ok.sum()), int((~ok).sum()))
        return out.replace_schema_metadata({**(out.schema.metadata or {}), **self.metadata})

    # Images ---------------------------------------------------------------------------------------------------

    def _image_columns(self, pixels: pa.ChunkedArray, ok: np.ndarray) -> tuple[dict[str, pa.Array], dict[int, str]]:
        """The image columns, and the rows that failed here (row -> reason), which are null in every column."""
        from sam3core import normalize_images

        n, size = len(ok), self.settings.imgsz
        rows = np.flatnonzero(ok)
        pooled = arrow_features.empty_rows(n, (self.d_model,), self.output_dtype)
        wanted = set(self.settings.features)
        dense: dict[str, np.ndarray] = {}
        if len(rows):
            uint8 = pixel_array(pixels, rows, size)  # [n_ok, S, S, 3], one copy out of the Arrow buffers
            if self.compiled and len(rows) < self.settings.batch_size:
                # A compiled trunk recompiles for every new batch size; short batches are padded instead.
                padding = np.zeros((self.settings.batch_size - len(rows), size, size, 3), dtype=np.uint8)
                uint8 = np.concatenate([uint8, padding])
            # uint8 crosses to the device (4x less than float32) and is normalized there.
            x = normalize_images(torch.from_numpy(uint8).to(self.device, non_blocking=True))
            if self.vision_only:
                trunk = None
                vision = self.backbone.forward_vision_features(x)[: len(rows)]  # [B, d, g, g]
                out = None
            else:
                # forward_image is exactly these two calls; the trunk map is kept for the `trunk` feature.
                trunk = self.backbone.forward_trunk(x)  # [B, width, g, g]
                out = _drop_padding(self.backbone.forward_image_from_trunk(trunk), len(rows))
                vision = out["vision_features"]
            # Pooled on the device, in float32; the host gets one tensor per output.
            pooled[rows] = self._to_numpy(F.normalize(vision.float().mean(dim=(2, 3)), dim=-1))
            if trunk is not None and schema.TRUNK in wanted:
                dense[schema.TRUNK] = self._to_numpy(trunk[: len(rows)])
            if schema.VISION_FEATURES in wanted:
                dense[schema.VISION_FEATURES] = self._to_numpy(vision)
            if out is not None and "backbone_fpn" in wanted:
                for level, tensor in enumerate(out["backbone_fpn"]):
                    dense[schema.fpn_column(level)] = self._to_numpy(tensor)
            if out is not None and "sam2_backbone_fpn" in wanted:
                sam2 = out["sam2_backbone_out"]
                if sam2 is None:
                    raise RuntimeError("sam2_backbone_fpn requested but the backbone has no SAM 2 neck")
                for level, tensor in enumerate(sam2["backbone_fpn"]):
                    dense[schema.fpn_column(level, sam2=True)] = self._to_numpy(tensor)
        # Every stored feature, the pooled embedding included (the one row a search index reads).
        stored = {schema.IMAGE_EMBEDDING: pooled[rows], **dense} if len(rows) else {}
        failures = _non_finite_rows(stored, rows, self.settings.feature_dtype)
        valid = ok.copy()
        valid[list(failures)] = False
        columns = {schema.IMAGE_EMBEDDING: arrow_features.vectors(pooled, valid)}
        for name in self._dense_image_columns():
            shape = self._dense_image_shape(name)
            full = arrow_features.empty_rows(n, shape, self.output_dtype)
            if name in dense:
                full[rows] = dense[name]
            columns[name] = arrow_features.tensors(full, valid)
        return columns, failures

    def _dense_image_columns(self) -> list[str]:
        wanted = set(self.settings.features)
        names = [schema.TRUNK] if schema.TRUNK in wanted else []
        if schema.VISION_FEATURES in wanted:
            names.append(schema.VISION_FEATURES)
        if "backbone_fpn" in wanted:
            names += [schema.fpn_column(level) for level in range(schema.FPN_LEVELS)]
        if "sam2_backbone_fpn" in wanted:
            names += [schema.fpn_column(level, sam2=True) for level in range(schema.FPN_LEVELS)]
        return names

    def _dense_image_shape(self, name: str) -> tuple[int, int, int]:
        grid = self.settings.imgsz // self.backbone.config.vision.patch_size
        if name == schema.TRUNK:
            return (self.backbone.config.vision.width, grid, grid)
        if name == schema.VISION_FEATURES:
            return (self.d_model, grid, grid)
        level = int(name.rsplit("_", 1)[1])
        side = grid * (4, 2, 1)[level]
        return (self.d_model, side, side)

    # Text -----------------------------------------------------------------------------------------------------

    def _text_columns(self, tokens: pa.ChunkedArray, ok: np.ndarray) -> tuple[dict[str, pa.Array], dict[int, str]]:
        """The text columns, and the rows whose captions embed to non-finite values (row -> reason): null."""
        n = len(ok)
        context = self.backbone.config.text.context_length
        per_row = tokens.to_pylist()
        counts = [len(t) if (t is not None and ok[i]) else 0 for i, t in enumerate(per_row)]
        has_text = np.array([c > 0 for c in counts], dtype=bool)
        flat = [ids for i, row in enumerate(per_row) if counts[i] for ids in row]
        total = len(flat)
        wanted = set(self.settings.features)
        d, width = self.d_model, self.backbone.config.text.width
        pooled = np.zeros((total, d), dtype=self.output_dtype)
        features = (
            np.zeros((total, context, d), dtype=self.output_dtype) if schema.LANGUAGE_FEATURES in wanted else None
        )
        masks = np.zeros((total, context), dtype=bool)
        embeds = (
            np.zeros((total, context, width), dtype=self.output_dtype) if schema.LANGUAGE_EMBEDS in wanted else None
        )
        for start in range(0, total, MAX_CAPTIONS_PER_FORWARD):
            chunk = torch.tensor(flat[start : start + MAX_CAPTIONS_PER_FORWARD], dtype=torch.long)
            stop = start + chunk.shape[0]
            out = self.backbone.forward_text(chunk.to(self.device))
            language = out["language_features"].float().transpose(0, 1)  # [N, L, d]
            padding = out["language_mask"]  # [N, L], True where padded
            real = (~padding).unsqueeze(-1).to(language.dtype)
            mean = (language * real).sum(dim=1) / real.sum(dim=1).clamp(min=1.0)
            pooled[start:stop] = self._to_numpy(F.normalize(mean, dim=-1))
            masks[start:stop] = padding.cpu().numpy()
            if features is not None:
                features[start:stop] = self._to_numpy(language)
            if embeds is not None:
                embeds[start:stop] = self._to_numpy(out["language_embeds"].float().transpose(0, 1))

        per_caption: dict[str, np.ndarray] = {schema.TEXT_EMBEDDING: pooled}
        if features is not None:
            per_caption[schema.LANGUAGE_FEATURES] = features
            per_caption[schema.LANGUAGE_MASK] = masks
        if embeds is not None:
            per_caption[schema.LANGUAGE_EMBEDS] = embeds
        caption_rows = np.repeat(np.arange(n), counts)  # caption -> its batch row
        checked = {name: values for name, values in per_caption.items() if name != schema.LANGUAGE_MASK}
        failures = _non_finite_rows(checked, caption_rows, self.settings.feature_dtype)
        if failures:
            has_text = has_text.copy()
            has_text[list(failures)] = False
        columns = {name: self._per_row(name, values, counts, has_text) for name, values in per_caption.items()}
        assert all(len(c) == n for c in columns.values())
        return columns, failures

    def _per_row(self, name: str, values: np.ndarray, counts: list[int], has_text: np.ndarray) -> pa.Array:
        """Per-caption arrays to one entry per row, or a list of entries per row when rows hold several captions."""
        build = arrow_features.vectors if values.ndim == 2 else arrow_features.tensors
        if self.settings.multi_caption:
            items = build(values, np.ones(len(values), dtype=bool))
            return arrow_features.ragged(items, counts, has_text)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        full = np.zeros((len(counts), *values.shape[1:]), dtype=values.dtype)
        full[has_text] = values[first[has_text]]
        return build(full, has_text)

    def _to_numpy(self, tensor: torch.Tensor) -> np.ndarray:
        # Cast on the device to the stored dtype, then one copy to the host.
        target = torch.float16 if self.output_dtype == np.float16 else torch.float32
        return tensor.detach().to(target).cpu().numpy()


def _log_to_stderr_in_workers() -> None:
    """Ray forwards an actor's stderr to the driver's log, but a worker process has no logging handler: give this
    module's logger one, so "model ready ... warm-up" reaches the run's log."""
    if logging.getLogger().handlers or logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def pixel_array(pixels: pa.ChunkedArray, rows: np.ndarray, size: int) -> np.ndarray:
    """The `rows` of a binary column of S*S*3 uint8 images as one [len(rows), S, S, 3] array.

    Reads the column's value buffer in place (no per-row Python bytes objects) and gathers the wanted rows.
    """
    array = pixels.combine_chunks() if isinstance(pixels, pa.ChunkedArray) else pixels
    if pa.types.is_large_binary(array.type):
        offset_type = np.int64
    elif pa.types.is_binary(array.type):
        offset_type = np.int32
    else:
        raise TypeError(f"pixel column must be binary, got {array.type}")
    _, offsets_buffer, data_buffer = array.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=offset_type)[array.offset : array.offset + len(array) + 1]
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.empty(0, np.uint8)
    image_bytes = size * size * 3
    starts = offsets[rows].astype(np.int64)
    lengths = offsets[rows + 1].astype(np.int64) - starts
    if np.any(lengths != image_bytes):
        raise ValueError(f"pixel rows must hold {image_bytes} bytes ({size}x{size} RGB)")
    batch = np.empty((len(rows), size, size, 3), dtype=np.uint8)
    flat = batch.reshape(len(rows), image_bytes)
    if len(rows) and np.all(np.diff(starts) == image_bytes):
        flat[:] = data[starts[0] : starts[0] + len(rows) * image_bytes].reshape(len(rows), image_bytes)
    else:
        for i, start in enumerate(starts):  # slices of the buffer copied in place, no Python bytes per row
            flat[i] = data[start : start + image_bytes]
    return batch


def _non_finite_rows(dense: dict[str, np.ndarray], rows: np.ndarray, feature_dtype: str) -> dict[int, str]:
    """Rows whose stored features hold inf or NaN (batch row -> reason): never written as numbers, failed instead.

    `rows[i]` is the batch row of `values[i]` (several entries map to one row when rows hold several captions).
    A NaN comes from the model (float16 compute that overflowed, a bad checkpoint); L2 normalisation passes it on.

    Casting to float16 turns anything beyond +-65504 into inf. The trunk map is the residual stream of a ViT,
    the one feature where large values are plausible (see docs/feature-cache.md), so the check covers every map.
    """
    failures: dict[int, str] = {}
    for name, values in dense.items():
        if not len(values):
            continue
        flat = values.reshape(len(values), -1)
        for index in np.flatnonzero(~np.isfinite(flat).all(axis=1)):
            row = int(rows[index])
            if row in failures:
                continue
            if feature_dtype == "float16":
                failures[row] = (
                    f"{name} has values beyond float16's range (+-65504) or not finite; "
                    "store it with output.feature_dtype: float32"
                )
            else:
                failures[row] = f"{name} holds non-finite values (the model's output overflowed)"
    return failures


def _mark_failed(table: pa.Table, failures: dict[int, str]) -> pa.Table:
    status = table.column(schema.STATUS).to_pylist()
    error = table.column(schema.ERROR).to_pylist()
    for row, reason in failures.items():
        status[row], error[row] = schema.STATUS_ERROR, reason
    table = table.set_column(table.schema.get_field_index(schema.STATUS), schema.STATUS, pa.array(status, pa.string()))
    return table.set_column(table.schema.get_field_index(schema.ERROR), schema.ERROR, pa.array(error, pa.string()))


def _drop_padding(out: dict[str, Any], rows: int) -> dict[str, Any]:
    sam2 = out["sam2_backbone_out"]
    sam2_levels = None if sam2 is None else {"backbone_fpn": [level[:rows] for level in sam2["backbone_fpn"]]}
    return {
        "vision_features": out["vision_features"][:rows],
        "backbone_fpn": [level[:rows] for level in out["backbone_fpn"]],
        "sam2_backbone_out": sam2_levels,
    }
