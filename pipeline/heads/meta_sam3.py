"""Meta's `sam3`: its heads read `forward_image`'s dictionary as it is, plus `forward_text`'s keys.

What they read (sam3 0.1.4): `Sam3Image._get_img_feats` takes `backbone_fpn[-1:]` and `vision_pos_enc[-1:]` indexed
by `find_input.img_ids` (and `id_mapping` when present); `_encode_prompt` takes `language_features[:, text_ids]` and
`language_mask[text_ids]`; the segmentation head takes the whole `backbone_fpn`. `Sam3Processor` keeps
`{"backbone_out", "original_height", "original_width"}` per image, and its `set_image` passes the SAM 2 levels 0 and
1 through the interactive predictor's `conv_s0` / `conv_s1` once. SAM 3.1 (Meta's repository after 2026-03-27, not
the wheel): `SAM3VLBackboneTri.forward_image` adds `vision_mask` and `interactive`, `sam2_backbone_out` holds the
propagation head, and `Sam3Processor.set_image` is unchanged (it stores that dictionary whole). Meta's heads edit
the dictionary in place (`pop("backbone_fpn")` without a segmentation head, the `conv_s*` above), so every call
here returns fresh containers around the cached tensors.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.cache.feature_cache import CachedImages

# The heads' sub-dictionaries: SAM 3's optional SAM 2 neck; SAM 3.1's interactive and propagation heads.
_HEAD_KEYS = ("interactive", "sam2_backbone_out")


def _fresh(out: dict[str, Any]) -> dict[str, Any]:
    """New dicts and lists around the same tensors, so a consumer's in-place edits never reach the cache."""
    copy = {key: list(value) if isinstance(value, list) else value for key, value in out.items()}
    for key in _HEAD_KEYS:
        if isinstance(out.get(key), dict):
            copy[key] = _fresh(out[key])
    return copy


def meta_backbone_out(images: CachedImages, text: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """`backbone_out` for `Sam3Image.forward_grounding(backbone_out=..., find_input=FindStage(img_ids, text_ids))`.

    The batch's images are `img_ids` 0..B-1 in `images.ids` order; `text` is `FeatureCache.text(prompts)` (or
    Meta's own `backbone.forward_text`), whose prompts are `text_ids` 0..N-1. A SAM 3.1 run gives SAM 3.1's
    dictionary (`interactive`, and the propagation head as `sam2_backbone_out`), as `SAM3VLBackboneTri` returns it.
    """
    out = _fresh(images.backbone_out)
    if text is not None:
        out.update(text)
    return out


def _one_image(part: dict[str, Any], index: int) -> dict[str, Any]:
    """Image `index` of every tensor in a `forward_image` dictionary, kept batch-first ([1, ...])."""
    single: dict[str, Any] = {}
    for key, value in part.items():
        if isinstance(value, list):
            single[key] = [t[index : index + 1] for t in value]
        elif isinstance(value, torch.Tensor):
            single[key] = value[index : index + 1]
        elif isinstance(value, dict):
            single[key] = _one_image(value, index)
        else:
            single[key] = value  # None: an absent SAM 2 neck, or the trunk's mask
    if "backbone_fpn" in single:
        single["vision_features"] = single["backbone_fpn"][-1]
    return single


def sam3_processor_state(images: CachedImages, index: int, processor: Any = None) -> dict[str, Any]:
    """What `Sam3Processor.set_image` leaves in its state for image `index`, without running the backbone.

    Then `processor.set_text_prompt(prompt, state)` runs the heads as usual. With the processor given, the levels
    under `sam2_backbone_out` (SAM 3's SAM 2 neck, SAM 3.1's propagation head) go through its interactive
    predictor's `conv_s0` / `conv_s1` exactly as `set_image` does; SAM 3.1's `interactive` levels are left as they are.
    """
    single = _one_image(images.backbone_out, index)
    sam2 = single.get("sam2_backbone_out")
    predictor = getattr(getattr(processor, "model", None), "inst_interactive_predictor", None)
    if sam2 is not None and predictor is not None:
        decoder = predictor.model.sam_mask_decoder
        levels = sam2["backbone_fpn"]
        with torch.inference_mode():
            levels[0] = decoder.conv_s0(levels[0])
            levels[1] = decoder.conv_s1(levels[1])
    height, width = images.original_sizes[index]
    return {"backbone_out": single, "original_height": height, "original_width": width}
