"""A transformers `Sam3Model` whose backbone is a sam3core configuration, loaded with the same weights.

The feature-cache proof (`tests/test_feature_cache.py`) and `bench/feature_cache.py` run transformers' own SAM 3
detector twice, from pixels and from `vision_embeds` built out of the pipeline's Parquet. Its backbone sizes come
from the project's configuration exactly as `tools/make_hf_key_list.py` maps them (that mapping produced the key list
the parity tests check the converter against); the backbone weights are the official-layout checkpoint converted by
`tests/hf_layout.py`. The heads (geometry encoder, DETR encoder and decoder, mask decoder, scoring) get deterministic
weights with the parity generator's scale rule (`tools/parity_weights.py`: spread 1/sqrt(fan_in), LayerNorm weights
near 1), so their activations are O(1) and masks and scores react to the features instead of sitting at zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sam3core import Sam3Config
from tests.hf_layout import DETECTOR_PREFIX, official_to_hf
from tools.make_hf_key_list import transformers_detector_config
from tools.parity_weights import deterministic_tensor


def transformers_config(config: Sam3Config, imgsz: int, *, small_heads: bool) -> Any:
    """transformers' `Sam3Config`: the backbone of `config` at `imgsz`; heads at their default size or tiny."""
    from transformers import Sam3Config as HFSam3Config

    detector = transformers_detector_config(config)
    backbone = detector["vision_config"]["backbone_config"]
    backbone["image_size"] = imgsz
    backbone["layer_norm_eps"] = config.vision.layer_norm_eps  # transformers' default is 1e-6, SAM 3's is 1e-5
    width = config.d_model
    if small_heads:
        layers = {"hidden_size": width, "num_attention_heads": 4, "intermediate_size": 2 * width}
        detector["geometry_encoder_config"] = {**layers, "num_layers": 1}
        detector["detr_encoder_config"] = {**layers, "num_layers": 1}
        detector["detr_decoder_config"] = {**layers, "num_layers": 2, "num_queries": 10}
        detector["mask_decoder_config"] = {"hidden_size": width, "num_attention_heads": 4}
    return HFSam3Config(**detector)


def transformers_sam3_model(
    official_state: Mapping[str, torch.Tensor], config: Sam3Config, imgsz: int, *, small_heads: bool = True
) -> Any:
    """`Sam3Model` in eval mode: backbone weights from `official_state` (sam3.pt layout), deterministic heads."""
    from transformers import Sam3Model

    model = Sam3Model(transformers_config(config, imgsz, small_heads=small_heads))
    backbone = {k.removeprefix(DETECTOR_PREFIX): v for k, v in official_to_hf(official_state).items()}
    backbone = {k: v for k, v in backbone.items() if not k.startswith("tracker_neck.")}  # the video model's
    # Parameters only: buffers (RoPE tables and the like) keep the values transformers computed.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            value = backbone.pop(name, None)
            if value is None:
                value = deterministic_tensor(f"hf_heads.{name}", parameter.shape)
            parameter.copy_(value)
    assert not backbone, f"backbone tensors the transformers model has no place for: {sorted(backbone)[:5]}"
    return model.eval()
