"""Which neck head each dense pyramid feature reads, for SAM 3 and SAM 3.1 checkpoints.

Three optional features store a head's levels (4x, 2x and 1x the ViT grid), one column per level:
- `backbone_fpn` (`backbone_fpn_<level>`): the detector head, both generations (`backbone_fpn` of `forward_image`);
- `sam2_backbone_fpn` (`sam2_backbone_fpn_<level>`): what `forward_image` returns as `sam2_backbone_out`, SAM 3's
  optional `sam2_convs` neck, or SAM 3.1's propagation head (`propagation_convs`, the video tracker's);
- `interactive_backbone_fpn` (`interactive_backbone_fpn_<level>`): SAM 3.1's interactive head (`interactive_convs`,
  point and box prompts); a SAM 3 checkpoint has none.
A SAM 3.1 forward computes only the heads a run stores (its `need_*` switches); the detector head always runs, since
the pooled `image_embedding` is the mean of its `vision_features`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pipeline.dataset import schema

# feature name -> (column prefix, key of `forward_image`'s dictionary holding the head; None: the top level)
DENSE_HEADS: dict[str, tuple[str, str | None]] = {
    "backbone_fpn": ("", None),
    "sam2_backbone_fpn": ("sam2_", "sam2_backbone_out"),
    "interactive_backbone_fpn": ("interactive_", "interactive"),
}
SAM31_ONLY = frozenset({"interactive_backbone_fpn"})


def head_columns(feature: str) -> list[str]:
    prefix, _ = DENSE_HEADS[feature]
    return [f"{prefix}backbone_fpn_{level}" for level in range(schema.FPN_LEVELS)]


def head_levels(out: dict[str, Any], feature: str) -> list[Any] | None:
    """The levels of `feature`'s head in a `forward_image` dictionary, or None when the head was not computed."""
    _, key = DENSE_HEADS[feature]
    part = out if key is None else out.get(key)
    return None if part is None else part.get("backbone_fpn")


def image_forward_options(generation: str, features: Iterable[str]) -> dict[str, bool]:
    """Keyword arguments for `forward_image_from_trunk`: SAM 3.1's heads a run needs; none for SAM 3."""
    if generation != "sam3.1":
        return {}
    wanted = set(features)
    return {
        "need_sam3_out": True,
        "need_interactive_out": "interactive_backbone_fpn" in wanted,
        "need_propagation_out": "sam2_backbone_fpn" in wanted,
    }


def unsupported_features(generation: str, features: Iterable[str]) -> list[str]:
    """Features a checkpoint of this generation cannot produce."""
    return sorted(SAM31_ONLY & set(features)) if generation == "sam3" else []
