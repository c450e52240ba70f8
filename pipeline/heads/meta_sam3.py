"""Meta's `sam3`: its heads read `forward_image`'s dictionary as it is, plus `forward_text`'s keys.

What they read (sam3 0.1.4): `Sam3Image._get_img_feats` takes `backbone_fpn[-1:]` and `vision_pos_enc[-1:]` indexed
by `find_input.img_ids` (and `id_mapping` when present); `_encode_prompt` takes `language_features[:, text_ids]` and
`language_mask[text_ids]`; the segmentation head takes the whole `backbone_fpn`. `Sam3Processor` keeps
`{"backbone_out", "original_height", "original_width"}` per image, and its `set_image` passes the SAM 2 levels 0 and
1 through the interactive predictor's `conv_s0` / `conv_s1` once. Meta's heads edit the dictionary in place
(`pop("backbone_fpn")` without a segmentation head, the `conv_s*` above), so every call here returns fresh
containers around the cached tensors.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.feature_cache import CachedImages


def _fresh(out: dict[str, Any]) -> dict[str, Any]:
    """New dicts and lists around the same tensors, so a consumer's in-place edits never reach the cache."""
    copy = {key: list(value) if isinstance(value, list) else value for key, value in out.items()}
    if out.get("sam2_backbone_out") is not None:
        copy["sam2_backbone_out"] = _fresh(out["sam2_backbone_out"])
    return copy


def meta_backbone_out(images: CachedImages, text: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """`backbone_out` for `Sam3Image.forward_grounding(backbone_out=..., find_input=FindStage(img_ids, text_ids))`.

    The batch's images are `img_ids` 0..B-1 in `images.ids` order; `text` is `FeatureCache.text(prompts)` (or
    Meta's own `backbone.forward_text`), whose prompts are `text_ids` 0..N-1.
    """
    out = _fresh(images.backbone_out)
    if text is not None:
        out.update(text)
    return out


def sam3_processor_state(images: CachedImages, index: int, processor: Any = None) -> dict[str, Any]:
    """What `Sam3Processor.set_image` leaves in its state for image `index`, without running the backbone.

    Then `processor.set_text_prompt(prompt, state)` runs the heads as usual. With the processor given, the SAM 2
    levels go through its interactive predictor's `conv_s0` / `conv_s1` exactly as `set_image` does.
    """
    one = images.backbone_out
    single = {
        "vision_features": one["vision_features"][index : index + 1],
        "vision_pos_enc": [p[index : index + 1] for p in one["vision_pos_enc"]],
        "backbone_fpn": [f[index : index + 1] for f in one["backbone_fpn"]],
        "sam2_backbone_out": None,
    }
    single["vision_features"] = single["backbone_fpn"][-1]
    sam2 = one.get("sam2_backbone_out")
    if sam2 is not None:
        levels = [f[index : index + 1] for f in sam2["backbone_fpn"]]
        single["sam2_backbone_out"] = {
            "vision_features": levels[-1],
            "vision_pos_enc": [p[index : index + 1] for p in sam2["vision_pos_enc"]],
            "backbone_fpn": levels,
        }
        predictor = getattr(getattr(processor, "model", None), "inst_interactive_predictor", None)
        if predictor is not None:
            decoder = predictor.model.sam_mask_decoder
            with torch.inference_mode():
                levels[0] = decoder.conv_s0(levels[0])
                levels[1] = decoder.conv_s1(levels[1])
    height, width = images.original_sizes[index]
    return {"backbone_out": single, "original_height": height, "original_width": width}
