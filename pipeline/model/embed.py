"""The model stage's worker: it builds the backbone once per actor and embeds batches of prepared records.

On a GPU the backbone runs in bfloat16 with the vision trunk compiled (both configurable); without one the same
class runs on the CPU, in bfloat16 (compiled) where the CPU has it natively and in float32 (eager) elsewhere
(`sam3core.cpu`), so a laptop runs the exact code a cluster runs. Compilation is paid in the constructor, on a
padded batch of the real batch size.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from pipeline.dataset import schema
from pipeline.model import arrow_features
from pipeline.model.compile_share import checkpoint_identity, expects_package, warm_up_shared
from pipeline.model.model_cache import local_checkpoint
from pipeline.model.neck_heads import (
    DENSE_HEADS,
    head_columns,
    head_levels,
    image_forward_options,
    unsupported_features,
)
from pipeline.model.settings import EmbedSettings
from sam3core.compile import (
    CPU_COMPILE_MIN_TFLOP,
    compile_fallback,
    compile_pays_off,
    is_compiled,
    is_out_of_memory,
    set_compile_threads,
    trunk_flops,
)
from sam3core.config import get_config
from sam3core.cpu import auto_dtype

logger = logging.getLogger(__name__)

_PART_NAMES = {"trunk": "the trunk's weights (in the package)", "text": "the text encoder (no captions)"}
RANDOM_WEIGHTS_SEED = 0  # every actor must build the same random model when no checkpoint is given
MAX_CAPTIONS_PER_FORWARD = 256


def compile_choice(settings: EmbedSettings, device: torch.device) -> tuple[str, str | None]:
    """`settings.compile`, or "off" with the reason when `auto` meets a CPU run too small to pay for compiling."""
    if settings.compile != "auto":
        return settings.compile, None
    # "auto" is resolved from the checkpoint later; both generations share the trunk
    config = get_config(settings.model_config.replace("auto", "sam3"))
    flops = trunk_flops(config, settings.imgsz)
    if compile_pays_off(device, settings.expected_rows, flops):
        return settings.compile, None
    work = (settings.expected_rows or 0) * flops / 1e12
    threshold = CPU_COMPILE_MIN_TFLOP
    return "off", f"{settings.expected_rows} rows at most, {work:.2g} TFLOP; compiling pays from {threshold:g}"


def compute_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        return auto_dtype(device)  # bfloat16 on GPUs and on CPUs that have it natively, else float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]


class EmbedWorker:
    """One model and its batches; a run's actors hold one each (`pipeline.model.actor.EmbedActor`, which keeps torch
    out of the driver), benchmarks and `sam3-embed compile` call it directly."""

    def __init__(self, settings: EmbedSettings, progress: Any = None) -> None:
        from sam3core import build_sam3_vl_backbone

        started = time.monotonic()
        _log_to_stderr_in_workers()
        self.settings = settings
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        self.progress = progress
        self.device = actor_device(settings.num_gpus)
        self.dtype = compute_dtype(settings.dtype, self.device)
        # Inductor's compile workers follow the host's cores; a pod may use only its CPU limit. The actor's own
        # reservation (one CPU on a GPU node) would serialise a compilation of minutes: it is a one-off cost.
        set_compile_threads(max(torch.get_num_threads(), usable_cpus()))
        self.output_dtype = np.dtype(settings.feature_dtype)
        resolved = local_checkpoint(settings.checkpoint, settings.storage_options)
        if resolved.path is None:
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
        compile_visual, self.compile_skipped = compile_choice(settings, self.device)
        self.backbone = build_sam3_vl_backbone(
            resolved.path,
            config=settings.model_config,
            imgsz=settings.imgsz,
            device=self.device,
            dtype=self.dtype,
            compile_visual=compile_visual,
            add_sam2_neck="sam2_backbone_fpn" in settings.features,
            bpe_path=settings.bpe_path,
            storage_options=None,  # the checkpoint is a local file by now (or a hub spec sam3core resolves)
            defer=self._parts_left_unbuilt(compile_visual),
        )
        self.d_model = self.backbone.config.d_model
        generation = self.backbone.config.generation
        unsupported = unsupported_features(generation, settings.features)
        if unsupported:
            raise ValueError(
                f"features {unsupported} need a SAM 3.1 checkpoint; the {self.backbone.config.name} model is SAM 3"
            )
        # SAM 3.1: only the neck heads the stored features read are computed
        self.image_options = image_forward_options(generation, settings.features)
        # Only the pooled embedding and vision_features wanted: the neck's other levels are skipped.
        wanted = set(settings.features)
        self.vision_only = not ({*DENSE_HEADS, schema.TRUNK} & wanted)
        built = time.monotonic() - started
        # Compilation (lazy) is paid here, on a padded batch of the real batch size, not by the first real batch;
        # once per cluster: the first actor publishes the compiled code, the others load it.
        try:
            self.warm_up_seconds, self.compile_outcome = warm_up_shared(
                self.backbone,
                batch_size=settings.batch_size,
                vision_features_only=self.vision_only,
                checkpoint_id=checkpoint_identity(resolved.sha256, resolved.path, RANDOM_WEIGHTS_SEED),
                cache_uri=settings.compile_cache,
                storage_options=settings.storage_options,
                wait_s=settings.compile_wait_s,
            )
        except Exception as exc:
            if is_out_of_memory(exc):
                raise RuntimeError(
                    f"{self.device.type.upper()} out of memory warming up the model on a batch of "
                    f"{settings.batch_size} images at {settings.imgsz} px: lower compute.batch_size "
                    f"(or store fewer dense features)"
                ) from exc
            raise
        compiled = is_compiled(self.backbone.vision_backbone)
        self.compiled = compiled
        # Why compiling failed and the model runs eagerly (None when it did not): in every file's metadata and in
        # the run summary, where a slow GPU run is explained.
        self.compile_fallback = compile_fallback(self.backbone.vision_backbone)
        self._split_warned = False
        self.run_description = {
            "run_id": settings.run_id,
            "package_version": settings.package_version,
            "model": {
                "config": self.backbone.config.name,  # "auto" resolved to the checkpoint's
                "generation": generation,
                "architecture": self.backbone.config.to_dict(),
                "checkpoint": settings.checkpoint,
                "checkpoint_sha256": resolved.sha256,
                "compute_dtype": str(self.dtype).removeprefix("torch."),
                "compiled_vision": compiled,
                "compile": self.backbone.compile_plan.describe() if compiled else "eager",
                "compile_fallback": self.compile_fallback,
                # how this actor got its compiled code: "loaded" (another actor's artifact), "compiled and
                # published", ...; None when not shared (pipeline.model.compile_share)
                "compile_outcome": self.compile_outcome.how if self.compile_outcome else None,
                "device": self.device.type,
            },
            "image_size": settings.imgsz,
            "feature_dtype": settings.feature_dtype,
            "features": list(settings.features),
            "pooling": schema.POOLING,
            **settings.extra_metadata,
        }
        self.metadata = _encoded(self.run_description)
        pending = self.backbone.pending_weights()
        logger.info(
            "model ready on %s with %d threads (%s, %s): built in %.1fs, warm-up%s %.1fs on a padded batch of %d%s",
            self.device,
            torch.get_num_threads(),
            self.dtype,
            self.backbone.compile_plan.describe()
            if compiled
            else ("eager: " + self.compile_skipped if self.compile_skipped else "eager"),
            built,
            f" and compilation ({self.compile_outcome.how if self.compile_outcome else 'not shared'})"
            if compiled
            else "",
            self.warm_up_seconds,
            settings.batch_size,
            f"; not built (not needed yet): {', '.join(_PART_NAMES[part] for part in pending)}" if pending else "",
        )

    def _parts_left_unbuilt(self, compile_visual: str) -> tuple[str, ...]:
        """What the model can be built without (`sam3core.deferred`): the trunk's weights where a shared package
        holds them (0.9 GB and seconds per actor for "sam3"), the text encoder where no row has a caption; either is
        made on its first call if one comes after all."""
        settings = self.settings
        parts = []
        if expects_package(settings.compile_cache, self.device, self.dtype, compile_visual):
            parts.append("trunk")
        if not settings.captions:
            parts.append("text")
        return tuple(parts)

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
        self._note_compile_fallback()
        embedded_at = {schema.EMBEDDED_AT_KEY: repr(time.time()).encode()}  # for the writer's first-file clock
        return out.replace_schema_metadata({**(out.schema.metadata or {}), **self.metadata, **embedded_at})

    def _note_compile_fallback(self) -> None:
        """A loaded library that failed during a batch (its module runs eagerly from then on) is recorded as a warm-up's
        fallback is: in the metadata of every file from then on, so the run summary names it."""
        reason = compile_fallback(self.backbone.vision_backbone)
        if reason != self.compile_fallback:
            self.compile_fallback = reason
            self.run_description["model"]["compile_fallback"] = reason
            self.metadata = _encoded(self.run_description)

    # Images ---------------------------------------------------------------------------------------------------

    def _image_columns(self, pixels: pa.ChunkedArray, ok: np.ndarray) -> tuple[dict[str, pa.Array], dict[int, str]]:
        """The image columns, and the rows that failed here (row -> reason), which are null in every column."""
        n, size = len(ok), self.settings.imgsz
        rows = np.flatnonzero(ok)
        pooled = arrow_features.empty_rows(n, (self.d_model,), self.output_dtype)
        dense: dict[str, np.ndarray] = {}
        if len(rows):
            uint8 = pixel_array(pixels, rows, size)  # [n_ok, S, S, 3], one copy out of the Arrow buffers
            outputs = self._forward_images_splitting(uint8)
            pooled[rows] = outputs.pop(schema.IMAGE_EMBEDDING)
            dense = outputs
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

    def _forward_images_splitting(self, uint8: np.ndarray, top: bool = True) -> dict[str, np.ndarray]:
        """`_forward_images`, and on device out-of-memory the batch again in halves (never a lost row).

        A halved batch on a compiled model is a new shape and compiles once more; a warning names the setting to
        lower. One image that does not fit raises, naming it too.
        """
        try:
            return self._forward_images(uint8, pad=top)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(uint8) == 1:
                raise RuntimeError(
                    f"{self.device.type.upper()} out of memory on a single image at {self.settings.imgsz} px "
                    f"(compute.batch_size {self.settings.batch_size}): the device is too small or shared; "
                    "lower compute.batch_size or model.imgsz, or store fewer dense features"
                ) from exc
            if not self._split_warned:
                logger.warning(
                    "%s out of memory on a batch of %d images at %d px: splitting it in halves; lower "
                    "compute.batch_size (now %d) to avoid this",
                    self.device.type.upper(),
                    len(uint8),
                    self.settings.imgsz,
                    self.settings.batch_size,
                )
                self._split_warned = True
        half = len(uint8) // 2
        first = self._forward_images_splitting(uint8[:half], top=False)
        second = self._forward_images_splitting(uint8[half:], top=False)
        return {name: np.concatenate([first[name], second[name]]) for name in first}

    def _forward_images(self, uint8: np.ndarray, pad: bool) -> dict[str, np.ndarray]:
        """[n, S, S, 3] uint8 -> the pooled embedding (under `image_embedding`) and each wanted dense map, on the
        host in the stored dtype, one row per image."""
        from sam3core import normalize_images

        wanted = set(self.settings.features)
        count = len(uint8)
        if pad and self.compiled and count < self.settings.batch_size:
            # A compiled trunk recompiles for every new batch size; short batches are padded instead.
            padding = np.zeros((self.settings.batch_size - count, *uint8.shape[1:]), dtype=np.uint8)
            uint8 = np.concatenate([uint8, padding])
        # uint8 crosses to the device (4x less than float32) and is normalized there.
        x = normalize_images(torch.from_numpy(uint8).to(self.device, non_blocking=True))
        if self.vision_only:
            trunk = None
            vision = self.backbone.forward_vision_features(x)[:count]  # [B, d, g, g]
            out = None
        else:
            # forward_image is exactly these two calls; the trunk map is kept for the `trunk` feature.
            trunk = self.backbone.forward_trunk(x)  # [B, width, g, g]
            out = _drop_padding(self.backbone.forward_image_from_trunk(trunk, **self.image_options), count)
            vision = out["vision_features"]
        # Pooled on the device, in float32; the host gets one tensor per output.
        outputs = {schema.IMAGE_EMBEDDING: self._to_numpy(F.normalize(vision.float().mean(dim=(2, 3)), dim=-1))}
        if trunk is not None and schema.TRUNK in wanted:
            outputs[schema.TRUNK] = self._to_numpy(trunk[:count])
        if schema.VISION_FEATURES in wanted:
            outputs[schema.VISION_FEATURES] = self._to_numpy(vision)
        for feature in (f for f in DENSE_HEADS if f in wanted and out is not None):
            levels = head_levels(out, feature)
            if levels is None:
                raise RuntimeError(f"{feature} requested but the backbone has no such neck head")
            for name, tensor in zip(head_columns(feature), levels, strict=True):
                outputs[name] = self._to_numpy(tensor)
        return outputs

    def _dense_image_columns(self) -> list[str]:
        wanted = set(self.settings.features)
        names = [schema.TRUNK] if schema.TRUNK in wanted else []
        if schema.VISION_FEATURES in wanted:
            names.append(schema.VISION_FEATURES)
        for feature in DENSE_HEADS:  # a fixed order
            if feature in wanted:
                names += head_columns(feature)
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


def actor_device(num_gpus: float | None) -> torch.device:
    """The device for an actor that reserved `num_gpus` GPUs from Ray (see `EmbedSettings.num_gpus`).

    Ray sets CUDA_VISIBLE_DEVICES to the GPU it assigned, so that GPU is `cuda:0` inside the actor.
    """
    if num_gpus is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if num_gpus <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        import os

        raise RuntimeError(
            f"this model actor reserved {num_gpus:g} GPU but CUDA is not usable in it (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): "
            "the image needs a CUDA build of torch and the node the NVIDIA driver; set compute.gpus_per_actor: 0 "
            "to run the model on CPUs instead"
        )
    return torch.device("cuda", 0)


def usable_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: its CPU affinity, capped by the container's CPU limit (a Kubernetes pod's
    `limits.cpu` becomes a CFS quota, which `os.cpu_count()` and the affinity do not show)."""
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit(cgroup_root)
    return max(1, min(cpus, limit)) if limit is not None else max(1, cpus)


def cgroup_cpu_limit(cgroup_root: str = "/sys/fs/cgroup") -> int | None:
    """The CFS quota in whole CPUs (rounded up), from cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`; None: none."""
    import math
    from pathlib import Path

    root = Path(cgroup_root)
    try:
        if (root / "cpu.max").exists():
            quota, period = (root / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
        v1 = root / "cpu"
        if (v1 / "cpu.cfs_quota_us").exists():
            quota = int((v1 / "cpu.cfs_quota_us").read_text())
            period = int((v1 / "cpu.cfs_period_us").read_text())
            return None if quota <= 0 else max(1, math.ceil(quota / period))
    except (OSError, ValueError):
        return None
    return None


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
    """The real rows of every level the pipeline stores (the compiled path pads short batches)."""
    kept: dict[str, Any] = {"vision_features": out["vision_features"][:rows]}
    for feature, (_, key) in DENSE_HEADS.items():
        levels = head_levels(out, feature)
        trimmed = None if levels is None else [level[:rows] for level in levels]
        if key is None:
            kept["backbone_fpn"] = trimmed
        else:
            kept[key] = None if trimmed is None else {"backbone_fpn": trimmed}
    return kept


def _encoded(description: dict[str, Any]) -> dict[bytes, bytes]:
    """The run's description as the Parquet schema metadata every output batch carries."""
    return {schema.METADATA_KEY: json.dumps(description, sort_keys=True).encode()}
