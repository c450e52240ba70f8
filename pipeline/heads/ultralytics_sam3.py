"""ultralytics: `SAM3SemanticPredictor.inference_features(features, src_shape, bboxes=None, labels=None, text=None)`.

What it reads (ultralytics 8.4.190, `models/sam/predict.py`, `sam3/sam3_image.py`): `features` is the dictionary its
own `get_im_features` returns, `model.backbone.forward_image(im)` for one image; `forward_grounding` expands
`backbone_fpn` and `vision_pos_enc` to the number of prompts (`SAM2Model._prepare_backbone_features`, batch 1
expected), takes the last level for the detector and the whole `backbone_fpn` for the segmentation head. Text goes
through its own `model.set_classes(text)`. `src_shape` is the image's (height, width): boxes and masks come back
at that size. Its preprocessing stretches the image to the square input (`LetterBox(scale_fill=True)`), as this
pipeline does.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.feature_cache import CachedImages


def ultralytics_features(
    images: CachedImages, index: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> tuple[dict[str, Any], tuple[int, int]]:
    """(features, src_shape) of image `index` for `predictor.inference_features(features, src_shape, text=[...])`.

    device, dtype: the predictor's (`predictor.device`, and its model's dtype when it runs in half precision).
    """
    out = images.backbone_out

    def one(tensor: torch.Tensor) -> torch.Tensor:
        return tensor[index : index + 1].to(device=device or tensor.device, dtype=dtype or tensor.dtype)

    levels = [one(f) for f in out["backbone_fpn"]]
    features: dict[str, Any] = {
        "vision_features": levels[-1],
        "vision_pos_enc": [one(p) for p in out["vision_pos_enc"]],
        "backbone_fpn": levels,
        "sam2_backbone_out": None,
    }
    return features, images.original_sizes[index]
