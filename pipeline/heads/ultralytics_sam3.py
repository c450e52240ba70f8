"""ultralytics: `SAM3SemanticPredictor.inference_features(features, src_shape, bboxes=None, labels=None, text=None)`.

What it reads (ultralytics 8.4.190, `models/sam/predict.py`, `sam3/sam3_image.py`): `features` is the dictionary its
own `get_im_features` returns, `model.backbone.forward_image(im)` for one image; `forward_grounding` expands
`backbone_fpn` and `vision_pos_enc` to the number of prompts (`SAM2Model._prepare_backbone_features`, batch 1
expected), takes the last level for the detector and the whole `backbone_fpn` for the segmentation head. Text goes
through its own `model.set_classes(text)`. `src_shape` is the image's (height, width): boxes and masks come back
at that size. Its preprocessing stretches the image to the square input (`LetterBox(scale_fill=True)`), as this
pipeline does.

SAM 3.1 (ultralytics 8.4.148+, #26144): `sam3.1_multiplex.pt` is loaded into the SAM 3 modules by renaming keys,
the detector head `convs.0-2` onto its `convs` (its fourth, 0.5x level keeps random weights, which `scalp` drops) and
`interactive_convs` onto `sam2_convs`, the neck its point-prompt `SAM3Predictor` reads; `propagation_convs` has no
place there. So `features` for the semantic predictor are the detector head's levels, as for SAM 3, and
`interactive=True` adds the interactive head as `sam2_backbone_out`, where ultralytics' SAM 3 neck puts `sam2_convs`.
Checked by keys and shapes against its code; ultralytics was not run (it needs torchvision).
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.cache.feature_cache import CachedImages


def ultralytics_features(
    images: CachedImages,
    index: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    interactive: bool = False,
) -> tuple[dict[str, Any], tuple[int, int]]:
    """(features, src_shape) of image `index` for `predictor.inference_features(features, src_shape, text=[...])`.

    device, dtype: the predictor's (`predictor.device`, and its model's dtype when it runs in half precision).
    interactive: SAM 3.1 runs: also the interactive head, as `sam2_backbone_out` (see above).
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
    if interactive:
        head = out.get("interactive")
        if head is None:
            raise ValueError("interactive=True needs a SAM 3.1 run (SAM 3 has no interactive head)")
        sam2 = [one(f) for f in head["backbone_fpn"]]
        features["sam2_backbone_out"] = {
            "vision_features": sam2[-1],
            "vision_pos_enc": [one(p) for p in head["vision_pos_enc"]],
            "backbone_fpn": sam2,
        }
    return features, images.original_sizes[index]
