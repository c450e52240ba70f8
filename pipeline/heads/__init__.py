"""Adapters from a `FeatureCache` batch to the three places SAM 3's heads live.

- `meta_sam3`: Meta's `sam3` package (`Sam3Image.forward_grounding`, `Sam3Processor` state);
- `hf_transformers`: Hugging Face transformers' `Sam3Model(vision_embeds=..., text_embeds=...)`;
- `ultralytics_sam3`: ultralytics' `SAM3SemanticPredictor.inference_features`.

They build the inputs those packages read (keys, shapes, conventions taken from their code; see
docs/feature-cache.md). Only the transformers adapter imports its client (its output classes, when called), so the
pipeline depends on none of them.
"""

from pipeline.heads.hf_transformers import transformers_text_embeds, transformers_vision_embeds
from pipeline.heads.meta_sam3 import meta_backbone_out, sam3_processor_state
from pipeline.heads.ultralytics_sam3 import ultralytics_features

__all__ = [
    "meta_backbone_out",
    "sam3_processor_state",
    "transformers_text_embeds",
    "transformers_vision_embeds",
    "ultralytics_features",
]
