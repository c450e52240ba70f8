"""Hugging Face transformers: `Sam3Model(vision_embeds=..., text_embeds=..., attention_mask=...)`.

What it reads (transformers 5.x, `models/sam3/modeling_sam3.py`):
- `vision_embeds` is a `Sam3VisionEncoderOutput`, what `Sam3Model.get_vision_features` returns:
  `last_hidden_state` [B, g*g, width] (the ViT's output tokens: the trunk map, flattened row-major),
  `fpn_hidden_states` with all four levels (4x, 2x, 1x, 0.5x) and `fpn_position_encoding` for each. `forward` drops
  the last level itself (the `scalp` of Meta's backbone), so the 0.5x level must be there although it is unused:
  it is rebuilt here by the same neck, not filled with a placeholder.
- `text_embeds` is used as `text_embeds.pooler_output`, per token [N, 32, d] (`get_text_features` projects every
  token with the 1024 -> d `text_projection`, this backbone's `resizer`): `language_features` batch-first.
- `attention_mask` is True (1) where a token is real: the opposite of `language_mask`, which is True where padded.

SAM 3.1: transformers' open pull request (huggingface/transformers#46128) reuses `Sam3Model` for 3.1 images with a
neck of three scale factors (4, 2, 1) carrying the detector head (`convs`); the interactive and propagation heads
belong to its video and tracker models. For a 3.1 run `fpn_hidden_states` is therefore the detector head's three
levels, what `Sam3Model.get_vision_features` computes with `scale_factors=[4.0, 2.0, 1.0]` (checked by running
released transformers' `Sam3Model` so configured; the pull request's own code was not run).
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.cache.feature_cache import CachedImages


def transformers_vision_embeds(images: CachedImages) -> Any:
    """A `Sam3VisionEncoderOutput` for the batch (needs transformers>=5)."""
    from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

    trunk = images.trunk  # [B, width, g, g]
    neck = images.backbone.vision_backbone
    with torch.inference_mode():
        if images.backbone.config.generation == "sam3.1":
            levels, positions = neck.head_levels(images.backbone._trunk_input(trunk), "convs")  # three levels
        else:
            # All four levels: the neck computes them before `scalp` drops the last one.
            levels, positions, _, _ = neck.forward_from_trunk(trunk)
    return Sam3VisionEncoderOutput(
        last_hidden_state=trunk.flatten(2).transpose(1, 2),  # [B, g*g, width]
        fpn_hidden_states=tuple(levels),
        fpn_position_encoding=tuple(positions),
    )


def transformers_text_embeds(text: dict[str, torch.Tensor]) -> tuple[Any, torch.Tensor]:
    """(text_embeds, attention_mask) from `FeatureCache.text(prompts)`: one prompt per image of the batch."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    features = text["language_features"].transpose(0, 1)  # [32, N, d] -> [N, 32, d]
    attention_mask = (~text["language_mask"]).long()  # [N, 32], 1 where the token is real
    return BaseModelOutputWithPooling(pooler_output=features), attention_mask
