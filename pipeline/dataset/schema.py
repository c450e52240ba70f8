"""Names of the output columns and of the Parquet key-value metadata: the contract docs/schema.md describes."""

from __future__ import annotations

ID = "id"
SOURCE_URI = "source_uri"
IMAGE_WIDTH = "image_width"
IMAGE_HEIGHT = "image_height"
IMAGE_SHA256 = "image_sha256"
CAPTION = "caption"
CAPTIONS = "captions"
STATUS = "status"
ERROR = "error"
IMAGE_EMBEDDING = "image_embedding"
TEXT_EMBEDDING = "text_embedding"
VISION_FEATURES = "vision_features"
TRUNK = "trunk"  # the ViT trunk's last map [width, g, g]: every neck output is rebuilt from it (feature cache)
LANGUAGE_FEATURES = "language_features"
LANGUAGE_MASK = "language_mask"
LANGUAGE_EMBEDS = "language_embeds"
WEBDATASET_JSON = "json"  # webdataset input only: each sample's `.json` member, as text
FPN_LEVELS = 3  # backbone_fpn_0 (4x the ViT grid), _1 (2x), _2 (the grid itself); the same for every neck head

STATUS_OK = "ok"
STATUS_ERROR = "error"
# A row whose image repeats another row's, waiting for that row's image features: written by the model actor,
# turned into `ok` (or `error`) before the run commits, so no committed file holds it (pipeline.dataset.copies).
STATUS_COPY = "copy"

# Columns the pipeline writes itself; a manifest column with one of these names would be ambiguous.
RESERVED_COLUMNS = frozenset(
    {
        ID,
        SOURCE_URI,
        IMAGE_WIDTH,
        IMAGE_HEIGHT,
        IMAGE_SHA256,
        CAPTION,
        CAPTIONS,
        STATUS,
        ERROR,
        IMAGE_EMBEDDING,
        TEXT_EMBEDDING,
        VISION_FEATURES,
        TRUNK,
        LANGUAGE_FEATURES,
        LANGUAGE_MASK,
        LANGUAGE_EMBEDS,
    }
    | {f"backbone_fpn_{level}" for level in range(FPN_LEVELS)}
    | {f"sam2_backbone_fpn_{level}" for level in range(FPN_LEVELS)}
    | {f"interactive_backbone_fpn_{level}" for level in range(FPN_LEVELS)}  # SAM 3.1's interactive head
)

# Internal columns carried from the CPU stage to the model stage; never written.
PIXELS = "__pixels"
TOKENS = "__tokens"

METADATA_KEY = b"sam3_embed"  # JSON: model, checkpoint, image size, dtypes, pooling, version, run id
# Wall-clock seconds at which a block left the model (schema metadata of the model stage's blocks): the writer's
# first-file clock starts there (pipeline.run.file_groups) and removes it; never written.
EMBEDDED_AT_KEY = b"sam3_embed.embedded_at"
SUMMARY_FILE = "_summary.json"
SUCCESS_FILE = "_SUCCESS"

POOLING = {
    IMAGE_EMBEDDING: "mean of vision_features over all spatial positions, then L2-normalized",
    TEXT_EMBEDDING: "mean of language_features over real tokens (language_mask False), then L2-normalized",
}


def fpn_column(level: int, sam2: bool = False) -> str:
    return f"{'sam2_' if sam2 else ''}backbone_fpn_{level}"
